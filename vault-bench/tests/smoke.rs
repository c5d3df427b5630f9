//! The benchmark end to end, kept short: real vault processes on SoftHSM,
//! real load. These tests check what the benchmark reports (counts, files,
//! the snapshot catch-up), never how fast anything was.

use std::process::Command;

use serde_json::Value;

fn bench(out: &std::path::Path, args: &[&str]) -> Value {
    let status = Command::new(vault_e2e::bin("vault-bench"))
        .args(args)
        .arg(format!("--out={}", out.display()))
        .args(["--duration=2", "--warmup=1", "--baseline-logins=40"])
        .status()
        .expect("run vault-bench");
    assert!(status.success(), "vault-bench failed: {status}");
    let summary = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&summary).expect("summary is JSON")
}

fn scenario<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .find(|s| s["scenario"] == name)
        .unwrap_or_else(|| panic!("no {name} in the summary"))
}

#[test]
fn bench_one_node_reports_recoveries_cpu_and_a_chart() {
    let out = tempfile::tempdir().expect("out dir");
    // Plaintext here; the catch-up below runs with TLS, the default.
    let summary = bench(
        out.path(),
        &["--scenario=one-node", "--workers=4", "--plaintext"],
    );
    assert!(
        summary["baseline"]["login"]["cpu_us"]
            .as_f64()
            .expect("baseline")
            > 0.0
    );
    let r = scenario(&summary, "one-node");
    assert!(r["completed"].as_u64().expect("completed") > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["vault_cpu_s"].as_f64().expect("cpu") > 0.0, "{r}");
    assert!(
        r["cpu_efficiency"].as_f64().expect("efficiency") > 0.0,
        "{r}"
    );
    assert!(
        r["latency"]["p99_ms"].as_f64().expect("p99")
            >= r["latency"]["p50_ms"].as_f64().expect("p50")
    );
    assert_eq!(r["targets"].as_array().expect("targets").len(), 1);
    let svg = std::fs::read_to_string(out.path().join("one-node.svg")).expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let table = std::fs::read_to_string(out.path().join("summary.md")).expect("table");
    assert!(table.contains("| one-node | 1 | 4 |"), "{table}");
}

/// A member that lost its disk catches up from the leader's snapshot (the
/// leader purged the log before it), and ends up holding every record.
#[test]
fn bench_catch_up_restores_every_record_from_a_snapshot() {
    let out = tempfile::tempdir().expect("out dir");
    let summary = bench(out.path(), &["--scenario=catch-up", "--records=3000"]);
    let r = scenario(&summary, "catch-up");
    let facts = &r["facts"];
    assert!(
        facts["snapshot_index"].as_u64().expect("snapshot") > 0,
        "{r}"
    );
    // The filler records plus the registrations that made the leader
    // snapshot.
    assert!(
        facts["records_held_after"].as_u64().expect("held") > 3000,
        "{r}"
    );
}
