//! Owner authorization for registration, deletion and status.
//!
//! The vault trusts one identity service, known by its public key; see
//! [`vault_proto::token`] for the token format.

use std::time::{SystemTime, UNIX_EPOCH};

use p256::ecdsa::VerifyingKey;
use tonic::metadata::MetadataMap;
use tonic::Status;
use vault_proto::token::{self, TokenError};

/// Verifies bearer tokens against the identity service's key.
#[derive(Debug, Clone)]
pub struct Authorizer {
    key: VerifyingKey,
}

impl Authorizer {
    pub fn new(key: VerifyingKey) -> Self {
        Authorizer { key }
    }

    /// Checks that the request carries a valid token for `account_id`.
    pub fn check(&self, metadata: &MetadataMap, account_id: &[u8]) -> Result<(), Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer token required"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
        let bearer = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        token::verify(&self.key, bearer, account_id, now)
            .map(|_| ())
            .map_err(|e| match e {
                TokenError::Expired => Status::unauthenticated("bearer token has expired"),
                TokenError::WrongAccount => {
                    Status::unauthenticated("bearer token was issued for another account")
                }
                TokenError::BadSignature => Status::unauthenticated(
                    "bearer token is not signed by the trusted identity service",
                ),
                TokenError::Malformed | TokenError::BadKey => {
                    Status::unauthenticated("bearer token is malformed")
                }
            })
    }
}
