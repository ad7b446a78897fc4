//! Hex digits as the filter writes and reads them: IMDSv2 tokens and the
//! broker authority in lowercase, percent-encoding in uppercase (RFC 3986
//! section 2.1), JSON's `\u00XX` escapes in lowercase as serde_json writes
//! them. These few lines stand in for the `hex` and `percent-encoding`
//! crates, which cost the module about 2 KB (`twiggy top` of the release
//! build); each use is tested against `format!`'s hex or the crate.

pub const LOWER: &[u8; 16] = b"0123456789abcdef";
pub const UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// The two digits of `byte`, from `digits`.
pub fn pair(byte: u8, digits: &[u8; 16]) -> [u8; 2] {
    [digits[usize::from(byte >> 4)], digits[usize::from(byte & 0xf)]]
}

/// Appends `bytes` in lowercase hex.
pub fn push_lower(out: &mut String, bytes: &[u8]) {
    for &byte in bytes {
        let [high, low] = pair(byte, LOWER);
        out.push(char::from(high));
        out.push(char::from(low));
    }
}

/// The `N` bytes spelled by exactly `2 * N` lowercase hex digits; `None` for
/// any other text, so each value has one spelling.
pub fn decode_lower<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |d: &u8| LOWER.iter().position(|h| h == d).and_then(|v| u8::try_from(v).ok());
    let (pairs, []) = text.as_chunks::<2>() else { return None };
    if pairs.len() != N {
        return None;
    }
    let mut bytes = [0u8; N];
    for (byte, [high, low]) in bytes.iter_mut().zip(pairs) {
        *byte = digit(high)? << 4 | digit(low)?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn lowercase_hex_is_what_format_writes_and_reads_back() {
        let bytes: Vec<u8> = (0..=255).collect();
        let mut text = String::new();
        push_lower(&mut text, &bytes);
        assert_eq!(text, bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert_eq!(decode_lower::<256>(text.as_bytes()).map(Vec::from), Some(bytes));
        assert_eq!(pair(0xaf, UPPER), *b"AF");
    }

    #[test]
    fn only_exact_lowercase_hex_decodes() {
        assert_eq!(decode_lower::<2>(b"0aff"), Some([0x0a, 0xff]));
        for bad in [&b"0AFF"[..], b"0af", b"0aff00", b"", b"0g00", b"+aff", b" aff"] {
            assert_eq!(decode_lower::<2>(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
