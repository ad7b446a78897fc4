//! A raw HTTP/1.1 client. Real SDKs are tested elsewhere; this one exists
//! to send exactly the bytes a test names, including ones no SDK would.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::pki::TlsClient;

/// A request, built up and then sent as literal bytes.
#[derive(Debug, Clone)]
pub struct Req {
    method: String,
    path: Vec<u8>,
    host: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Sends the body chunked, then these trailers.
    trailers: Option<Vec<(String, String)>>,
    source: Option<IpAddr>,
}

impl Req {
    pub fn new(method: &str, path: impl Into<Vec<u8>>) -> Self {
        let (headers, body) = (Vec::new(), Vec::new());
        Self { method: method.to_owned(), path: path.into(), host: None, headers, body, trailers: None, source: None }
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

    /// Sends the body with `Transfer-Encoding: chunked`, as one chunk,
    /// followed by `trailers`.
    pub fn chunked(mut self, trailers: &[(&str, &str)]) -> Self {
        self.trailers = Some(trailers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect());
        self
    }

    /// Connects from `address` (a loopback address standing for a pod's IP,
    /// or for the broker sidecar's `127.0.0.6`) instead of the kernel's
    /// choice, `127.0.0.1`.
    pub fn source(mut self, address: IpAddr) -> Self {
        self.source = Some(address);
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
        if let Some(trailers) = &self.trailers {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
            if !self.body.is_empty() {
                out.extend_from_slice(format!("{:x}\r\n", self.body.len()).as_bytes());
                out.extend_from_slice(&self.body);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n");
            for (name, value) in trailers {
                out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            return out;
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
        let stream = connect(addr, self.source).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        self.exchange(stream).await.unwrap_or_else(|e| panic!("{addr}: {e}"))
    }

    /// Sends the request over a new TLS connection made by `client`. An
    /// error is the server refusing the connection (or failing it).
    pub async fn send_tls(&self, client: &TlsClient, addr: SocketAddr) -> std::io::Result<Reply> {
        self.exchange(client.connect_from(addr, self.source).await?).await
    }

    async fn exchange(&self, mut stream: impl AsyncRead + AsyncWrite + Unpin) -> std::io::Result<Reply> {
        stream.write_all(&self.to_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok(Reply::parse(&raw, self.method == "HEAD"))
    }

    /// Sends the request and returns once the response head has arrived,
    /// for bodies that stream (a Kubernetes watch).
    pub async fn open(&self, addr: SocketAddr) -> Streaming {
        let mut stream = connect(addr, self.source).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.write_all(&self.to_bytes()).await.unwrap_or_else(|e| panic!("write to {addr}: {e}"));
        let mut raw = Vec::new();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&raw) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers: Vec<(String, String)> = response
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect();
                    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
                    return Streaming {
                        status: response.code.unwrap_or(0),
                        headers,
                        stream,
                        raw: raw[len..].to_vec(),
                        body: Vec::new(),
                        chunked,
                        ended: false,
                    };
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => panic!("not an HTTP response ({e}): {:?}", String::from_utf8_lossy(&raw)),
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap_or_else(|e| panic!("read from {addr}: {e}"));
            assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
    }
}

/// A TCP connection to `addr`, from `source` (any port) if given.
pub async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else { return TcpStream::connect(addr).await };
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// A response whose body is read as it arrives (chunked or until close).
#[derive(Debug)]
pub struct Streaming {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    stream: TcpStream,
    /// Received body bytes not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked body bytes not yet returned.
    body: Vec<u8>,
    chunked: bool,
    ended: bool,
}

impl Streaming {
    /// A header's value (names are lower-cased).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The next newline-terminated line of the body, without the newline;
    /// `None` once the body has ended (a last unterminated line is
    /// returned first).
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=at).collect();
                return Some(String::from_utf8_lossy(&line[..at]).into_owned());
            }
            if self.ended {
                return (!self.body.is_empty())
                    .then(|| String::from_utf8_lossy(&std::mem::take(&mut self.body)).into_owned());
            }
            self.dechunk();
            if self.ended || self.body.contains(&b'\n') {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    self.dechunk();
                    self.ended = true;
                }
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Moves complete chunks (or, unchunked, everything) from `raw` to
    /// `body`; marks the end at the last chunk.
    fn dechunk(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size_field = String::from_utf8_lossy(&self.raw[..line_end]);
            let size_hex = size_field.split(';').next().unwrap_or_default().trim();
            let Ok(size) = usize::from_str_radix(size_hex, 16) else {
                panic!("bad chunk size line {size_field:?}");
            };
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
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
