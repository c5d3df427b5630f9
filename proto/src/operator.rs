//! Signed operator requests (see `vault/node/v1/node.proto`, service
//! `Operator`).

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

const LABEL: &[u8] = b"hsm-vault/v1/operator";
/// How old (or how far in the future) a signed request may be.
pub const FRESHNESS_SECS: u64 = 120;

fn message(kind: &str, issued_at: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(LABEL.len() + kind.len() + 9 + body.len());
    m.extend_from_slice(LABEL);
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(&issued_at.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Signs an operator request of `kind` (the RPC name).
pub fn sign(key: &SigningKey, kind: &str, issued_at: u64, body: &[u8]) -> Vec<u8> {
    let sig: Signature = key.sign(&message(kind, issued_at, body));
    sig.to_bytes().to_vec()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OperatorError {
    #[error("operator signature does not verify")]
    BadSignature,
    #[error("operator request is stale or from the future")]
    Stale,
}

/// Verifies an operator request's signature and freshness.
pub fn verify(
    key: &VerifyingKey,
    kind: &str,
    issued_at: u64,
    body: &[u8],
    signature: &[u8],
    now: u64,
) -> Result<(), OperatorError> {
    if now.abs_diff(issued_at) > FRESHNESS_SECS {
        return Err(OperatorError::Stale);
    }
    let sig = Signature::from_slice(signature).map_err(|_| OperatorError::BadSignature)?;
    key.verify(&message(kind, issued_at, body), &sig)
        .map_err(|_| OperatorError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_requests_bind_kind_body_and_time() {
        let k = SigningKey::from_slice(&[5u8; 32]).expect("scalar");
        let vk = *k.verifying_key();
        let s = sign(&k, "ExportKeys", 1000, b"{}");
        assert_eq!(verify(&vk, "ExportKeys", 1000, b"{}", &s, 1010), Ok(()));
        assert_eq!(
            verify(&vk, "AddLearner", 1000, b"{}", &s, 1010),
            Err(OperatorError::BadSignature)
        );
        assert_eq!(
            verify(&vk, "ExportKeys", 1000, b"{ }", &s, 1010),
            Err(OperatorError::BadSignature)
        );
        assert_eq!(
            verify(
                &vk,
                "ExportKeys",
                1000,
                b"{}",
                &s,
                1000 + FRESHNESS_SECS + 1
            ),
            Err(OperatorError::Stale)
        );
    }
}
