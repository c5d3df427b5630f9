//! `softhsm-test-harness`: token stores for tests and local fleets, on one
//! of two PKCS#11 implementations, and an isolated-token harness.
//!
//! The provider is chosen by `VAULT_PKCS11` (`softhsm`, the default, or
//! `kryoptic`), the module by `PKCS11_MODULE` (default: where Debian installs
//! SoftHSM2, or the module `scripts/kryoptic.sh` builds). Both read their
//! configuration once, when a process initializes the library, from a file
//! named by an environment variable (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`). So:
//!
//! - every [`TestToken`] lives in its own temporary directory with its own
//!   configuration and token files ([`TokenStore`]);
//! - child processes get the token through [`TestToken::env`];
//! - a test that opens the token in-process calls
//!   [`TestToken::use_in_this_process`], which points this process's
//!   configuration variable at it. A process can hold one PKCS#11 context, so
//!   only one token store per process can be used this way (run tests with
//!   nextest, which gives each test its own process);
//! - code finds the token by its label, never by slot number.
//!
//! Tokens are made through PKCS#11 itself (`C_InitToken`, then the SO logs
//! in and sets the user PIN with `C_InitPIN`), in this process, with a
//! context that is finalized at once, so no PIN is ever on a command line
//! (where `/proc/*/cmdline` shows it to every user of the machine). SoftHSM
//! keeps a free slot for a new token; kryoptic's slots are fixed by its
//! configuration file (one SQLite file per slot), so adding a token means
//! adding a slot to the file before any process that should see it
//! initializes the library.
//!
//! This crate is test and deployment tooling: the vault's own PKCS#11 calls
//! all live in `hsm_vault::partition`.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

const TEMPLATE: &str = include_str!("../templates/softhsm2.conf.in");

/// Which slot a new token goes to.
#[derive(Clone, Copy, Debug)]
enum SlotChoice {
    /// This slot id (kryoptic: the slot added to its configuration).
    Id(u64),
    /// The free slot (SoftHSM).
    Free,
}

/// Where Debian and most distributions install the SoftHSM2 module.
const SOFTHSM_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Where `scripts/kryoptic.sh` builds the kryoptic module.
const KRYOPTIC_BUILT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../kryoptic-module/target/release/libkryoptic_module.so"
);

/// Environment variable choosing the PKCS#11 implementation.
pub const PROVIDER_ENV: &str = "VAULT_PKCS11";

/// A PKCS#11 implementation the vault is tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// SoftHSM2 (Debian package `softhsm2`).
    SoftHsm,
    /// kryoptic, built by `scripts/kryoptic.sh` (`kryoptic-module/`).
    Kryoptic,
}

impl Provider {
    /// The provider named by `VAULT_PKCS11` (SoftHSM when unset).
    pub fn from_env() -> Result<Self, HarnessError> {
        match std::env::var(PROVIDER_ENV) {
            Err(_) => Ok(Provider::SoftHsm),
            Ok(v) => Self::parse(&v),
        }
    }

    /// `softhsm` or `kryoptic`.
    pub fn parse(name: &str) -> Result<Self, HarnessError> {
        match name.trim() {
            "" | "softhsm" | "softhsm2" => Ok(Provider::SoftHsm),
            "kryoptic" => Ok(Provider::Kryoptic),
            other => Err(HarnessError(format!(
                "{PROVIDER_ENV}={other:?}: expected \"softhsm\" or \"kryoptic\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::SoftHsm => "softhsm",
            Provider::Kryoptic => "kryoptic",
        }
    }

    /// Whether the vault's cloning ceremony works on this provider's tokens.
    /// kryoptic 1.5 cannot mark a key `CKA_TRUSTED` (not even as the SO), so
    /// keys that leave a token only under a trusted key cannot leave it at
    /// all: several of its tokens get the same domain keys only by
    /// provisioning-time import (`hsm_vault::partition::import`).
    pub fn can_clone(self) -> bool {
        match self {
            Provider::SoftHsm => true,
            Provider::Kryoptic => false,
        }
    }

    /// The environment variable through which the module finds its
    /// configuration file.
    pub fn conf_env(self) -> &'static str {
        match self {
            Provider::SoftHsm => "SOFTHSM2_CONF",
            Provider::Kryoptic => "KRYOPTIC_CONF",
        }
    }

    fn conf_file(self) -> &'static str {
        match self {
            Provider::SoftHsm => "softhsm2.conf",
            Provider::Kryoptic => "kryoptic.conf",
        }
    }

    /// The module's path when `PKCS11_MODULE` is not set.
    pub fn default_module(self) -> PathBuf {
        match self {
            Provider::SoftHsm => SOFTHSM_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(SOFTHSM_CANDIDATES[0])),
            Provider::Kryoptic => PathBuf::from(KRYOPTIC_BUILT),
        }
    }
}

/// The provider of this process ([`Provider::from_env`]); an unknown name
/// is a setup error worth stopping for.
pub fn provider() -> Provider {
    match Provider::from_env() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Path of the PKCS#11 module: `PKCS11_MODULE`, or the provider's default.
pub fn module_path() -> PathBuf {
    if let Some(m) = std::env::var_os("PKCS11_MODULE") {
        return PathBuf::from(m);
    }
    provider().default_module()
}

#[derive(Debug)]
pub struct HarnessError(pub String);

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> HarnessError {
    move |e| HarnessError(format!("{what}: {e}"))
}

/// A configuration file and the tokens it holds, in one directory.
#[derive(Clone, Debug)]
pub struct TokenStore {
    provider: Provider,
    dir: PathBuf,
    module: PathBuf,
}

impl TokenStore {
    /// Writes an empty store's configuration into `dir` (which must exist).
    pub fn create(provider: Provider, dir: &Path, module: &Path) -> Result<Self, HarnessError> {
        let dir = dir.canonicalize().map_err(err("token store directory"))?;
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(err("token dir"))?;
        let store = TokenStore {
            provider,
            dir,
            module: module.to_owned(),
        };
        let text = match provider {
            Provider::SoftHsm => TEMPLATE.replace("@TOKENDIR@", &tokens.to_string_lossy()),
            Provider::Kryoptic => KRYOPTIC_HEADER.to_owned(),
        };
        std::fs::write(store.conf_path(), text).map_err(err("writing config"))?;
        Ok(store)
    }

    /// A store [`TokenStore::create`] made earlier in `dir`.
    pub fn open(provider: Provider, dir: &Path, module: &Path) -> Self {
        TokenStore {
            provider,
            dir: dir.to_owned(),
            module: module.to_owned(),
        }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn conf_path(&self) -> PathBuf {
        self.dir.join(self.provider.conf_file())
    }

    /// Environment a child process needs to see this store's tokens.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                self.provider.conf_env().into(),
                self.conf_path().to_string_lossy().into_owned(),
            ),
            (
                "PKCS11_MODULE".into(),
                self.module.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// Initializes a new token labelled `label` with these PINs. Must not be
    /// called while this process holds an initialized PKCS#11 context of the
    /// same module (kryoptic: the new token is seen only by contexts
    /// initialized afterwards).
    pub fn init_token(&self, label: &str, pin: &str, so_pin: &str) -> Result<(), HarnessError> {
        match self.provider {
            Provider::SoftHsm => {
                if self.token_labels()?.iter().any(|l| l == label) {
                    return Err(HarnessError(format!("a token labelled {label:?} exists")));
                }
                self.init_in_process(SlotChoice::Free, label, pin, so_pin)
            }
            Provider::Kryoptic => {
                let slot = self.kryoptic_slot_for(label)?;
                self.init_in_process(SlotChoice::Id(slot), label, pin, so_pin)
            }
        }
    }

    /// Deletes the token labelled `label` (a lost token), if there is one.
    pub fn delete_token(&self, label: &str) -> Result<(), HarnessError> {
        match self.provider {
            Provider::SoftHsm => {
                // Fails when there is no such token, which is fine.
                let _ = Command::new("softhsm2-util")
                    .env("SOFTHSM2_CONF", self.conf_path())
                    .args(["--delete-token", "--token", label])
                    .output();
                Ok(())
            }
            Provider::Kryoptic => {
                if let Some(slot) = self
                    .kryoptic_slots()?
                    .into_iter()
                    .find(|s| s.label == label)
                {
                    match std::fs::remove_file(&slot.db) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(err("deleting the token file")(e)),
                    }
                }
                Ok(())
            }
        }
    }

    /// The slots of a kryoptic configuration, as this crate writes them.
    fn kryoptic_slots(&self) -> Result<Vec<KryopticSlot>, HarnessError> {
        let text = std::fs::read_to_string(self.conf_path()).map_err(err("reading config"))?;
        let mut slots = Vec::new();
        for block in text.split("[[slots]]").skip(1) {
            let field = |name: &str| {
                block.lines().find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
                })
            };
            let id = field("slot")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| HarnessError("kryoptic config: a slot without a number".into()))?;
            slots.push(KryopticSlot {
                id,
                label: field("description").unwrap_or_default(),
                db: PathBuf::from(field("dbargs").unwrap_or_default()),
            });
        }
        Ok(slots)
    }

    /// The slot for a new token `label`: the one that held a deleted token
    /// of that label, or a new one added to the configuration.
    fn kryoptic_slot_for(&self, label: &str) -> Result<u64, HarnessError> {
        if label.is_empty()
            || label.len() > 32
            || !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
        {
            return Err(HarnessError(format!(
                "token label {label:?}: use 1 to 32 characters of [A-Za-z0-9-_./:]"
            )));
        }
        let slots = self.kryoptic_slots()?;
        if let Some(s) = slots.iter().find(|s| s.label == label) {
            if s.db.exists() {
                return Err(HarnessError(format!("a token labelled {label:?} exists")));
            }
            return Ok(s.id);
        }
        let id = slots.iter().map(|s| s.id).max().unwrap_or(0) + 1;
        let db = self.dir.join("tokens").join(format!("slot-{id}.sql"));
        let block = format!(
            "\n[[slots]]\nslot = {id}\ndescription = \"{label}\"\ndbtype = \"sqlite\"\n\
             dbargs = \"{}\"\n",
            db.display()
        );
        let mut text = std::fs::read_to_string(self.conf_path()).map_err(err("reading config"))?;
        text.push_str(&block);
        std::fs::write(self.conf_path(), text).map_err(err("writing config"))?;
        Ok(id)
    }

    /// Initializes a token through PKCS#11 in this process: `C_InitToken` on
    /// the slot `which` picks, then the SO logs in and sets the user PIN
    /// (`C_InitPIN`), with a context of the module pointed at this store and
    /// finalized at once. No PIN is ever on a command line.
    fn init_in_process(
        &self,
        which: SlotChoice,
        label: &str,
        pin: &str,
        so_pin: &str,
    ) -> Result<(), HarnessError> {
        // The module reads its configuration variable when initialized:
        // point it at this store for the moment, one initialization at a
        // time.
        static IN_PROCESS: Mutex<()> = Mutex::new(());
        let _one = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        let var = self.provider.conf_env();
        let before = std::env::var_os(var);
        std::env::set_var(var, self.conf_path());
        let result = (|| {
            let ctx = Pkcs11::new(&self.module).map_err(err("loading the PKCS#11 module"))?;
            match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) => {}
                Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                    return Err(HarnessError(
                        "the PKCS#11 module is already initialized in this process: create \
                         every token before opening one in-process"
                            .into(),
                    ))
                }
                Err(e) => return Err(err("initializing the PKCS#11 module")(e)),
            }
            let init = (|| {
                let slots = ctx.get_all_slots().map_err(err("listing slots"))?;
                let slot = match which {
                    SlotChoice::Id(id) => slots.into_iter().find(|s| s.id() == id),
                    // SoftHSM keeps one free slot with an uninitialized token.
                    SlotChoice::Free => slots
                        .into_iter()
                        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized())),
                }
                .ok_or_else(|| HarnessError("no free slot for a new token".into()))?;
                ctx.init_token(slot, &AuthPin::new(so_pin.into()), label)
                    .map_err(err("C_InitToken"))?;
                // SoftHSM moves an initialized token to a slot of its own:
                // find it again by its label.
                let slot = ctx
                    .get_slots_with_initialized_token()
                    .map_err(err("listing slots"))?
                    .into_iter()
                    .find(|s| {
                        ctx.get_token_info(*s)
                            .is_ok_and(|i| i.label().trim_end() == label)
                    })
                    .ok_or_else(|| HarnessError(format!("token {label:?} vanished")))?;
                let session = ctx.open_rw_session(slot).map_err(err("open session"))?;
                session
                    .login(UserType::So, Some(&AuthPin::new(so_pin.into())))
                    .map_err(err("SO login"))?;
                session
                    .init_pin(&AuthPin::new(pin.into()))
                    .map_err(err("C_InitPIN"))?;
                session.logout().map_err(err("logout"))?;
                Ok(())
            })();
            let finalized = ctx.finalize().map_err(err("finalizing the PKCS#11 module"));
            init.and(finalized)
        })();
        match before {
            Some(v) => std::env::set_var(var, v),
            None => std::env::remove_var(var),
        }
        result
    }

    /// Labels of the initialized tokens a fresh context of the module sees.
    /// Kryoptic only; like [`TokenStore::init_token`], not while this process
    /// holds a context.
    pub fn token_labels(&self) -> Result<Vec<String>, HarnessError> {
        match self.provider {
            Provider::SoftHsm => {
                let out = Command::new("softhsm2-util")
                    .env("SOFTHSM2_CONF", self.conf_path())
                    .arg("--show-slots")
                    .output()
                    .map_err(err("running softhsm2-util"))?;
                Ok(String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("Label:"))
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect())
            }
            Provider::Kryoptic => {
                static IN_PROCESS: Mutex<()> = Mutex::new(());
                let _one = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
                let before = std::env::var_os("KRYOPTIC_CONF");
                std::env::set_var("KRYOPTIC_CONF", self.conf_path());
                let result = (|| {
                    let ctx = Pkcs11::new(&self.module).map_err(err("loading kryoptic"))?;
                    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                        .map_err(err("initializing kryoptic"))?;
                    let labels = ctx
                        .get_slots_with_initialized_token()
                        .map_err(err("listing slots"))
                        .and_then(|slots| {
                            slots
                                .into_iter()
                                .map(|s| {
                                    ctx.get_token_info(s)
                                        .map(|i| i.label().trim_end().to_owned())
                                        .map_err(err("token info"))
                                })
                                .collect()
                        });
                    let finalized = ctx.finalize().map_err(err("finalizing kryoptic"));
                    let labels = labels?;
                    finalized?;
                    Ok(labels)
                })();
                match before {
                    Some(v) => std::env::set_var("KRYOPTIC_CONF", v),
                    None => std::env::remove_var("KRYOPTIC_CONF"),
                }
                result
            }
        }
    }
}

/// The start of every kryoptic configuration this crate writes; slots are
/// appended as tokens are made.
const KRYOPTIC_HEADER: &str = "# kryoptic configuration (written by softhsm-test-harness).\n\
# One slot block per token, each with its own SQLite file; the\n\
# description is the token's label, so a lost token's slot can be reused.\n";

#[derive(Debug)]
struct KryopticSlot {
    id: u64,
    label: String,
    db: PathBuf,
}

/// An initialized token in a private temporary directory, removed when
/// dropped.
#[derive(Debug)]
pub struct TestToken {
    dir: tempfile::TempDir,
    store: TokenStore,
    label: String,
    pin: String,
    so_pin: String,
}

impl TestToken {
    /// Creates and initializes a token labelled `label` with a random PIN,
    /// on the provider `VAULT_PKCS11` names.
    pub fn new(label: &str) -> Result<Self, HarnessError> {
        let provider = Provider::from_env()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-test-", provider.name()))
            .tempdir()
            .map_err(err("temp dir"))?;
        let store = TokenStore::create(provider, dir.path(), &module_path())?;
        let (pin, so_pin) = (random_hex(8)?, random_hex(8)?);
        store.init_token(label, &pin, &so_pin)?;
        std::fs::write(dir.path().join("user.pin"), &pin).map_err(err("writing PIN file"))?;
        Ok(TestToken {
            dir,
            store,
            label: label.to_owned(),
            pin,
            so_pin,
        })
    }

    /// Adds another token to this token's store, so one process can open
    /// both (through one PKCS#11 context), as a cloning ceremony between two
    /// tokens needs. Returns its (user PIN, SO PIN).
    pub fn add_token(&self, label: &str) -> Result<(String, String), HarnessError> {
        let (pin, so_pin) = (random_hex(8)?, random_hex(8)?);
        self.store.init_token(label, &pin, &so_pin)?;
        Ok((pin, so_pin))
    }

    /// The security officer's PIN (needed for cloning ceremonies).
    pub fn so_pin(&self) -> &str {
        &self.so_pin
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pin(&self) -> &str {
        &self.pin
    }

    pub fn provider(&self) -> Provider {
        self.store.provider()
    }

    /// The token store (configuration and token files).
    pub fn store(&self) -> &TokenStore {
        &self.store
    }

    /// File holding the user PIN (what a node reads with `--pin-file`).
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    pub fn conf_path(&self) -> PathBuf {
        self.store.conf_path()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment a child process needs to see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        self.store.env()
    }

    /// Points this process's module at this token's store. Call before the
    /// first PKCS#11 context is initialized; a second call with another
    /// store in the same process fails.
    pub fn use_in_this_process(&self) -> Result<(), HarnessError> {
        static CHOSEN: OnceLock<PathBuf> = OnceLock::new();
        let conf = self.conf_path();
        let chosen = CHOSEN.get_or_init(|| conf.clone());
        if *chosen != conf {
            return Err(HarnessError(
                "this process already uses another token store; run each test in its own \
                 process (cargo nextest)"
                    .into(),
            ));
        }
        // Set once, before any PKCS#11 context exists in this process.
        std::env::set_var(self.provider().conf_env(), &conf);
        Ok(())
    }
}

/// `n` random bytes from the OS, hex-encoded (PINs).
pub fn random_hex(n: usize) -> Result<String, HarnessError> {
    let mut buf = vec![0u8; n];
    let mut f = std::fs::File::open("/dev/urandom").map_err(err("opening /dev/urandom"))?;
    std::io::Read::read_exact(&mut f, &mut buf).map_err(err("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_isolated_and_labelled() {
        let a = TestToken::new("harness-a").expect("token a");
        let b = TestToken::new("harness-b").expect("token b");
        assert_ne!(a.conf_path(), b.conf_path());
        assert_ne!(a.pin(), b.pin());
        let seen = a.store().token_labels().expect("list tokens");
        assert!(seen.iter().any(|l| l == "harness-a"), "{seen:?}");
        assert!(!seen.iter().any(|l| l == "harness-b"), "{seen:?}");
    }

    #[test]
    fn a_store_holds_several_tokens_and_reuses_a_lost_ones_slot() {
        let a = TestToken::new("store-1").expect("token");
        a.add_token("store-2").expect("second token");
        let mut seen = a.store().token_labels().expect("list tokens");
        seen.sort();
        assert_eq!(seen, ["store-1", "store-2"]);
        a.store().delete_token("store-2").expect("delete");
        let (pin, so_pin) = (random_hex(8).expect("pin"), random_hex(8).expect("pin"));
        a.store()
            .init_token("store-2", &pin, &so_pin)
            .expect("a new token of that label");
        let mut seen = a.store().token_labels().expect("list tokens");
        seen.sort();
        assert_eq!(seen, ["store-1", "store-2"]);
    }
}
