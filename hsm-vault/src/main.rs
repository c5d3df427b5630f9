//! `hsm-vault`: one vault node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use hsm_vault::auth::Authorizer;
use hsm_vault::partition::Partition;
use hsm_vault::service::{VaultService, MAX_MESSAGE_BYTES};
use hsm_vault::store::Store;
use tokio_stream::wrappers::TcpListenerStream;
use vault_proto::vault::v1::vault_server::VaultServer;
use zeroize::Zeroizing;

/// Serves the vault's client API from a PKCS#11 token and a sled store.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is
    /// printed as `hsm-vault listening on ADDR`).
    #[arg(long, env = "HSM_VAULT_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Directory of the sled record store.
    #[arg(long, env = "HSM_VAULT_DATA_DIR")]
    data_dir: PathBuf,
    /// PKCS#11 module (SoftHSM2 by default).
    #[arg(
        long,
        env = "PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pkcs11_module: PathBuf,
    /// Label of the token holding this node's partition.
    #[arg(long, env = "HSM_VAULT_TOKEN_LABEL")]
    token_label: String,
    /// File holding the token user PIN. The PIN may instead come from the
    /// HSM_VAULT_PIN environment variable; it is never a command-line value.
    #[arg(long, env = "HSM_VAULT_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// The identity service's public key (hex SEC1 P-256) that signs owner
    /// bearer tokens.
    #[arg(long, env = "HSM_VAULT_AUTH_PUBLIC_KEY")]
    auth_public_key: PathBuf,
    /// Where to publish the vault's OPAQUE public key (hex) for clients to pin.
    #[arg(long, env = "HSM_VAULT_PUBLISH_KEY")]
    publish_key: Option<PathBuf>,
}

/// Reads the token PIN from the file or, failing that, from HSM_VAULT_PIN,
/// which is then removed from the environment. Runs before any thread
/// exists.
fn read_pin(args: &Args) -> anyhow::Result<Zeroizing<String>> {
    if let Some(path) = &args.pin_file {
        let pin = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading PIN file {}", path.display()))?,
        );
        return Ok(Zeroizing::new(
            pin.trim_end_matches(['\n', '\r']).to_owned(),
        ));
    }
    match std::env::var("HSM_VAULT_PIN") {
        Ok(pin) => {
            std::env::remove_var("HSM_VAULT_PIN");
            Ok(Zeroizing::new(pin))
        }
        Err(_) => bail!("no token PIN: set --pin-file or HSM_VAULT_PIN"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pin = read_pin(&args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, pin))
}

async fn serve(args: Args, pin: Zeroizing<String>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let auth_key = std::fs::read_to_string(&args.auth_public_key)
        .with_context(|| format!("reading {}", args.auth_public_key.display()))?;
    let auth_key = vault_proto::token::parse_verifying_key(&auth_key)
        .context("auth public key must be a hex SEC1 P-256 point")?;

    let module = args.pkcs11_module.clone();
    let label = args.token_label.clone();
    let partition = tokio::task::spawn_blocking(move || Partition::open(&module, &label, &pin))
        .await?
        .context("opening the PKCS#11 partition")?;
    let store =
        Store::open(&args.data_dir, partition.clone()).context("opening the record store")?;
    let service = VaultService::new(partition, store, Authorizer::new(auth_key))?;
    let public_hex = hex::encode(service.server_public_key());
    if let Some(path) = &args.publish_key {
        std::fs::write(path, format!("{public_hex}\n"))
            .with_context(|| format!("publishing the public key to {}", path.display()))?;
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, opaque_public_key = %public_hex, "vault node ready");
    println!("hsm-vault listening on {addr}");

    tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .add_service(
            VaultServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown())
        .await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (what systemd and container runtimes send).
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
