//! The proxy-wasm floor: about the least a Rust proxy-wasm HTTP filter can
//! be. It answers every request with one fixed body, its plugin
//! configuration, so `bench-filter` can hand it the bytes the imds-mesh
//! filter serves for a cached credential and compare like with like: what
//! Envoy's Wasm VM and the proxy-wasm SDK cost on their own (memory per
//! sidecar, requests per second), and what the imds-mesh filter adds on top.
//! Test tooling only, built like the filter (`just floor-filter`).
//!
//! Only for `wasm32-wasip1`; on other targets the crate is empty, so the
//! workspace's native builds and lints pass over it.
#![forbid(unsafe_code)]

#[cfg(target_os = "wasi")]
mod floor {
    use std::rc::Rc;

    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(Root { body: Rc::from(Vec::new()) }));
    }}

    /// Holds the body every request is answered with.
    struct Root {
        body: Rc<[u8]>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
            self.body = Rc::from(self.get_plugin_configuration().unwrap_or_default());
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Answer(Rc::clone(&self.body))))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    /// One request, answered with the body at once.
    struct Answer(Rc<[u8]>);

    impl Context for Answer {}

    impl HttpContext for Answer {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            self.send_http_response(200, vec![("content-type", "application/json")], Some(&self.0));
            Action::Pause
        }
    }
}
