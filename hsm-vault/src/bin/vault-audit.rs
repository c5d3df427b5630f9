//! `vault-audit`: verifies a node's audit trail in a token of the fleet and
//! exports it (JSON lines on stdout, or a table). Exits non-zero if the
//! chain does not verify: an entry was changed, removed, inserted or moved.
//!
//! Any token of the fleet verifies any node's trail (they share the domain
//! keys); the node may keep running meanwhile.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hsm_vault::audit::{read, verify};
use hsm_vault::partition::{KeySetup, Module, Partition};
use zeroize::Zeroizing;

#[derive(Debug, Parser)]
#[command(version, about = "Verify and export a vault node's audit trail")]
struct Args {
    /// The trail (a node's `--audit-log`, by default `audit.log` in its
    /// data directory).
    #[arg(long)]
    log: PathBuf,
    /// PKCS#11 module.
    #[arg(
        long,
        env = "PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pkcs11_module: PathBuf,
    /// Label of a token of the fleet (its MAC key checks the chain).
    #[arg(long, env = "HSM_VAULT_TOKEN_LABEL")]
    token_label: String,
    /// File holding that token's user PIN (or HSM_VAULT_PIN).
    #[arg(long, env = "HSM_VAULT_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// Print a table instead of JSON lines.
    #[arg(long)]
    table: bool,
}

fn run(args: Args) -> anyhow::Result<()> {
    let pin = match (&args.pin_file, std::env::var("HSM_VAULT_PIN")) {
        (Some(path), _) => Zeroizing::new(std::fs::read_to_string(path)?.trim().to_owned()),
        (None, Ok(pin)) => Zeroizing::new(pin),
        (None, Err(_)) => anyhow::bail!("give --pin-file or HSM_VAULT_PIN"),
    };
    let partition = Partition::open_in(
        &Module::load(&args.pkcs11_module)?,
        &args.token_label,
        &pin,
        KeySetup::RequireExisting,
    )?;
    let entries = read(&args.log)?;
    let last = verify(&partition, &entries)?;
    for e in &entries {
        if args.table {
            let event = serde_json::to_value(&e.event)?;
            println!(
                "{:>6}  {:>13}  node {:<3} {event}",
                e.seq, e.time_ms, e.node
            );
        } else {
            println!("{}", serde_json::to_string(e)?);
        }
    }
    eprintln!(
        "vault-audit: {} entries, chain verified through entry {last}",
        entries.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vault-audit: {e:#}");
            ExitCode::FAILURE
        }
    }
}
