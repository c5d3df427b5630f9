//! Owner-authorization bearer tokens: standard JWTs (RFC 7519), signed with
//! ES256 (ECDSA P-256, SHA-256), as identity services (OIDC providers)
//! issue them.
//!
//! Registration, deletion and Status need proof that the caller owns the
//! account. The vault accepts a JWT whose
//!
//! - header names `alg: ES256` (nothing else: not `none`, not an HMAC with
//!   the public key as its secret) and, when the key set has more than one
//!   key, the `kid` of one of them;
//! - signature verifies under a P-256 key of the JWKS file the operator
//!   configures (several keys, for rotation);
//! - `sub` is the account id (UTF-8), `aud` the vault's configured name,
//!   `iss` the configured issuer;
//! - `iat` and `exp` are present, `exp` is not past (60 s of clock skew
//!   allowed), `iat` is not in the future, and `exp - iat` is at most the
//!   node's maximum lifetime.
//!
//! Verification is `jsonwebtoken`'s; this module only chooses what to
//! require. `vault token issue` makes such tokens for local use
//! ([`Issuer`]); docs/AUTH_TOKENS.md says how to wire an existing provider.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::pkcs8::EncodePrivateKey;
use serde::{Deserialize, Serialize};

use crate::suite::MAX_ACCOUNT_ID_LEN;

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Clock skew tolerated between the identity service and the vault.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// The audience `vault token issue` and a node use unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "hsm-vault";
/// The issuer `vault token issue` and a node use unless told otherwise.
pub const DEFAULT_ISSUER: &str = "hsm-vault-local-identity";
/// Longest token lifetime (`exp - iat`) a node takes unless told otherwise.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is not an ES256 JWT")]
    WrongAlgorithm,
    #[error("token names no key of the configured key set")]
    UnknownKey,
    #[error("token signature is not valid for the configured identity keys")]
    BadSignature,
    #[error("token is for another audience or from another issuer")]
    WrongAudienceOrIssuer,
    #[error("token has expired")]
    Expired,
    #[error("token was issued in the future")]
    NotYetValid,
    #[error("token lives longer than this vault allows")]
    TooLong,
    #[error("token was issued for another account")]
    WrongAccount,
    #[error("key is malformed")]
    BadKey,
}

/// The registered claims the vault reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The account id.
    pub sub: String,
    pub aud: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

/// What a node accepts: keys (by `kid`), audience, issuer, lifetime.
#[derive(Clone)]
pub struct Verifier {
    keys: BTreeMap<String, DecodingKey>,
    /// What `jsonwebtoken` checks: ES256 only, the audience, the issuer, the
    /// claims that must be there (times are checked by [`Verifier::verify`]).
    validation: Validation,
    max_lifetime: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("audience", &self.validation.aud)
            .field("issuer", &self.validation.iss)
            .field("max_lifetime", &self.max_lifetime)
            .finish()
    }
}

impl Verifier {
    /// From a JWKS document (`{"keys": [...]}`): only its P-256 keys are
    /// taken (an `oct` key would make an HMAC key of public bytes), and a
    /// set without one is refused.
    pub fn from_jwks(
        jwks: &str,
        audience: &str,
        issuer: &str,
        max_lifetime: u64,
    ) -> Result<Self, TokenError> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|_| TokenError::BadKey)?;
        let mut keys = BTreeMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let AlgorithmParameters::EllipticCurve(ec) = &jwk.algorithm else {
                continue;
            };
            if ec.curve != EllipticCurve::P256 {
                continue;
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|_| TokenError::BadKey)?;
            let kid = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
            keys.insert(kid, key);
        }
        if keys.is_empty() {
            return Err(TokenError::BadKey);
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "aud", "iss"]);
        // Times are checked in `verify`, against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        Ok(Verifier {
            keys,
            validation,
            max_lifetime,
        })
    }

    /// Verifies `token` for `account_id` at `now` (seconds since the Unix
    /// epoch).
    pub fn verify(&self, token: &str, account_id: &[u8], now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::WrongAlgorithm);
        }
        let key = match (&header.kid, self.keys.len()) {
            (Some(kid), _) => self.keys.get(kid),
            (None, 1) => self.keys.values().next(),
            (None, _) => None,
        }
        .ok_or(TokenError::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::WrongAlgorithm
                }
                ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                    TokenError::WrongAudienceOrIssuer
                }
                _ => TokenError::Malformed,
            }
        })?;
        let claims = data.claims;
        if claims.exp.saturating_add(CLOCK_SKEW_SECS) < now {
            return Err(TokenError::Expired);
        }
        if claims.iat > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp.saturating_sub(claims.iat) > self.max_lifetime {
            return Err(TokenError::TooLong);
        }
        if claims.sub.as_bytes() != account_id {
            return Err(TokenError::WrongAccount);
        }
        Ok(claims)
    }
}

/// The `kid` of a key: the first 8 bytes of the SHA-256 of its SEC1
/// compressed encoding, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.to_encoded_point(true).as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A JWKS document holding `keys` (each with its [`key_id`]).
pub fn jwks(keys: &[VerifyingKey]) -> String {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            let point = k.to_encoded_point(false);
            let (x, y) = (point.x(), point.y());
            serde_json::json!({
                "kty": "EC",
                "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(x.map(|x| x.as_slice()).unwrap_or_default()),
                "y": URL_SAFE_NO_PAD.encode(y.map(|y| y.as_slice()).unwrap_or_default()),
                "kid": key_id(k),
                "alg": "ES256",
                "use": "sig",
            })
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// The private JWK of `key` (for other tools that issue tokens, such as a
/// test with another JWT library).
pub fn private_jwk(key: &SigningKey) -> zeroize::Zeroizing<String> {
    let public = key.verifying_key().to_encoded_point(false);
    let d = zeroize::Zeroizing::new(key.to_bytes());
    zeroize::Zeroizing::new(
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(public.x().map(|x| x.as_slice()).unwrap_or_default()),
            "y": URL_SAFE_NO_PAD.encode(public.y().map(|y| y.as_slice()).unwrap_or_default()),
            "d": URL_SAFE_NO_PAD.encode(d.as_slice()),
            "kid": key_id(key.verifying_key()),
        })
        .to_string(),
    )
}

/// Issues tokens (the identity service's side; `vault token issue` uses it
/// for local deployments).
pub struct Issuer {
    key: EncodingKey,
    kid: String,
    issuer: String,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    pub fn new(key: &SigningKey, issuer: &str) -> Result<Self, TokenError> {
        let secret = p256::SecretKey::from(key);
        let der = secret.to_pkcs8_der().map_err(|_| TokenError::BadKey)?;
        Ok(Issuer {
            key: EncodingKey::from_ec_der(der.as_bytes()),
            kid: key_id(key.verifying_key()),
            issuer: issuer.to_owned(),
        })
    }

    /// A token for `account` and `audience`, issued at `now` (seconds since
    /// the Unix epoch), valid for `ttl` seconds.
    pub fn issue(
        &self,
        account: &[u8],
        audience: &str,
        now: u64,
        ttl: u64,
    ) -> Result<String, TokenError> {
        if account.is_empty() || account.len() > MAX_ACCOUNT_ID_LEN {
            return Err(TokenError::Malformed);
        }
        let sub = std::str::from_utf8(account)
            .map_err(|_| TokenError::Malformed)?
            .to_owned();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            sub,
            aud: audience.to_owned(),
            iss: self.issuer.clone(),
            iat: now,
            exp: now.saturating_add(ttl),
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|_| TokenError::BadKey)
    }
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

    fn key(n: u8) -> SigningKey {
        SigningKey::from_slice(&[n; 32]).expect("valid scalar")
    }

    fn verifier(keys: &[VerifyingKey]) -> Verifier {
        Verifier::from_jwks(&jwks(keys), "vault-eu", "idp", 600).expect("jwks")
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn a_token_round_trips_and_binds_account_audience_issuer_and_times() {
        let k = key(7);
        let v = verifier(&[*k.verifying_key()]);
        let issuer = Issuer::new(&k, "idp").expect("issuer");
        let t = issuer
            .issue(b"alice", "vault-eu", 1000, 300)
            .expect("issue");
        let claims = v.verify(&t, b"alice", 1100).expect("valid");
        assert_eq!((claims.sub.as_str(), claims.exp), ("alice", 1300));
        assert_eq!(v.verify(&t, b"bob", 1100), Err(TokenError::WrongAccount));
        assert_eq!(
            v.verify(&t, b"alice", 1300 + CLOCK_SKEW_SECS + 1),
            Err(TokenError::Expired)
        );
        assert_eq!(
            v.verify(&t, b"alice", 1000 - CLOCK_SKEW_SECS - 1),
            Err(TokenError::NotYetValid)
        );
        let other_aud = issuer
            .issue(b"alice", "vault-us", 1000, 300)
            .expect("issue");
        assert_eq!(
            v.verify(&other_aud, b"alice", 1100),
            Err(TokenError::WrongAudienceOrIssuer)
        );
        let other_iss = Issuer::new(&k, "someone-else")
            .expect("issuer")
            .issue(b"alice", "vault-eu", 1000, 300)
            .expect("issue");
        assert_eq!(
            v.verify(&other_iss, b"alice", 1100),
            Err(TokenError::WrongAudienceOrIssuer)
        );
        let long = issuer
            .issue(b"alice", "vault-eu", 1000, 601)
            .expect("issue");
        assert_eq!(v.verify(&long, b"alice", 1100), Err(TokenError::TooLong));
    }

    #[test]
    fn keys_are_found_by_kid_and_an_unknown_key_is_refused() {
        let (a, b, c) = (key(1), key(2), key(3));
        let v = verifier(&[*a.verifying_key(), *b.verifying_key()]);
        for k in [&a, &b] {
            let t = Issuer::new(k, "idp")
                .expect("issuer")
                .issue(b"alice", "vault-eu", 1000, 60)
                .expect("issue");
            v.verify(&t, b"alice", 1000).expect("either key of the set");
        }
        let t = Issuer::new(&c, "idp")
            .expect("issuer")
            .issue(b"alice", "vault-eu", 1000, 60)
            .expect("issue");
        assert_eq!(v.verify(&t, b"alice", 1000), Err(TokenError::UnknownKey));
        // A token signed by c but naming a's kid: the signature fails.
        let (h, rest) = t.split_once('.').expect("header");
        let mut header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).expect("b64")).expect("json");
        header["kid"] = key_id(a.verifying_key()).into();
        let forged = format!("{}.{rest}", b64(&header));
        assert_eq!(
            v.verify(&forged, b"alice", 1000),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn only_es256_is_taken_not_none_nor_hmac_with_the_public_key() {
        use hmac::{Hmac, Mac};
        let k = key(7);
        let v = verifier(&[*k.verifying_key()]);
        let claims = serde_json::json!({
            "sub": "alice", "aud": "vault-eu", "iss": "idp", "iat": 1000, "exp": 1060,
        });
        // alg none, no signature.
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(&claims)
        );
        assert!(v.verify(&none, b"alice", 1000).is_err());
        // HS256 keyed with the public key's bytes, as the JWKS shows them.
        let jwks: serde_json::Value =
            serde_json::from_str(&jwks(&[*k.verifying_key()])).expect("j");
        for secret in [
            jwks.to_string().into_bytes(),
            k.verifying_key().to_encoded_point(true).as_bytes().to_vec(),
        ] {
            let head = b64(&serde_json::json!({
                "alg": "HS256", "typ": "JWT", "kid": key_id(k.verifying_key())
            }));
            let signing_input = format!("{head}.{}", b64(&claims));
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&secret).expect("hmac");
            mac.update(signing_input.as_bytes());
            let t = format!(
                "{signing_input}.{}",
                URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
            );
            assert_eq!(
                v.verify(&t, b"alice", 1000),
                Err(TokenError::WrongAlgorithm)
            );
        }
        // A key set with only a symmetric key is no key set at all.
        let oct = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]});
        assert!(Verifier::from_jwks(&oct.to_string(), "a", "i", 60).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        let v = verifier(&[*key(7).verifying_key()]);
        for junk in ["", "a.b.c", "bearer", "..", "hvt1.x.y"] {
            assert!(v.verify(junk, b"alice", 900).is_err(), "{junk}");
        }
        assert_eq!(
            v.verify(&"x".repeat(MAX_TOKEN_LEN + 1), b"a", 0),
            Err(TokenError::Malformed)
        );
    }
}
