//! `softhsm-test-harness`: gives each test its own SoftHSM2 token.
//!
//! SoftHSM reads its configuration (`SOFTHSM2_CONF`) once, when a process
//! initializes the library, and renumbers slots as tokens come and go. So:
//!
//! - every [`TestToken`] lives in its own temporary directory with its own
//!   `softhsm2.conf` and token directory, initialized with `softhsm2-util`;
//! - child processes get the token through [`TestToken::env`];
//! - a test that opens the token in-process calls
//!   [`TestToken::use_in_this_process`], which points this process's
//!   `SOFTHSM2_CONF` at it. A process can hold one PKCS#11 context, so only
//!   one token per process can be used this way (run tests with nextest,
//!   which gives each test its own process);
//! - code finds the token by its label, never by slot number.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const TEMPLATE: &str = include_str!("../templates/softhsm2.conf.in");

/// Where Debian and most distributions install the SoftHSM2 module;
/// `PKCS11_MODULE` overrides.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Path of the SoftHSM2 PKCS#11 module.
pub fn module_path() -> PathBuf {
    if let Some(m) = std::env::var_os("PKCS11_MODULE") {
        return PathBuf::from(m);
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(MODULE_CANDIDATES[0]))
}

/// An initialized SoftHSM2 token in a private temporary directory, removed
/// when dropped.
#[derive(Debug)]
pub struct TestToken {
    dir: tempfile::TempDir,
    label: String,
    pin: String,
    so_pin: String,
}

#[derive(Debug)]
pub struct HarnessError(pub String);

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

impl TestToken {
    /// Creates and initializes a token labelled `label` with a random PIN.
    pub fn new(label: &str) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("softhsm-test-")
            .tempdir()
            .map_err(|e| HarnessError(format!("temp dir: {e}")))?;
        write_config(dir.path())?;
        let (pin, so_pin) = init_token(&dir.path().join("softhsm2.conf"), label)?;
        std::fs::write(dir.path().join("user.pin"), &pin)
            .map_err(|e| HarnessError(format!("writing PIN file: {e}")))?;
        Ok(TestToken {
            dir,
            label: label.to_owned(),
            pin,
            so_pin,
        })
    }

    /// Adds another token to this token's SoftHSM configuration, so one
    /// process can open both (through one PKCS#11 context), as a cloning
    /// ceremony between two tokens needs.
    pub fn add_token(&self, label: &str) -> Result<(String, String), HarnessError> {
        init_token(&self.conf_path(), label)
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

    /// File holding the user PIN (what a node reads with `--pin-file`).
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("user.pin")
    }

    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment a child process needs to see this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "SOFTHSM2_CONF".into(),
                self.conf_path().to_string_lossy().into_owned(),
            ),
            (
                "PKCS11_MODULE".into(),
                module_path().to_string_lossy().into_owned(),
            ),
        ]
    }

    /// Points this process's SoftHSM at this token. Call before the first
    /// PKCS#11 context is initialized; a second call with another token in
    /// the same process fails.
    pub fn use_in_this_process(&self) -> Result<(), HarnessError> {
        static CHOSEN: OnceLock<PathBuf> = OnceLock::new();
        let conf = self.conf_path();
        let chosen = CHOSEN.get_or_init(|| conf.clone());
        if *chosen != conf {
            return Err(HarnessError(
                "this process already uses another SoftHSM token; run each test in its own \
                 process (cargo nextest)"
                    .into(),
            ));
        }
        // Set once, before any PKCS#11 context exists in this process.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        Ok(())
    }
}

fn write_config(dir: &Path) -> Result<(), HarnessError> {
    let tokens = dir.join("tokens");
    std::fs::create_dir(&tokens).map_err(|e| HarnessError(format!("token dir: {e}")))?;
    std::fs::write(
        dir.join("softhsm2.conf"),
        TEMPLATE.replace("@TOKENDIR@", &tokens.to_string_lossy()),
    )
    .map_err(|e| HarnessError(format!("writing config: {e}")))
}

/// Initializes a token in the first free slot; returns (user PIN, SO PIN).
fn init_token(conf: &Path, label: &str) -> Result<(String, String), HarnessError> {
    let pin = random_hex(8)?;
    let so_pin = random_hex(8)?;
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            &pin,
            "--so-pin",
            &so_pin,
        ])
        .output()
        .map_err(|e| {
            HarnessError(format!(
                "running softhsm2-util (is the softhsm2 package installed?): {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(HarnessError(format!(
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok((pin, so_pin))
}

fn random_hex(n: usize) -> Result<String, HarnessError> {
    let mut buf = vec![0u8; n];
    let mut f = std::fs::File::open("/dev/urandom")
        .map_err(|e| HarnessError(format!("opening /dev/urandom: {e}")))?;
    std::io::Read::read_exact(&mut f, &mut buf)
        .map_err(|e| HarnessError(format!("reading /dev/urandom: {e}")))?;
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
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", a.conf_path())
            .arg("--show-slots")
            .output()
            .expect("softhsm2-util runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("harness-a"), "{text}");
        assert!(!text.contains("harness-b"), "{text}");
    }
}
