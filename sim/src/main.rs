//! `vault-sim`: runs seeds of the deterministic simulation and prints what
//! was checked. A failing seed is printed with the command that replays it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use vault_sim::{run_seed, BrokenKind, Figures, Fixture, Options};

/// Deterministic simulation of a vault replica group under faults.
#[derive(Parser, Debug)]
#[command(name = "vault-sim")]
struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Simulated seconds of load and faults per seed (then the group is
    /// healed and checked).
    #[arg(long, default_value_t = 8)]
    load_seconds: u64,
    /// Run a deliberately broken vault, to see the simulation catch it:
    /// `early-ke2` (the default: KE2 released before the charge is
    /// committed) or `no-anchor` (a replica whose token does not vouch for
    /// its state machine).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "early-ke2")]
    broken: Option<BrokenKind>,
    /// Print every event of every seed.
    #[arg(long)]
    trace: bool,
    /// Run every seed even after a failure, and list the failing ones at
    /// the end (the long run), instead of stopping at the first.
    #[arg(long)]
    keep_going: bool,
    /// Also print the figures as `sum KEY VALUE` lines (for adding up the
    /// shards of a long run).
    #[arg(long)]
    sum_lines: bool,
}

fn print_sum_lines(f: &Figures) {
    println!("sum seeds {}", f.seeds);
    println!("sum simulated_seconds {}", f.simulated.as_secs());
    println!("sum messages {}", f.messages);
    println!("sum messages_lost {}", f.lost);
    println!("sum messages_duplicated {}", f.duplicated);
    for (k, v) in &f.faults {
        println!("sum fault:{k} {v}");
    }
    for (k, v) in &f.checked {
        println!("sum checked:{} {v}", k.replace(' ', "_"));
    }
}

fn print_figures(f: &Figures, wall: Duration) {
    println!(
        "seeds: {}   simulated: {:.0} s   wall: {:.1} s",
        f.seeds,
        f.simulated.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "faults injected: {} ({} messages lost, {} duplicated of {} sent)",
        f.faults_injected(),
        f.lost,
        f.duplicated,
        f.messages
    );
    for (k, v) in &f.faults {
        println!("  {k:<16} {v}");
    }
    println!("operations checked: {}", f.operations_checked());
    for (k, v) in &f.checked {
        println!("  {k:<28} {v}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Off unless RUST_LOG asks (a run's own trace is what `--trace` prints).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let fixture = match Fixture::new() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vault-sim: setting up the token: {e:#}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        broken: args.broken,
        load: Duration::from_secs(args.load_seconds),
        ..Options::default()
    };
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut total = Figures::default();
    let mut failed = Vec::new();
    for seed in args.first..args.first.saturating_add(args.seeds) {
        let outcome = run_seed(&fixture, seed, &opts);
        total.add(&outcome.figures);
        if args.trace {
            for line in &outcome.trace {
                println!("seed {seed} {line}");
            }
            println!("seed {seed} digest {:016x}", outcome.digest);
        }
        if let Some(why) = outcome.violation {
            println!("FAILED seed {seed}: {why}");
            println!("last events:");
            let tail = outcome.trace.len().saturating_sub(40);
            for line in &outcome.trace[tail..] {
                println!("  {line}");
            }
            println!(
                "replay: cargo run --release -p vault-sim -- --first {seed} --seeds 1 --trace{}",
                match args.broken {
                    Some(BrokenKind::EarlyKe2) => " --broken early-ke2",
                    Some(BrokenKind::NoAnchor) => " --broken no-anchor",
                    None => "",
                }
            );
            failed.push(seed);
            if !args.keep_going {
                break;
            }
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "… {} seeds, {} operations checked, {:.0} s",
                total.seeds,
                total.operations_checked(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    if failed.is_empty() {
        println!("PASSED: no invariant broken");
    } else {
        println!("FAILED seeds: {failed:?}");
    }
    print_figures(&total, started.elapsed());
    if args.sum_lines {
        print_sum_lines(&total);
        println!("sum failed_seeds {}", failed.len());
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
