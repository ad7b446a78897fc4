//! The JSON the filter reads and writes: a strict RFC 8259 reader into a
//! small [`Value`] tree, and the string escaping for the documents it serves.
//!
//! Why not serde_json here: every byte of the module is compiled by each of
//! a sidecar's V8 isolates, and the memory that costs stays with the pod. In
//! the filter, serde_json and its derives were about 38 KB of the module, and
//! its error messages format floats, which links about 20 KB of float
//! printing the filter never uses (figures from `twiggy top` of the release
//! build; `bench-filter` reports what the module costs a sidecar). The filter
//! reads two small documents, `pluginConfig` once and the broker's answer
//! once per refresh, and needs no more than this. serde_json stays the oracle:
//! the unit tests and the `filter_json` fuzz target hold this reader to it.
//!
//! Errors carry a kind and an offset, never the input: a broker body holds
//! secrets, and a message quoting it could reach a log.

use std::fmt;

use crate::hex;

/// Nesting deeper than this is refused, where serde_json refuses it: the
/// reader recurses, and an attacker's `[[[[...` must not exhaust the stack.
pub const MAX_DEPTH: usize = 127;

/// A JSON value. Objects keep their members in document order, duplicates
/// included: the code reading an object decides what a duplicate means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    /// A number as written; its grammar is checked, its range is not.
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The number as a `u64` if it is written as one (digits only, no sign,
    /// fraction or exponent) and fits.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Self::Number(text) if text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(text) => Some(text),
            _ => None,
        }
    }

    /// The JSON type's name, for error messages that must not quote values.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::String(_) => "a string",
            Self::Array(_) => "an array",
            Self::Object(_) => "an object",
        }
    }
}

/// Why a document is not JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    /// Byte offset where reading stopped.
    pub offset: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The document ended inside a value.
    Eof,
    /// Anything else that is not JSON, invalid UTF-8 included.
    Syntax,
    /// Nested deeper than [`MAX_DEPTH`].
    Depth,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Eof => f.write_str("JSON ends early")?,
            ErrorKind::Syntax => f.write_str("not JSON")?,
            ErrorKind::Depth => write!(f, "JSON nested deeper than {MAX_DEPTH}")?,
        }
        write!(f, " at byte {}", self.offset)
    }
}

/// Reads one JSON document: a value with only whitespace around it.
pub fn parse(bytes: &[u8]) -> Result<Value, Error> {
    let mut reader = Reader { bytes, at: 0 };
    let value = reader.value(0)?;
    reader.skip_whitespace();
    if reader.at < bytes.len() {
        return Err(reader.error(ErrorKind::Syntax));
    }
    Ok(value)
}

/// Appends `text` as a JSON string: quoted, with `"`, `\` and control
/// characters escaped as serde_json escapes them.
pub fn push_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            ..0x20 => {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&hex::pair(byte, hex::LOWER));
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn error(&self, kind: ErrorKind) -> Error {
        Error { kind, offset: self.at }
    }

    /// The error for the byte at the cursor: end of input, or a bad byte.
    fn unexpected(&self) -> Error {
        self.error(if self.at >= self.bytes.len() { ErrorKind::Eof } else { ErrorKind::Syntax })
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Result<u8, Error> {
        let byte = self.peek().ok_or_else(|| self.error(ErrorKind::Eof))?;
        self.at += 1;
        Ok(byte)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Consumes `byte`, after any whitespace.
    fn expect(&mut self, byte: u8) -> Result<(), Error> {
        self.skip_whitespace();
        if self.peek() != Some(byte) {
            return Err(self.unexpected());
        }
        self.at += 1;
        Ok(())
    }

    /// After an array item or object member: `true` at `close`, `false` at
    /// a comma (another follows).
    fn end_of(&mut self, close: u8) -> Result<bool, Error> {
        self.skip_whitespace();
        let at_close = self.peek() == Some(close);
        if !at_close && self.peek() != Some(b',') {
            return Err(self.unexpected());
        }
        self.at += 1;
        Ok(at_close)
    }

    /// Consumes `word` (after its first byte was seen).
    fn literal(&mut self, word: &[u8], value: Value) -> Result<Value, Error> {
        for &expected in word {
            if self.peek() != Some(expected) {
                return Err(self.unexpected());
            }
            self.at += 1;
        }
        Ok(value)
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        self.skip_whitespace();
        match self.peek() {
            None => Err(self.error(ErrorKind::Eof)),
            Some(b'n') => self.literal(b"null", Value::Null),
            Some(b't') => self.literal(b"true", Value::Bool(true)),
            Some(b'f') => self.literal(b"false", Value::Bool(false)),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'[') => self.array(depth + 1),
            Some(b'{') => self.object(depth + 1),
            Some(_) => Err(self.error(ErrorKind::Syntax)),
        }
    }

    fn digits(&mut self) -> Result<(), Error> {
        if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
            return Err(self.unexpected());
        }
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        Ok(())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Result<Value, Error> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            _ => self.digits()?,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.digits()?;
        }
        // Only ASCII digits and signs were consumed: always UTF-8.
        let text = std::str::from_utf8(&self.bytes[start..self.at]).unwrap_or_default();
        Ok(Value::Number(text.to_owned()))
    }

    fn string(&mut self) -> Result<String, Error> {
        self.at += 1; // the opening quote
        let mut text = Vec::new();
        loop {
            // Copy the run up to the next quote, backslash or control byte.
            let run = self.bytes[self.at..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            let end = run.map_or(self.bytes.len(), |n| self.at + n);
            text.extend_from_slice(&self.bytes[self.at..end]);
            self.at = end;
            match self.next()? {
                b'"' => break,
                b'\\' => self.escape(&mut text)?,
                _ => {
                    self.at -= 1;
                    return Err(self.error(ErrorKind::Syntax));
                }
            }
        }
        String::from_utf8(text).map_err(|_| self.error(ErrorKind::Syntax))
    }

    fn escape(&mut self, text: &mut Vec<u8>) -> Result<(), Error> {
        let byte = match self.next()? {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let c = self.unicode_escape()?;
                text.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                return Ok(());
            }
            _ => {
                self.at -= 1;
                return Err(self.error(ErrorKind::Syntax));
            }
        };
        text.push(byte);
        Ok(())
    }

    /// The character of `\uXXXX` (after the `u`), joining a surrogate pair;
    /// a lone surrogate is refused, as serde_json refuses it.
    fn unicode_escape(&mut self) -> Result<char, Error> {
        let first = self.hex4()?;
        let code = match first {
            0xd800..=0xdbff => {
                if self.next()? != b'\\' || self.next()? != b'u' {
                    self.at -= 1;
                    return Err(self.error(ErrorKind::Syntax));
                }
                let second = self.hex4()?;
                if !(0xdc00..=0xdfff).contains(&second) {
                    return Err(self.error(ErrorKind::Syntax));
                }
                0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
            }
            0xdc00..=0xdfff => return Err(self.error(ErrorKind::Syntax)),
            _ => first,
        };
        char::from_u32(code).ok_or_else(|| self.error(ErrorKind::Syntax))
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let mut code = 0;
        for _ in 0..4 {
            let digit = self.peek().and_then(|b| char::from(b).to_digit(16)).ok_or_else(|| self.unexpected())?;
            self.at += 1;
            code = code * 16 + digit;
        }
        Ok(code)
    }

    fn array(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(self.error(ErrorKind::Depth));
        }
        self.at += 1; // [
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            if self.end_of(b']')? {
                return Ok(Value::Array(items));
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, Error> {
        if depth > MAX_DEPTH {
            return Err(self.error(ErrorKind::Depth));
        }
        self.at += 1; // {
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.unexpected());
            }
            let name = self.string()?;
            self.expect(b':')?;
            members.push((name, self.value(depth)?));
            if self.end_of(b'}')? {
                return Ok(Value::Object(members));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn string(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    fn kind(json: &str) -> ErrorKind {
        parse(json.as_bytes()).unwrap_err().kind
    }

    #[test]
    fn every_json_type_reads() {
        let value = parse(br#" {"a": [null, true, false, -0.5e+3, 12, "x"], "b": {}, "a": []} "#).unwrap();
        let items = vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Number("-0.5e+3".into()),
            Value::Number("12".into()),
            string("x"),
        ];
        assert_eq!(
            value,
            Value::Object(vec![
                ("a".into(), Value::Array(items)),
                ("b".into(), Value::Object(vec![])),
                ("a".into(), Value::Array(vec![])),
            ])
        );
    }

    #[test]
    fn escapes_and_surrogate_pairs_decode() {
        assert_eq!(parse(br#""\"\\\/\b\f\n\r\t\u00e9\uD83D\uDE00""#).unwrap(), string("\"\\/\u{8}\u{c}\n\r\té😀"));
        assert_eq!(parse("\"ünï\"".as_bytes()).unwrap(), string("ünï"));
    }

    #[test]
    fn numbers_follow_the_json_grammar() {
        for ok in ["0", "-0", "10", "1.5", "1e9", "1E+9", "-1.25e-3", "18446744073709551616"] {
            assert_eq!(parse(ok.as_bytes()).unwrap(), Value::Number(ok.to_owned()), "{ok}");
        }
        for bad in ["01", "+1", ".5", "1.", "1e", "-", "0x10", "1.e5", "NaN", "Infinity"] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(parse(b"18446744073709551615").unwrap().as_u64(), Some(u64::MAX));
        for not_u64 in ["18446744073709551616", "-1", "1.0", "1e3", "-0"] {
            assert_eq!(parse(not_u64.as_bytes()).unwrap().as_u64(), None, "{not_u64}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_its_kind() {
        for (json, want) in [
            ("", ErrorKind::Eof),
            ("{\"a\":", ErrorKind::Eof),
            ("[1,", ErrorKind::Eof),
            ("\"abc", ErrorKind::Eof),
            ("\"\\u12", ErrorKind::Eof),
            ("{\"a\" 1}", ErrorKind::Syntax),
            ("{a:1}", ErrorKind::Syntax),
            ("[1,]", ErrorKind::Syntax),
            ("{\"a\":1,}", ErrorKind::Syntax),
            ("[1 2]", ErrorKind::Syntax),
            ("{} {}", ErrorKind::Syntax),
            ("tru", ErrorKind::Eof),
            ("nul1", ErrorKind::Syntax),
            ("\"tab\there\"", ErrorKind::Syntax),
            ("\"\\x\"", ErrorKind::Syntax),
            ("\"\\uD800\"", ErrorKind::Syntax),
            ("\"\\uDC00\"", ErrorKind::Syntax),
            ("\"\\uD800\\u0041\"", ErrorKind::Syntax),
            ("'single'", ErrorKind::Syntax),
            ("\u{feff}{}", ErrorKind::Syntax),
        ] {
            assert_eq!(kind(json), want, "{json:?}");
        }
        assert_eq!(parse(b"\"\xff\"").unwrap_err().kind, ErrorKind::Syntax);
        assert_eq!(parse(b"{\"a\":1} x").unwrap_err(), Error { kind: ErrorKind::Syntax, offset: 8 });
    }

    #[test]
    fn nesting_is_bounded_like_serde_json() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(kind(&nested(MAX_DEPTH + 1)), ErrorKind::Depth);
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH)).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH + 1)).is_err());
        // Far past the bound, the reader stops before the stack does.
        assert_eq!(kind(&"[".repeat(100_000)), ErrorKind::Depth);
    }

    #[test]
    fn errors_never_quote_the_input() {
        let err = parse(br#"{"SecretAccessKey": secret-in-the-clear}"#).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(err.to_string(), "not JSON at byte 20");
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for text in ["plain", "quote \" and \\ slash /", "line\nbreak\r\ttab", "\u{0}\u{1f}\u{8}\u{c}\u{7f}", "é😀", ""]
        {
            let mut out = Vec::new();
            push_string(&mut out, text);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), serde_json::to_string(text).unwrap(), "{text:?}");
            assert_eq!(parse(&out).unwrap(), string(text));
        }
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let json = r#"{"Code":"Success","n":[1,-2.5e3,{"x":null}],"t":true,"u":"\u00e9\n"}"#;
        let ours = parse(json.as_bytes()).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(to_serde(&ours), theirs);
    }

    fn to_serde(value: &Value) -> serde_json::Value {
        match value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(text) => serde_json::from_str(text).unwrap(),
            Value::String(text) => serde_json::Value::String(text.clone()),
            Value::Array(items) => serde_json::Value::Array(items.iter().map(to_serde).collect()),
            Value::Object(members) => {
                serde_json::Value::Object(members.iter().map(|(k, v)| (k.clone(), to_serde(v))).collect())
            }
        }
    }
}
