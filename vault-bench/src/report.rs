//! What a scenario measured, as JSON, as an SVG chart, and as a table row.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::load::Measured;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// One second of the measured window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Second {
    pub t: u64,
    pub ops: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A target of the issue, checked against what was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub operation: String,
    pub nodes: usize,
    pub workers: usize,
    pub window_s: f64,
    pub completed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub throughput_per_s: f64,
    pub latency: Latency,
    /// CPU time of every vault process of the scenario, in the window.
    pub vault_cpu_s: f64,
    pub vault_cpu_per_op_us: f64,
    /// CPU time of the load generator itself (client-side OPAQUE, gRPC).
    pub bench_cpu_s: f64,
    pub bench_cpu_per_op_us: f64,
    /// Raw opaque-ke server CPU per operation, same run.
    pub baseline_cpu_per_op_us: f64,
    /// baseline CPU per operation ÷ vault CPU per operation.
    pub cpu_efficiency: f64,
    /// Share of the machine's busy CPU the load generator took.
    pub load_generator_share: f64,
    pub timeline: Vec<Second>,
    pub targets: Vec<Target>,
    /// Facts particular to the scenario (round trips, records, …).
    pub facts: serde_json::Map<String, serde_json::Value>,
    /// (x on a "nines" axis, ms): the latency distribution, for the chart.
    pub percentiles: Vec<(f64, f64)>,
}

fn histogram(latencies_us: impl IntoIterator<Item = u64>) -> Histogram<u64> {
    // 1 µs to 10 minutes, 3 significant digits.
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
    for us in latencies_us {
        h.saturating_record(us.max(1));
    }
    h
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Report {
    /// Turns raw measurements into the report (targets and facts are added
    /// by the scenario).
    pub fn new(
        scenario: &str,
        description: &str,
        operation: &'static str,
        (nodes, workers): (usize, usize),
        m: &Measured,
        baseline_cpu_per_op_us: f64,
    ) -> Self {
        let h = histogram(m.latencies_us.iter().copied());
        let completed = m.latencies_us.len() as u64;
        let per_op = |cpu: std::time::Duration| {
            if completed == 0 {
                0.0
            } else {
                cpu.as_secs_f64() * 1e6 / completed as f64
            }
        };
        let vault_cpu_per_op_us = per_op(m.vault_cpu);
        let busy = m.vault_cpu + m.bench_cpu;
        let mut timeline = Vec::new();
        let seconds = m.window.as_secs_f64().ceil() as u64;
        for t in 0..seconds {
            let in_second = m
                .completions
                .iter()
                .filter(|(at, _)| *at >= t as f64 && *at < (t + 1) as f64)
                .map(|c| c.1);
            let hs = histogram(in_second);
            timeline.push(Second {
                t,
                ops: hs.len(),
                p50_ms: ms(hs.value_at_quantile(0.5)),
                p99_ms: ms(hs.value_at_quantile(0.99)),
            });
        }
        Report {
            scenario: scenario.to_owned(),
            description: description.to_owned(),
            operation: operation.to_owned(),
            nodes,
            workers,
            window_s: m.window.as_secs_f64(),
            completed,
            errors: m.errors,
            first_error: m.first_error.clone(),
            throughput_per_s: completed as f64 / m.window.as_secs_f64().max(1e-9),
            latency: Latency {
                p50_ms: ms(h.value_at_quantile(0.50)),
                p95_ms: ms(h.value_at_quantile(0.95)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                max_ms: ms(h.max()),
                mean_ms: h.mean() / 1000.0,
            },
            vault_cpu_s: m.vault_cpu.as_secs_f64(),
            vault_cpu_per_op_us,
            bench_cpu_s: m.bench_cpu.as_secs_f64(),
            bench_cpu_per_op_us: per_op(m.bench_cpu),
            baseline_cpu_per_op_us,
            cpu_efficiency: if vault_cpu_per_op_us > 0.0 {
                baseline_cpu_per_op_us / vault_cpu_per_op_us
            } else {
                0.0
            },
            load_generator_share: if busy.is_zero() {
                0.0
            } else {
                m.bench_cpu.as_secs_f64() / busy.as_secs_f64()
            },
            timeline,
            targets: Vec::new(),
            facts: serde_json::Map::new(),
            percentiles: percentile_curve(&h),
        }
    }

    pub fn fact(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.facts.insert(key.to_owned(), value.into());
    }

    pub fn target(&mut self, what: &str, target: String, measured: String, met: bool) {
        self.targets.push(Target {
            what: what.to_owned(),
            target,
            measured,
            met,
        });
    }

    /// Writes `<dir>/<scenario>.json` and `<dir>/<scenario>.svg`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        if self.workers > 0 {
            let svg = dir.join(format!("{}.svg", self.scenario));
            std::fs::write(&svg, self.svg())
                .with_context(|| format!("writing {}", svg.display()))?;
        }
        Ok(())
    }

    /// Two panels: the latency distribution, and throughput per second
    /// with its p50 and p99.
    pub fn svg(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="960" height="420" font-family="sans-serif" font-size="12">
<rect width="960" height="420" fill="white"/>
<text x="20" y="24" font-size="15" font-weight="bold">{}</text>
<text x="20" y="42" fill="#555">{}</text>
<text x="20" y="58" fill="#555">{} nodes · {} workers · {:.0} {}/s · p50 {:.1} ms · p99 {:.1} ms · CPU efficiency {:.2}</text>
"##,
            esc(&self.scenario),
            esc(&self.description),
            self.nodes,
            self.workers,
            self.throughput_per_s,
            self.operation,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.cpu_efficiency,
        );
        let pct: Vec<(f64, f64)> = self.percentiles.iter().map(|p| (p.0, p.1)).collect();
        let nines = [
            (0.0, "0%"),
            (nines_x(50.0), "50%"),
            (nines_x(90.0), "90%"),
            (nines_x(99.0), "99%"),
            (nines_x(99.9), "99.9%"),
            (nines_x(99.99), "99.99%"),
        ];
        panel(
            &mut s,
            (60.0, 90.0, 380.0, 280.0),
            ("latency by percentile", "percentile", "ms"),
            &[(&pct, "#1f77b4")],
            &nines.map(|(x, l)| (x, l.to_owned())),
        );
        // One point per second of the window, at its middle.
        let per_second = |value: fn(&Second) -> f64| -> Vec<(f64, f64)> {
            self.timeline
                .iter()
                .map(|t| (t.t as f64 + 0.5, value(t)))
                .collect()
        };
        let ops = per_second(|t| t.ops as f64);
        let p50 = per_second(|t| t.p50_ms);
        let p99 = per_second(|t| t.p99_ms);
        let end = self.window_s.ceil().max(1.0);
        let ticks: Vec<(f64, String)> = (0..=4)
            .map(|i| {
                let x = end * f64::from(i) / 4.0;
                (x, format!("{x:.0} s"))
            })
            .collect();
        panel(
            &mut s,
            (540.0, 90.0, 380.0, 120.0),
            ("operations per second", "", "ops/s"),
            &[(&ops, "#2ca02c")],
            &ticks,
        );
        panel(
            &mut s,
            (540.0, 250.0, 380.0, 120.0),
            (
                "p50 (blue) and p99 (red) per second",
                "time in the window",
                "ms",
            ),
            &[(&p50, "#1f77b4"), (&p99, "#d62728")],
            &ticks,
        );
        s.push_str("</svg>\n");
        s
    }
}

/// Rewrites the chart of every scenario report in `dir` from its JSON.
pub fn redraw(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_report = path.extension().is_some_and(|e| e == "json")
            && path.file_stem().is_some_and(|s| s != "summary");
        if !is_report {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a scenario report", path.display()))?;
        report.write(dir)?;
    }
    Ok(())
}

/// x position of percentile `p` on a "nines" axis.
fn nines_x(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.9999)).log10()
}

fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let mut p = 0.0f64;
    while p <= 99.99 {
        out.push((nines_x(p), ms(h.value_at_percentile(p))));
        // Finer steps as the nines grow.
        p += (100.0 - p) / 20.0;
        if 100.0 - p < 0.01 {
            break;
        }
    }
    out.push((nines_x(99.99), ms(h.max())));
    out
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart in the box `(x, y, w, h)`; y starts at 0.
fn panel(
    s: &mut String,
    (x, y, w, h): (f64, f64, f64, f64),
    (title, x_label, y_label): (&str, &str, &str),
    series: &[(&[(f64, f64)], &str)],
    x_ticks: &[(f64, String)],
) {
    let all = series.iter().flat_map(|(pts, _)| pts.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for (px, py) in all {
        x_max = x_max.max(*px);
        y_max = y_max.max(*py);
    }
    x_max = x_ticks.iter().map(|t| t.0).fold(x_max, f64::max).max(1e-9);
    let y_max = nice(y_max);
    let sx = |v: f64| x + v / x_max * w;
    let sy = |v: f64| y + h - v / y_max * h;
    let _ = writeln!(
        s,
        r##"<text x="{x}" y="{}" font-weight="bold">{}</text>
<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" stroke="#999"/>
<text x="{}" y="{}" text-anchor="middle" fill="#555">{}</text>
<text x="{}" y="{}" text-anchor="middle" fill="#555" transform="rotate(-90 {} {})">{}</text>"##,
        y - 8.0,
        esc(title),
        x + w / 2.0,
        y + h + 34.0,
        esc(x_label),
        x - 42.0,
        y + h / 2.0,
        x - 42.0,
        y + h / 2.0,
        esc(y_label),
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let (x2, ly, tx, ty, label) = (x + w, sy(v), x - 4.0, sy(v) + 4.0, trim(v));
        let _ = writeln!(
            s,
            r##"<line x1="{x}" x2="{x2}" y1="{ly}" y2="{ly}" stroke="#eee"/><text x="{tx}" y="{ty}" text-anchor="end">{label}</text>"##,
        );
    }
    for (tx, label) in x_ticks {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            sx(*tx),
            y + h + 16.0,
            esc(label)
        );
    }
    for (pts, color) in series {
        let path: Vec<String> = pts
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", sx(*px), sy(*py)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
    }
}

/// A round upper bound for an axis.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn trim(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The summary table (Markdown) of every scenario run.
pub fn table(reports: &[Report]) -> String {
    let mut t = String::from(
        "| scenario | nodes | workers | ops/s | p50 ms | p95 ms | p99 ms | max ms | vault CPU/op µs | raw opaque-ke CPU/op µs | CPU efficiency | load generator CPU share | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    // Scenarios without a load (catch-up) report through their targets.
    for r in reports.iter().filter(|r| r.workers > 0) {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.0}% | {} |",
            r.scenario,
            r.nodes,
            r.workers,
            r.throughput_per_s,
            r.latency.p50_ms,
            r.latency.p95_ms,
            r.latency.p99_ms,
            r.latency.max_ms,
            r.vault_cpu_per_op_us,
            r.baseline_cpu_per_op_us,
            r.cpu_efficiency,
            r.load_generator_share * 100.0,
            r.errors,
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn report_reads_percentiles_cpu_and_timeline_from_samples() {
        // 100 completions over 2 s, latencies 1..=100 ms.
        let completions: Vec<(f64, u64)> = (1..=100u64)
            .map(|i| (i as f64 / 50.0 - 0.01, i * 1000))
            .collect();
        let m = Measured {
            latencies_us: completions.iter().map(|c| c.1).collect(),
            completions,
            errors: 1,
            first_error: Some("x".into()),
            window: Duration::from_secs(2),
            vault_cpu: Duration::from_millis(200),
            bench_cpu: Duration::from_millis(600),
        };
        let r = Report::new("t", "test", "recoveries", (1, 4), &m, 1000.0);
        assert_eq!(r.completed, 100);
        assert!((r.throughput_per_s - 50.0).abs() < 1e-9);
        assert!((r.latency.p50_ms - 50.0).abs() < 0.1, "{:?}", r.latency);
        assert!((r.latency.p99_ms - 99.0).abs() < 0.1, "{:?}", r.latency);
        assert!((r.latency.max_ms - 100.0).abs() < 0.1);
        // 200 ms over 100 recoveries = 2,000 µs each; baseline 1,000 µs.
        assert!((r.vault_cpu_per_op_us - 2000.0).abs() < 1e-6);
        assert!((r.cpu_efficiency - 0.5).abs() < 1e-9);
        assert!((r.load_generator_share - 0.75).abs() < 1e-9);
        assert_eq!(r.timeline.len(), 2);
        assert_eq!(r.timeline[0].ops + r.timeline[1].ops, 100);
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("polyline"));
        assert!(table(&[r]).contains("| t | 1 | 4 | 50 |"));
    }
}
