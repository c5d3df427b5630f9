//! Owner bearer tokens (`proto/src/token.rs`: ES256 JWTs checked by
//! `jsonwebtoken`), from the `authorization` metadata of client requests,
//! and the identity key files:
//!
//! 0. `Verifier::verify` over arbitrary text (with a fixed identity key);
//! 1. a token issued for claims from the input, then edited at one
//!    position: the unedited one verifies to its claims, and an edited one
//!    that still verifies carries the same claims (the signature binds them);
//! 2. the hex key file parsers;
//! 3. a JWKS document from the input: whatever it makes of it, it never
//!    panics, and a key set it takes verifies only what its keys signed.
//!
//! Input: a selector byte, then the mode's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use p256::ecdsa::SigningKey;
use vault_fuzz::select;
use vault_proto::suite::MAX_ACCOUNT_ID_LEN;
use vault_proto::token::{
    jwks, parse_signing_key, parse_verifying_key, Issuer, TokenError, Verifier, CLOCK_SKEW_SECS,
    MAX_TOKEN_LEN,
};

const AUDIENCE: &str = "vault";
const ISSUER: &str = "idp";
const MAX_LIFETIME: u64 = 86_400;

fn key() -> SigningKey {
    SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar")
}

fn verifier() -> Verifier {
    Verifier::from_jwks(
        &jwks(&[*key().verifying_key()]),
        AUDIENCE,
        ISSUER,
        MAX_LIFETIME,
    )
    .expect("a key set")
}

fuzz_target!(init: vault_fuzz::seeds::init("bearer_token"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 4 {
        0 => {
            let text = String::from_utf8_lossy(bytes);
            if let Ok(c) = verifier().verify(&text, b"alice", 1000) {
                // Only a token this key signed (a seed) can get here.
                assert_eq!(c.sub, "alice");
                assert!(text.len() <= MAX_TOKEN_LEN);
            }
        }
        1 => issued(bytes),
        2 => {
            let text = String::from_utf8_lossy(bytes);
            if let Ok(vk) = parse_verifying_key(&text) {
                let hex = hex::encode(vk.to_encoded_point(true).as_bytes());
                assert_eq!(parse_verifying_key(&hex).expect("re-parses"), vk);
            }
            if let Ok(sk) = parse_signing_key(&text) {
                let hex = hex::encode(sk.to_bytes());
                assert_eq!(parse_signing_key(&hex).expect("re-parses"), sk);
            }
        }
        _ => {
            let text = String::from_utf8_lossy(bytes);
            if let Ok(v) = Verifier::from_jwks(&text, AUDIENCE, ISSUER, MAX_LIFETIME) {
                // A token of another key verifies only if the set holds it.
                let other = SigningKey::from_slice(&[9u8; 32]).expect("a valid scalar");
                let token = Issuer::new(&other, ISSUER)
                    .and_then(|i| i.issue(b"alice", AUDIENCE, 1000, 60))
                    .expect("issue");
                if v.verify(&token, b"alice", 1000).is_ok() {
                    let mine = jwks(&[*other.verifying_key()]);
                    let x = mine.split("\"x\":\"").nth(1).and_then(|r| r.split('"').next());
                    assert!(x.is_some_and(|x| text.contains(x)), "verified by a key not in the set");
                }
            }
        }
    }
});

fn issued(bytes: &[u8]) {
    // iat (8), ttl (2), edit position (2), edit byte (1), then the account.
    let Some((head, account)) = bytes.split_at_checked(13) else {
        return;
    };
    let iat = u64::from_be_bytes(head[..8].try_into().expect("8 bytes")) >> 2;
    let ttl = u64::from(u16::from_be_bytes([head[8], head[9]]));
    let k = key();
    let token = match Issuer::new(&k, ISSUER).and_then(|i| i.issue(account, AUDIENCE, iat, ttl)) {
        Ok(t) => t,
        Err(TokenError::Malformed) => {
            assert!(
                account.is_empty()
                    || account.len() > MAX_ACCOUNT_ID_LEN
                    || std::str::from_utf8(account).is_err()
            );
            return;
        }
        Err(e) => panic!("issue: {e}"),
    };
    assert!(token.len() <= MAX_TOKEN_LEN);
    let v = verifier();
    let claims = v
        .verify(&token, account, iat)
        .expect("a fresh token verifies");
    assert_eq!((claims.iat, claims.exp), (iat, iat + ttl));
    assert_eq!(
        v.verify(&token, account, iat + ttl + CLOCK_SKEW_SECS + 1),
        Err(TokenError::Expired)
    );
    let mut edited = token.clone().into_bytes();
    let i = usize::from(u16::from_be_bytes([head[10], head[11]])) % edited.len();
    edited[i] = head[12];
    let Ok(edited) = String::from_utf8(edited) else {
        return;
    };
    if edited != token {
        if let Ok(c) = v.verify(&edited, account, iat) {
            assert_eq!(c, claims, "an edited token verified to other claims");
        }
    }
}
