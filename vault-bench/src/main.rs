//! `vault-bench`: how close the vault comes to the cost of its own OPAQUE
//! arithmetic, from one node to a fleet across emulated regions.
//!
//! Each scenario starts real `hsm-vault` processes on SoftHSM tokens (the
//! test fixtures of `vault-e2e`), runs closed-loop clients over loopback
//! gRPC, and reads the vault processes' CPU time from `/proc`. The baseline,
//! raw opaque-ke server logins with in-memory keys, is measured in the same
//! run. Results: a table on stdout, and JSON plus an SVG chart per scenario.

#![forbid(unsafe_code)]

mod baseline;
mod fill;
mod load;
mod os;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::scenarios::Scenario;

#[derive(Debug, Parser)]
#[command(
    name = "vault-bench",
    about = "Recoveries and registrations per second, latency and CPU per operation, against raw opaque-ke",
    after_help = "The load generator stretches passwords with Argon2id at its smallest cost \
                  (8 KiB, one pass) instead of the suite's 19 MiB: it measures the vault, not \
                  the client's key stretching."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: run one scenario in this process and write its reports
    /// (each scenario gets its own process: PKCS#11 is initialized once per
    /// process, for one SoftHSM configuration).
    #[command(hide = true)]
    One {
        #[arg(long, value_enum)]
        which: Scenario,
        /// The baseline measured by the parent, as JSON.
        #[arg(long)]
        baseline: String,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Redraw the SVG chart of every scenario report (JSON) in a directory.
    Redraw {
        /// Directory of a run's results.
        dir: PathBuf,
    },
    /// Internal: grow a stopped node's store with filler records (run by
    /// the `records` scenario in a process of its own).
    #[command(hide = true)]
    Fill(fill::FillArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Scenarios to run (all when none is given).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Seconds discarded at the start of each scenario.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Closed-loop clients (default: 32 where the scenario measures CPU per
    /// operation, so that group commit has company; 4 where it measures
    /// latency across regions).
    #[arg(long)]
    workers: Option<usize>,
    /// Stop a scenario after this many measured operations.
    #[arg(long, default_value_t = 1_000_000)]
    max_ops: u64,
    /// Records of the large store in the `records` scenario (the small one
    /// has 10,000).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Raw opaque-ke logins timed for the baseline.
    #[arg(long, default_value_t = 3000)]
    baseline_logins: usize,
    /// Where the JSON and SVG files go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Run the nodes without TLS. By default they run as `fleet up` runs
    /// them: TLS on the client API, mutual TLS between peers.
    #[arg(long)]
    plaintext: bool,
}

impl RunArgs {
    /// The same options as command-line arguments, for a child process.
    fn to_args(&self) -> Vec<String> {
        let workers = self.workers.map(|w| format!("--workers={w}"));
        workers
            .into_iter()
            .chain([
                format!("--duration={}", self.duration),
                format!("--warmup={}", self.warmup),
                format!("--max-ops={}", self.max_ops),
                format!("--records={}", self.records),
                format!("--baseline-logins={}", self.baseline_logins),
                format!("--out={}", self.out.display()),
            ])
            .chain(self.plaintext.then(|| "--plaintext".to_owned()))
            .collect()
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs(self.warmup)
    }
    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The load generator is one address recovering a few thousand accounts
    // as fast as it can: exactly what the vault's rate limits refuse. The
    // nodes it starts inherit this and run without them (the benchmark
    // measures the vault's work, not its throttling).
    for limit in [
        "HSM_VAULT_RECOVERY_LIMIT_ACCOUNT",
        "HSM_VAULT_RECOVERY_LIMIT_ADDRESS",
    ] {
        std::env::set_var(limit, "off");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Command::Fill(args)) => runtime.block_on(fill::fill(args)),
        Some(Command::Redraw { dir }) => report::redraw(&dir),
        Some(Command::One {
            which,
            baseline,
            run,
        }) => scenarios::run_one(&runtime, &run, which, serde_json::from_str(&baseline)?),
        None => scenarios::run_all(&cli.run),
    }
}
