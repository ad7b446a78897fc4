//! A raw HTTP/1.1 client. Real SDKs are tested elsewhere; this one exists
//! to send exactly the bytes a test names, including ones no SDK would.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request, built up and then sent as literal bytes.
#[derive(Debug, Clone)]
pub struct Req {
    method: String,
    path: Vec<u8>,
    host: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    pub fn new(method: &str, path: impl Into<Vec<u8>>) -> Self {
        Self { method: method.to_owned(), path: path.into(), host: None, headers: Vec::new(), body: Vec::new() }
    }

    pub fn get(path: impl Into<Vec<u8>>) -> Self {
        Self::new("GET", path)
    }

    pub fn put(path: impl Into<Vec<u8>>) -> Self {
        Self::new("PUT", path)
    }

    /// `PUT /latest/api/token` with the TTL header.
    pub fn token(ttl: &str) -> Self {
        Self::put("/latest/api/token").header("X-aws-ec2-metadata-token-ttl-seconds", ttl)
    }

    /// The `Host` header; the IMDS address unless set.
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The exact bytes sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.path);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let host = self.host.as_deref().unwrap_or("169.254.169.254");
        out.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        if !self.body.is_empty() || self.method == "PUT" || self.method == "POST" {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Sends the request on a new connection and reads the whole reply.
    pub async fn send(&self, addr: SocketAddr) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.write_all(&self.to_bytes()).await.unwrap_or_else(|e| panic!("write to {addr}: {e}"));
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap_or_else(|e| panic!("read from {addr}: {e}"));
        Reply::parse(&raw, self.method == "HEAD")
    }
}

/// A parsed response, with the raw bytes kept for byte-level comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub raw: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8], head: bool) -> Self {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = response.parse(raw) else {
            panic!("not an HTTP response: {:?}", String::from_utf8_lossy(raw));
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
            .collect();
        let rest = &raw[len..];
        let body = if head {
            Vec::new()
        } else {
            match headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok()) {
                Some(n) => rest[..n.min(rest.len())].to_vec(),
                None => rest.to_vec(),
            }
        };
        Self { status: response.code.unwrap_or(0), headers, body, raw: raw.to_vec() }
    }

    /// A header's value (names are lower-cased).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body_text()))
    }
}
