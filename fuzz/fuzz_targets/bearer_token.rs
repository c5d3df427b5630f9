//! Owner bearer tokens (`proto/src/token.rs`), from the `authorization`
//! metadata of client requests, and the identity key files:
//!
//! 0. `verify` over arbitrary text (with a fixed identity key);
//! 1. the payload decoder: whatever it accepts re-encodes to its input;
//! 2. a token issued for claims from the input, then edited at one
//!    position: the unedited one verifies to its claims, and an edited one
//!    that still verifies carries the same claims (the signature binds them);
//! 3. the hex key file parsers.
//!
//! Input: a selector byte, then the mode's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use p256::ecdsa::SigningKey;
use vault_fuzz::select;
use vault_proto::suite::MAX_ACCOUNT_ID_LEN;
use vault_proto::token::{
    decode_payload, encode_payload, issue, parse_signing_key, parse_verifying_key, verify, Claims,
    TokenError, CLOCK_SKEW_SECS, MAX_TOKEN_LEN,
};

fn key() -> SigningKey {
    SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar")
}

fuzz_target!(init: vault_fuzz::seeds::init("bearer_token"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 4 {
        0 => {
            let text = String::from_utf8_lossy(bytes);
            let k = key();
            if let Ok(c) = verify(k.verifying_key(), &text, b"alice", 1000) {
                // Only a token this key signed (a seed) can get here.
                assert_eq!(c.account_id, b"alice");
                assert!(text.len() <= MAX_TOKEN_LEN);
            }
        }
        1 => {
            if let Ok(c) = decode_payload(bytes) {
                assert!(!c.account_id.is_empty() && c.account_id.len() <= MAX_ACCOUNT_ID_LEN);
                assert_eq!(encode_payload(&c).expect("decoded claims encode"), bytes);
            }
        }
        2 => issued(bytes),
        _ => {
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
    }
});

fn issued(bytes: &[u8]) {
    // expires_at (8), edit position (2), edit byte (1), then the account.
    let Some((head, account)) = bytes.split_at_checked(11) else {
        return;
    };
    let claims = Claims {
        account_id: account.to_vec(),
        expires_at: u64::from_be_bytes(head[..8].try_into().expect("8 bytes")),
    };
    let k = key();
    let token = match issue(&k, &claims) {
        Ok(t) => t,
        Err(TokenError::Malformed) => {
            assert!(account.is_empty() || account.len() > MAX_ACCOUNT_ID_LEN);
            return;
        }
        Err(e) => panic!("issue: {e}"),
    };
    assert!(token.len() <= MAX_TOKEN_LEN);
    let now = claims.expires_at.saturating_sub(1);
    assert_eq!(
        verify(k.verifying_key(), &token, account, now),
        Ok(claims.clone())
    );
    if claims.expires_at < u64::MAX - CLOCK_SKEW_SECS {
        assert_eq!(
            verify(
                k.verifying_key(),
                &token,
                account,
                claims.expires_at + CLOCK_SKEW_SECS + 1
            ),
            Err(TokenError::Expired)
        );
    }
    let mut edited = token.clone().into_bytes();
    let i = usize::from(u16::from_be_bytes([head[8], head[9]])) % edited.len();
    edited[i] = head[10];
    let Ok(edited) = String::from_utf8(edited) else {
        return;
    };
    if edited != token {
        if let Ok(c) = verify(k.verifying_key(), &edited, account, now) {
            assert_eq!(c, claims, "an edited token verified to other claims");
        }
    }
}
