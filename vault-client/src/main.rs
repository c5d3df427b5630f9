//! `vault`: the command-line client of the HSM-backed backup key vault.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use vault_client::backup::{self, BackupKey};
use vault_client::{parse_pinned_key, ClientError, RecordStatus, Transport, VaultClient};
use zeroize::Zeroizing;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Back up and restore with a key kept by the HSM vault"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct VaultArgs {
    /// The vault's gRPC endpoint: `https://HOST:PORT` (or `http://` with
    /// --plaintext).
    #[arg(long, env = "VAULT_ENDPOINT", default_value = "https://127.0.0.1:7700")]
    endpoint: String,
    /// The CA certificate (PEM) the vault's TLS certificate must chain to
    /// (a local fleet's: FLEET_DIR/tls/ca.pem).
    #[arg(long, env = "VAULT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Talk to an `http://` endpoint without TLS: development vaults only
    /// (the bearer token and the OPAQUE messages cross in the clear).
    #[arg(long, env = "VAULT_PLAINTEXT", conflicts_with = "ca_cert")]
    plaintext: bool,
    /// The vault's published OPAQUE public key (hex); the client refuses any
    /// other vault.
    #[arg(long, env = "VAULT_PUBLIC_KEY")]
    vault_key: Option<PathBuf>,
    /// Account id.
    #[arg(long, env = "VAULT_ACCOUNT")]
    account: Option<String>,
    /// Read the password from the first line of standard input instead of
    /// prompting (for scripts).
    #[arg(long)]
    password_stdin: bool,
}

impl VaultArgs {
    fn account(&self) -> anyhow::Result<&[u8]> {
        self.account
            .as_deref()
            .map(str::as_bytes)
            .ok_or_else(|| anyhow!("--account (or VAULT_ACCOUNT) is needed"))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register or recover a raw 32-byte key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encrypt, restore or stop protecting a backup file.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Show the account's record (owner token required).
    Status {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(long, env = "VAULT_TOKEN_FILE")]
        token_file: PathBuf,
    },
    /// Owner bearer tokens, for local deployments without an identity service.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Register a key under a password. The key (64 hex digits) is read from
    /// standard input after the password line, or generated and printed.
    Register {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(long, env = "VAULT_TOKEN_FILE")]
        token_file: PathBuf,
        /// Wrong guesses allowed (1..=10; default 10).
        #[arg(long, default_value_t = 10)]
        max_guesses: u32,
        /// Generate a fresh key and print it instead of reading one.
        #[arg(long)]
        generate: bool,
    },
    /// Recover the key and print it as 64 hex digits.
    Recover {
        #[command(flatten)]
        vault: VaultArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Encrypt a file under a fresh 256-bit key, then protect the key with a
    /// vault password, or print it as 64 hex digits (--no-vault).
    Create {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long = "out")]
        output: PathBuf,
        /// Keep the key yourself: print it instead of using the vault.
        #[arg(long)]
        no_vault: bool,
        #[arg(long, default_value_t = 10)]
        max_guesses: u32,
        #[arg(long, env = "VAULT_TOKEN_FILE", required_unless_present = "no_vault")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Decrypt a backup with the key recovered from the vault, or with the
    /// 64 hex digits typed back (--key-stdin or the prompt of --no-vault).
    Restore {
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long = "out")]
        output: PathBuf,
        /// Use the 64-digit key instead of the vault.
        #[arg(long)]
        no_vault: bool,
        /// Read the 64-digit key from standard input.
        #[arg(long, requires = "no_vault")]
        key_stdin: bool,
        #[command(flatten)]
        vault: VaultArgs,
    },
    /// Turn encrypted backup off: delete the vault record (password
    /// required).
    Disable {
        #[command(flatten)]
        vault: VaultArgs,
        #[arg(long, env = "VAULT_TOKEN_FILE")]
        token_file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make an identity key pair for local use: DIR/identity.key (secret),
    /// DIR/identity.pub (hex) and DIR/jwks.json (give it to the vault:
    /// `--auth-jwks`).
    Keygen {
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Issue a bearer token for an account: an ES256 JWT.
    Issue {
        #[arg(long)]
        signing_key: PathBuf,
        #[arg(long)]
        account: String,
        /// Lifetime in seconds (a vault takes at most its
        /// `--auth-max-lifetime-secs`, an hour by default).
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// The vault's name, as its `--auth-audience` says.
        #[arg(long, default_value = vault_proto::token::DEFAULT_AUDIENCE)]
        audience: String,
        /// The issuer name, as the vault's `--auth-issuer` says.
        #[arg(long, default_value = vault_proto::token::DEFAULT_ISSUER)]
        issuer: String,
    },
}

/// Exit codes a script can act on.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::WrongPassword) => 3,
        Some(ClientError::Locked) => 4,
        Some(ClientError::Unreachable { .. }) => 5,
        Some(ClientError::KeyMismatch) => 6,
        Some(ClientError::BadKey(_)) => 7,
        Some(ClientError::Unauthenticated(_)) => 8,
        _ if e.downcast_ref::<backup::BackupError>().is_some() => 9,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Reads lines from standard input once, so a password line and a key line
/// can both come from a pipe.
struct Stdin {
    lines: std::io::Lines<std::io::StdinLock<'static>>,
}

impl Stdin {
    fn new() -> Self {
        Stdin {
            lines: std::io::stdin().lock().lines(),
        }
    }

    fn line(&mut self, what: &str) -> anyhow::Result<Zeroizing<String>> {
        match self.lines.next() {
            Some(Ok(l)) => Ok(Zeroizing::new(l)),
            _ => Err(anyhow!("expected the {what} on standard input")),
        }
    }

    fn password(&mut self, vault: &VaultArgs, prompt: &str) -> anyhow::Result<Zeroizing<String>> {
        let pw = if vault.password_stdin {
            self.line("password")?
        } else {
            Zeroizing::new(rpassword::prompt_password(prompt).context("reading the password")?)
        };
        if pw.is_empty() {
            return Err(anyhow!("the password is empty"));
        }
        Ok(pw)
    }
}

fn read_key(stdin: &mut Stdin, from_stdin: bool) -> anyhow::Result<BackupKey> {
    let text = if from_stdin || !std::io::stdin().is_terminal() {
        stdin.line("64-digit key")?
    } else {
        Zeroizing::new(rpassword::prompt_password("Backup key (64 hex digits): ")?)
    };
    BackupKey::from_hex(&text).ok_or_else(|| {
        ClientError::BadKey(
            "a backup key is exactly 64 hex digits (spaces and dashes allowed)".into(),
        )
        .into()
    })
}

/// The bearer token in `path`, in a buffer wiped when dropped (the file's
/// text too).
fn read_token(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?,
    );
    Ok(Zeroizing::new(text.trim().to_owned()))
}

async fn connect(vault: &VaultArgs) -> anyhow::Result<VaultClient> {
    let path = vault
        .vault_key
        .as_deref()
        .ok_or_else(|| anyhow!("--vault-key (or VAULT_PUBLIC_KEY) is needed"))?;
    let pinned = std::fs::read_to_string(path)
        .with_context(|| format!("reading vault public key {}", path.display()))?;
    let pinned = parse_pinned_key(&pinned)?;
    let plaintext_endpoint = vault.endpoint.starts_with("http://");
    let transport = match (&vault.ca_cert, vault.plaintext) {
        (_, true) if plaintext_endpoint => Transport::Plaintext,
        (_, true) => {
            return Err(anyhow!(
                "--plaintext needs an http:// endpoint, not {}",
                vault.endpoint
            ))
        }
        (_, false) if plaintext_endpoint => {
            return Err(anyhow!(
                "refusing to talk to {} without TLS: use an https:// endpoint with --ca-cert, \
                 or --plaintext for a development vault",
                vault.endpoint
            ))
        }
        (Some(ca), false) => Transport::Tls {
            ca_pem: std::fs::read(ca)
                .with_context(|| format!("reading CA certificate {}", ca.display()))?,
        },
        (None, false) => {
            return Err(anyhow!(
                "--ca-cert (or VAULT_CA_CERT) is needed to check the vault's TLS certificate"
            ))
        }
    };
    Ok(VaultClient::connect(&vault.endpoint, &transport, pinned).await?)
}

/// Writes to `path` through a temporary file renamed into place on success,
/// so a failed restore never leaves a partial plaintext file behind.
/// Writes the output through a temporary file beside it; nothing appears at
/// `path` until [`publish`] renames it into place, so a failed restore never
/// leaves partial plaintext behind.
fn stage(
    path: &Path,
    f: impl FnOnce(&mut BufWriter<File>) -> anyhow::Result<u64>,
) -> anyhow::Result<(tempfile::NamedTempFile, u64)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).context("creating a temporary output file")?;
    let mut w = BufWriter::new(tmp.reopen()?);
    let n = f(&mut w)?;
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok((tmp, n))
}

fn publish(tmp: tempfile::NamedTempFile, path: &Path) -> anyhow::Result<()> {
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn open_input(path: &Path) -> anyhow::Result<BufReader<File>> {
    Ok(BufReader::new(
        File::open(path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

fn fmt_key(key: &BackupKey) -> Zeroizing<String> {
    key.to_grouped_hex()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut stdin = Stdin::new();
    match cli.command {
        Command::Key(KeyCommand::Register {
            vault,
            token_file,
            max_guesses,
            generate,
        }) => {
            let token = read_token(&token_file)?;
            let password = stdin.password(&vault, "New vault password: ")?;
            let key = if generate {
                BackupKey::generate()
            } else {
                read_key(&mut stdin, true)?
            };
            let mut client = connect(&vault).await?;
            let max = client
                .register_key(
                    vault.account()?,
                    &token,
                    password.as_bytes(),
                    &key,
                    max_guesses,
                )
                .await?;
            if generate {
                println!("{}", key.to_hex().as_str());
            }
            eprintln!("key registered; {max} wrong guesses allowed");
        }
        Command::Key(KeyCommand::Recover { vault }) => {
            let password = stdin.password(&vault, "Vault password: ")?;
            let mut client = connect(&vault).await?;
            let key = client
                .recover_key(vault.account()?, password.as_bytes())
                .await?;
            println!("{}", key.to_hex().as_str());
        }
        Command::Backup(BackupCommand::Create {
            input,
            output,
            no_vault,
            max_guesses,
            token_file,
            vault,
        }) => {
            let key = BackupKey::generate();
            let credentials = if no_vault {
                None
            } else {
                let token = read_token(
                    token_file
                        .as_deref()
                        .ok_or_else(|| anyhow!("--token-file is needed"))?,
                )?;
                Some((token, stdin.password(&vault, "New backup password: ")?))
            };
            // Encrypt first, register second, publish last: registering
            // replaces the account's old key, so it must not happen unless
            // the new backup file is ready to take the old one's place.
            let (staged, n) = stage(&output, |w| {
                Ok(backup::encrypt(&key, open_input(&input)?, w)?)
            })?;
            if let Some((token, password)) = credentials {
                connect(&vault)
                    .await?
                    .register_key(
                        vault.account()?,
                        &token,
                        password.as_bytes(),
                        &key,
                        max_guesses,
                    )
                    .await?;
            }
            publish(staged, &output)?;
            if no_vault {
                println!("{}", fmt_key(&key).as_str());
                eprintln!("encrypted {n} bytes to {}; write the 64-digit key above down: it is the only way to restore", output.display());
            } else {
                eprintln!("encrypted {n} bytes to {}; the key is protected by the vault under your password", output.display());
            }
        }
        Command::Backup(BackupCommand::Restore {
            input,
            output,
            no_vault,
            key_stdin,
            vault,
        }) => {
            let key = if no_vault {
                read_key(&mut stdin, key_stdin)?
            } else {
                let password = stdin.password(&vault, "Backup password: ")?;
                connect(&vault)
                    .await?
                    .recover_key(vault.account()?, password.as_bytes())
                    .await?
            };
            let (staged, n) = stage(&output, |w| {
                Ok(backup::decrypt(&key, open_input(&input)?, w)?)
            })?;
            publish(staged, &output)?;
            eprintln!("restored {n} bytes to {}", output.display());
        }
        Command::Backup(BackupCommand::Disable { vault, token_file }) => {
            let token = read_token(&token_file)?;
            let password = stdin.password(&vault, "Backup password: ")?;
            connect(&vault)
                .await?
                .delete(vault.account()?, &token, password.as_bytes())
                .await?;
            eprintln!("encrypted backup disabled: the vault record is deleted");
        }
        Command::Status { vault, token_file } => {
            let token = read_token(&token_file)?;
            match connect(&vault)
                .await?
                .status(vault.account()?, &token)
                .await?
            {
                RecordStatus::NotRegistered => println!("not registered"),
                RecordStatus::Registered {
                    guesses_remaining,
                    max_guesses,
                } => {
                    println!("registered: {guesses_remaining} of {max_guesses} guesses remaining")
                }
                RecordStatus::Locked => {
                    println!("locked: the key was destroyed after too many wrong passwords")
                }
            }
        }
        Command::Token(TokenCommand::Keygen { out_dir }) => {
            std::fs::create_dir_all(&out_dir)?;
            let sk = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
            let secret = Zeroizing::new(hex::encode(sk.to_bytes()));
            write_private(&out_dir.join("identity.key"), secret.as_bytes())?;
            let pk = hex::encode(sk.verifying_key().to_encoded_point(true).as_bytes());
            std::fs::write(out_dir.join("identity.pub"), format!("{pk}\n"))?;
            std::fs::write(
                out_dir.join("jwks.json"),
                vault_proto::token::jwks(&[*sk.verifying_key()]),
            )?;
            eprintln!(
                "wrote {0}/identity.key, {0}/identity.pub and {0}/jwks.json",
                out_dir.display()
            );
        }
        Command::Token(TokenCommand::Issue {
            signing_key,
            account,
            ttl_secs,
            audience,
            issuer,
        }) => {
            let text = Zeroizing::new(std::fs::read_to_string(&signing_key)?);
            let sk = vault_proto::token::parse_signing_key(&text)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let token = vault_proto::token::Issuer::new(&sk, &issuer)?.issue(
                account.as_bytes(),
                &audience,
                now,
                ttl_secs,
            )?;
            println!("{token}");
        }
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
