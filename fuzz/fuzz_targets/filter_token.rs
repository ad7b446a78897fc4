//! IMDSv2 tokens (`TokenSigner::issue`/`verify`) and the TTL header
//! (`token::parse_ttl`).
//!
//! Invariants: a token verifies exactly when it is byte for byte one this
//! run minted with the key and `now` is before its expiry; a token minted
//! with another key, a minted token with one byte changed, and any other
//! byte string never verify; the per-worker memo changes no answer; the TTL
//! parser accepts exactly 1 to 6 decimal digits whose value is in
//! 1..=21600.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use imds_filter::token::{self, MAX_TTL_SECONDS, MIN_TTL_SECONDS, TokenSigner};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Issue {
        now_ms: u64,
        ttl: u64,
    },
    /// Verify the `index`th minted token at its expiry plus `delta_ms`.
    VerifyMinted {
        index: u8,
        delta_ms: i32,
    },
    /// Verify a minted token with byte `at` replaced by `with`.
    VerifyChanged {
        index: u8,
        at: u8,
        with: u8,
        now_ms: u64,
    },
    VerifyRaw {
        token: Vec<u8>,
        now_ms: u64,
    },
    /// A token of the other key, verified with ours.
    VerifyForeign {
        now_ms: u64,
        ttl: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Keys {
    key: [u8; 32],
    other_key: [u8; 32],
}

struct Input {
    key: [u8; 32],
    other_key: [u8; 32],
    ops: Vec<Op>,
}

/// `token` is valid at `now_ms` iff it is one of `minted` not yet expired.
fn expected(minted: &[(Vec<u8>, u64)], token: &[u8], now_ms: u64) -> bool {
    minted.iter().any(|(t, expiry)| t == token && now_ms < *expiry)
}

// `<TTL header>\n<keys and operations>`; without a newline, no TTL
// header and everything is keys and operations (read by `arbitrary`).
fuzz_target!(|data: &[u8]| {
    let (ttl_header, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    // The TTL header against its model.
    let parsed = token::parse_ttl(ttl_header);
    let model = ttl_header.and_then(|h| {
        let digits = !h.is_empty() && h.len() <= 6 && h.iter().all(u8::is_ascii_digit);
        let value: u64 = std::str::from_utf8(h).ok().filter(|_| digits)?.parse().ok()?;
        (MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&value).then_some(value)
    });
    assert_eq!(parsed.ok(), model, "ttl {:?}", ttl_header);
    let mut u = Unstructured::new(rest);
    let (Ok(keys), Ok(ops)) = (Keys::arbitrary(&mut u), Vec::<Op>::arbitrary_take_rest(u)) else { return };
    let input = Input { key: keys.key, other_key: keys.other_key, ops };

    let mut signer = TokenSigner::new(&input.key);
    let foreign = TokenSigner::new(&input.other_key);
    let mut minted: Vec<(Vec<u8>, u64)> = Vec::new();
    for op in input.ops.iter().take(64) {
        match op {
            Op::Issue { now_ms, ttl } => {
                let token = signer.issue(*now_ms, *ttl).into_bytes();
                let expiry = now_ms.saturating_add(ttl.saturating_mul(1000));
                // A fresh token verifies before its expiry and not at it.
                if *now_ms < expiry {
                    assert_eq!(signer.verify(&token, expiry - 1), Ok(()));
                }
                assert!(signer.verify(&token, expiry).is_err());
                minted.push((token, expiry));
            }
            Op::VerifyMinted { index, delta_ms } => {
                let Some((token, expiry)) = minted.get(usize::from(*index) % minted.len().max(1)).cloned() else {
                    continue;
                };
                let now = expiry.saturating_add_signed(i64::from(*delta_ms));
                assert_eq!(signer.verify(&token, now).is_ok(), now < expiry, "minted token at {now}, expiry {expiry}");
            }
            Op::VerifyChanged { index, at, with, now_ms } => {
                let Some((mut token, _)) = minted.get(usize::from(*index) % minted.len().max(1)).cloned() else {
                    continue;
                };
                let at = usize::from(*at) % token.len();
                token[at] = *with;
                let ok = signer.verify(&token, *now_ms).is_ok();
                assert_eq!(
                    ok,
                    expected(&minted, &token, *now_ms),
                    "changed token {:?}",
                    String::from_utf8_lossy(&token)
                );
            }
            Op::VerifyRaw { token, now_ms } => {
                let ok = signer.verify(token, *now_ms).is_ok();
                assert_eq!(ok, expected(&minted, token, *now_ms), "raw token {:?}", String::from_utf8_lossy(token));
            }
            Op::VerifyForeign { now_ms, ttl } => {
                let token = foreign.issue(*now_ms, *ttl).into_bytes();
                let ok = signer.verify(&token, *now_ms).is_ok();
                if input.key != input.other_key {
                    assert_eq!(ok, expected(&minted, &token, *now_ms), "another key's token verified");
                }
            }
        }
    }
});
