//! Signed operator requests (see `vault/node/v1/node.proto`, service
//! `Operator`): each names its call, the one node (and group) it is for, its
//! time and a fresh nonce, all under the operator's signature. A node
//! checks the signature, that it is the target, the time, and (keeping the
//! nonces of the freshness window) that it has not seen the request before.

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand::RngCore;

use crate::vault::node::v1::OperatorRequest;

const LABEL: &[u8] = b"hsm-vault/v2/operator";
/// How old (or how far in the future) a signed request may be.
pub const FRESHNESS_SECS: u64 = 120;
/// Length of a request's nonce.
pub const NONCE_LEN: usize = 16;

/// The node a request is for, and its replica group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: u64,
    pub group: u64,
}

fn message(kind: &str, target: Target, issued_at: u64, nonce: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(LABEL.len() + kind.len() + 41 + nonce.len() + body.len());
    m.extend_from_slice(LABEL);
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(&target.node.to_be_bytes());
    m.extend_from_slice(&target.group.to_be_bytes());
    m.extend_from_slice(&issued_at.to_be_bytes());
    m.extend_from_slice(&u64::try_from(nonce.len()).unwrap_or(u64::MAX).to_be_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(body);
    m
}

/// A request of `kind` (the RPC name) for `target`, made at `issued_at`
/// (seconds since the Unix epoch) with a fresh random nonce, signed.
pub fn request(
    key: &SigningKey,
    kind: &str,
    target: Target,
    issued_at: u64,
    body: Vec<u8>,
) -> OperatorRequest {
    let mut nonce = vec![0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let sig: Signature = key.sign(&message(kind, target, issued_at, &nonce, &body));
    OperatorRequest {
        issued_at,
        body,
        signature: sig.to_bytes().to_vec(),
        target_node: target.node,
        target_group: target.group,
        nonce,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OperatorError {
    #[error("operator signature does not verify")]
    BadSignature,
    #[error("operator request is stale or from the future")]
    Stale,
    #[error("operator request is for node {node} of group {group}, not this one")]
    WrongTarget { node: u64, group: u64 },
    #[error("operator request has no {NONCE_LEN}-byte nonce")]
    BadNonce,
}

/// Verifies a request of `kind` received by node `me` at `now`: its
/// signature, target, nonce length and freshness. Whether the nonce was
/// seen before is the receiver's to check (it keeps them).
pub fn verify(
    key: &VerifyingKey,
    kind: &str,
    me: Target,
    request: &OperatorRequest,
    now: u64,
) -> Result<(), OperatorError> {
    if request.nonce.len() != NONCE_LEN {
        return Err(OperatorError::BadNonce);
    }
    let target = Target {
        node: request.target_node,
        group: request.target_group,
    };
    let sig = Signature::from_slice(&request.signature).map_err(|_| OperatorError::BadSignature)?;
    key.verify(
        &message(
            kind,
            target,
            request.issued_at,
            &request.nonce,
            &request.body,
        ),
        &sig,
    )
    .map_err(|_| OperatorError::BadSignature)?;
    if target != me {
        return Err(OperatorError::WrongTarget {
            node: target.node,
            group: target.group,
        });
    }
    if now.abs_diff(request.issued_at) > FRESHNESS_SECS {
        return Err(OperatorError::Stale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Target = Target { node: 2, group: 1 };

    #[test]
    fn operator_requests_bind_kind_target_nonce_body_and_time() {
        let k = SigningKey::from_slice(&[5u8; 32]).expect("scalar");
        let vk = *k.verifying_key();
        let r = request(&k, "ExportKeys", ME, 1000, b"{}".to_vec());
        assert_eq!(r.nonce.len(), NONCE_LEN);
        assert_eq!(verify(&vk, "ExportKeys", ME, &r, 1010), Ok(()));
        assert_eq!(
            verify(&vk, "AddLearner", ME, &r, 1010),
            Err(OperatorError::BadSignature)
        );
        let edit = |f: &dyn Fn(&mut OperatorRequest)| {
            let mut r = r.clone();
            f(&mut r);
            verify(&vk, "ExportKeys", ME, &r, 1010)
        };
        assert_eq!(
            edit(&|r| r.body = b"{ }".to_vec()),
            Err(OperatorError::BadSignature)
        );
        assert_eq!(edit(&|r| r.nonce[0] ^= 1), Err(OperatorError::BadSignature));
        assert_eq!(
            edit(&|r| r.target_node = 3),
            Err(OperatorError::BadSignature)
        );
        assert_eq!(edit(&|r| r.nonce.clear()), Err(OperatorError::BadNonce));
        // Signed for another node: refused there.
        let other = request(
            &k,
            "ExportKeys",
            Target { node: 3, group: 1 },
            1000,
            b"{}".to_vec(),
        );
        assert_eq!(
            verify(&vk, "ExportKeys", ME, &other, 1010),
            Err(OperatorError::WrongTarget { node: 3, group: 1 })
        );
        assert_eq!(
            verify(&vk, "ExportKeys", ME, &r, 1000 + FRESHNESS_SECS + 1),
            Err(OperatorError::Stale)
        );
        // Two requests never share a nonce.
        assert_ne!(
            r.nonce,
            request(&k, "ExportKeys", ME, 1000, b"{}".to_vec()).nonce
        );
    }
}
