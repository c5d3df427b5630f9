//! The secure core: OPAQUE, record sealing and the attempt policy.
//!
//! This is the part that on a programmable HSM would run inside the module.
//! It is sans-IO: it performs no storage, network or clock access of its own.
//! The shell hands it stored bytes and the current time, and it answers with
//! typed outcomes that name the writes to make durable. Its only platform is
//! the [`Token`], through which every long-term secret is used.
//!
//! Invariants (DESIGN.md §3):
//! 1. *Guess charged before evaluation*: a KE2 is only produced by
//!    [`SecureCore::evaluate`], which needs a [`GuessTicket`] that only
//!    [`SecureCore::charge_guess`] hands out, and the sealed record carrying
//!    that charge. The shell must make the charge durable in between.
//! 2. *Attempt limit*: a charge is refused once `guesses_used == max_guesses`.
//! 3. *Lockout is final*: reaching the limit rewrites the record as `Locked`,
//!    with the secret and password file zeroed.
//! 4. *Success resets*: a verified KE3 resets the counter and releases the
//!    secret encrypted under a key derived from the OPAQUE session key.
//! 5. *No enumeration*: an unknown account gets a phantom record that counts
//!    guesses like a real one, and OPAQUE's fake-record KE2.

pub mod ecdh;
pub mod index;
pub mod memo;
pub mod pending;
pub mod record;
pub mod replica;

use std::time::Instant;

use opaque_ke::keypair::{KeyPair, PublicKey};
use opaque_ke::{
    CredentialFinalization, CredentialRequest, RegistrationRequest, RegistrationUpload,
    ServerLogin, ServerLoginParameters, ServerRegistration, ServerSetup,
};
use rand::rngs::OsRng;
use rand::RngCore;
use vault_proto::suite::{
    seal_with, Suite, DEFAULT_MAX_GUESSES, MAX_GUESSES_LIMIT, MAX_SECRET_LEN, RELEASE_AAD,
    RELEASE_INFO,
};
use zeroize::Zeroizing;

use crate::partition::{MacKey, PartitionError, PartitionSession};
use crate::types::{LoginId, RecordId, Seq};
pub use pending::Client;
use pending::{PendingLogin, PendingLogins};
use record::{
    Generation, Record, RecordBody, RecordError, SealedRecord, Stored, PASSWORD_FILE_LEN,
};

use crate::telemetry::metrics;

/// The operations the core needs from its HSM partition.
pub trait Token {
    fn hmac(&self, key: MacKey, data: &[u8]) -> Result<[u8; 32], PartitionError>;
    fn ecdh_x(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, PartitionError>;
    fn seal(&self, iv: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, PartitionError>;
    fn unseal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, PartitionError>;
}

/// The token's operations, each timed (and its failures counted) in the
/// node's metrics.
impl Token for PartitionSession {
    fn hmac(&self, key: MacKey, data: &[u8]) -> Result<[u8; 32], PartitionError> {
        metrics().token_op("hmac", || PartitionSession::hmac(self, key, data))
    }
    fn ecdh_x(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
        metrics().token_op("ecdh", || PartitionSession::ecdh_x(self, peer))
    }
    fn seal(&self, iv: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, PartitionError> {
        metrics().token_op("seal", || PartitionSession::seal(self, iv, aad, plaintext))
    }
    fn unseal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
        metrics().token_op("unseal", || PartitionSession::unseal(self, iv, aad, sealed))
    }
}

/// Marker for the OPAQUE AKE private key: it never leaves the token, so the
/// core holds only this placeholder.
#[derive(Clone, Debug)]
pub struct TokenAkeKey;

/// Marker for the OPRF seed, which likewise stays in the token.
#[derive(Clone, Debug)]
pub struct TokenOprfSeed;

/// Label HMACed with the account id to make a record id.
const RECORD_ID_LABEL: &[u8] = b"hsm-vault/v1/record-id:";

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("invalid {0}")]
    InvalidMessage(&'static str),
    #[error("{0}")]
    InvalidArgument(&'static str),
    #[error("no pending login with this id (it expired, was already used, or never existed)")]
    UnknownLogin,
    #[error("the record changed since this login started; start the recovery again")]
    RecordChanged,
    #[error("too many logins in progress; retry shortly")]
    Busy,
    #[error("stored record failed its integrity check; it is not served")]
    Tampered,
    #[error(
        "stored record is an older copy than the vault committed (rolled back); it is not served"
    )]
    Stale,
    #[error("HSM operation failed: {0}")]
    Token(PartitionError),
}

impl From<PartitionError> for CoreError {
    fn from(e: PartitionError) -> Self {
        CoreError::Token(e)
    }
}

impl From<RecordError> for CoreError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Tampered => CoreError::Tampered,
            RecordError::Stale => CoreError::Stale,
            RecordError::Token(t) => CoreError::Token(t),
        }
    }
}

/// Proof that a guess was charged; only [`SecureCore::charge_guess`] makes
/// one, and only [`SecureCore::evaluate`] consumes it.
#[derive(Debug)]
pub struct GuessTicket {
    id: RecordId,
    client: Client,
    seq: Seq,
    generation: Generation,
    ke1: Box<CredentialRequest<Suite>>,
}

/// Outcome of a recovery start's first step.
#[derive(Debug)]
pub enum Charge {
    /// Make `write` durable, then call [`SecureCore::evaluate`].
    Charged {
        write: SealedRecord,
        ticket: GuessTicket,
    },
    /// The limit had been reached: make `write` (the record with its secret
    /// destroyed) durable, then answer `locked`.
    Lock { write: SealedRecord },
    /// Already locked; nothing to write. Answer `locked`.
    Locked,
}

/// The KE2 a charged guess earns.
#[derive(Debug)]
pub struct Challenge {
    pub login_id: LoginId,
    pub ke2: Vec<u8>,
    pub guesses_remaining: u8,
}

/// What a finished login asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Recover,
    Delete,
}

/// Outcome of a recovery or deletion finish.
#[derive(Debug)]
pub enum Finish {
    /// Password verified, purpose `Recover`: make `write` (counter reset)
    /// durable, then send `release` (nonce || ciphertext of the secret under
    /// the session key).
    Recovered {
        write: SealedRecord,
        release: Vec<u8>,
    },
    /// Password verified, purpose `Delete`: remove the record.
    Delete,
    /// Wrong password; the guess stays charged. (`guesses_remaining` is the
    /// owner's count, for the node's log and audit trail only: a stranger's
    /// answer carries no count.)
    WrongPassword { guesses_remaining: u8 },
    /// The record's own limit was reached by a wrong guess: make `write`
    /// (its secret destroyed) durable, then answer `wrong password` like any
    /// record with guesses left to a stranger ([`APPARENT_LIMIT`]).
    Destroy { write: SealedRecord },
    /// The apparent limit was reached: make `write` (locked record)
    /// durable, then answer `locked`.
    Lock { write: SealedRecord },
    /// The record is locked.
    Locked,
}

/// The owner's view of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusView {
    NotRegistered,
    Registered { remaining: u8, max: u8 },
    Locked { max: u8 },
}

/// The secure core of one vault node.
pub struct SecureCore {
    setup: ServerSetup<Suite, TokenAkeKey, TokenOprfSeed>,
    server_public: ecdh::ServerPublic,
    pending: PendingLogins,
}

impl std::fmt::Debug for SecureCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureCore").finish_non_exhaustive()
    }
}

fn random_iv() -> [u8; 12] {
    let mut iv = [0u8; 12];
    OsRng.fill_bytes(&mut iv);
    iv
}

impl SecureCore {
    /// Builds the core around the AKE public key read from the token (SEC1).
    pub fn new(ake_public_sec1: &[u8]) -> Result<Self, CoreError> {
        let server_public = ecdh::ServerPublic::from_sec1(ake_public_sec1).ok_or(
            CoreError::InvalidArgument("token AKE public key is not a P-256 point"),
        )?;
        let pk = PublicKey::deserialize(&server_public.compressed)
            .map_err(|_| CoreError::InvalidArgument("token AKE public key rejected by OPAQUE"))?;
        let setup = ServerSetup::new_with_key_pair_and_seed(
            &mut OsRng,
            KeyPair::new(TokenAkeKey, pk),
            TokenOprfSeed,
        );
        Ok(SecureCore {
            setup,
            server_public,
            pending: PendingLogins::default(),
        })
    }

    /// The OPAQUE server public key (SEC1 compressed) clients pin.
    pub fn server_public_key(&self) -> [u8; 33] {
        self.server_public.compressed
    }

    /// Maps an account id to its record id inside the token.
    pub fn record_id(&self, token: &impl Token, account_id: &[u8]) -> Result<RecordId, CoreError> {
        let mut data = Vec::with_capacity(RECORD_ID_LABEL.len() + account_id.len());
        data.extend_from_slice(RECORD_ID_LABEL);
        data.extend_from_slice(account_id);
        Ok(RecordId(token.hmac(MacKey::RecordId, &data)?))
    }

    /// OPRF key material of one registration: HKDF-Expand over the OPRF seed
    /// with the credential identifier `record id || generation`, done as one
    /// HMAC inside the token (32 bytes is one SHA-256 block).
    ///
    /// The generation is fresh for every registration, so a caller who may
    /// register (holds the owner's token) cannot use `RegisterStart` as an
    /// unmetered OPRF oracle for the key a stored record's logins use.
    fn key_material(
        &self,
        token: &impl Token,
        id: &RecordId,
        generation: &Generation,
    ) -> Result<generic_array::GenericArray<u8, generic_array::typenum::U32>, CoreError> {
        let mut credential = [0u8; 48];
        credential[..32].copy_from_slice(&id.0);
        credential[32..].copy_from_slice(generation);
        let info = self.setup.key_material_info(&credential).info;
        let mut data: Vec<u8> = info.iter().flat_map(|part| part.iter().copied()).collect();
        data.push(1);
        let block = Zeroizing::new(token.hmac(MacKey::OprfSeed, &data)?);
        Ok(generic_array::GenericArray::clone_from_slice(
            block.as_ref(),
        ))
    }

    /// OPAQUE registration, first step. Stateless: it picks the new
    /// registration's generation, which the client echoes in the last step.
    pub fn registration_start(
        &self,
        token: &impl Token,
        id: &RecordId,
        request: &[u8],
    ) -> Result<(Vec<u8>, Generation), CoreError> {
        let bytes = request;
        let request = RegistrationRequest::<Suite>::deserialize(bytes)
            .map_err(|_| CoreError::InvalidMessage("registration request"))?;
        // The parser reads one point and ignores what follows: only the
        // exact encoding is a registration request.
        if request.serialize().as_slice() != bytes {
            return Err(CoreError::InvalidMessage("registration request"));
        }
        let mut generation = [0u8; 16];
        OsRng.fill_bytes(&mut generation);
        let km = self.key_material(token, id, &generation)?;
        let response =
            ServerRegistration::<Suite>::start_with_key_material(&self.setup, km, request)
                .map_err(|_| CoreError::InvalidMessage("registration request"))?;
        Ok((response.message.serialize().to_vec(), generation))
    }

    /// OPAQUE registration, last step: seals a fresh record at `seq`. It
    /// replaces whatever the id held before. `generation` is the one
    /// `registration_start` handed out; a client that sends another only
    /// makes its own envelope unopenable.
    #[allow(clippy::too_many_arguments)]
    pub fn registration_finish(
        &self,
        token: &impl Token,
        id: &RecordId,
        generation: &[u8],
        upload: &[u8],
        secret: &[u8],
        max_guesses: u32,
        seq: Seq,
    ) -> Result<(SealedRecord, u8), CoreError> {
        if secret.is_empty() || secret.len() > MAX_SECRET_LEN {
            return Err(CoreError::InvalidArgument("secret must be 1..=128 bytes"));
        }
        let max_guesses = match max_guesses {
            0 => DEFAULT_MAX_GUESSES,
            n if n <= u32::from(MAX_GUESSES_LIMIT) => n as u8,
            _ => {
                return Err(CoreError::InvalidArgument(
                    "max_guesses must be 0 (default) or 1..=10",
                ))
            }
        };
        let upload = RegistrationUpload::<Suite>::deserialize(upload)
            .map_err(|_| CoreError::InvalidMessage("registration upload"))?;
        let file = ServerRegistration::<Suite>::finish(upload).serialize();
        let mut password_file = [0u8; PASSWORD_FILE_LEN];
        if file.len() != PASSWORD_FILE_LEN {
            return Err(CoreError::InvalidMessage("registration upload"));
        }
        password_file.copy_from_slice(&file);
        let generation: Generation = generation
            .try_into()
            .map_err(|_| CoreError::InvalidArgument("registration_id must be 16 bytes"))?;
        let record = Record {
            body: RecordBody::Registered {
                password_file,
                secret: secret.to_vec(),
            },
            max_guesses,
            guesses_used: 0,
            generation,
        };
        Ok((
            record::seal(token, id, seq, &record, random_iv())?,
            max_guesses,
        ))
    }

    /// Recovery, step one: charges a guess against the record (or against a
    /// phantom for an unknown id), for a login `client` will hold. Nothing is
    /// evaluated yet. [`CoreError::Busy`] when the client (or everyone) has
    /// as many logins pending as allowed: refused before any charge.
    pub fn charge_guess(
        &self,
        token: &impl Token,
        (id, client): (&RecordId, Client),
        stored: &Stored,
        ke1: &[u8],
        seq: Seq,
        now: Instant,
    ) -> Result<Charge, CoreError> {
        let ke1_bytes = ke1;
        let ke1 = CredentialRequest::<Suite>::deserialize(ke1)
            .map_err(|_| CoreError::InvalidMessage("KE1"))?;
        // Refuse, before charging, an ephemeral key the token cannot use.
        if !ecdh::usable_ke1(ke1_bytes) {
            return Err(CoreError::InvalidMessage("KE1 ephemeral key"));
        }
        if !self.pending.has_room(client, now) {
            return Err(CoreError::Busy);
        }
        let mut record = match record::current(token, id, stored)? {
            Some(r) => r,
            None => {
                let mut generation = [0u8; 16];
                OsRng.fill_bytes(&mut generation);
                Record {
                    body: RecordBody::Phantom,
                    max_guesses: APPARENT_LIMIT,
                    guesses_used: 0,
                    generation,
                }
            }
        };
        if record.guesses_used >= APPARENT_LIMIT {
            if record.body == RecordBody::Locked {
                return Ok(Charge::Locked);
            }
            destroy(&mut record);
            return Ok(Charge::Lock {
                write: record::seal(token, id, seq, &record, random_iv())?,
            });
        }
        if matches!(record.body, RecordBody::Registered { .. })
            && record.guesses_used >= record.max_guesses
        {
            // Its own limit was reached and the destroying write was lost
            // (it is committed behind its answer): destroy it with this one.
            destroy(&mut record);
        }
        record.guesses_used += 1;
        let write = record::seal(token, id, seq, &record, random_iv())?;
        Ok(Charge::Charged {
            write,
            ticket: GuessTicket {
                id: *id,
                client,
                seq,
                generation: record.generation,
                ke1: Box::new(ke1),
            },
        })
    }

    /// Recovery, step two: given the committed record carrying the charge,
    /// evaluates the OPRF and produces the KE2.
    pub fn evaluate(
        &self,
        token: &impl Token,
        ticket: GuessTicket,
        committed: &SealedRecord,
        now: Instant,
    ) -> Result<Challenge, CoreError> {
        let (seq, record) = record::unseal(token, &ticket.id, committed)?;
        if seq != ticket.seq || record.generation != ticket.generation {
            // The shell offered a record other than the one carrying the
            // charge: refuse to evaluate.
            return Err(CoreError::RecordChanged);
        }
        let (password_file, phantom) = match &record.body {
            RecordBody::Registered { password_file, .. } => (
                Some(
                    ServerRegistration::<Suite>::deserialize(password_file)
                        .map_err(|_| CoreError::Tampered)?,
                ),
                false,
            ),
            // Unknown accounts and destroyed secrets get a decoy KE2 that
            // no password finishes.
            RecordBody::Phantom | RecordBody::Locked => (None, true),
        };
        let km = self.key_material(token, &ticket.id, &record.generation)?;
        let builder = ServerLogin::builder_with_key_material(
            &mut OsRng,
            &self.setup,
            km,
            password_file,
            *ticket.ke1,
            ServerLoginParameters::default(),
        )
        .map_err(|_| CoreError::InvalidMessage("KE1"))?;
        let shared = ecdh::shared_point(token, &self.server_public, builder.data())?;
        let started = builder
            .build(shared)
            .map_err(|_| CoreError::InvalidMessage("KE1"))?;
        let login_id = self.pending.insert(
            PendingLogin {
                id: ticket.id,
                client: ticket.client,
                generation: record.generation,
                phantom,
                state: started.state,
            },
            now,
        );
        Ok(Challenge {
            login_id,
            ke2: started.message.serialize().to_vec(),
            guesses_remaining: record.guesses_remaining(),
        })
    }

    /// The record a pending login belongs to, so the shell can lock and read
    /// it before [`SecureCore::finish`].
    pub fn pending_record(&self, login: &LoginId, now: Instant) -> Option<RecordId> {
        self.pending.record_of(login, now)
    }

    /// Recovery or deletion, last step: checks the KE3 against the pending
    /// login and the record as it is now stored.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        token: &impl Token,
        login: &LoginId,
        ke3: &[u8],
        stored: &Stored,
        purpose: Purpose,
        seq: Seq,
        now: Instant,
    ) -> Result<Finish, CoreError> {
        let ke3 = if ke3.is_empty() {
            None
        } else {
            Some(
                CredentialFinalization::<Suite>::deserialize(ke3)
                    .map_err(|_| CoreError::InvalidMessage("KE3"))?,
            )
        };
        let pending = self
            .pending
            .take(login, now)
            .ok_or(CoreError::UnknownLogin)?;
        let Some(mut record) = record::current(token, &pending.id, stored)? else {
            return Err(CoreError::RecordChanged);
        };
        if record.body == RecordBody::Locked {
            // Destroyed: no KE3 opens it; answered like any wrong guess
            // until the apparent limit.
            return Ok(if record.guesses_used >= APPARENT_LIMIT {
                Finish::Locked
            } else {
                Finish::WrongPassword {
                    guesses_remaining: 0,
                }
            });
        }
        if record.generation != pending.generation {
            return Err(CoreError::RecordChanged);
        }
        let session_key = match (ke3, pending.phantom) {
            (Some(ke3), false) => pending
                .state
                .finish(ke3, ServerLoginParameters::default())
                .ok()
                .map(|r| Zeroizing::new(r.session_key.to_vec())),
            _ => None,
        };
        let Some(session_key) = session_key else {
            if record.guesses_used >= APPARENT_LIMIT {
                destroy(&mut record);
                return Ok(Finish::Lock {
                    write: record::seal(token, &pending.id, seq, &record, random_iv())?,
                });
            }
            if matches!(record.body, RecordBody::Registered { .. })
                && record.guesses_remaining() == 0
            {
                destroy(&mut record);
                return Ok(Finish::Destroy {
                    write: record::seal(token, &pending.id, seq, &record, random_iv())?,
                });
            }
            return Ok(Finish::WrongPassword {
                guesses_remaining: record.guesses_remaining(),
            });
        };
        match purpose {
            Purpose::Delete => Ok(Finish::Delete),
            Purpose::Recover => {
                let RecordBody::Registered { secret, .. } = &record.body else {
                    // Only a registered record has a password file a KE3 can
                    // verify against.
                    return Err(CoreError::RecordChanged);
                };
                let release =
                    seal_with(&session_key, RELEASE_INFO, RELEASE_AAD, random_iv(), secret);
                record.guesses_used = 0;
                Ok(Finish::Recovered {
                    write: record::seal(token, &pending.id, seq, &record, random_iv())?,
                    release,
                })
            }
        }
    }

    /// The owner's view of a record.
    pub fn status(
        &self,
        token: &impl Token,
        id: &RecordId,
        stored: &Stored,
    ) -> Result<StatusView, CoreError> {
        let Some(r) = record::current(token, id, stored)? else {
            return Ok(StatusView::NotRegistered);
        };
        Ok(match r.body {
            RecordBody::Registered { .. } => StatusView::Registered {
                remaining: r.guesses_remaining(),
                max: r.max_guesses,
            },
            RecordBody::Locked => StatusView::Locked { max: r.max_guesses },
            RecordBody::Phantom => StatusView::NotRegistered,
        })
    }

    /// Checks a stored record's integrity without using it (for audits and
    /// tests that look at what is on disk).
    pub fn inspect(
        &self,
        token: &impl Token,
        id: &RecordId,
        stored: &SealedRecord,
    ) -> Result<(Seq, Record), CoreError> {
        Ok(record::unseal(token, id, stored)?)
    }
}

/// Crypto-shreds a record's secret: the locked record keeps its limit and
/// its count, which goes on to [`APPARENT_LIMIT`] like any other record's.
fn destroy(record: &mut Record) {
    record.body = RecordBody::Locked;
}

/// The limit every record shows a stranger: the guesses after which *any*
/// account id, registered or not, answers `locked`. A record registered with
/// a lower limit has its secret destroyed at its own limit (invariant 2) and
/// then answers like the rest (decoy challenges, `wrong password`) until
/// this one, so neither its limit nor its existence shows in any answer.
pub const APPARENT_LIMIT: u8 = MAX_GUESSES_LIMIT;
