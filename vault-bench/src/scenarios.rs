//! The scenarios: which fleet to start, what load to put on it, and which
//! targets of the issue its figures are checked against.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::runtime::Runtime;
use vault_e2e::{prepare_layout_with, Layout, VaultNode};
use vault_proto::vault::v1 as pb;

use crate::baseline::{self, Baseline};
use crate::load::{self, Op, Plan};
use crate::report::{self, Report};
use crate::RunArgs;
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Recoveries on one stand-alone node.
    OneNode,
    /// Recoveries on a 3-node replica group in one region.
    ThreeNodes,
    /// Recoveries on a 5-node group in 3 regions (35–80 ms apart).
    FiveNodesThreeRegions,
    /// Registrations on one node.
    Registrations,
    /// Recoveries on one node with 10,000 records, then with `--records`.
    Records,
    /// A member of a 3-node group holding `--records` loses its disk and
    /// catches up from the leader's snapshot.
    CatchUp,
}

const ALL: [Scenario; 6] = [
    Scenario::OneNode,
    Scenario::ThreeNodes,
    Scenario::FiveNodesThreeRegions,
    Scenario::Registrations,
    Scenario::Records,
    Scenario::CatchUp,
];

/// Log entries between snapshots in the catch-up scenario (the node default
/// is 5,000): enough writes to pass it take a few seconds.
const CATCH_UP_SNAPSHOT_EVERY: u64 = 200;

/// How long the catch-up scenario waits for a snapshot or a caught-up node.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(900);

/// Accounts each worker recovers in turn.
const ACCOUNTS_PER_WORKER: usize = 4;

/// How long a fleet may take to elect a leader and adopt its shard map.
const READY_DEADLINE: Duration = Duration::from_secs(60);

struct Bench<'a> {
    rt: &'a Runtime,
    args: &'a RunArgs,
    baseline: Baseline,
    reports: Vec<Report>,
}

/// Measures the baseline, then runs each scenario in a process of its own
/// (`vault-bench one`) and gathers the reports.
pub fn run_all(args: &RunArgs) -> Result<()> {
    let list: Vec<Scenario> = if args.scenarios.is_empty() {
        ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    eprintln!(
        "baseline: {} raw opaque-ke server logins (P256-SHA256, keys in memory, one thread)",
        args.baseline_logins
    );
    let baseline = baseline::measure(args.baseline_logins, args.baseline_logins / 4)?;
    eprintln!(
        "  login {:.0} µs CPU ({:.0}/s per core), registration {:.0} µs CPU",
        baseline.login.cpu_us,
        baseline.login.per_core_second(),
        baseline.registration.cpu_us
    );
    std::fs::create_dir_all(&args.out)?;
    let mut reports = Vec::new();
    for scenario in list {
        let name = scenario
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        let list_file = args.out.join(format!(".{name}.reports"));
        let _ = std::fs::remove_file(&list_file);
        let status = Command::new(std::env::current_exe()?)
            .arg("one")
            .arg(format!("--which={name}"))
            .arg(format!("--baseline={}", serde_json::to_string(&baseline)?))
            .args(args.to_args())
            .status()
            .context("running a scenario")?;
        if !status.success() {
            bail!("scenario {name} failed ({status})");
        }
        let names = std::fs::read_to_string(&list_file)
            .with_context(|| format!("reading {}", list_file.display()))?;
        let _ = std::fs::remove_file(&list_file);
        for report in names.lines() {
            let path = args.out.join(format!("{report}.json"));
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            reports.push(serde_json::from_str::<Report>(&text)?);
        }
    }
    summarize(args, &baseline, &reports)
}

/// Runs one scenario in this process.
pub fn run_one(rt: &Runtime, args: &RunArgs, scenario: Scenario, baseline: Baseline) -> Result<()> {
    let mut bench = Bench {
        rt,
        args,
        baseline,
        reports: Vec::new(),
    };
    let name = scenario
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    match scenario {
        Scenario::OneNode => bench.one_node()?,
        Scenario::ThreeNodes => bench.three_nodes()?,
        Scenario::FiveNodesThreeRegions => bench.five_nodes()?,
        Scenario::Registrations => bench.registrations()?,
        Scenario::Records => bench.records()?,
        Scenario::CatchUp => bench.catch_up()?,
    }
    let names: Vec<&str> = bench.reports.iter().map(|r| r.scenario.as_str()).collect();
    std::fs::write(args.out.join(format!(".{name}.reports")), names.join("\n"))?;
    Ok(())
}

/// Default concurrency where CPU per operation is measured, and where
/// latency across regions is.
const CPU_WORKERS: usize = 32;
const LATENCY_WORKERS: usize = 4;

impl Bench<'_> {
    fn plan(&self, op: Op, entry: &VaultNode, nodes: &[&VaultNode], prefix: &str) -> Result<Plan> {
        let mut pids = Vec::new();
        for n in nodes {
            pids.push(n.pid().context("a node is not running")?);
        }
        Ok(Plan {
            op,
            endpoints: vec![entry.endpoint()],
            transport: entry.transport(),
            pinned: entry.pinned_key(),
            issuer: entry.issuer(),
            workers: self.args.workers.unwrap_or(CPU_WORKERS),
            warmup: self.args.warmup(),
            duration: self.args.duration(),
            max_ops: self.args.max_ops,
            vault_pids: pids,
            prefix: prefix.to_owned(),
            accounts_per_worker: ACCOUNTS_PER_WORKER,
        })
    }

    /// Runs `plan` and turns it into a report.
    fn measure(
        &self,
        (scenario, description): (&str, &str),
        plan: Plan,
        nodes: usize,
    ) -> Result<Report> {
        eprintln!("{scenario}: {description}");
        let op = plan.op;
        let workers = plan.workers;
        let measured = self.rt.block_on(load::run(plan))?;
        let (operation, baseline) = match op {
            Op::Recover => ("recoveries", self.baseline.login.cpu_us),
            Op::Register => ("registrations", self.baseline.registration.cpu_us),
        };
        let report = Report::new(
            scenario,
            description,
            operation,
            (nodes, workers),
            &measured,
            baseline,
        );
        eprintln!(
            "  {:.0} {operation}/s, p50 {:.1} ms, p99 {:.1} ms, vault CPU {:.0} µs/op, efficiency {:.2}, errors {}{}",
            report.throughput_per_s,
            report.latency.p50_ms,
            report.latency.p99_ms,
            report.vault_cpu_per_op_us,
            report.cpu_efficiency,
            report.errors,
            report
                .first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        if report.completed == 0 {
            bail!("{scenario}: no operation completed");
        }
        Ok(report)
    }

    fn keep(&mut self, report: Report) -> Result<()> {
        report.write(&self.args.out)?;
        self.reports.push(report);
        Ok(())
    }

    fn one_node(&mut self) -> Result<()> {
        let node = self.start_node("bench-one");
        let plan = self.plan(Op::Recover, &node, &[&node], "one")?;
        let mut r = self.measure(("one-node", "recoveries on one stand-alone node"), plan, 1)?;
        let e = r.cpu_efficiency;
        r.target(
            "CPU efficiency",
            "≥ 0.50".into(),
            format!("{e:.2}"),
            e >= 0.5,
        );
        self.keep(r)
    }

    fn registrations(&mut self) -> Result<()> {
        let node = self.start_node("bench-reg");
        let plan = self.plan(Op::Register, &node, &[&node], "reg")?;
        let r = self.measure(
            ("registrations", "registrations of new accounts on one node"),
            plan,
            1,
        )?;
        self.keep(r)
    }

    fn three_nodes(&mut self) -> Result<()> {
        let layout = one_region(3);
        let (nodes, leader) = self.start_fleet(&layout, "bench-three")?;
        let all: Vec<&VaultNode> = nodes.iter().collect();
        let plan = self.plan(Op::Recover, &nodes[leader], &all, "three")?;
        let before = nodes[leader].scrape();
        let mut r = self.measure(
            (
                "three-nodes",
                "recoveries on a 3-node replica group in one region (1 ms one-way)",
            ),
            plan,
            3,
        )?;
        write_latency(&mut r, &before, &nodes[leader].scrape());
        let e = r.cpu_efficiency;
        r.target(
            "CPU efficiency, all three nodes counted",
            "≥ 0.35".into(),
            format!("{e:.2}"),
            e >= 0.35,
        );
        self.keep(r)
    }

    fn five_nodes(&mut self) -> Result<()> {
        let layout = three_regions();
        let (nodes, leader) = self.start_fleet(&layout, "bench-five")?;
        let rtt = majority_rtt_ms(&layout, leader);
        let all: Vec<&VaultNode> = nodes.iter().collect();
        // Latency at a few clients, then throughput at many (unless
        // `--workers` fixes one count).
        let counts = match self.args.workers {
            Some(w) => vec![w],
            None => vec![LATENCY_WORKERS, 32, 64],
        };
        for (i, workers) in counts.into_iter().enumerate() {
            let mut plan = self.plan(
                Op::Recover,
                &nodes[leader],
                &all,
                &format!("five-{workers}"),
            )?;
            plan.workers = workers;
            let name = if i == 0 {
                "five-nodes-three-regions".to_owned()
            } else {
                format!("five-nodes-three-regions-{workers}w")
            };
            let before = nodes[leader].scrape();
            let mut r = self.measure(
                (
                    &name,
                    "recoveries on a 5-node group in 3 regions; clients at the leader",
                ),
                plan,
                5,
            )?;
            write_latency(&mut r, &before, &nodes[leader].scrape());
            r.fact("leader_region", layout.nodes[leader].0.clone());
            r.fact("round_trip_to_nearest_majority_ms", rtt);
            r.fact(
                "latency_table_one_way_ms",
                layout
                    .links
                    .iter()
                    .map(|(a, b, ms)| (format!("{a}/{b}"), serde_json::Value::from(*ms)))
                    .chain([("intra_region".to_owned(), layout.intra_region_ms.into())])
                    .collect::<serde_json::Map<_, _>>(),
            );
            if i == 0 {
                let (p50, p99) = (r.latency.p50_ms, r.latency.p99_ms);
                for (what, measured, rtts, plus) in [("p50", p50, 2, 10), ("p99", p99, 3, 20)] {
                    let limit = (rtts * rtt + plus) as f64;
                    r.target(
                        &format!("{what} recovery latency"),
                        format!("≤ {rtts} × {rtt} ms + {plus} ms = {limit:.0} ms"),
                        format!("{measured:.1} ms"),
                        measured <= limit,
                    );
                }
            }
            self.keep(r)?;
        }
        Ok(())
    }

    fn records(&mut self) -> Result<()> {
        let small = 10_000u64;
        let large = self.args.records.max(small);
        let mut node = self.start_node("bench-records");
        let mut p99 = Vec::new();
        let mut filled = 0u64;
        for (target, name) in [(small, "records-small"), (large, "records-large")] {
            node.kill9();
            let began = Instant::now();
            fill(&node, filled, target)?;
            let fill_s = began.elapsed().as_secs_f64();
            filled = target;
            let began = Instant::now();
            node.restart();
            let start_s = began.elapsed().as_secs_f64();
            let plan = self.plan(Op::Recover, &node, &[&node], name)?;
            let description = format!("recoveries on one node holding {target} records");
            let mut r = self.measure((name, &description), plan, 1)?;
            r.fact("records", target);
            r.fact("fill_seconds", fill_s);
            r.fact("node_start_seconds", start_s);
            p99.push(r.latency.p99_ms);
            if let [small_p99, large_p99] = p99[..] {
                let limit = 1.5 * small_p99;
                r.target(
                    &format!("p99 at {large} records"),
                    format!("≤ 1.5 × p99 at {small} ({small_p99:.1} ms) = {limit:.1} ms"),
                    format!("{large_p99:.1} ms"),
                    large_p99 <= limit,
                );
            }
            self.keep(r)?;
        }
        Ok(())
    }

    fn catch_up(&mut self) -> Result<()> {
        let records = self.args.records;
        let layout = one_region(3);
        let extra = [format!("--snapshot-every={CATCH_UP_SNAPSHOT_EVERY}")];
        let (mut nodes, _) = self.start_fleet_with(&layout, "bench-catch-up", &extra)?;
        // The same records in every member's state machine, as if the log
        // had replicated them.
        for n in &mut nodes {
            n.kill9();
        }
        let began = Instant::now();
        fill_group(&nodes, records)?;
        let fill_s = began.elapsed().as_secs_f64();
        for n in &mut nodes {
            n.restart();
        }
        let leader = self.rt.block_on(wait_for_leader(&nodes))?;
        // Writes until the leader has snapshotted (all the records) and
        // purged its log past the start: a member that lost its disk can
        // then only catch up from the snapshot. A snapshot is taken once
        // `CATCH_UP_SNAPSHOT_EVERY` entries were applied since the last
        // one finished, and the log is purged down to that many entries.
        let all: Vec<&VaultNode> = nodes.iter().collect();
        eprintln!(
            "catch-up: writes until the leader snapshots {records} records and purges its log"
        );
        let began = Instant::now();
        let mut round = 0;
        let snapshot = loop {
            let mut plan = self.plan(
                Op::Register,
                &nodes[leader],
                &all,
                &format!("catch-up-{round}"),
            )?;
            plan.workers = 8;
            plan.warmup = Duration::ZERO;
            plan.duration = CATCH_UP_DEADLINE;
            plan.max_ops = CATCH_UP_SNAPSHOT_EVERY;
            self.rt.block_on(load::run(plan))?;
            round += 1;
            let i = self.rt.block_on(info(&nodes[leader]))?;
            if i.snapshot_index >= 2 * CATCH_UP_SNAPSHOT_EVERY {
                break i.snapshot_index;
            }
            if began.elapsed() > CATCH_UP_DEADLINE {
                bail!(
                    "the leader did not snapshot past index {}",
                    2 * CATCH_UP_SNAPSHOT_EVERY
                );
            }
        };
        let snapshot_s = began.elapsed().as_secs_f64();
        // A follower loses its disk (its token keeps its watermarks: it
        // knows it was rolled back and will not vote until caught up).
        let victim = (leader + 1) % nodes.len();
        nodes[victim].kill9();
        std::fs::remove_dir_all(nodes[victim].data_dir())?;
        let target = self.rt.block_on(info(&nodes[leader]))?.applied_index;
        eprintln!(
            "catch-up: node {} lost its disk; the leader's snapshot covers index {snapshot}, its log {target}",
            victim + 1
        );
        let began = Instant::now();
        nodes[victim].restart();
        let member = &nodes[victim];
        self.rt.block_on(async {
            loop {
                if let Ok(i) = info(member).await {
                    if i.applied_index >= target {
                        return anyhow::Ok(());
                    }
                }
                if began.elapsed() > CATCH_UP_DEADLINE {
                    bail!("the member did not catch up");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })?;
        let catch_up_s = began.elapsed().as_secs_f64();
        // Check what it holds.
        nodes[victim].kill9();
        let held = count_records(&nodes[victim].data_dir(), 1)?;
        eprintln!("  caught up in {catch_up_s:.1} s, holding {held} records");
        let empty = load::Measured::default();
        let mut r = Report::new(
            "catch-up",
            &format!("a member of a 3-node group holding {records} records loses its disk and catches up"),
            "catch-up",
            (3, 0),
            &empty,
            0.0,
        );
        r.fact("records", records);
        r.fact("records_held_after", held);
        r.fact("fill_seconds", fill_s);
        r.fact("snapshot_wait_seconds", snapshot_s);
        r.fact("snapshot_index", snapshot);
        r.fact("catch_up_seconds", catch_up_s);
        r.target(
            &format!("catch-up on {records} records"),
            "< 120 s".into(),
            format!("{catch_up_s:.1} s"),
            catch_up_s < 120.0 && held >= records,
        );
        self.keep(r)
    }

    /// Starts the fleet and waits for its leader; returns the nodes and the
    /// leader's index.
    fn start_fleet(&self, layout: &Layout, prefix: &str) -> Result<(Vec<VaultNode>, usize)> {
        self.start_fleet_with(layout, prefix, &[])
    }

    /// [`Bench::start_fleet`], with extra flags for every node.
    fn start_fleet_with(
        &self,
        layout: &Layout,
        prefix: &str,
        extra: &[String],
    ) -> Result<(Vec<VaultNode>, usize)> {
        let mut nodes = prepare_layout_with(layout, prefix, !self.args.plaintext);
        for n in &mut nodes {
            n.extra_args.extend(extra.iter().cloned());
            n.restart();
        }
        let leader = self.rt.block_on(wait_for_leader(&nodes))?;
        Ok((nodes, leader))
    }

    /// Starts a stand-alone node, over TLS unless `--plaintext`.
    fn start_node(&self, label: &str) -> VaultNode {
        if self.args.plaintext {
            VaultNode::start(label)
        } else {
            VaultNode::start_tls(label)
        }
    }
}

/// Prints the table and the targets, and writes `summary.md` and
/// `summary.json`.
fn summarize(args: &RunArgs, baseline: &Baseline, reports: &[Report]) -> Result<()> {
    let table = report::table(reports);
    let mut targets = String::new();
    for r in reports {
        for t in &r.targets {
            targets.push_str(&format!(
                "- {} — {}: target {}, measured {} — {}\n",
                r.scenario,
                t.what,
                t.target,
                t.measured,
                if t.met { "met" } else { "MISSED" }
            ));
        }
    }
    // Where a group replicates: the network's floor beside what a write took.
    for r in reports {
        let fact = |k: &str| r.facts.get(k).and_then(serde_json::Value::as_f64);
        if let Some(write) = fact("replicated_write_mean_ms") {
            let rtt = fact("round_trip_to_nearest_majority_ms")
                .map(|rtt| format!("round trip to the nearest majority {rtt:.0} ms, "))
                .unwrap_or_default();
            targets.push_str(&format!(
                "- {}: {rtt}replicated write {write:.1} ms on average at the leader\n",
                r.scenario
            ));
        }
    }
    let head = format!(
        "Baseline (raw opaque-ke, P256-SHA256, keys in memory, one thread): server login {:.0} µs CPU, \
         server registration {:.0} µs CPU.\n\n",
        baseline.login.cpu_us, baseline.registration.cpu_us
    );
    let text = format!("{head}{table}\n{targets}");
    std::fs::write(args.out.join("summary.md"), &text)?;
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "baseline": baseline,
            "machine": machine(),
            "scenarios": reports,
        }))?,
    )?;
    println!("{text}");
    println!("results in {}", args.out.display());
    Ok(())
}

/// `n` nodes of one group in one region, 1 ms apart.
fn one_region(n: usize) -> Layout {
    Layout {
        intra_region_ms: 1,
        regions: vec!["eu-west".into()],
        links: Vec::new(),
        nodes: vec![("eu-west".into(), 1); n],
    }
}

/// The layout of `deploy/local-fleet`: five nodes of one group, two in
/// eu-west, two in us-east, one in ap-south; 2 ms inside a region, 35, 60
/// and 80 ms one-way between them.
fn three_regions() -> Layout {
    let region = |r: &str| r.to_owned();
    Layout {
        intra_region_ms: 2,
        regions: vec![region("eu-west"), region("us-east"), region("ap-south")],
        links: vec![
            (region("eu-west"), region("us-east"), 35),
            (region("eu-west"), region("ap-south"), 60),
            (region("us-east"), region("ap-south"), 80),
        ],
        nodes: ["eu-west", "eu-west", "us-east", "us-east", "ap-south"]
            .iter()
            .map(|r| (region(r), 1))
            .collect(),
    }
}

/// Polls every node until all name the same leader and it has adopted a
/// shard map; returns the leader's index.
async fn wait_for_leader(nodes: &[VaultNode]) -> Result<usize> {
    let start = Instant::now();
    loop {
        let mut leaders = Vec::new();
        let mut adopted = true;
        for n in nodes {
            match info(n).await {
                Ok(i) => {
                    leaders.push(i.leader_id);
                    adopted &= i.shard_map_version > 0;
                }
                Err(_) => leaders.push(0),
            }
        }
        let first = leaders[0];
        if first != 0 && adopted && leaders.iter().all(|l| *l == first) {
            // Node ids count from 1 in fleet order.
            return Ok(usize::try_from(first)? - 1);
        }
        if start.elapsed() > READY_DEADLINE {
            bail!("the fleet did not settle on a leader: {leaders:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn info(node: &VaultNode) -> Result<pb::GetInfoResponse> {
    let mut c =
        vault_client::VaultClient::connect(&node.endpoint(), &node.transport(), node.pinned_key())
            .await?;
    Ok(c.raw().get_info(pb::GetInfoRequest {}).await?.into_inner())
}

/// The round trip from the leader to the nearest majority of its group:
/// twice the one-way delay to the farthest of the nearest ⌊n/2⌋ others.
fn majority_rtt_ms(layout: &Layout, leader: usize) -> u64 {
    let here = &layout.nodes[leader].0;
    let mut delays: Vec<u64> = layout
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, (region, _))| {
            if region == here {
                layout.intra_region_ms
            } else {
                layout
                    .links
                    .iter()
                    .find(|(a, b, _)| (a == here && b == region) || (b == here && a == region))
                    .map_or(0, |l| l.2)
            }
        })
        .collect();
    delays.sort_unstable();
    let needed = layout.nodes.len() / 2;
    2 * delays.get(needed.saturating_sub(1)).copied().unwrap_or(0)
}

/// Runs `vault-bench fill` for a stopped node, in its own process.
fn fill(node: &VaultNode, from: u64, to: u64) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    eprintln!("  growing the store from {from} to {to} records");
    run_fill(fill_command(node, from, to)?)
}

/// Runs `vault-bench fill --group 1` over the (stopped) members' data
/// directories, sealing with the first member's token.
fn fill_group(nodes: &[VaultNode], records: u64) -> Result<()> {
    eprintln!(
        "  filling {} state machines with {records} records",
        nodes.len()
    );
    let mut cmd = fill_command(&nodes[0], 0, records)?;
    cmd.arg("--group=1");
    for n in &nodes[1..] {
        cmd.arg(format!("--also={}", n.data_dir().display()));
    }
    run_fill(cmd)?;
    // Each member's token vouches for its own state machine.
    for n in nodes {
        let mut cmd = fill_command(n, 0, 0)?;
        cmd.args(["--group=1", "--vouch"]);
        run_fill(cmd)?;
    }
    Ok(())
}

/// `vault-bench fill` of filler accounts `from..to` into `node`'s data
/// directory, with its token.
fn fill_command(node: &VaultNode, from: u64, to: u64) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.envs(node.token.env())
        .arg("fill")
        .arg(format!("--data-dir={}", node.data_dir().display()))
        .arg(format!("--pkcs11-module={}", softhsm_module().display()))
        .arg(format!("--token-label={}", node.label))
        .arg(format!("--pin-file={}", node.pin_file().display()))
        .arg(format!("--from={from}"))
        .arg(format!("--to={to}"));
    Ok(cmd)
}

fn run_fill(mut cmd: Command) -> Result<()> {
    let status = cmd.status().context("running vault-bench fill")?;
    if !status.success() {
        bail!("filling failed ({status})");
    }
    Ok(())
}

/// Adds the leader's mean replicated-write latency over the run (from its
/// `vault_raft_write_duration_seconds`, scraped before and after; the
/// accounts' registrations before the measured window count too): how long
/// a write waits for a majority, apart from the rest of a recovery.
fn write_latency(r: &mut Report, before: &str, after: &str) {
    let delta =
        |name: &str| vault_e2e::metric(after, name, &[]) - vault_e2e::metric(before, name, &[]);
    let count = delta("vault_raft_write_duration_seconds_count");
    if count > 0.0 {
        let mean_ms = 1000.0 * delta("vault_raft_write_duration_seconds_sum") / count;
        r.fact("replicated_write_mean_ms", (mean_ms * 10.0).round() / 10.0);
        r.fact("replicated_writes", count);
    }
}

/// Records in group `group`'s state machine of a stopped node's sled.
fn count_records(dir: &Path, group: u64) -> Result<u64> {
    let db = sled::Config::new().path(dir).open()?;
    let tree = db.open_tree(format!("raft-sm/g{group}"))?;
    Ok(tree
        .iter()
        .keys()
        .flatten()
        .filter(|k| k.len() == 32)
        .count() as u64)
}

fn softhsm_module() -> std::path::PathBuf {
    softhsm_test_harness::module_path()
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "load_average_before": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "results_dir": Path::new(".").canonicalize().ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_round_trip_follows_the_latency_table() {
        let layout = three_regions();
        // From eu-west: the other eu-west node (2 ms) and a us-east node
        // (35 ms) make three.
        assert_eq!(majority_rtt_ms(&layout, 0), 70);
        // From ap-south: two more are needed, the nearest being eu-west's
        // at 60 ms.
        assert_eq!(majority_rtt_ms(&layout, 4), 120);
        // From us-east: the other us-east node and an eu-west node.
        assert_eq!(majority_rtt_ms(&layout, 2), 70);
    }
}
