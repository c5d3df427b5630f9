//! `fleet dashboard`: the operators' live view of a fleet, served over HTTP.
//!
//! Once a second a poller asks every node for its Raft view (`GetInfo`, over
//! TLS, one-second deadline), scrapes its metrics listener, and reads the
//! tail of its audit trail; it keeps the latest [`View`]. The listener
//! serves:
//! - `/`: the page (static HTML and script, rendering `/api/fleet` every
//!   second);
//! - `/api/fleet`: the view as JSON;
//! - `/metrics`: the fleet manager's own metrics (nodes up, leaders, lag),
//!   for Prometheus.
//!
//! A node that does not answer within the deadline is `down` from the next
//! poll on: a killed node turns red within about two seconds.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_client::VaultClient;

use crate::{client_api, watched, NodeState};

/// How often the poller looks, and how long a node has to answer.
const POLL_EVERY: Duration = Duration::from_secs(1);
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Audit events shown, newest first.
const AUDIT_EVENTS: usize = 14;

/// What the page shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct View {
    /// When this view was taken (ms since the Unix epoch).
    pub updated_ms: u64,
    pub regions: Vec<Region>,
    pub groups: Vec<Group>,
    pub nodes: Vec<NodeView>,
    pub totals: Totals,
    pub audit: Vec<AuditLine>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Region {
    pub name: String,
    pub nodes: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Group {
    pub id: u64,
    pub members: Vec<u64>,
    pub leader: Option<u64>,
    pub voters: Vec<u64>,
    pub term: Option<u64>,
    pub applied: Option<u64>,
    pub shard_map_version: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeView {
    pub id: u64,
    pub region: String,
    pub group: u64,
    pub addr: String,
    /// `up`, `no-leader` (answers, but its group has no leader) or `down`.
    pub health: &'static str,
    /// `leader`, `unconfirmed` (claims to lead, not acknowledged), `follower`,
    /// `learner`, `no-leader`, or `unknown` (down); see `roles`.
    pub role: &'static str,
    pub applied: Option<u64>,
    /// Entries behind its group's leader.
    pub lag: Option<u64>,
    pub term: Option<u64>,
    pub rpc_per_s: Option<f64>,
    pub recoveries_per_s: Option<f64>,
    pub guesses_per_s: Option<f64>,
    /// Lockouts this node recorded since it started.
    pub lockouts: Option<u64>,
    /// Since when the node is down (ms since the Unix epoch).
    pub down_since_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub nodes: usize,
    pub nodes_up: usize,
    pub recoveries_per_s: f64,
    pub guesses_per_s: f64,
    pub rpc_per_s: f64,
    pub lockouts: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditLine {
    pub time_ms: u64,
    pub node: u64,
    pub event: String,
    /// The first characters of the record id (never an account id).
    pub record: Option<String>,
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: u64,
    region: String,
    group: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: u64,
}

/// The fleet manager's own metrics.
#[derive(Debug)]
struct FleetMetrics {
    registry: Registry,
    node_up: Family<NodeLabels, Gauge>,
    node_lag: Family<NodeLabels, Gauge>,
    group_leader: Family<GroupLabels, Gauge>,
    polls: Counter,
    recoveries_per_s: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl FleetMetrics {
    fn new() -> Self {
        let m = FleetMetrics {
            registry: Registry::default(),
            node_up: Family::default(),
            node_lag: Family::default(),
            group_leader: Family::default(),
            polls: Counter::default(),
            recoveries_per_s: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("vault_fleet");
        registry.register(
            "node_up",
            "1 while the node answers within a second",
            m.node_up.clone(),
        );
        registry.register(
            "node_lag_entries",
            "Entries the node has applied fewer than its group's leader",
            m.node_lag.clone(),
        );
        registry.register(
            "group_leader",
            "Node id of the group's leader (0: none known)",
            m.group_leader.clone(),
        );
        registry.register("polls", "Polls of the fleet", m.polls.clone());
        registry.register(
            "recoveries_per_second",
            "Secrets released per second across the fleet (last poll)",
            m.recoveries_per_s.clone(),
        );
        FleetMetrics { registry, ..m }
    }

    fn record(&self, view: &View) {
        self.polls.inc();
        for n in &view.nodes {
            let labels = NodeLabels {
                node: n.id,
                region: n.region.clone(),
                group: n.group,
            };
            self.node_up
                .get_or_create(&labels)
                .set(i64::from(n.health != "down"));
            self.node_lag
                .get_or_create(&labels)
                .set(n.lag.map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX)));
        }
        for g in &view.groups {
            self.group_leader
                .get_or_create(&GroupLabels { group: g.id })
                .set(g.leader.map_or(0, |l| i64::try_from(l).unwrap_or(0)));
        }
        self.recoveries_per_s.set(view.totals.recoveries_per_s);
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One node's answer to a poll.
#[derive(Clone, Debug, Default)]
struct Probe {
    info: Option<pb::GetInfoResponse>,
    /// Counters from the metrics listener: rpc, recoveries, guesses,
    /// lockouts, and the Raft term.
    counters: Option<[f64; 5]>,
    at: Option<Instant>,
}

/// Runs the dashboard on `listen` until interrupted.
/// (`fleet_file`: watch its nodes instead of the local fleet's.)
pub async fn serve(
    dir: PathBuf,
    listen: SocketAddr,
    fleet_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    watched(&dir, fleet_file.as_deref())?;
    let view = Arc::new(RwLock::new(View::default()));
    let metrics = Arc::new(FleetMetrics::new());
    tokio::spawn(poll(
        (dir, fleet_file),
        Arc::clone(&view),
        Arc::clone(&metrics),
    ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    println!("fleet dashboard on http://{addr}/");
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    PAGE,
                )
            }),
        )
        .route(
            "/api/fleet",
            axum::routing::get({
                let view = Arc::clone(&view);
                move || async move {
                    let v = view.read().map(|v| v.clone()).unwrap_or_default();
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        serde_json::to_string(&v).unwrap_or_default(),
                    )
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

const PAGE: &str = include_str!("dashboard.html");

/// The poll loop: a new view every second.
async fn poll(
    (dir, fleet_file): (PathBuf, Option<PathBuf>),
    view: Arc<RwLock<View>>,
    metrics: Arc<FleetMetrics>,
) {
    let mut last: BTreeMap<u64, Probe> = BTreeMap::new();
    let mut down_since: BTreeMap<u64, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Re-read each time: nodes are added, replaced and restarted.
        let Ok(state) = watched(&dir, fleet_file.as_deref()) else {
            continue;
        };
        let mut probes = tokio::task::JoinSet::new();
        for (id, node) in state.nodes.clone() {
            let dir = dir.clone();
            probes.spawn(async move { (id, probe(&dir, &node).await) });
        }
        let mut now: BTreeMap<u64, Probe> = BTreeMap::new();
        while let Some(Ok((id, p))) = probes.join_next().await {
            now.insert(id, p);
        }
        let next = build(&dir, &state.nodes, &now, &last, &mut down_since);
        metrics.record(&next);
        if let Ok(mut v) = view.write() {
            *v = next;
        }
        last = now;
    }
}

async fn probe(dir: &Path, node: &NodeState) -> Probe {
    let info = tokio::time::timeout(ANSWER_WITHIN, async {
        let channel = client_api(dir, &node.addr, ANSWER_WITHIN).await.ok()?;
        VaultClient::new(channel)
            .get_info(pb::GetInfoRequest {})
            .await
            .ok()
            .map(tonic::Response::into_inner)
    })
    .await
    .ok()
    .flatten();
    let counters = match (&info, &node.metrics_addr) {
        (Some(_), Some(addr)) => scrape(addr).await.map(|text| {
            let m = |name: &str| hsm_vault::telemetry::sample_sum(&text, name, &[]);
            [
                m("vault_rpc_requests_total"),
                m("vault_recoveries_total"),
                m("vault_guesses_charged_total"),
                m("vault_lockouts_total"),
                m("vault_raft_term"),
            ]
        }),
        _ => None,
    };
    Probe {
        info,
        counters,
        at: Some(Instant::now()),
    }
}

/// `GET /metrics` from a node's metrics listener (HTTP/1.0: the answer
/// ends when the connection closes).
async fn scrape(addr: &str) -> Option<String> {
    tokio::time::timeout(ANSWER_WITHIN, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.")
            .then(|| head.split_whitespace().nth(1) == Some("200"))
            .filter(|ok| *ok)
            .map(|_| body.to_owned())
    })
    .await
    .ok()
    .flatten()
}

fn millis_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn build(
    dir: &Path,
    nodes: &BTreeMap<u64, NodeState>,
    now: &BTreeMap<u64, Probe>,
    last: &BTreeMap<u64, Probe>,
    down_since: &mut BTreeMap<u64, u64>,
) -> View {
    let updated_ms = millis_now();
    // Per group: the acknowledged leader's answer (voters, applied, map).
    let answers: Vec<crate::roles::Answer> = now
        .iter()
        .filter_map(|(id, p)| Some((*id, nodes.get(id)?.group, p.info.as_ref()?)))
        .collect();
    let leaders = crate::roles::acknowledged_leaders(&answers);
    let mut view = View {
        updated_ms,
        ..View::default()
    };
    let mut regions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut groups: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (id, node) in nodes {
        regions.entry(node.region.clone()).or_default().push(*id);
        groups.entry(node.group).or_default().push(*id);
        let probe = now.get(id).cloned().unwrap_or_default();
        let leader = leaders.get(&node.group);
        let mut n = NodeView {
            id: *id,
            region: node.region.clone(),
            group: node.group,
            addr: node.addr.clone(),
            health: "down",
            role: "unknown",
            ..NodeView::default()
        };
        match &probe.info {
            Some(info) => {
                down_since.remove(id);
                n.health = if info.leader_id == 0 {
                    "no-leader"
                } else {
                    "up"
                };
                n.role = crate::roles::role(*id, info, leader.copied());
                n.applied = Some(info.applied_index);
                n.lag = leader.map(|(_, l)| l.applied_index.saturating_sub(info.applied_index));
            }
            None => {
                n.down_since_ms = Some(*down_since.entry(*id).or_insert(updated_ms));
            }
        }
        if let Some(c) = probe.counters {
            n.term = Some(c[4] as u64);
            n.lockouts = Some(c[3] as u64);
            view.totals.lockouts += c[3] as u64;
            if let (Some(prev), Some(at), Some(then)) = (
                last.get(id).and_then(|p| p.counters),
                probe.at,
                last.get(id).and_then(|p| p.at),
            ) {
                let secs = at.duration_since(then).as_secs_f64().max(0.001);
                let rate = |i: usize| ((c[i] - prev[i]).max(0.0) / secs * 10.0).round() / 10.0;
                n.rpc_per_s = Some(rate(0));
                n.recoveries_per_s = Some(rate(1));
                n.guesses_per_s = Some(rate(2));
                view.totals.rpc_per_s += rate(0);
                view.totals.recoveries_per_s += rate(1);
                view.totals.guesses_per_s += rate(2);
            }
        }
        view.totals.nodes += 1;
        if n.health != "down" {
            view.totals.nodes_up += 1;
        }
        view.nodes.push(n);
    }
    view.regions = regions
        .into_iter()
        .map(|(name, nodes)| Region { name, nodes })
        .collect();
    view.groups = groups
        .into_iter()
        .map(|(id, members)| {
            let leader = leaders.get(&id);
            Group {
                id,
                members,
                leader: leader.map(|(l, _)| *l),
                voters: leader.map(|(_, i)| i.voters.clone()).unwrap_or_default(),
                term: leader.and_then(|(l, _)| view.nodes.iter().find(|n| n.id == *l)?.term),
                applied: leader.map(|(_, i)| i.applied_index),
                shard_map_version: leader.map(|(_, i)| i.shard_map_version),
            }
        })
        .collect();
    view.audit = recent_audit(dir, nodes.keys().copied());
    view
}

/// The newest audit events across the nodes' trails (their last 64 KiB).
fn recent_audit(dir: &Path, ids: impl Iterator<Item = u64>) -> Vec<AuditLine> {
    let mut lines = Vec::new();
    for id in ids {
        let path = dir.join(format!("node-{id}/data/audit.log"));
        let Some(text) = tail(&path, 64 * 1024) else {
            continue;
        };
        for line in text.lines().rev().take(AUDIT_EVENTS) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let detail = ["guesses_remaining", "voters", "step", "learner", "node_id"]
                .iter()
                .find_map(|k| v.get(*k).map(|d| format!("{k}: {d}")));
            lines.push(AuditLine {
                time_ms: v["time_ms"].as_u64().unwrap_or(0),
                node: v["node"].as_u64().unwrap_or(id),
                event: v["event"].as_str().unwrap_or("?").to_owned(),
                record: v["record"].as_str().map(|r| r.chars().take(12).collect()),
                detail,
            });
        }
    }
    lines.sort_by_key(|l| std::cmp::Reverse(l.time_ms));
    lines.truncate(AUDIT_EVENTS);
    lines
}

/// The last `bytes` of a file, from its first whole line.
fn tail(path: &Path, bytes: u64) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(bytes);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut raw = Vec::new();
    f.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    Some(if from > 0 {
        text.split_once('\n')
            .map_or(String::new(), |(_, rest)| rest.to_owned())
    } else {
        text
    })
}
