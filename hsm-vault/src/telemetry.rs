//! What a node tells its operators: Prometheus metrics, request ids, and the
//! per-RPC layer that counts, times and tags every call.
//!
//! - [`metrics`]: the process's metrics (one node per process), served as
//!   OpenMetrics text by [`serve_metrics`] on `--metrics-listen`. Labels come
//!   from fixed sets (method names, status codes, operation names), never
//!   from what a caller sends, so a caller cannot grow them.
//! - [`RpcLayer`]: wraps a gRPC server. Each call gets a request id (the
//!   caller's `x-request-id` if it is a short token, else a fresh random
//!   one), runs inside a tracing span carrying it (every log line of the call
//!   names it), and answers with it in `x-request-id`. Forwarded requests
//!   carry it to the next node.
//! - [`watch_raft`]: copies a replica's Raft state into gauges and its health
//!   into the gRPC health service.

use openraft::async_runtime::WatchReceiver;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::Instrument;

/// The request-id header (and gRPC metadata key).
pub const REQUEST_ID: &str = "x-request-id";

/// A histogram family constructor (prometheus-client wants a `fn`).
type NewHistogram = fn() -> Histogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: u64,
}

/// Every metric a node exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_seconds: Family<MethodLabels, Histogram, NewHistogram>,
    pub registrations: Counter,
    pub guesses_charged: Counter,
    pub wrong_passwords: Counter,
    pub recoveries: Counter,
    pub lockouts: Counter,
    pub second_writes_lost: Counter,
    pub deletions: Counter,
    pub throttled: Counter,
    pub snapshots_refused: Counter,
    pub replica_diverged: Gauge,
    pub raft_term: Gauge,
    pub raft_leader: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_snapshot_index: Gauge,
    pub raft_follower_lag: Family<PeerLabels, Gauge>,
    pub pkcs11_seconds: Family<OpLabels, Histogram, NewHistogram>,
    pub pkcs11_errors: Family<OpLabels, Counter>,
    pub flush_seconds: Family<StoreLabels, Histogram, NewHistogram>,
    pub raft_write_seconds: Histogram,
}

fn rpc_buckets() -> Histogram {
    // 0.25 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn fast_buckets() -> Histogram {
    // 25 µs .. ~0.8 s: token operations and disk flushes.
    Histogram::new(exponential_buckets(0.000_025, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("vault");
        let m = Metrics {
            rpc_requests: Family::default(),
            rpc_seconds: Family::new_with_constructor(rpc_buckets),
            registrations: Counter::default(),
            guesses_charged: Counter::default(),
            wrong_passwords: Counter::default(),
            recoveries: Counter::default(),
            lockouts: Counter::default(),
            second_writes_lost: Counter::default(),
            deletions: Counter::default(),
            throttled: Counter::default(),
            snapshots_refused: Counter::default(),
            replica_diverged: Gauge::default(),
            raft_term: Gauge::default(),
            raft_leader: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_snapshot_index: Gauge::default(),
            raft_follower_lag: Family::default(),
            pkcs11_seconds: Family::new_with_constructor(fast_buckets),
            pkcs11_errors: Family::default(),
            flush_seconds: Family::new_with_constructor(fast_buckets),
            raft_write_seconds: rpc_buckets(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rpc_requests",
            "gRPC calls served, by method and status code",
            m.rpc_requests.clone(),
        );
        r.register(
            "rpc_duration_seconds",
            "Time to answer a gRPC call, by method",
            m.rpc_seconds.clone(),
        );
        r.register(
            "registrations",
            "Records registered (or replaced)",
            m.registrations.clone(),
        );
        r.register(
            "guesses_charged",
            "Password guesses charged durably before a KE2 was released",
            m.guesses_charged.clone(),
        );
        r.register(
            "wrong_passwords",
            "Logins finished with a wrong password",
            m.wrong_passwords.clone(),
        );
        r.register(
            "recoveries",
            "Secrets released to their owner",
            m.recoveries.clone(),
        );
        r.register(
            "lockouts",
            "Records locked by their guess limit",
            m.lockouts.clone(),
        );
        r.register(
            "second_writes_lost",
            "Resets and lockouts after a finished login that did not commit (the record keeps \
             the guesses it was charged)",
            m.second_writes_lost.clone(),
        );
        r.register("deletions", "Records deleted", m.deletions.clone());
        r.register(
            "recovery_starts_throttled",
            "Recovery starts refused by a rate limit",
            m.throttled.clone(),
        );
        r.register(
            "snapshots_refused",
            "Snapshots from a peer refused: their token MAC or their maps did not check",
            m.snapshots_refused.clone(),
        );
        r.register(
            "replica_diverged",
            "1 once a leader's state check found this replica's state different from its group's (it then serves nothing)",
            m.replica_diverged.clone(),
        );
        r.register(
            "raft_term",
            "Current Raft term of this node",
            m.raft_term.clone(),
        );
        r.register(
            "raft_leader",
            "Node id of the leader this node knows (0: none)",
            m.raft_leader.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 while this node leads its group",
            m.raft_is_leader.clone(),
        );
        r.register(
            "raft_last_log_index",
            "Index of the last entry in this node's Raft log",
            m.raft_last_log_index.clone(),
        );
        r.register(
            "raft_commit_index",
            "Index of the last Raft entry this node knows to be committed",
            m.raft_commit_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "Index of the last Raft entry this node applied",
            m.raft_applied_index.clone(),
        );
        r.register(
            "raft_snapshot_index",
            "Last log index covered by this node's latest snapshot",
            m.raft_snapshot_index.clone(),
        );
        r.register(
            "raft_follower_lag_entries",
            "On a leader: entries each follower's log is behind the leader's",
            m.raft_follower_lag.clone(),
        );
        r.register(
            "pkcs11_operation_duration_seconds",
            "Time of a PKCS#11 operation in the token, by operation",
            m.pkcs11_seconds.clone(),
        );
        r.register(
            "pkcs11_errors",
            "PKCS#11 operations that failed, by operation",
            m.pkcs11_errors.clone(),
        );
        r.register(
            "storage_flush_duration_seconds",
            "Time to make a batch of writes durable on disk, by store",
            m.flush_seconds.clone(),
        );
        r.register(
            "raft_write_duration_seconds",
            "On a leader: time for a replicated write to commit on a majority and apply here",
            m.raft_write_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Times a token operation and counts its failure.
    pub fn token_op<T, E>(
        &self,
        op: &'static str,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let out = f();
        let labels = OpLabels { op };
        self.pkcs11_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if out.is_err() {
            self.pkcs11_errors.get_or_create(&labels).inc();
        }
        out
    }

    /// Records the time a flush of `store` took.
    pub fn flushed(&self, store: &'static str, started: Instant) {
        self.flush_seconds
            .get_or_create(&StoreLabels { store })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Serves `GET /metrics` (OpenMetrics text) and `GET /healthz` (200
/// "SERVING" or 503 "NOT_SERVING", as the gRPC health service says: for
/// probes that cannot speak gRPC over TLS) on `listener` until `stop`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|| async {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics().encode(),
                )
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(|| async {
                if SERVING.load(std::sync::atomic::Ordering::Relaxed) {
                    (http::StatusCode::OK, "SERVING\n")
                } else {
                    (http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

/// The sum of the samples of `name` in an OpenMetrics/Prometheus text
/// scrape whose labels include every `label="value"` pair in `labels` (0 if
/// none). For the dashboard and tests, not a general parser.
pub fn sample_sum(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let wanted = labels.iter().all(|(k, v)| {
                label_text.split(',').any(|p| {
                    p.strip_prefix(*k).and_then(|r| r.strip_prefix('='))
                        == Some(&format!("\"{v}\""))
                })
            });
            (metric == name && wanted)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The gRPC methods the nodes serve, as metric labels. Anything else is
/// "other": label values never come from the caller.
const METHODS: &[&str] = &[
    "/vault.v1.Vault/GetInfo",
    "/vault.v1.Vault/RegisterStart",
    "/vault.v1.Vault/RegisterFinish",
    "/vault.v1.Vault/RecoverStart",
    "/vault.v1.Vault/RecoverFinish",
    "/vault.v1.Vault/Delete",
    "/vault.v1.Vault/Status",
    "/vault.node.v1.Node/Raft",
    "/vault.node.v1.Operator/ExportKeys",
    "/vault.node.v1.Operator/AddLearner",
    "/vault.node.v1.Operator/ChangeMembership",
    "/vault.node.v1.Operator/Reshard",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn method_label(path: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == path)
        .map_or("other", |m| m.rsplit('/').next().unwrap_or("other"))
}

/// gRPC status code names (the canonical ones), by number.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// A caller's request id, if it is one we keep: 1–64 characters of
/// `[A-Za-z0-9._-]` (it goes into logs as it is).
fn acceptable_id(value: &http::HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    .then_some(s)
}

static NEXT_ID: LazyLock<(u64, AtomicU64)> =
    LazyLock::new(|| (rand::random::<u64>(), AtomicU64::new(0)));

/// A fresh request id: this process's random prefix and a counter (unique,
/// cheap, and says nothing about the request).
fn fresh_id() -> String {
    let (prefix, counter) = &*NEXT_ID;
    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:08x}{n:08x}", prefix >> 32)
}

/// Tower layer for a tonic server: request ids, a span per call, and the
/// per-RPC metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Rpc<S> {
        Rpc { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Rpc<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Rpc<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not the instance that was polled ready: swap them.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = method_label(request.uri().path());
        let id = request
            .headers()
            .get(REQUEST_ID)
            .and_then(acceptable_id)
            .map_or_else(fresh_id, str::to_owned);
        let header = http::HeaderValue::from_str(&id).ok();
        if let Some(h) = &header {
            request.headers_mut().insert(REQUEST_ID, h.clone());
        }
        let span = tracing::info_span!("rpc", request_id = %id, method);
        let started = Instant::now();
        Box::pin(
            async move {
                let result = inner.call(request).await;
                let elapsed = started.elapsed();
                let m = metrics();
                m.rpc_seconds
                    .get_or_create(&MethodLabels { method })
                    .observe(elapsed.as_secs_f64());
                let code = match &result {
                    // A unary error comes as a trailers-only answer
                    // (status in the headers); a success has its status in
                    // the trailers, which this layer does not wait for.
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .map_or(
                            if response.status().is_success() {
                                "OK"
                            } else {
                                "UNAVAILABLE"
                            },
                            code_name,
                        ),
                    Err(_) => "INTERNAL",
                };
                m.rpc_requests
                    .get_or_create(&RpcLabels { method, code })
                    .inc();
                tracing::debug!(code, micros = elapsed.as_micros() as u64, "rpc done");
                result.map(|mut response| {
                    if let Some(h) = header {
                        response.headers_mut().insert(REQUEST_ID, h);
                    }
                    response
                })
            }
            .instrument(span),
        )
    }
}

/// Whether the node serves clients, as the gRPC health service and the
/// metrics listener's `/healthz` tell it.
#[derive(Clone, Debug)]
pub struct Serving {
    health: tonic_health::server::HealthReporter,
    services: &'static [&'static str],
}

static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Serving {
    pub fn new(
        health: tonic_health::server::HealthReporter,
        services: &'static [&'static str],
    ) -> Self {
        Serving { health, services }
    }

    /// Sets the overall status ("") and each service's.
    pub async fn set(&self, up: bool) {
        SERVING.store(up, std::sync::atomic::Ordering::Relaxed);
        let status = if up {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for s in std::iter::once("").chain(self.services.iter().copied()) {
            self.health.set_service_status(s, status).await;
        }
    }
}

/// Keeps the Raft gauges and the health service in step with a replica's
/// Raft state: the node serves (SERVING) while it knows a leader of its
/// group, since it can then answer or forward; NOT_SERVING otherwise.
pub async fn watch_raft(raft: crate::replication::Raft, serving: Serving) {
    let mut rx = raft.metrics();
    let mut shown = None;
    loop {
        let now = rx.borrow_and_update().clone();
        let m = metrics();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.raft_term.set(gauge(now.current_term));
        m.raft_leader.set(gauge(now.current_leader.unwrap_or(0)));
        m.raft_is_leader
            .set(i64::from(now.current_leader == Some(now.id)));
        let last = now.last_log_index.unwrap_or(0);
        m.raft_last_log_index.set(gauge(last));
        m.raft_applied_index
            .set(gauge(now.last_applied.map_or(0, |l| l.index)));
        m.raft_snapshot_index
            .set(gauge(now.snapshot.map_or(0, |l| l.index)));
        m.raft_follower_lag.clear();
        for (peer, matched) in now.replication.iter().flatten() {
            if *peer != now.id {
                let behind = last.saturating_sub(matched.map_or(0, |l| l.index));
                m.raft_follower_lag
                    .get_or_create(&PeerLabels { peer: *peer })
                    .set(gauge(behind));
            }
        }
        // A replica whose state diverged from its group's serves nothing.
        let up = now.current_leader.is_some()
            && now.running_state.is_ok()
            && m.replica_diverged.get() == 0;
        if shown != Some(up) {
            shown = Some(up);
            serving.set(up).await;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The reflection service of a listener serving `services`.
pub fn reflection(
    services: &[&'static str],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection_builder(services).build_v1()
}

/// The same under the older `v1alpha` name, which many clients (grpcurl
/// before 1.8.8 among them) still ask for.
pub fn reflection_v1alpha(
    services: &[&'static str],
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    reflection_builder(services).build_v1alpha()
}

fn reflection_builder(services: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vault_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    for s in services {
        builder = builder.with_service_name(*s);
    }
    builder
}
