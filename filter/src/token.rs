//! Stateless IMDSv2 session tokens.
//!
//! A token is `hex(expiry || HMAC-SHA256(key, DOMAIN || expiry)[..MAC_LEN])`,
//! in lowercase hex: 48 characters.
//! The key is random per Envoy process and shared by every worker through
//! proxy-wasm shared data, so any worker can check a token another issued,
//! and nothing is stored per token.

use hmac::digest::KeyInit;
use hmac::digest::generic_array::GenericArray;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cache::SharedStore;
use crate::hex;

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

/// Shared-data key of the process-wide token key.
pub const SHARED_KEY: &str = "imds-mesh/v1/token-key";
/// Shared-data key written only for the version Envoy gives the write.
const CLAIM_KEY: &str = "imds-mesh/v1/token-key-claim";

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

/// The process-wide token key: the one in shared data, or `fresh` if this
/// root context is the first to configure. Root contexts configure
/// concurrently (one per worker), and every one must end up with the same
/// key, or tokens one worker issued are 401 on another.
///
/// Envoy's compare-and-swap cannot say "only if absent": a write carrying a
/// version succeeds on a missing key, and a plain write overwrites. But
/// versions come from one counter for all of shared data
/// (proxy-wasm-cpp-host's `SharedData::nextCas`), so a version just given
/// to another key ([`CLAIM_KEY`]) is one the token key cannot have: a write
/// carrying it succeeds only while the token key is absent. Exactly one
/// creator wins; everyone, the winner included, adopts what is stored.
pub fn shared_key(store: &impl SharedStore, fresh: &[u8; KEY_LEN]) -> Option<[u8; KEY_LEN]> {
    let stored = || store.get(SHARED_KEY).and_then(|(bytes, _)| <[u8; KEY_LEN]>::try_from(bytes.as_slice()).ok());
    if let Some(key) = stored() {
        return Some(key);
    }
    store.set(CLAIM_KEY, b"claim", None);
    let (_, claim) = store.get(CLAIM_KEY)?;
    store.set(SHARED_KEY, fresh, Some(claim));
    stored()
}

/// Issues and checks tokens with one process-wide key.
pub struct TokenSigner {
    mac: Hmac<Sha256>,
    /// Tokens that verified, with their expiry (zero: an empty slot).
    memo: [([u8; 2 * TOKEN_LEN], u64); MEMO_SLOTS],
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
        Self { mac, memo: [([0; 2 * TOKEN_LEN], 0); MEMO_SLOTS], next_slot: 0 }
    }

    /// A token valid until `now_ms + ttl_seconds`.
    pub fn issue(&self, now_ms: u64, ttl_seconds: u64) -> String {
        let expiry_ms = now_ms.saturating_add(ttl_seconds.saturating_mul(1000));
        let mut raw = [0u8; TOKEN_LEN];
        raw[..EXPIRY_LEN].copy_from_slice(&expiry_ms.to_be_bytes());
        raw[EXPIRY_LEN..].copy_from_slice(&self.tag(expiry_ms)[..MAC_LEN]);
        let mut text = String::with_capacity(2 * TOKEN_LEN);
        hex::push_lower(&mut text, &raw);
        text
    }

    /// Checks a token presented at `now_ms`.
    pub fn verify(&mut self, token: &[u8], now_ms: u64) -> Result<(), BadToken> {
        if let Some((_, expiry_ms)) = self.memo.iter().find(|(known, expiry_ms)| *expiry_ms > 0 && known == token) {
            return if now_ms < *expiry_ms { Ok(()) } else { Err(BadToken::Expired) };
        }
        // Lowercase only, so each token has one spelling.
        let raw: [u8; TOKEN_LEN] = hex::decode_lower(token).ok_or(BadToken::Malformed)?;
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
        // A token that decoded has exactly this length.
        if let Ok(known) = token.try_into() {
            self.memo[self.next_slot] = (known, expiry_ms);
            self.next_slot = (self.next_slot + 1) % MEMO_SLOTS;
        }
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
    use std::cell::Cell;

    use super::*;
    use crate::cache::memory::MemoryStore;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_800_000_000_000;

    fn signer(seed: u8) -> TokenSigner {
        TokenSigner::new(&[seed; KEY_LEN])
    }

    /// Shared data where a rival root context configures from start to
    /// finish just before this one's first write to `cut_in_before`.
    struct Racing<'a> {
        inner: &'a MemoryStore,
        cut_in_before: &'static str,
        rival: Cell<Option<[u8; KEY_LEN]>>,
        rival_adopted: Cell<Option<[u8; KEY_LEN]>>,
    }

    impl SharedStore for Racing<'_> {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }

        fn set(&self, key: &str, value: &[u8], version: Option<u32>) -> bool {
            if key == self.cut_in_before
                && let Some(rival) = self.rival.take()
            {
                self.rival_adopted.set(shared_key(self.inner, &rival));
            }
            self.inner.set(key, value, version)
        }
    }

    #[test]
    fn root_contexts_configuring_at_once_adopt_one_token_key() {
        for cut_in_before in [CLAIM_KEY, SHARED_KEY] {
            let store = MemoryStore::default();
            let racing = Racing {
                inner: &store,
                cut_in_before,
                rival: Cell::new(Some([2; KEY_LEN])),
                rival_adopted: Cell::new(None),
            };
            let mine = shared_key(&racing, &[1; KEY_LEN]);
            assert_eq!(racing.rival_adopted.get(), Some([2; KEY_LEN]), "the rival came first and won");
            assert_eq!(mine, Some([2; KEY_LEN]), "the loser adopts the winner's key ({cut_in_before})");
            // Tokens cross between them.
            let token = TokenSigner::new(&[2; KEY_LEN]).issue(NOW, 60);
            assert_eq!(TokenSigner::new(&mine.unwrap()).verify(token.as_bytes(), NOW), Ok(()));
        }
    }

    #[test]
    fn the_first_root_context_creates_the_token_key_and_later_ones_read_it() {
        let store = MemoryStore::default();
        assert_eq!(shared_key(&store, &[1; KEY_LEN]), Some([1; KEY_LEN]));
        assert_eq!(shared_key(&store, &[2; KEY_LEN]), Some([1; KEY_LEN]));
        store.set(SHARED_KEY, b"short", None);
        assert_eq!(shared_key(&store, &[3; KEY_LEN]), None, "a malformed stored key is never replaced");
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
        assert!(token.len() == 48 && token.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{token}");
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
        let mut raw: [u8; TOKEN_LEN] = hex::decode_lower(token.as_bytes()).unwrap();
        raw[7] ^= 0x01; // stretch the expiry
        let tampered: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s.verify(tampered.as_bytes(), NOW), Err(BadToken::Forged));
        let upper = token.to_ascii_uppercase();
        let short = &token.as_bytes()[..token.len() - 2];
        for junk in [&b""[..], b"x", b"!!!!", &[0xff; 48], short, upper.as_bytes(), &[b'g'; 48]] {
            assert_eq!(s.verify(junk, NOW), Err(BadToken::Malformed));
        }
    }
}
