//! The PKCS#11 partition: the **only** module of the project that calls
//! `cryptoki`.
//!
//! Invariants kept here:
//! - Every long-term secret of the vault (the domain keys) is generated inside
//!   the token as a sensitive object and used only through PKCS#11 operations:
//!   HMAC (`C_Sign`) with the OPRF seed and the record-id key, ECDH
//!   (`C_DeriveKey`) with the OPAQUE AKE private key, AES-GCM
//!   (`C_Encrypt`/`C_Decrypt`) with the record-sealing key.
//! - Domain keys are `CKA_SENSITIVE` and extractable only wrapped under a
//!   trusted key (`CKA_WRAP_WITH_TRUSTED`), so a later cloning ceremony can copy
//!   them to another token without a plaintext copy ever existing.
//! - The one exception is explicit provisioning for tokens that cannot clone
//!   ([`import`]): the provisioner creates the same keys, with the same
//!   protections, from material it generated in memory. The token reports
//!   such keys as not local, and [`KeyProtection`] says so.
//! - The token is found by its label, never by slot number (SoftHSM renumbers
//!   slots), and the user PIN never comes from the command line.
//! - A PKCS#11 `Session` is `Send` but not `Sync`: each worker checks one out
//!   of a pool and returns it when done.
//!
//! Where SoftHSM differs from a real HSM it is said at the call site.

pub mod ceremony;
pub mod import;

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use zeroize::Zeroizing;

/// Labels of the domain keys inside the token. Changing one orphans the keys
/// of every existing deployment: they are part of the on-token format.
pub mod labels {
    pub const OPRF_SEED: &str = "hsm-vault/v1/oprf-seed";
    pub const AKE_PRIVATE: &str = "hsm-vault/v1/ake-private";
    pub const AKE_PUBLIC: &str = "hsm-vault/v1/ake-public";
    pub const SEAL: &str = "hsm-vault/v1/seal";
    pub const RECORD_ID: &str = "hsm-vault/v1/record-id";
    /// `CKA_APPLICATION` of the data object whose label holds the anchor
    /// (watermark and index digest).
    pub const WATERMARK_APP: &str = "hsm-vault/v1/watermark";
}

/// DER encoding of the P-256 curve OID (1.2.840.10045.3.1.7), the
/// `CKA_EC_PARAMS` of the AKE key pair.
const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Length of the generic secrets (OPRF seed, record-id key): one SHA-256 block
/// of output, as RFC 9807 asks for the OPRF seed (`Nh`).
const SECRET_LEN: u64 = 32;

/// Sessions kept open for reuse. More workers than this still get a session;
/// the extra ones are closed when returned.
const MAX_IDLE_SESSIONS: usize = 16;

/// GCM tag length in bits.
const GCM_TAG_BITS: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("PKCS#11 module could not be loaded or initialized: {0}")]
    Module(String),
    #[error("no token labelled {0:?} is present")]
    TokenNotFound(String),
    #[error("login to the token failed (wrong PIN or locked token): {0}")]
    Login(String),
    #[error("domain key {0:?} is missing from the token")]
    MissingKey(&'static str),
    #[error("authenticated decryption failed: the sealed bytes were altered or belong elsewhere")]
    Integrity,
    /// The token cannot mark a key trusted (`CKA_TRUSTED`), so keys that
    /// leave it only under a trusted key (`CKA_WRAP_WITH_TRUSTED`) cannot
    /// leave it at all: no cloning ceremony is possible from it.
    #[error("this token cannot clone keys: {0}")]
    CloningUnsupported(String),
    #[error("token operation {op} failed: {detail}")]
    Operation { op: &'static str, detail: String },
}

fn op_err(op: &'static str) -> impl FnOnce(CkError) -> PartitionError {
    move |e| PartitionError::Operation {
        op,
        detail: e.to_string(),
    }
}

/// Handles of the domain keys, found by label once at start. The four
/// secrets are the keeper session's working copies
/// ([`Partition::working_copies`]); the watermark is the token object.
#[derive(Clone, Copy, Debug)]
struct DomainKeys {
    oprf_seed: ObjectHandle,
    ake_private: ObjectHandle,
    seal: ObjectHandle,
    record_id: ObjectHandle,
    watermark: ObjectHandle,
}

/// A loaded and initialized PKCS#11 module. A process initializes a module
/// once; every token it uses (by label) goes through this one context.
pub struct Module {
    ctx: Pkcs11,
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module").finish_non_exhaustive()
    }
}

/// Finalizing on drop lets the next [`Module::load`] in this process start
/// afresh. SoftHSM is unloaded with the library anyway; kryoptic (a Rust
/// shared object, which the C runtime does not unload) keeps its state, and
/// would answer the next `C_Initialize` with `CKR_CRYPTOKI_ALREADY_INITIALIZED`
/// and its old configuration. Every session belongs to a [`Partition`] or an
/// enrollment that holds this module, so none outlives it.
impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.clone().finalize();
    }
}

impl Module {
    pub fn load(path: &Path) -> Result<Arc<Self>, PartitionError> {
        let ctx = Pkcs11::new(path).map_err(|e| PartitionError::Module(e.to_string()))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| PartitionError::Module(e.to_string()))?;
        Ok(Arc::new(Module { ctx }))
    }

    /// Opens a session on the token labelled `label` and logs the user in
    /// (login state is per token and application: later sessions share it).
    fn user_session(&self, label: &str, pin: &str) -> Result<(Slot, Session), PartitionError> {
        let slot = find_slot(&self.ctx, label)?;
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(op_err("open session"))?;
        match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(PartitionError::Login(e.to_string())),
        }
        Ok((slot, session))
    }
}

/// Whether a partition may create the domain keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySetup {
    /// Generate any missing domain key (the first token of a domain).
    GenerateIfMissing,
    /// The keys must already be there (a token enrolled by a cloning
    /// ceremony); a token without them cannot serve.
    RequireExisting,
}

/// An open, logged-in token holding the vault's domain keys.
pub struct Partition {
    // Field order matters: sessions must close before the module finalizes.
    idle: Mutex<Vec<Session>>,
    /// Owns the working copies of the domain secrets: session objects live
    /// as long as the session that made them.
    keeper: Mutex<Session>,
    /// Handles of the token-state objects, by application name: a search
    /// by attribute makes SoftHSM re-read every token object's file.
    state_objects: Mutex<std::collections::HashMap<String, ObjectHandle>>,
    /// Handles change when the token is logged out and in again (a cloning
    /// ceremony does that), so they are re-found by label then.
    keys: RwLock<DomainKeys>,
    /// SEC1 uncompressed encoding of the AKE public key (65 bytes).
    ake_public: Vec<u8>,
    slot: Slot,
    label: String,
    module: Arc<Module>,
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partition")
            .field("token", &self.label)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// Attributes that every domain secret shares: a private, sensitive token
/// object that can leave the token only wrapped under a trusted key.
fn protected_secret(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

impl Partition {
    /// Loads the PKCS#11 module, finds the token by label, logs in as user and
    /// makes sure the domain keys exist (generating them inside the token on
    /// first start).
    pub fn open(module: &Path, token_label: &str, pin: &str) -> Result<Arc<Self>, PartitionError> {
        Self::open_in(
            &Module::load(module)?,
            token_label,
            pin,
            KeySetup::GenerateIfMissing,
        )
    }

    /// Opens the token labelled `token_label` through an already loaded
    /// module.
    pub fn open_in(
        module: &Arc<Module>,
        token_label: &str,
        pin: &str,
        setup: KeySetup,
    ) -> Result<Arc<Self>, PartitionError> {
        let (slot, session) = module.user_session(token_label, pin)?;
        let (keys, ake_public) = match setup {
            KeySetup::GenerateIfMissing => ensure_domain_keys(&session)?,
            KeySetup::RequireExisting => load_domain_keys(&session)?,
        };
        let keeper = module
            .ctx
            .open_rw_session(slot)
            .map_err(op_err("open session"))?;
        let keys = working_copies(&keeper, keys)?;
        Ok(Arc::new(Partition {
            idle: Mutex::new(vec![session]),
            keeper: Mutex::new(keeper),
            state_objects: Mutex::new(std::collections::HashMap::new()),
            keys: RwLock::new(keys),
            ake_public,
            slot,
            label: token_label.to_owned(),
            module: Arc::clone(module),
        }))
    }

    /// Replaces the key handles after a logout (which invalidates them and
    /// destroys the working copies): `found` are the token objects, found
    /// again by label.
    fn reload_keys(&self, found: DomainKeys) -> Result<(), PartitionError> {
        let copies = {
            let keeper = self.keeper.lock().map_err(|_| PartitionError::Operation {
                op: "reload keys",
                detail: "keeper session lock poisoned".into(),
            })?;
            working_copies(&keeper, found)?
        };
        if let Ok(mut current) = self.keys.write() {
            *current = copies;
        }
        if let Ok(mut objects) = self.state_objects.lock() {
            objects.clear();
        }
        Ok(())
    }

    /// The AKE public key, SEC1 uncompressed.
    pub fn ake_public_key(&self) -> &[u8] {
        &self.ake_public
    }

    /// Checks a session out of the pool (opening one if none is idle).
    pub fn session(self: &Arc<Self>) -> Result<PartitionSession, PartitionError> {
        let pooled = self.idle.lock().map(|mut idle| idle.pop()).ok().flatten();
        let session = match pooled {
            Some(s) => s,
            // Login state is per application, so a new session is already
            // logged in.
            None => self
                .module
                .ctx
                .open_rw_session(self.slot)
                .map_err(op_err("open session"))?,
        };
        Ok(PartitionSession {
            session: Some(session),
            partition: Arc::clone(self),
        })
    }
}

/// Finds the slot of the token labelled `label`.
///
/// Other tokens may share the token directory (a local fleet keeps every
/// node's token in one SoftHSM configuration), and a token another process
/// is writing can fail `C_GetTokenInfo` for a moment: such slots are
/// skipped, and the search is retried a few times before giving up.
fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot, PartitionError> {
    const ATTEMPTS: u32 = 20;
    let mut last_error = None;
    for attempt in 0..ATTEMPTS {
        match ctx.get_slots_with_initialized_token() {
            Ok(slots) => {
                for slot in slots {
                    match ctx.get_token_info(slot) {
                        Ok(info) if info.label().trim_end() == label => return Ok(slot),
                        Ok(_) => {}
                        Err(e) => last_error = Some(e),
                    }
                }
                if last_error.is_none() {
                    break;
                }
            }
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(
            25 * u64::from(attempt + 1),
        ));
    }
    match last_error {
        Some(e) => Err(op_err("find token")(e)),
        None => Err(PartitionError::TokenNotFound(label.to_owned())),
    }
}

fn find_one(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>, PartitionError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(op_err("find objects"))?;
    Ok(found.into_iter().next())
}

fn generic_secret(session: &Session, label: &str) -> Result<ObjectHandle, PartitionError> {
    if let Some(h) = find_one(session, ObjectClass::SECRET_KEY, label)? {
        return Ok(h);
    }
    let mut template = protected_secret(label);
    template.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(SECRET_LEN.into()),
        Attribute::Sign(true),
        Attribute::Verify(true),
    ]);
    session
        .generate_key(&Mechanism::GenericSecretKeyGen, &template)
        .map_err(op_err("generate generic secret"))
}

fn aes_key(session: &Session, label: &str) -> Result<ObjectHandle, PartitionError> {
    if let Some(h) = find_one(session, ObjectClass::SECRET_KEY, label)? {
        return Ok(h);
    }
    let mut template = protected_secret(label);
    template.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ]);
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .map_err(op_err("generate AES key"))
}

fn ake_key_pair(session: &Session) -> Result<(ObjectHandle, Vec<u8>), PartitionError> {
    let private = find_one(session, ObjectClass::PRIVATE_KEY, labels::AKE_PRIVATE)?;
    let public = find_one(session, ObjectClass::PUBLIC_KEY, labels::AKE_PUBLIC)?;
    let (private, public) = match (private, public) {
        (Some(private), Some(public)) => (private, public),
        (private, public) => {
            // A half-made pair (crash during first start) is replaced whole.
            for h in [private, public].into_iter().flatten() {
                session
                    .destroy_object(h)
                    .map_err(op_err("destroy half key pair"))?;
            }
            let public_template = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::EcParams(P256_OID_DER.to_vec()),
                Attribute::Label(labels::AKE_PUBLIC.as_bytes().to_vec()),
            ];
            let mut private_template = protected_secret(labels::AKE_PRIVATE);
            private_template.push(Attribute::Derive(true));
            let (public, private) = session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &public_template,
                    &private_template,
                )
                .map_err(op_err("generate AKE key pair"))?;
            (private, public)
        }
    };
    Ok((private, read_ec_point(session, public)?))
}

/// The SEC1 point in a `CKA_EC_POINT` value.
///
/// PKCS#11 up to 3.0 says `CKA_EC_POINT` is a DER OCTET STRING around the
/// SEC1 point, and SoftHSM returns that; kryoptic follows PKCS#11 3.1 and
/// returns the bare point unless configured otherwise
/// (`ec_point_encoding`). Both are accepted. They cannot be confused: the
/// DER form is taken only when what it wraps is itself a P-256 point (33 or
/// 65 bytes with a SEC1 tag), and a bare point of those sizes has no room
/// for the two header bytes.
fn unwrap_der_octet_string(value: &[u8]) -> Result<Vec<u8>, PartitionError> {
    let is_point = |p: &[u8]| match p.first() {
        Some(0x04) => p.len() == 65,
        Some(0x02 | 0x03) => p.len() == 33,
        _ => false,
    };
    match value {
        [0x04, len, rest @ ..]
            if usize::from(*len) == rest.len() && *len < 0x80 && is_point(rest) =>
        {
            Ok(rest.to_vec())
        }
        bare if is_point(bare) => Ok(bare.to_vec()),
        _ => Err(PartitionError::Operation {
            op: "parse EC point",
            detail: "CKA_EC_POINT is neither a SEC1 point nor one in a DER OCTET STRING".into(),
        }),
    }
}

/// Copies the domain secrets into session objects of `keeper` and returns
/// their handles (the watermark stays the token object).
///
/// SoftHSM re-reads a token object's file on every use, in case another
/// process changed it; a session object lives in memory, which makes each
/// HMAC, GCM and ECDH operation several times cheaper. The copies are still
/// sensitive, are no longer extractable at all, and carry a label of their
/// own so that a search by a domain key's label finds only the token object.
/// They stay `CKA_PRIVATE` (SoftHSM refuses to change that in a copy, and
/// decrypts a private key's value at every operation's init: a few percent
/// of a recovery). They vanish when the keeper session closes or the user
/// logs out.
///
/// kryoptic refuses `CKA_EXTRACTABLE` in a `C_CopyObject` template
/// (`CKR_ATTRIBUTE_READ_ONLY`), though it lets `C_SetAttributeValue` turn it
/// off: there the copy is made as is and made non-extractable at once, and
/// a copy that cannot be is destroyed rather than used.
fn working_copies(keeper: &Session, token: DomainKeys) -> Result<DomainKeys, PartitionError> {
    let copy = |handle, label: &str| {
        let label = Attribute::Label(format!("{label}/working-copy").into_bytes());
        match keeper.copy_object(
            handle,
            &[
                Attribute::Token(false),
                Attribute::Extractable(false),
                label.clone(),
            ],
        ) {
            Err(CkError::Pkcs11(RvError::AttributeReadOnly, _)) => {}
            done => return done.map_err(op_err("copy a domain key into the session")),
        }
        let copy = keeper
            .copy_object(handle, &[Attribute::Token(false), label])
            .map_err(op_err("copy a domain key into the session"))?;
        match keeper.update_attributes(copy, &[Attribute::Extractable(false)]) {
            Ok(()) => Ok(copy),
            Err(e) => {
                let _ = keeper.destroy_object(copy);
                Err(op_err("make a working copy non-extractable")(e))
            }
        }
    };
    Ok(DomainKeys {
        oprf_seed: copy(token.oprf_seed, labels::OPRF_SEED)?,
        ake_private: copy(token.ake_private, labels::AKE_PRIVATE)?,
        seal: copy(token.seal, labels::SEAL)?,
        record_id: copy(token.record_id, labels::RECORD_ID)?,
        watermark: token.watermark,
    })
}

/// Finds the domain keys by label, creating none.
fn load_domain_keys(session: &Session) -> Result<(DomainKeys, Vec<u8>), PartitionError> {
    let find = |class, label: &'static str| {
        find_one(session, class, label)?.ok_or(PartitionError::MissingKey(label))
    };
    let oprf_seed = find(ObjectClass::SECRET_KEY, labels::OPRF_SEED)?;
    let record_id = find(ObjectClass::SECRET_KEY, labels::RECORD_ID)?;
    let seal = find(ObjectClass::SECRET_KEY, labels::SEAL)?;
    let ake_private = find(ObjectClass::PRIVATE_KEY, labels::AKE_PRIVATE)?;
    let ake_public = find(ObjectClass::PUBLIC_KEY, labels::AKE_PUBLIC)?;
    let ake_public = read_ec_point(session, ake_public)?;
    let watermark = ensure_watermark(session)?;
    Ok((
        DomainKeys {
            oprf_seed,
            ake_private,
            seal,
            record_id,
            watermark,
        },
        ake_public,
    ))
}

fn read_ec_point(session: &Session, public: ObjectHandle) -> Result<Vec<u8>, PartitionError> {
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(op_err("read AKE public key"))?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or(PartitionError::MissingKey(labels::AKE_PUBLIC))?;
    unwrap_der_octet_string(&point)
}

fn ensure_watermark(session: &Session) -> Result<ObjectHandle, PartitionError> {
    state_object(session, labels::WATERMARK_APP)
}

/// The private data object whose label holds the state kept under
/// application name `app`, created empty on first use.
fn state_object(session: &Session, app: &str) -> Result<ObjectHandle, PartitionError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(app.as_bytes().to_vec()),
        ])
        .map_err(op_err("find token state"))?;
    if let Some(h) = found.into_iter().next() {
        return Ok(h);
    }
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(true),
            Attribute::Application(app.as_bytes().to_vec()),
            Attribute::Label(Vec::new()),
        ])
        .map_err(op_err("create token state"))
}

/// Creates the AKE public key object (token, public, found by its label)
/// from a SEC1 point, with `CKA_EC_POINT` in the DER form of PKCS#11 up to
/// 3.0, which SoftHSM and kryoptic both accept.
fn create_ake_public(session: &Session, point: &[u8]) -> Result<ObjectHandle, PartitionError> {
    let len =
        u8::try_from(point.len())
            .ok()
            .filter(|l| *l < 0x80)
            .ok_or(PartitionError::Operation {
                op: "create AKE public key",
                detail: "public key has the wrong length".into(),
            })?;
    let mut der = vec![0x04, len];
    der.extend_from_slice(point);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::EcParams(P256_OID_DER.to_vec()),
            Attribute::EcPoint(der),
            Attribute::Label(labels::AKE_PUBLIC.as_bytes().to_vec()),
        ])
        .map_err(op_err("create AKE public key"))
}

fn read_label(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, PartitionError> {
    crate::telemetry::metrics().token_op("read_state", || read_label_untimed(session, handle))
}

fn read_label_untimed(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, PartitionError> {
    session
        .get_attributes(handle, &[AttributeType::Label])
        .map_err(op_err("read token state"))?
        .into_iter()
        .find_map(|a| match a {
            Attribute::Label(l) => Some(l),
            _ => None,
        })
        .ok_or(PartitionError::Operation {
            op: "read token state",
            detail: "state object has no label".into(),
        })
}

fn write_label(
    session: &Session,
    handle: ObjectHandle,
    state: &[u8],
) -> Result<(), PartitionError> {
    crate::telemetry::metrics().token_op("write_state", || {
        session
            .update_attributes(handle, &[Attribute::Label(state.to_vec())])
            .map_err(op_err("write token state"))
    })
}

fn ensure_domain_keys(session: &Session) -> Result<(DomainKeys, Vec<u8>), PartitionError> {
    let oprf_seed = generic_secret(session, labels::OPRF_SEED)?;
    let record_id = generic_secret(session, labels::RECORD_ID)?;
    let seal = aes_key(session, labels::SEAL)?;
    let (ake_private, ake_public) = ake_key_pair(session)?;
    let watermark = ensure_watermark(session)?;
    Ok((
        DomainKeys {
            oprf_seed,
            ake_private,
            seal,
            record_id,
            watermark,
        },
        ake_public,
    ))
}

/// A checked-out PKCS#11 session; returns to the pool when dropped.
pub struct PartitionSession {
    session: Option<Session>,
    partition: Arc<Partition>,
}

impl fmt::Debug for PartitionSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionSession").finish_non_exhaustive()
    }
}

impl Drop for PartitionSession {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if let Ok(mut idle) = self.partition.idle.lock() {
                if idle.len() < MAX_IDLE_SESSIONS {
                    idle.push(session);
                }
            }
        }
    }
}

/// Which domain key an HMAC is made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacKey {
    /// The OPRF seed: HKDF-Expand over it yields per-record OPRF keys.
    OprfSeed,
    /// The key that turns account ids into record ids.
    RecordId,
}

/// Facts read back from the token about one domain key, for audits and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProtection {
    pub label: &'static str,
    pub sensitive: bool,
    pub extractable: bool,
    pub wrap_with_trusted: bool,
    /// Whether `CKA_VALUE` could be read in plaintext (must be false).
    pub value_readable: bool,
    /// Whether wrapping under a fresh, untrusted AES key succeeded (must be
    /// false). Tried on the token object and on its working copy.
    pub wraps_under_untrusted_key: bool,
    /// `CKA_LOCAL` of the token object: true only for a key generated in
    /// this token. A key cloned by the ceremony (unwrapped) or imported at
    /// provisioning ([`import`]) is not local.
    pub local: bool,
    /// `CKA_ALWAYS_SENSITIVE` of the token object: false for a key that
    /// ever existed outside the token's protection (imported), and for a
    /// cloned one (PKCS#11 cannot vouch for the source).
    pub always_sensitive: bool,
}

impl KeyProtection {
    /// Where the key came from, as far as the token can tell.
    pub fn origin(&self) -> KeyOrigin {
        if self.local {
            KeyOrigin::GeneratedHere
        } else {
            KeyOrigin::ClonedOrImported
        }
    }
}

/// Where a domain key came from, as the token reports it (`CKA_LOCAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Generated inside this token: it never existed anywhere else.
    GeneratedHere,
    /// Created from outside: unwrapped by a cloning ceremony, or imported
    /// from the provisioner's memory ([`import`]). PKCS#11 does not tell
    /// the two apart.
    ClonedOrImported,
}

impl PartitionSession {
    fn s(&self) -> &Session {
        // Invariant: `session` is only taken in `drop`.
        self.session
            .as_ref()
            .unwrap_or_else(|| unreachable!("session used after drop"))
    }

    fn keys(&self) -> DomainKeys {
        match self.partition.keys.read() {
            Ok(k) => *k,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// HMAC-SHA256 inside the token.
    pub fn hmac(&self, key: MacKey, data: &[u8]) -> Result<[u8; 32], PartitionError> {
        let handle = match key {
            MacKey::OprfSeed => self.keys().oprf_seed,
            MacKey::RecordId => self.keys().record_id,
        };
        let out = self
            .s()
            .sign(&Mechanism::Sha256Hmac, handle, data)
            .map_err(op_err("HMAC"))?;
        out.try_into().map_err(|_| PartitionError::Operation {
            op: "HMAC",
            detail: "token returned a MAC of unexpected length".into(),
        })
    }

    /// ECDH between the AKE private key and `peer` (SEC1, compressed or not).
    /// Returns the x-coordinate of the shared point.
    ///
    /// PKCS#11 `CKM_ECDH1_DERIVE` only returns the x-coordinate (SoftHSM
    /// supports only the null KDF), so the derived secret object is made
    /// extractable to read it and destroyed at once. It is a one-time DH
    /// share, never a long-term key. See [`ecdh_share`] for the point's
    /// encoding.
    pub fn ecdh_x(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
        ecdh_share(self.s(), self.keys().ake_private, peer)
    }

    /// AES-256-GCM encryption under the record-sealing key. Returns
    /// ciphertext || tag.
    pub fn seal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, PartitionError> {
        let mut iv = *iv;
        let params =
            GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(op_err("GCM params"))?;
        self.s()
            .encrypt(&Mechanism::AesGcm(params), self.keys().seal, plaintext)
            .map_err(op_err("seal"))
    }

    /// AES-256-GCM decryption under the record-sealing key.
    ///
    /// SoftHSM 2.6 reports a bad tag as `CKR_GENERAL_ERROR` rather than
    /// `CKR_ENCRYPTED_DATA_INVALID`, so both are read as an integrity failure.
    pub fn unseal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
        let mut iv = *iv;
        let params =
            GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).map_err(op_err("GCM params"))?;
        match self
            .s()
            .decrypt(&Mechanism::AesGcm(params), self.keys().seal, sealed)
        {
            Ok(p) => Ok(Zeroizing::new(p)),
            Err(CkError::Pkcs11(
                RvError::GeneralError
                | RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange,
                _,
            )) => Err(PartitionError::Integrity),
            Err(e) => Err(op_err("unseal")(e)),
        }
    }

    /// Reads the vault's anchor state kept in the token (see
    /// `core::index`): opaque bytes to this module.
    ///
    /// It lives in the label of a private data object: SoftHSM cannot change
    /// a data object's `CKA_VALUE` in place, but it updates labels in place.
    pub fn anchor_state(&self) -> Result<Vec<u8>, PartitionError> {
        read_label(self.s(), self.keys().watermark)
    }

    /// Replaces the anchor state kept in the token.
    pub fn set_anchor_state(&self, state: &[u8]) -> Result<(), PartitionError> {
        write_label(self.s(), self.keys().watermark, state)
    }

    /// Reads the monotonic state kept under application name `app` in the
    /// token (created empty on first use). Like the anchor, it lives in the
    /// label of a private data object, where the host cannot roll it back.
    /// A label is UTF-8 text (PKCS#11's `CKA_LABEL`; kryoptic refuses other
    /// bytes), so the state's bytes are kept as hex.
    pub fn app_state(&self, app: &str) -> Result<Vec<u8>, PartitionError> {
        let text = read_label(self.s(), self.state_object(app)?)
            .inspect_err(|_| self.forget_state_object(app))?;
        hex::decode(&text).map_err(|e| PartitionError::Operation {
            op: "read token state",
            detail: format!("the state label is not hex: {e}"),
        })
    }

    /// Replaces the state kept under application name `app`.
    pub fn set_app_state(&self, app: &str, state: &[u8]) -> Result<(), PartitionError> {
        write_label(
            self.s(),
            self.state_object(app)?,
            hex::encode(state).as_bytes(),
        )
        .inspect_err(|_| self.forget_state_object(app))
    }

    /// The state object of `app`, found (or made) once and remembered.
    fn state_object(&self, app: &str) -> Result<ObjectHandle, PartitionError> {
        // Found or made under the lock, so that two threads never make two
        // objects for one application.
        let mut objects =
            self.partition
                .state_objects
                .lock()
                .map_err(|_| PartitionError::Operation {
                    op: "token state",
                    detail: "state object lock poisoned".into(),
                })?;
        if let Some(h) = objects.get(app).copied() {
            return Ok(h);
        }
        let h = state_object(self.s(), app)?;
        objects.insert(app.to_owned(), h);
        Ok(h)
    }

    /// Forgets the handle of `app`'s state object after an operation on it
    /// failed: the next use finds the object again (a handle can go stale,
    /// say if the object's file was being rewritten when SoftHSM re-read it).
    fn forget_state_object(&self, app: &str) {
        if let Ok(mut objects) = self.partition.state_objects.lock() {
            objects.remove(app);
        }
    }

    /// Reads back how each domain key is protected, and tries the two ways a
    /// plaintext copy could leave the token: reading `CKA_VALUE`, and wrapping
    /// under an untrusted key made for the purpose.
    pub fn key_protection(&self) -> Result<Vec<KeyProtection>, PartitionError> {
        let s = self.s();
        let k = self.keys();
        // A session AES-256 key with `extra` attributes.
        let aes_key = |extra: &[Attribute], what: &'static str| {
            let mut template = vec![
                Attribute::Token(false),
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
            ];
            template.extend_from_slice(extra);
            s.generate_key(&Mechanism::AesKeyGen, &template)
                .map_err(op_err(what))
        };
        let probe = aes_key(&[Attribute::Wrap(true)], "generate probe key")?;
        // Every AES wrap mechanism cryptoki can name: SoftHSM offers
        // CKM_AES_KEY_WRAP_PAD, kryoptic only CKM_AES_KEY_WRAP (and
        // CKM_AES_KEY_WRAP_KWP, which cryptoki 0.12 cannot name). A probe
        // with a mechanism the token lacks would be refused whatever the
        // key's protection, so a control key shows first that the probe can
        // wrap at all.
        let wraps = |handle| {
            [Mechanism::AesKeyWrap, Mechanism::AesKeyWrapPad]
                .iter()
                .any(|m| s.wrap_key(m, probe, handle).is_ok())
        };
        let control = aes_key(
            &[Attribute::Sensitive(true), Attribute::Extractable(true)],
            "generate control key",
        )?;
        let control_wraps = wraps(control);
        let _ = s.destroy_object(control);
        if !control_wraps {
            let _ = s.destroy_object(probe);
            return Err(PartitionError::Operation {
                op: "key protection probe",
                detail: "the token wraps no key under an AES key: the probe would prove nothing"
                    .into(),
            });
        }
        let mut out = Vec::new();
        for (label, handle, class) in [
            (labels::OPRF_SEED, k.oprf_seed, ObjectClass::SECRET_KEY),
            (labels::RECORD_ID, k.record_id, ObjectClass::SECRET_KEY),
            (labels::SEAL, k.seal, ObjectClass::SECRET_KEY),
            (labels::AKE_PRIVATE, k.ake_private, ObjectClass::PRIVATE_KEY),
        ] {
            // `handle` is the working copy; the token object (found by its
            // label, which the copy does not share) says where the key came
            // from, and is probed too.
            let token_object = match find_one(s, class, label) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    let _ = s.destroy_object(probe);
                    return Err(PartitionError::MissingKey(label));
                }
                Err(e) => {
                    let _ = s.destroy_object(probe);
                    return Err(e);
                }
            };
            let origin = s
                .get_attributes(
                    token_object,
                    &[AttributeType::Local, AttributeType::AlwaysSensitive],
                )
                .map_err(op_err("read key attributes"))?;
            let attrs = s
                .get_attributes(
                    handle,
                    &[
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::WrapWithTrusted,
                        AttributeType::Value,
                    ],
                )
                .map_err(op_err("read key attributes"))?;
            let mut p = KeyProtection {
                label,
                sensitive: false,
                extractable: false,
                wrap_with_trusted: false,
                value_readable: false,
                wraps_under_untrusted_key: false,
                local: false,
                always_sensitive: false,
            };
            for a in origin {
                match a {
                    Attribute::Local(v) => p.local = v,
                    Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
                    _ => {}
                }
            }
            for a in attrs {
                match a {
                    Attribute::Sensitive(v) => p.sensitive = v,
                    Attribute::Extractable(v) => p.extractable = v,
                    Attribute::WrapWithTrusted(v) => p.wrap_with_trusted = v,
                    Attribute::Value(_) => p.value_readable = true,
                    _ => {}
                }
            }
            p.wraps_under_untrusted_key = wraps(handle) || wraps(token_object);
            out.push(p);
        }
        s.destroy_object(probe)
            .map_err(op_err("destroy probe key"))?;
        Ok(out)
    }
}

/// ECDH between `private` (a P-256 private key object) and `peer` (SEC1,
/// compressed or not): the x-coordinate of the shared point.
///
/// The peer's point goes to the token uncompressed, in a DER OCTET
/// STRING. SoftHSM wants the DER form; kryoptic takes the bare point and
/// recognizes DER only when it is longer than an uncompressed point, so
/// a compressed point in DER (35 bytes) fails there. An uncompressed
/// point in DER (67 bytes) is read right by both, and decompressing it
/// here also refuses a point off the curve before the token sees it.
pub(crate) fn ecdh_share(
    s: &Session,
    private: ObjectHandle,
    peer: &[u8],
) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
    let point = p256::PublicKey::from_sec1_bytes(peer)
        .map_err(|_| PartitionError::Operation {
            op: "ECDH",
            detail: "the peer's public key is not a P-256 point".into(),
        })?
        .to_encoded_point(false);
    let mut der = vec![0x04, 65];
    der.extend_from_slice(point.as_bytes());
    let derived = s
        .derive_key(
            &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), &der)),
            private,
            &[
                Attribute::Token(false),
                // Not private: SoftHSM encrypts the values of private
                // objects, and this one is read out at once anyway.
                Attribute::Private(false),
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .map_err(op_err("ECDH derive"))?;
    let value = s.get_attributes(derived, &[AttributeType::Value]);
    // Derived objects pile up in the session unless destroyed.
    let destroyed = s.destroy_object(derived);
    let value = value.map_err(op_err("read ECDH share"))?;
    destroyed.map_err(op_err("destroy ECDH share"))?;
    value
        .into_iter()
        .find_map(|a| match a {
            Attribute::Value(v) => Some(Zeroizing::new(v)),
            _ => None,
        })
        .ok_or(PartitionError::Operation {
            op: "ECDH derive",
            detail: "token returned no shared secret".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::unwrap_der_octet_string;

    /// SoftHSM's DER-wrapped `CKA_EC_POINT` and kryoptic's bare point give
    /// the same SEC1 bytes, and a bare point whose second byte happens to
    /// equal the length of the rest is not taken for DER.
    #[test]
    fn ec_point_in_der_or_bare_reads_the_same() {
        let mut point = vec![0x04];
        point.extend((0..64u8).map(|i| i.wrapping_mul(37)));
        let mut der = vec![0x04, 65];
        der.extend_from_slice(&point);
        assert_eq!(unwrap_der_octet_string(&der).expect("der"), point);
        assert_eq!(unwrap_der_octet_string(&point).expect("bare"), point);

        let mut tricky = vec![0x04, 63];
        tricky.extend([7u8; 63]);
        assert_eq!(unwrap_der_octet_string(&tricky).expect("bare"), tricky);

        let mut compressed = vec![0x02];
        compressed.extend([9u8; 32]);
        assert_eq!(
            unwrap_der_octet_string(&compressed).expect("bare"),
            compressed
        );
        assert!(unwrap_der_octet_string(&[0x04, 3, 1, 2, 3]).is_err());
        assert!(unwrap_der_octet_string(&[]).is_err());
    }
}
