//! Owner-authorization bearer tokens.
//!
//! Registration and deletion need proof that the caller owns the account: a
//! token signed by an identity service the operator trusts. The format:
//!
//! ```text
//! token   = "hvt1." base64url(payload) "." base64url(signature)
//! payload = version:u8 (=1) || expires_at:u64be (unix seconds)
//!           || account_len:u16be || account_id
//! signature = ECDSA P-256 / SHA-256 over payload, r || s (64 bytes)
//! ```
//!
//! The vault holds only the identity service's public key (SEC1, hex). The
//! token says nothing secret; it must still travel over TLS in production,
//! since whoever holds it may register or delete for that account until it
//! expires.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

use crate::suite::MAX_ACCOUNT_ID_LEN;

const PREFIX: &str = "hvt1.";
const PAYLOAD_VERSION: u8 = 1;
/// Longest token accepted: the largest payload plus signature, encoded.
pub const MAX_TOKEN_LEN: usize = 512;
/// Clock skew tolerated between the identity service and the vault.
pub const CLOCK_SKEW_SECS: u64 = 60;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is not valid for the configured identity key")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token was issued for another account")]
    WrongAccount,
    #[error("key is malformed")]
    BadKey,
}

/// The claims of a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub account_id: Vec<u8>,
    pub expires_at: u64,
}

/// The signed payload of a token for `claims`.
pub fn encode_payload(claims: &Claims) -> Result<Vec<u8>, TokenError> {
    if claims.account_id.is_empty() || claims.account_id.len() > MAX_ACCOUNT_ID_LEN {
        return Err(TokenError::Malformed);
    }
    let len = u16::try_from(claims.account_id.len()).map_err(|_| TokenError::Malformed)?;
    let mut p = Vec::with_capacity(11 + claims.account_id.len());
    p.push(PAYLOAD_VERSION);
    p.extend_from_slice(&claims.expires_at.to_be_bytes());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&claims.account_id);
    Ok(p)
}

/// Parses a token's payload (after its signature verified).
pub fn decode_payload(p: &[u8]) -> Result<Claims, TokenError> {
    let [version, rest @ ..] = p else {
        return Err(TokenError::Malformed);
    };
    if *version != PAYLOAD_VERSION || rest.len() < 10 {
        return Err(TokenError::Malformed);
    }
    let (exp, rest) = rest.split_at(8);
    let (len, account) = rest.split_at(2);
    let expires_at = u64::from_be_bytes(exp.try_into().map_err(|_| TokenError::Malformed)?);
    let len = u16::from_be_bytes(len.try_into().map_err(|_| TokenError::Malformed)?);
    if usize::from(len) != account.len() || account.is_empty() || account.len() > MAX_ACCOUNT_ID_LEN
    {
        return Err(TokenError::Malformed);
    }
    Ok(Claims {
        account_id: account.to_vec(),
        expires_at,
    })
}

/// Signs a token (the identity service's side; `vault token issue` uses it
/// for local deployments).
pub fn issue(signing_key: &SigningKey, claims: &Claims) -> Result<String, TokenError> {
    let payload = encode_payload(claims)?;
    let sig: Signature = signing_key.sign(&payload);
    Ok(format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    ))
}

/// Verifies a token's signature, expiry and account.
pub fn verify(
    key: &VerifyingKey,
    token: &str,
    account_id: &[u8],
    now_unix: u64,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let body = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (payload, sig) = body.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    let sig = Signature::from_slice(&sig).map_err(|_| TokenError::Malformed)?;
    key.verify(&payload, &sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims = decode_payload(&payload)?;
    if claims.expires_at.saturating_add(CLOCK_SKEW_SECS) < now_unix {
        return Err(TokenError::Expired);
    }
    if claims.account_id != account_id {
        return Err(TokenError::WrongAccount);
    }
    Ok(claims)
}

/// Parses an identity public key file's contents (hex SEC1).
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, TokenError> {
    let bytes = hex_decode(text.trim()).ok_or(TokenError::BadKey)?;
    VerifyingKey::from_sec1_bytes(&bytes).map_err(|_| TokenError::BadKey)
}

/// Parses an identity signing key file's contents (hex scalar).
pub fn parse_signing_key(text: &str) -> Result<SigningKey, TokenError> {
    let bytes = zeroize::Zeroizing::new(hex_decode(text.trim()).ok_or(TokenError::BadKey)?);
    SigningKey::from_slice(&bytes).map_err(|_| TokenError::BadKey)
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).expect("valid scalar")
    }

    #[test]
    fn token_round_trips_and_binds_account_and_expiry() {
        let k = key();
        let claims = Claims {
            account_id: b"alice".to_vec(),
            expires_at: 1000,
        };
        let t = issue(&k, &claims).expect("issue");
        let vk = *k.verifying_key();
        assert_eq!(verify(&vk, &t, b"alice", 900), Ok(claims));
        assert_eq!(verify(&vk, &t, b"bob", 900), Err(TokenError::WrongAccount));
        assert_eq!(
            verify(&vk, &t, b"alice", 1000 + CLOCK_SKEW_SECS + 1),
            Err(TokenError::Expired)
        );
        let other = SigningKey::from_slice(&[9u8; 32]).expect("valid scalar");
        assert_eq!(
            verify(other.verifying_key(), &t, b"alice", 900),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampered_or_garbage_tokens_are_refused() {
        let k = key();
        let vk = *k.verifying_key();
        let t = issue(
            &k,
            &Claims {
                account_id: b"alice".to_vec(),
                expires_at: 1000,
            },
        )
        .expect("issue");
        let mut bytes = t.into_bytes();
        let i = bytes.len() / 2;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(bytes).expect("ascii");
        assert!(verify(&vk, &t, b"alice", 900).is_err());
        for junk in ["", "hvt1.", "hvt1..", "bearer", "hvt1.!!!.???"] {
            assert_eq!(verify(&vk, junk, b"alice", 900), Err(TokenError::Malformed));
        }
        assert_eq!(
            verify(&vk, &"x".repeat(MAX_TOKEN_LEN + 1), b"a", 0),
            Err(TokenError::Malformed)
        );
    }
}
