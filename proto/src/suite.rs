//! The OPAQUE cipher suite and the derivations built on its outputs.
//!
//! Every label here is part of the wire format: `tests/golden.rs` pins them
//! with test vectors, so an accidental change fails a test.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use opaque_ke::key_exchange::tripledh::TripleDh;
use opaque_ke::CipherSuite;
use p256::NistP256;
use sha2::Sha256;
use zeroize::Zeroizing;

/// RFC 9807 `P256-SHA256`: OPRF on P-256, 3DH on P-256, SHA-256. It is the
/// suite whose every key SoftHSM can hold, use and clone (DESIGN.md §2).
/// Clients stretch the password with Argon2id.
#[derive(Debug, Clone, Copy)]
pub struct Suite;

impl CipherSuite for Suite {
    type OprfCs = NistP256;
    type KeyExchange = TripleDh<NistP256, Sha256>;
    type Ksf = argon2::Argon2<'static>;
}

/// The name a vault reports in `GetInfo`; clients refuse any other.
pub const SUITE_NAME: &str = "OPAQUE-P256-SHA256-3DH-ARGON2ID-v1";

/// Largest secret a record holds. A wrapped 32-byte key takes 60 bytes; 128
/// leaves room for other key types while keeping records small and of one
/// size.
pub const MAX_SECRET_LEN: usize = 128;

/// The guess limit a record can be given, and the default.
pub const MAX_GUESSES_LIMIT: u8 = 10;
pub const DEFAULT_MAX_GUESSES: u8 = 10;

/// Longest account id accepted. Ids are opaque to the vault (it stores only
/// their HMAC), so 256 bytes covers e-mail addresses and UUIDs alike.
pub const MAX_ACCOUNT_ID_LEN: usize = 256;

/// Argon2id parameters every client uses to stretch the password (OWASP's
/// recommended minimum: 19 MiB, 2 passes, 1 lane). They are part of the
/// suite: registration and recovery must use the same ones.
pub fn client_ksf() -> argon2::Argon2<'static> {
    // The parameters are constants known to be valid.
    let params = argon2::Params::new(19 * 1024, 2, 1, Some(32))
        .unwrap_or_else(|_| unreachable!("constant Argon2 parameters are valid"));
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// Argon2id at its smallest cost (8 KiB, one pass): for load generators
/// only, which measure the vault and not the client's key stretching. A
/// record registered with it can only be recovered with it, and its password
/// is as cheap to attack offline as a bare hash: never use it for real
/// accounts.
pub fn benchmark_ksf() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(argon2::Params::MIN_M_COST, 1, 1, Some(32))
        .unwrap_or_else(|_| unreachable!("constant Argon2 parameters are valid"));
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// HKDF info for the key that encrypts a released secret under the OPAQUE
/// session key.
pub const RELEASE_INFO: &[u8] = b"hsm-vault/v1/release";
/// AAD of a released secret.
pub const RELEASE_AAD: &[u8] = b"hsm-vault/v1/release";
/// HKDF info for the key that wraps a backup key under the OPAQUE export key.
pub const WRAP_INFO: &[u8] = b"hsm-vault/v1/backup-key-wrap";
/// AAD of a wrapped backup key.
pub const WRAP_AAD: &[u8] = b"hsm-vault/v1/backup-key";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuiteError {
    #[error("authenticated decryption failed")]
    Decrypt,
    #[error("input has the wrong length")]
    Length,
}

fn derive_aead(ikm: &[u8], info: &[u8]) -> Aes256Gcm {
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, okm.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
    Aes256Gcm::new_from_slice(okm.as_ref())
        .unwrap_or_else(|_| unreachable!("32 bytes is an AES-256 key"))
}

/// Encrypts `plaintext` under a key derived from `ikm` with `info`; returns
/// nonce (12 bytes) || ciphertext || tag.
pub fn seal_with(
    ikm: &[u8],
    info: &[u8],
    aad: &[u8],
    nonce: [u8; 12],
    plaintext: &[u8],
) -> Vec<u8> {
    let ct = derive_aead(ikm, info)
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_else(|_| unreachable!("AES-GCM encryption of a short message cannot fail"));
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    out
}

/// Inverse of [`seal_with`].
pub fn open_with(
    ikm: &[u8],
    info: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SuiteError> {
    if sealed.len() < 12 + 16 {
        return Err(SuiteError::Length);
    }
    let (nonce, ct) = sealed.split_at(12);
    derive_aead(ikm, info)
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map(Zeroizing::new)
        .map_err(|_| SuiteError::Decrypt)
}
