//! The record format and its sealing.
//!
//! A record holds everything the vault keeps for one account: the OPAQUE
//! password file, the stored secret, the guess limit, the guesses used and
//! the state. It leaves the secure core only sealed:
//!
//! ```text
//! sealed    = seq:u64be || iv:[12] || AES-256-GCM(seal key, iv, aad, plaintext)
//! aad       = "hsm-vault/v1/record" || record_id:[32] || seq:u64be
//! plaintext = format:u8 (=1) || kind:u8 || max_guesses:u8 || guesses_used:u8
//!             || generation:[16] || secret_len:u8 || secret:[128]
//!             || password_file:[129]
//! ```
//!
//! Invariants:
//! - Every record seals to exactly [`SEALED_LEN`] bytes whatever its state,
//!   so a locked or unknown account cannot be told from a live one by size.
//! - The AAD binds the record to its id and to its sequence number (the
//!   store's commit counter), so bytes moved to another id, or altered, fail
//!   to unseal.
//! - A locked record's secret and password file are zeros. An older sealed
//!   copy is refused as stale: the record must carry the sequence number its
//!   index entry names ([`current`]), and the index is anchored in the token
//!   (`core::index`).

use vault_proto::suite::MAX_SECRET_LEN;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::core::Token;
use crate::partition::PartitionError;
use crate::types::{RecordId, Seq};

/// Length of a serialized `ServerRegistration` for P256-SHA256: client public
/// key (33) + masking key (32) + envelope nonce (32) + envelope MAC (32).
pub const PASSWORD_FILE_LEN: usize = 129;
/// Size of a record's plaintext layout (before sealing).
pub const PLAINTEXT_LEN: usize = 4 + 16 + 1 + MAX_SECRET_LEN + PASSWORD_FILE_LEN;
const TAG_LEN: usize = 16;
const IV_LEN: usize = 12;
/// Size of every sealed record.
pub const SEALED_LEN: usize = 8 + IV_LEN + PLAINTEXT_LEN + TAG_LEN;
const FORMAT: u8 = 1;
const AAD_LABEL: &[u8] = b"hsm-vault/v1/record";

/// Random id of one registration; a login started under one registration
/// cannot finish under another.
pub type Generation = [u8; 16];

/// What a record is.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub enum RecordBody {
    /// A key is stored and can be recovered with the password.
    Registered {
        password_file: [u8; PASSWORD_FILE_LEN],
        secret: Vec<u8>,
    },
    /// The guess limit was reached; the secret and password file are gone.
    Locked,
    /// No account is registered here, but guesses were made against the id.
    /// Phantoms count guesses exactly like real records, so a stranger cannot
    /// tell an unknown account from a real one with a wrong password.
    Phantom,
}

/// A record in the clear; exists only inside the secure core.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Record {
    pub body: RecordBody,
    pub max_guesses: u8,
    pub guesses_used: u8,
    pub generation: Generation,
}

impl std::fmt::Debug for RecordBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints the secret or the password file.
        f.write_str(match self {
            RecordBody::Registered { .. } => "Registered",
            RecordBody::Locked => "Locked",
            RecordBody::Phantom => "Phantom",
        })
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("body", &self.body)
            .field("max_guesses", &self.max_guesses)
            .field("guesses_used", &self.guesses_used)
            .finish_non_exhaustive()
    }
}

impl Record {
    pub fn guesses_remaining(&self) -> u8 {
        self.max_guesses.saturating_sub(self.guesses_used)
    }
}

/// A sealed record as the host stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord(Vec<u8>);

impl std::fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SealedRecord(seq {:?}, {} bytes)",
            self.seq(),
            self.0.len()
        )
    }
}

impl SealedRecord {
    /// Wraps bytes read from storage; their integrity is checked on unseal.
    pub fn from_stored(bytes: Vec<u8>) -> Self {
        SealedRecord(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The sequence number in the (authenticated) header, if the header is
    /// whole. Not trusted until the record unseals.
    pub fn seq(&self) -> Option<Seq> {
        self.0
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(|b| Seq(u64::from_be_bytes(b)))
    }
}

/// A record as the store holds it: the sealed bytes and the sequence number
/// its index entry names (see `core::index`). Both absent means the id was
/// never written or was deleted.
#[derive(Debug, Default, Clone)]
pub struct Stored {
    pub record: Option<SealedRecord>,
    pub index: Option<Seq>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "stored record failed its integrity check (altered, truncated or moved from another id)"
    )]
    Tampered,
    #[error("stored record is an older copy than the one the vault committed (rolled back)")]
    Stale,
    #[error(transparent)]
    Token(PartitionError),
}

fn aad(id: &RecordId, seq: Seq) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 40);
    aad.extend_from_slice(AAD_LABEL);
    aad.extend_from_slice(&id.0);
    aad.extend_from_slice(&seq.0.to_be_bytes());
    aad
}

/// The plaintext layout of `r` ([`PLAINTEXT_LEN`] bytes).
pub fn encode(r: &Record) -> Zeroizing<Vec<u8>> {
    let mut p = Zeroizing::new(vec![0u8; PLAINTEXT_LEN]);
    p[0] = FORMAT;
    p[2] = r.max_guesses;
    p[3] = r.guesses_used;
    p[4..20].copy_from_slice(&r.generation);
    match &r.body {
        RecordBody::Registered {
            password_file,
            secret,
        } => {
            p[1] = 1;
            // Secret length is checked at registration (<= MAX_SECRET_LEN).
            p[20] = secret.len() as u8;
            p[21..21 + secret.len()].copy_from_slice(secret);
            p[21 + MAX_SECRET_LEN..].copy_from_slice(password_file);
        }
        RecordBody::Locked => p[1] = 2,
        RecordBody::Phantom => p[1] = 3,
    }
    p
}

/// Parses the plaintext layout of an unsealed record; `None` if malformed.
pub fn decode(p: &[u8]) -> Option<Record> {
    if p.len() != PLAINTEXT_LEN || p[0] != FORMAT {
        return None;
    }
    let mut generation = [0u8; 16];
    generation.copy_from_slice(&p[4..20]);
    let body = match p[1] {
        1 => {
            let len = usize::from(p[20]);
            if len == 0 || len > MAX_SECRET_LEN {
                return None;
            }
            let mut password_file = [0u8; PASSWORD_FILE_LEN];
            password_file.copy_from_slice(&p[21 + MAX_SECRET_LEN..]);
            RecordBody::Registered {
                password_file,
                secret: p[21..21 + len].to_vec(),
            }
        }
        2 => RecordBody::Locked,
        3 => RecordBody::Phantom,
        _ => return None,
    };
    Some(Record {
        body,
        max_guesses: p[2],
        guesses_used: p[3],
        generation,
    })
}

/// Seals `record` for `id` at sequence number `seq`.
pub fn seal(
    token: &impl Token,
    id: &RecordId,
    seq: Seq,
    record: &Record,
    iv: [u8; IV_LEN],
) -> Result<SealedRecord, PartitionError> {
    let ct = token.seal(&iv, &aad(id, seq), &encode(record))?;
    let mut out = Vec::with_capacity(SEALED_LEN);
    out.extend_from_slice(&seq.0.to_be_bytes());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ct);
    debug_assert_eq!(out.len(), SEALED_LEN);
    Ok(SealedRecord(out))
}

/// Unseals a stored record, checking that it belongs to `id`.
pub fn unseal(
    token: &impl Token,
    id: &RecordId,
    sealed: &SealedRecord,
) -> Result<(Seq, Record), RecordError> {
    let b = sealed.as_bytes();
    if b.len() != SEALED_LEN {
        return Err(RecordError::Tampered);
    }
    let seq = sealed.seq().ok_or(RecordError::Tampered)?;
    let mut iv = [0u8; IV_LEN];
    iv.copy_from_slice(&b[8..8 + IV_LEN]);
    let plain = match token.unseal(&iv, &aad(id, seq), &b[8 + IV_LEN..]) {
        Ok(p) => p,
        Err(PartitionError::Integrity) => return Err(RecordError::Tampered),
        Err(e) => return Err(RecordError::Token(e)),
    };
    decode(&plain)
        .map(|r| (seq, r))
        .ok_or(RecordError::Tampered)
}

/// The current record of `id`: unseals it and checks it is the copy its
/// index entry names.
pub fn current(
    token: &impl Token,
    id: &RecordId,
    stored: &Stored,
) -> Result<Option<Record>, RecordError> {
    match (&stored.record, stored.index) {
        (None, None) => Ok(None),
        (Some(sealed), Some(index)) => {
            let (seq, record) = unseal(token, id, sealed)?;
            if seq != index {
                return Err(RecordError::Stale);
            }
            Ok(Some(record))
        }
        // A record without its index entry, or the reverse, was edited
        // behind the vault's back.
        _ => Err(RecordError::Tampered),
    }
}
