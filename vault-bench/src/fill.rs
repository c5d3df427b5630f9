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
use hsm_vault::types::Seq;
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
    /// Fill the state machine of replica group N in every data directory
    /// given (`--data-dir` and `--also`), instead of a lone node's store.
    /// The group's nodes must all be stopped; they hold the same records
    /// afterwards, as if a log had replicated them.
    #[arg(long)]
    pub group: Option<u64>,
    #[arg(long)]
    pub also: Vec<PathBuf>,
    /// With `--group`: only make this node's token vouch for its state
    /// machine as filled (each member's own token keeps the anchor of its
    /// state; a member refuses a state its token does not vouch for).
    #[arg(long)]
    pub vouch: bool,
}

/// One real client registration upload, made against this token.
fn client_upload(
    core: &SecureCore,
    session: &hsm_vault::partition::PartitionSession,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let first = core
        .record_id(session, b"fill-upload")
        .context("record id")?;
    let start = ClientRegistration::<Suite>::start(&mut OsRng, b"filler")
        .map_err(|_| anyhow!("registration start"))?;
    let (response, generation) = core
        .registration_start(session, &first, &start.message.serialize())
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
    Ok((generation.to_vec(), upload))
}

/// Fills the state machine tree of `group` in every data directory.
fn fill_group(
    args: &FillArgs,
    group: u64,
    core: &SecureCore,
    partition: &Arc<Partition>,
) -> Result<()> {
    let dirs: Vec<&PathBuf> = std::iter::once(&args.data_dir).chain(&args.also).collect();
    let mut trees = Vec::new();
    for dir in &dirs {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .with_context(|| format!("opening {}", dir.display()))?;
        trees.push((db.open_tree(format!("raft-sm/g{group}"))?, db));
    }
    let session = partition.session().context("session")?;
    let (generation, upload) = client_upload(core, &session)?;
    let began = Instant::now();
    let mut next = args.from;
    while next < args.to {
        let end = (next + CHUNK as u64).min(args.to);
        let mut batch = sled::Batch::default();
        for i in next..end {
            let id = core
                .record_id(&session, format!("fill-{i}").as_bytes())
                .context("record id")?;
            // Sequence numbers of replicated records are clock-based; any
            // value the record is sealed under works for a filler.
            let seq = Seq(i + 1);
            let (sealed, _) = core
                .registration_finish(&session, &id, &generation, &upload, &[7u8; 60], 0, seq)
                .context("sealing a record")?;
            let mut v = seq.0.to_be_bytes().to_vec();
            v.extend_from_slice(sealed.as_bytes());
            batch.insert(&id.0[..], v);
        }
        for (tree, _) in &trees {
            tree.apply_batch(batch.clone())?;
        }
        next = end;
        if next % 100_000 < CHUNK as u64 || next == args.to {
            eprintln!(
                "  filled {next}/{} records in {} state machines ({:.0}/s)",
                args.to,
                trees.len(),
                (next - args.from) as f64 / began.elapsed().as_secs_f64()
            );
        }
    }
    for (_, db) in &trees {
        db.flush()?;
    }
    Ok(())
}

pub async fn fill(args: FillArgs) -> Result<()> {
    let pin = std::fs::read_to_string(&args.pin_file)
        .with_context(|| format!("reading {}", args.pin_file.display()))?;
    let partition = Partition::open(&args.pkcs11_module, &args.token_label, pin.trim())
        .context("opening the token")?;
    let core = SecureCore::new(partition.ake_public_key()).context("secure core")?;
    if let (Some(group), true) = (args.group, args.vouch) {
        let db = sled::Config::new()
            .path(&args.data_dir)
            .open()
            .with_context(|| format!("opening {}", args.data_dir.display()))?;
        hsm_vault::replication::state_machine::vouch_for_disk_state(
            &db,
            &format!("g{group}"),
            group,
            partition,
        )
        .context("anchoring the filled state in the token")?;
        return db.flush().map(|_| ()).context("flush");
    }
    if let Some(group) = args.group {
        return fill_group(&args, group, &core, &partition);
    }
    let store = Arc::new(Store::open(&args.data_dir, Arc::clone(&partition)).context("store")?);

    let session = partition.session().context("session")?;
    let (generation, upload) = client_upload(&core, &session)?;

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
