//! Owner authorization for registration, deletion and status.
//!
//! The vault trusts one identity service, known by its keys (a JWKS), its
//! issuer name and the audience it names this vault by; owner tokens are
//! ES256 JWTs (see [`vault_proto::token`]).

use std::time::{SystemTime, UNIX_EPOCH};

use tonic::metadata::MetadataMap;
use tonic::Status;
use vault_proto::token::{TokenError, Verifier};

/// Verifies bearer tokens against the identity service's keys.
#[derive(Debug, Clone)]
pub struct Authorizer {
    verifier: Verifier,
}

impl Authorizer {
    pub fn new(verifier: Verifier) -> Self {
        Authorizer { verifier }
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
        self.verifier
            .verify(bearer, account_id, now)
            .map(|_| ())
            .map_err(|e| {
                Status::unauthenticated(match e {
                    TokenError::Expired => "bearer token has expired",
                    TokenError::NotYetValid => "bearer token was issued in the future",
                    TokenError::TooLong => "bearer token lives longer than this vault allows",
                    TokenError::WrongAccount => "bearer token was issued for another account",
                    TokenError::WrongAudienceOrIssuer => {
                        "bearer token is for another audience or from another issuer"
                    }
                    TokenError::WrongAlgorithm => "bearer token is not an ES256 JWT",
                    TokenError::UnknownKey => {
                        "bearer token names no key of the trusted identity service"
                    }
                    TokenError::BadSignature => {
                        "bearer token is not signed by the trusted identity service"
                    }
                    TokenError::Malformed | TokenError::BadKey => "bearer token is malformed",
                })
            })
    }
}
