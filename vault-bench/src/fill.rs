//! Grows a stopped node's store with filler records, for the scenarios that
//! measure a large store. It runs as its own process (`vault-bench fill`)
//! with the node's SoftHSM configuration: PKCS#11 is initialized once per
//! process.
//!
//! Each filler record is a real registration sealed by the node's token and
//! committed through the store's group commit (index entry, anchor): the
//! same bytes a registration writes. They share one client upload, so none
//! of them can be recovered; they are there to make the store big.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use hsm_vault::core::SecureCore;
use hsm_vault::partition::Partition;
use hsm_vault::store::{Store, Write};
use opaque_ke::{ClientRegistration, ClientRegistrationFinishParameters, RegistrationResponse};
use rand::rngs::OsRng;
use vault_proto::suite::{benchmark_ksf, Suite};

/// How many records are sealed before their commits are queued together.
const CHUNK: usize = 2048;

#[derive(Debug, clap::Args)]
pub struct FillArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub pkcs11_module: PathBuf,
    #[arg(long)]
    pub token_label: String,
    #[arg(long)]
    pub pin_file: PathBuf,
    /// Filler accounts `fill-<from>` .. `fill-<to - 1>`.
    #[arg(long)]
    pub from: u64,
    #[arg(long)]
    pub to: u64,
}

pub async fn fill(args: FillArgs) -> Result<()> {
    let pin = std::fs::read_to_string(&args.pin_file)
        .with_context(|| format!("reading {}", args.pin_file.display()))?;
    let partition = Partition::open(&args.pkcs11_module, &args.token_label, pin.trim())
        .context("opening the token")?;
    let core = SecureCore::new(partition.ake_public_key()).context("secure core")?;
    let store = Arc::new(Store::open(&args.data_dir, Arc::clone(&partition)).context("store")?);

    // One real client upload, made against this token.
    let session = partition.session().context("session")?;
    let first = core
        .record_id(&session, b"fill-upload")
        .context("record id")?;
    let start = ClientRegistration::<Suite>::start(&mut OsRng, b"filler")
        .map_err(|_| anyhow!("registration start"))?;
    let (response, generation) = core
        .registration_start(&session, &first, &start.message.serialize())
        .context("registration start")?;
    let response = RegistrationResponse::deserialize(&response)
        .map_err(|_| anyhow!("registration response"))?;
    let ksf = benchmark_ksf();
    let upload = start
        .state
        .finish(
            &mut OsRng,
            b"filler",
            response,
            ClientRegistrationFinishParameters::new(Default::default(), Some(&ksf)),
        )
        .map_err(|_| anyhow!("registration finish"))?
        .message
        .serialize()
        .to_vec();

    let began = Instant::now();
    let mut next = args.from;
    while next < args.to {
        let end = (next + CHUNK as u64).min(args.to);
        let mut commits = tokio::task::JoinSet::new();
        for i in next..end {
            let id = core
                .record_id(&session, format!("fill-{i}").as_bytes())
                .context("record id")?;
            let seq = store.reserve();
            let (sealed, _) = core
                .registration_finish(&session, &id, &generation, &upload, &[7u8; 60], 0, seq)
                .context("sealing a record")?;
            let store = Arc::clone(&store);
            commits.spawn(async move { store.commit(seq, Write::Put(id, sealed)).await });
        }
        while let Some(done) = commits.join_next().await {
            done.context("commit task")?.context("commit")?;
        }
        next = end;
        if next % 50_000 < CHUNK as u64 || next == args.to {
            eprintln!(
                "  filled {next}/{} records ({:.0}/s)",
                args.to,
                (next - args.from) as f64 / began.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
