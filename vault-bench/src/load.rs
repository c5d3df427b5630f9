//! The closed-loop load generator: `workers` clients, each with its own
//! connection, each starting its next operation as soon as the last one
//! answered, for a bounded time and count.

use std::io::{IsTerminal, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vault_client::{BackupKey, KeyStretching, Transport, VaultClient};
use vault_e2e::Issuer;

use crate::os;

/// What each worker does in a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A full recovery: KE1 → KE2 → KE3 → the key decrypted and compared
    /// with the one registered.
    Recover,
    /// A registration of a new account (RegisterStart + RegisterFinish).
    Register,
}

/// Where the load goes and how much of it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub op: Op,
    /// Endpoints the workers connect to, round robin.
    pub endpoints: Vec<String>,
    /// TLS (with the fleet's CA) or plaintext, as the nodes run.
    pub transport: Transport,
    pub pinned: [u8; 33],
    pub issuer: Issuer,
    pub workers: usize,
    /// Discarded start of the run (connections, caches, leader settling).
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop after this many measured operations even if time is left.
    pub max_ops: u64,
    /// Processes whose CPU time is the vault's.
    pub vault_pids: Vec<u32>,
    /// Account names start with this (unique per scenario).
    pub prefix: String,
    /// Accounts each worker recovers in turn.
    pub accounts_per_worker: usize,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Measured {
    /// Latency of each operation completed in the window, microseconds.
    pub latencies_us: Vec<u64>,
    /// (seconds into the window, latency µs) of each completion.
    pub completions: Vec<(f64, u64)>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub window: Duration,
    pub vault_cpu: Duration,
    pub bench_cpu: Duration,
}

/// A registered account a worker recovers.
struct Account {
    name: String,
    key: BackupKey,
}

const PASSWORD: &[u8] = b"correct horse battery staple";

async fn connect(endpoint: &str, transport: &Transport, pinned: [u8; 33]) -> Result<VaultClient> {
    Ok(VaultClient::connect(endpoint, transport, pinned)
        .await
        .with_context(|| format!("connecting to {endpoint}"))?
        .with_key_stretching(KeyStretching::MinimalForBenchmarks))
}

/// Registers an account, retrying briefly while a fleet settles (a fresh
/// leader, a shard map being adopted).
async fn register(
    client: &mut VaultClient,
    issuer: &Issuer,
    name: &str,
    key: &BackupKey,
) -> Result<()> {
    let token = issuer.bearer(name);
    let mut tries = 0;
    loop {
        match client
            .register_key(name.as_bytes(), &token, PASSWORD, key, 0)
            .await
        {
            Ok(_) => return Ok(()),
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("registering {name}: {e}"),
        }
    }
}

/// Runs the plan: registers the recovery accounts first (not measured),
/// then the measured closed loop.
pub async fn run(plan: Plan) -> Result<Measured> {
    if plan.endpoints.is_empty() || plan.workers == 0 {
        bail!("nothing to run");
    }
    // Setup: each worker's connection and accounts.
    let mut workers = Vec::with_capacity(plan.workers);
    for w in 0..plan.workers {
        let endpoint = &plan.endpoints[w % plan.endpoints.len()];
        let mut client = connect(endpoint, &plan.transport, plan.pinned).await?;
        let mut accounts = Vec::new();
        if plan.op == Op::Recover {
            for a in 0..plan.accounts_per_worker {
                let name = format!("{}-w{w}-a{a}", plan.prefix);
                let key = BackupKey::generate();
                register(&mut client, &plan.issuer, &name, &key).await?;
                accounts.push(Account { name, key });
            }
        }
        workers.push((client, accounts));
    }

    let start = Instant::now();
    let from = start + plan.warmup;
    let end = from + plan.duration;
    let done = Arc::new(AtomicU64::new(0));
    let progress = tokio::spawn(show_progress(
        from,
        plan.duration,
        plan.max_ops,
        Arc::clone(&done),
    ));
    let pids = plan.vault_pids.clone();
    // CPU is read when the window opens, and again when the workers are
    // done (at its end, or earlier if the count ran out).
    let cpu_pids = pids.clone();
    let cpu_start = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        anyhow::Ok((
            os::processes_cpu(&cpu_pids)?,
            os::process_cpu(std::process::id())?,
            Instant::now(),
        ))
    });

    let mut tasks = Vec::new();
    for (w, (mut client, accounts)) in workers.into_iter().enumerate() {
        let (plan, done) = (plan.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut out = WorkerOut::default();
            let mut n = 0usize;
            loop {
                let t0 = Instant::now();
                if t0 >= end || done.load(Ordering::Relaxed) >= plan.max_ops {
                    break;
                }
                let result = match plan.op {
                    Op::Recover => {
                        let a = &accounts[n % accounts.len()];
                        match client.recover_key(a.name.as_bytes(), PASSWORD).await {
                            Ok(k) if *k.0 == *a.key.0 => Ok(()),
                            Ok(_) => Err(anyhow!("recovered a different key for {}", a.name)),
                            Err(e) => Err(anyhow!("recovering {}: {e}", a.name)),
                        }
                    }
                    Op::Register => {
                        let name = format!("{}-w{w}-r{n}", plan.prefix);
                        register_once(&mut client, &plan.issuer, &name).await
                    }
                };
                n += 1;
                let t1 = Instant::now();
                if t1 < from || t1 > end {
                    continue;
                }
                match result {
                    Ok(()) => {
                        let us = (t1 - t0).as_micros() as u64;
                        out.completions.push(((t1 - from).as_secs_f64(), us));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            out
        }));
    }
    let mut measured = Measured {
        latencies_us: Vec::new(),
        completions: Vec::new(),
        errors: 0,
        first_error: None,
        window: plan.duration,
        vault_cpu: Duration::ZERO,
        bench_cpu: Duration::ZERO,
    };
    for t in tasks {
        let out = t.await.context("worker failed")?;
        measured.errors += out.errors;
        if measured.first_error.is_none() {
            measured.first_error = out.first_error;
        }
        measured.completions.extend(out.completions);
    }
    let (v0, b0, t0) = cpu_start.await.context("CPU sampler")??;
    let vault_cpu = os::processes_cpu(&pids)? - v0;
    let bench_cpu = os::process_cpu(std::process::id())? - b0;
    let window = t0.elapsed().min(plan.duration);
    progress.abort();
    eprintln!();
    measured.completions.sort_by(|a, b| a.0.total_cmp(&b.0));
    measured.window = match measured.completions.last() {
        Some((t, _)) if done.load(Ordering::Relaxed) >= plan.max_ops => Duration::from_secs_f64(*t),
        _ => window,
    };
    measured.latencies_us = measured.completions.iter().map(|c| c.1).collect();
    measured.vault_cpu = vault_cpu;
    measured.bench_cpu = bench_cpu;
    Ok(measured)
}

#[derive(Default)]
struct WorkerOut {
    completions: Vec<(f64, u64)>,
    errors: u64,
    first_error: Option<String>,
}

async fn register_once(client: &mut VaultClient, issuer: &Issuer, name: &str) -> Result<()> {
    let token = issuer.bearer(name);
    client
        .register_key(name.as_bytes(), &token, PASSWORD, &BackupKey::generate(), 0)
        .await
        .map(|_| ())
        .map_err(|e| anyhow!("registering {name}: {e}"))
}

/// A progress bar on a terminal, a line every 5 s otherwise (CI logs).
async fn show_progress(from: Instant, duration: Duration, max_ops: u64, done: Arc<AtomicU64>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(5)
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let n = done.load(Ordering::Relaxed);
        let line = if now < from {
            "  warming up".to_owned()
        } else {
            let t = (now - from).min(duration);
            let frac = (t.as_secs_f64() / duration.as_secs_f64())
                .max(n as f64 / max_ops as f64)
                .min(1.0);
            let filled = (frac * 30.0) as usize;
            format!(
                "  [{}{}] {:5.1}/{:.0} s  {n} done  {:.0}/s",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                t.as_secs_f64(),
                duration.as_secs_f64(),
                n as f64 / t.as_secs_f64().max(0.001)
            )
        };
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}
