//! Stateless IMDSv2 session tokens.
//!
//! A token is `base64url(expiry || HMAC-SHA256(key, DOMAIN || expiry)[..MAC_LEN])`.
//! The key is random per Envoy process and shared by every worker through
//! proxy-wasm shared data, so any worker can check a token another issued,
//! and nothing is stored per token.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::digest::KeyInit;
use hmac::digest::generic_array::GenericArray;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of key material; HMAC-SHA256's block-size-independent strength.
pub const KEY_LEN: usize = 32;
/// Truncated MAC length: 128 bits is far beyond online guessing.
const MAC_LEN: usize = 16;
const EXPIRY_LEN: usize = 8;
const TOKEN_LEN: usize = EXPIRY_LEN + MAC_LEN;
/// Separates these MACs from any other use of the key.
const DOMAIN: &[u8] = b"imds-mesh token v1\0";

/// The TTL bounds IMDS enforces on `X-aws-ec2-metadata-token-ttl-seconds`.
pub const MIN_TTL_SECONDS: u64 = 1;
pub const MAX_TTL_SECONDS: u64 = 21_600;

/// Tokens remembered as valid per worker, so SDKs that reuse one token for
/// hours cost a comparison instead of an HMAC per request.
const MEMO_SLOTS: usize = 4;

/// Why a TTL header was refused (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTtl {
    Missing,
    NotANumber,
    OutOfRange,
}

/// Why a token was refused (answered with 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadToken {
    Malformed,
    Forged,
    Expired,
}

/// Parses the TTL header as IMDS does: decimal seconds in 1..=21600.
pub fn parse_ttl(header: Option<&[u8]>) -> Result<u64, BadTtl> {
    let text = header.ok_or(BadTtl::Missing)?;
    if text.is_empty() || text.len() > 6 || !text.iter().all(u8::is_ascii_digit) {
        return Err(BadTtl::NotANumber);
    }
    let ttl = text.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    if (MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl) { Ok(ttl) } else { Err(BadTtl::OutOfRange) }
}

/// Issues and checks tokens with one process-wide key.
pub struct TokenSigner {
    mac: Hmac<Sha256>,
    memo: [Option<(Vec<u8>, u64)>; MEMO_SLOTS],
    next_slot: usize,
}

impl TokenSigner {
    /// A signer for `key` (exactly [`KEY_LEN`] bytes, from shared data).
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        // HMAC zero-pads keys shorter than its 64-byte block, so padding here
        // gives the same MAC as `new_from_slice` without a fallible call.
        let mut block = [0u8; 64];
        block[..KEY_LEN].copy_from_slice(key);
        let mac = <Hmac<Sha256> as KeyInit>::new(GenericArray::from_slice(&block));
        Self { mac, memo: Default::default(), next_slot: 0 }
    }

    /// A token valid until `now_ms + ttl_seconds`.
    pub fn issue(&self, now_ms: u64, ttl_seconds: u64) -> String {
        let expiry_ms = now_ms.saturating_add(ttl_seconds.saturating_mul(1000));
        let mut raw = [0u8; TOKEN_LEN];
        raw[..EXPIRY_LEN].copy_from_slice(&expiry_ms.to_be_bytes());
        raw[EXPIRY_LEN..].copy_from_slice(&self.tag(expiry_ms)[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a token presented at `now_ms`.
    pub fn verify(&mut self, token: &[u8], now_ms: u64) -> Result<(), BadToken> {
        if let Some((_, expiry_ms)) = self.memo.iter().flatten().find(|(known, _)| known.as_slice() == token) {
            return if now_ms < *expiry_ms { Ok(()) } else { Err(BadToken::Expired) };
        }
        let mut raw = [0u8; TOKEN_LEN];
        match URL_SAFE_NO_PAD.decode_slice(token, &mut raw) {
            Ok(TOKEN_LEN) => {}
            _ => return Err(BadToken::Malformed),
        }
        let (expiry, tag) = raw.split_at(EXPIRY_LEN);
        let mut expiry_bytes = [0u8; EXPIRY_LEN];
        expiry_bytes.copy_from_slice(expiry);
        let expiry_ms = u64::from_be_bytes(expiry_bytes);
        let mut mac = self.mac.clone();
        mac.update(DOMAIN);
        mac.update(&expiry_bytes);
        mac.verify_truncated_left(tag).map_err(|_| BadToken::Forged)?;
        if now_ms >= expiry_ms {
            return Err(BadToken::Expired);
        }
        self.memo[self.next_slot] = Some((token.to_vec(), expiry_ms));
        self.next_slot = (self.next_slot + 1) % MEMO_SLOTS;
        Ok(())
    }

    fn tag(&self, expiry_ms: u64) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(DOMAIN);
        mac.update(&expiry_ms.to_be_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_800_000_000_000;

    fn signer(seed: u8) -> TokenSigner {
        TokenSigner::new(&[seed; KEY_LEN])
    }

    #[test]
    fn ttl_header_follows_imds_rules() {
        assert_eq!(parse_ttl(Some(b"1")), Ok(1));
        assert_eq!(parse_ttl(Some(b"21600")), Ok(21_600));
        assert_eq!(parse_ttl(None), Err(BadTtl::Missing));
        assert_eq!(parse_ttl(Some(b"")), Err(BadTtl::NotANumber));
        assert_eq!(parse_ttl(Some(b"-1")), Err(BadTtl::NotANumber));
        assert_eq!(parse_ttl(Some(b"60s")), Err(BadTtl::NotANumber));
        assert_eq!(parse_ttl(Some(b" 60")), Err(BadTtl::NotANumber));
        assert_eq!(parse_ttl(Some(b"99999999999999999999")), Err(BadTtl::NotANumber));
        assert_eq!(parse_ttl(Some(b"0")), Err(BadTtl::OutOfRange));
        assert_eq!(parse_ttl(Some(b"21601")), Err(BadTtl::OutOfRange));
    }

    #[test]
    fn issued_token_is_valid_until_its_ttl_ends() {
        let mut s = signer(1);
        let token = s.issue(NOW, 60);
        assert_eq!(s.verify(token.as_bytes(), NOW), Ok(()));
        assert_eq!(s.verify(token.as_bytes(), NOW + 59_999), Ok(()));
        assert_eq!(s.verify(token.as_bytes(), NOW + 60_000), Err(BadToken::Expired));
        // A fresh signer (no memo) agrees.
        assert_eq!(signer(1).verify(token.as_bytes(), NOW + 60_000), Err(BadToken::Expired));
    }

    #[test]
    fn token_from_another_key_is_forged() {
        let token = signer(1).issue(NOW, 60);
        assert_eq!(signer(2).verify(token.as_bytes(), NOW), Err(BadToken::Forged));
    }

    #[test]
    fn tampered_token_is_refused() {
        let mut s = signer(1);
        let token = s.issue(NOW, 60);
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[7] ^= 0x01; // stretch the expiry
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(s.verify(tampered.as_bytes(), NOW), Err(BadToken::Forged));
        for junk in [&b""[..], b"x", b"!!!!", &[0xff; 32], &token.as_bytes()[..token.len() - 1]] {
            assert_eq!(s.verify(junk, NOW), Err(BadToken::Malformed));
        }
    }
}
