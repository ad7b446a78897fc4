//! The proxy-wasm floor: about the least a Rust proxy-wasm HTTP filter can
//! be. It answers every request with one fixed body, its plugin
//! configuration, so `bench-filter` can hand it the bytes the imds-mesh
//! filter serves for a cached credential and compare like with like: what
//! Envoy's Wasm VM and the proxy-wasm SDK cost on their own (memory per
//! sidecar, requests per second), and what the imds-mesh filter adds on top.
//! Under the root id `read-headers` it first reads the request's header
//! list, in the one host call the imds-mesh filter makes for it: the floor
//! of any filter that answers from the request, as an IMDS answer must.
//! Test tooling only, built like the filter (`just floor-filter`).
//!
//! Only for `wasm32-wasip1`; on other targets the crate is empty, so the
//! workspace's native builds and lints pass over it.
#![forbid(unsafe_code)]

#[cfg(target_os = "wasi")]
mod floor {
    use std::rc::Rc;

    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

    /// The root id (`root_id` of the plugin) under which the floor reads the
    /// request headers before answering; the harness's floor listeners use it.
    const READ_HEADERS_ROOT_ID: &[u8] = b"read-headers";

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(Root { body: Rc::from(Vec::new()), read_headers: false }));
    }}

    /// Holds the body every request is answered with.
    struct Root {
        body: Rc<[u8]>,
        read_headers: bool,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
            self.body = Rc::from(self.get_plugin_configuration().unwrap_or_default());
            let root_id = hostcalls::get_property(vec!["plugin_root_id"]).ok().flatten();
            self.read_headers = root_id.as_deref() == Some(READ_HEADERS_ROOT_ID);
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Answer { body: Rc::clone(&self.body), read_headers: self.read_headers }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// One request, answered with the body at once (after reading its
    /// headers, under [`READ_HEADERS_ROOT_ID`]).
    struct Answer {
        body: Rc<[u8]>,
        read_headers: bool,
    }

    impl Context for Answer {}

    impl HttpContext for Answer {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            if self.read_headers {
                let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
            }
            self.send_http_response(200, vec![("content-type", "application/json")], Some(&self.body));
            Action::Pause
        }
    }
}
