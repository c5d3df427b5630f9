//! `hsm-vault`: one vault node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use hsm_vault::audit::AuditLog;
use hsm_vault::auth::Authorizer;
use hsm_vault::backend::Backend;
use hsm_vault::backend::Replica;
use hsm_vault::geo::{FleetFile, Geography};
use hsm_vault::limits::{Limits, Rate};
use hsm_vault::partition::{KeySetup, Module, Partition};
use hsm_vault::replication::network::{Channels, Network, NodeService, MAX_RAFT_MESSAGE};
use hsm_vault::replication::operator::{OperatorService, MAX_HANDOVER_MESSAGE};
use hsm_vault::service::{from_client, VaultService, MAX_MESSAGE_BYTES};
use hsm_vault::shard::{GroupId, ShardMap};
use hsm_vault::store::Store;
use hsm_vault::telemetry::{self, RpcLayer};
use hsm_vault::tls::{load_certificate, load_identity, Caller, Gated, NodeTls, PeerCheck};
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use vault_proto::vault::node::v1::node_server::NodeServer;
use vault_proto::vault::node::v1::operator_server::OperatorServer;
use vault_proto::vault::v1::vault_server::VaultServer;
use zeroize::Zeroizing;

/// Serves the vault's client API from a PKCS#11 token and a sled store.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the client API, served over TLS with --tls-cert (port 0
    /// picks a free port; the chosen address is printed as `hsm-vault
    /// listening on ADDR`).
    #[arg(long, env = "HSM_VAULT_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Address of the peer listener of a replica group member: the
    /// node-to-node and operator APIs and client requests forwarded by other
    /// nodes, over mutual TLS (callers need a client certificate of the
    /// fleet CA). It is this node's address in --peers or its `peer_addr` in
    /// the fleet file; printed as `hsm-vault peers listening on ADDR`.
    #[arg(long, env = "HSM_VAULT_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// The client listener sits behind a load balancer that starts every
    /// connection with a PROXY protocol version 2 header: take each
    /// client's address from it (for rate limits and pending-login quotas)
    /// and drop connections without one. Only with a balancer in front of
    /// every connection: otherwise anyone could claim any address.
    #[arg(long, env = "HSM_VAULT_PROXY_PROTOCOL")]
    proxy_protocol: bool,
    /// Serve and connect without TLS: development only. Without this flag
    /// the node refuses to start unless it has its TLS material.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca", "tls_client_cert", "tls_client_key"])]
    plaintext: bool,
    /// The node's server certificate (PEM), for both listeners.
    #[arg(long, env = "HSM_VAULT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "HSM_VAULT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The fleet CA's certificate (PEM): the client certificates of callers
    /// of the peer listener, and the server certificates of peers, must
    /// chain to it. Needed by a member of a replica group.
    #[arg(long, env = "HSM_VAULT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's client certificate (PEM, naming `node-<id>`), presented
    /// to its peers. Needed by a member of a replica group.
    #[arg(long, env = "HSM_VAULT_TLS_CLIENT_CERT", requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "HSM_VAULT_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// Directory of the sled record store.
    #[arg(long, env = "HSM_VAULT_DATA_DIR")]
    data_dir: PathBuf,
    /// PKCS#11 module (SoftHSM2 by default).
    #[arg(
        long,
        env = "PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pkcs11_module: PathBuf,
    /// Label of the token holding this node's partition.
    #[arg(long, env = "HSM_VAULT_TOKEN_LABEL")]
    token_label: String,
    /// File holding the token user PIN. The PIN may instead come from the
    /// HSM_VAULT_PIN environment variable; it is never a command-line value.
    #[arg(long, env = "HSM_VAULT_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// The identity service's signing keys, a JWKS file (`{"keys": [...]}`;
    /// its P-256 keys are taken, several for rotation). Owner bearer tokens
    /// are ES256 JWTs signed by one of them (docs/AUTH_TOKENS.md).
    #[arg(long, env = "HSM_VAULT_AUTH_JWKS")]
    auth_jwks: PathBuf,
    /// The audience (`aud`) owner tokens must name: this vault's name.
    #[arg(long, env = "HSM_VAULT_AUTH_AUDIENCE", default_value = vault_proto::token::DEFAULT_AUDIENCE)]
    auth_audience: String,
    /// The issuer (`iss`) owner tokens must name.
    #[arg(long, env = "HSM_VAULT_AUTH_ISSUER", default_value = vault_proto::token::DEFAULT_ISSUER)]
    auth_issuer: String,
    /// Longest owner-token lifetime (`exp - iat`, seconds) accepted.
    #[arg(long, env = "HSM_VAULT_AUTH_MAX_LIFETIME_SECS", default_value_t = vault_proto::token::DEFAULT_MAX_LIFETIME_SECS)]
    auth_max_lifetime_secs: u64,
    /// Where to publish the vault's OPAQUE public key (hex) for clients to pin.
    #[arg(long, env = "HSM_VAULT_PUBLISH_KEY")]
    publish_key: Option<PathBuf>,
    /// Refuse to start unless the token already holds the domain keys (a
    /// node enrolled by a cloning ceremony). Without it, missing keys are
    /// generated: right only for the first token of a domain.
    #[arg(long)]
    require_cloned_keys: bool,
    /// This node's id (unique in the fleet; with --peers or --fleet-file).
    #[arg(long, env = "HSM_VAULT_NODE_ID")]
    node_id: Option<u64>,
    /// The replica group, as `ID=HOST:PORT,...` of the members' peer
    /// listeners (this node included, at its --peer-listen address).
    /// Without it the node runs alone.
    #[arg(long, env = "HSM_VAULT_PEERS")]
    peers: Option<String>,
    /// Form this node's group from its members (on one node per group, on
    /// first start).
    #[arg(long)]
    init: bool,
    /// The fleet file (regions, nodes and their groups, latency table, shard
    /// map): with it the node injects the emulated inter-region latency,
    /// routes requests to the group holding their record, and --peers may be
    /// left out (the nodes of this node's group are the group).
    #[arg(long, env = "HSM_VAULT_FLEET_FILE")]
    fleet_file: Option<PathBuf>,
    /// A JSON file of fault switches (isolate nodes or regions, delay, loss)
    /// that the node re-reads while it runs.
    #[arg(long, env = "HSM_VAULT_FAULTS_FILE")]
    faults_file: Option<PathBuf>,
    /// The operator's public key (hex SEC1 P-256): enables the operator API
    /// (ceremony source, membership changes) for requests it signed.
    #[arg(long, env = "HSM_VAULT_OPERATOR_PUBLIC_KEY")]
    operator_public_key: Option<PathBuf>,
    /// Raft log entries between two snapshots of the state machine. After a
    /// snapshot the log is purged down to at most 1,000 entries (fewer if
    /// this is smaller): a member further behind catches up from the
    /// snapshot.
    #[arg(long, env = "HSM_VAULT_SNAPSHOT_EVERY", default_value_t = 5000)]
    snapshot_every: u64,
    /// Raft heartbeat interval in milliseconds. It must exceed the longest
    /// round trip between the group's members (each AppendEntries has one
    /// interval to be answered). Default: from the fleet file's latency
    /// table (5/4 of the longest round trip + 100 ms, at least 100 ms); set
    /// it for a real multi-region group. Elections follow after 5–10
    /// heartbeats of silence.
    #[arg(long, env = "HSM_VAULT_RAFT_HEARTBEAT_MS")]
    raft_heartbeat_ms: Option<u64>,
    /// How long the Raft leader gathers writes before appending them as one
    /// batch, in milliseconds. Every batch costs each replica a flush and a
    /// token write, so gathering saves CPU under load; it adds up to this
    /// much to each write. 0: append each write at once.
    #[arg(long, env = "HSM_VAULT_RAFT_WRITE_LINGER_MS", default_value_t = hsm_vault::replication::WRITE_LINGER_MS)]
    raft_write_linger_ms: u64,
    /// The audit trail: security events, chained by token MACs (default:
    /// `audit.log` in --data-dir). `vault-audit` verifies and exports it.
    #[arg(long, env = "HSM_VAULT_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Recovery starts allowed per account: `BURST/PER_MINUTE` (a burst,
    /// then a steady rate), or `off`. Over it: RESOURCE_EXHAUSTED with a
    /// retry hint.
    #[arg(
        long,
        env = "HSM_VAULT_RECOVERY_LIMIT_ACCOUNT",
        default_value = "20/10"
    )]
    recovery_limit_account: RateArg,
    /// Recovery starts allowed per client address: `BURST/PER_MINUTE`, or
    /// `off`.
    #[arg(
        long,
        env = "HSM_VAULT_RECOVERY_LIMIT_ADDRESS",
        default_value = "2000/1200"
    )]
    recovery_limit_address: RateArg,
    /// Address of the metrics listener: OpenMetrics text for Prometheus at
    /// `GET /metrics`, over plain HTTP (bind it where only the scraper
    /// reaches it). Printed as `hsm-vault metrics on ADDR`.
    #[arg(long, env = "HSM_VAULT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr: `text`, or `json` (one object per line; the
    /// lines of a gRPC call carry its request id). Levels: RUST_LOG.
    #[arg(long, env = "HSM_VAULT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A rate limit on the command line: `BURST/PER_MINUTE` or `off`.
#[derive(Clone, Copy, Debug)]
struct RateArg(Option<Rate>);

impl std::str::FromStr for RateArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(RateArg(None));
        }
        let (burst, per_minute) = s
            .split_once('/')
            .ok_or_else(|| format!("expected BURST/PER_MINUTE or off, got {s:?}"))?;
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{t:?} is not a positive whole number"))
        };
        Ok(RateArg(Some(Rate {
            burst: number(burst)?,
            per_minute: number(per_minute)?,
        })))
    }
}

/// Parses `ID=HOST:PORT,...`.
fn parse_peers(text: &str) -> anyhow::Result<BTreeMap<u64, BasicNode>> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.parse().with_context(|| format!("peer id {id:?}"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("peer address {addr:?}"))?;
        out.insert(id, BasicNode::new(addr.to_string()));
    }
    if out.is_empty() {
        bail!("--peers names no node");
    }
    Ok(out)
}

/// Reads the token PIN from the file or, failing that, from HSM_VAULT_PIN,
/// which is then removed from the environment. Runs before any thread
/// exists.
fn read_pin(args: &Args) -> anyhow::Result<Zeroizing<String>> {
    if let Some(path) = &args.pin_file {
        let pin = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading PIN file {}", path.display()))?,
        );
        return Ok(Zeroizing::new(
            pin.trim_end_matches(['\n', '\r']).to_owned(),
        ));
    }
    match std::env::var("HSM_VAULT_PIN") {
        Ok(pin) => {
            std::env::remove_var("HSM_VAULT_PIN");
            Ok(Zeroizing::new(pin))
        }
        Err(_) => bail!("no token PIN: set --pin-file or HSM_VAULT_PIN"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pin = read_pin(&args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, pin))
}

async fn serve(args: Args, pin: Zeroizing<String>) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    let jwks = std::fs::read_to_string(&args.auth_jwks)
        .with_context(|| format!("reading {}", args.auth_jwks.display()))?;
    let auth_key = vault_proto::token::Verifier::from_jwks(
        &jwks,
        &args.auth_audience,
        &args.auth_issuer,
        args.auth_max_lifetime_secs,
    )
    .with_context(|| {
        format!(
            "{} must be a JWKS document with at least one P-256 key",
            args.auth_jwks.display()
        )
    })?;

    let fleet = args
        .fleet_file
        .as_deref()
        .map(FleetFile::load)
        .transpose()
        .context("loading the fleet file")?;
    // This node's group: the fleet file's word, or group 1 of a lone group.
    let group = match (&fleet, args.node_id) {
        (Some(f), Some(id)) => {
            f.node(id)
                .with_context(|| format!("the fleet file does not name node {id}"))?
                .group
        }
        _ => 1,
    };
    let peers = match (&args.peers, &fleet) {
        (Some(p), _) => Some(parse_peers(p)?),
        (None, Some(f)) => Some(
            f.group_nodes(group)
                .map(|n| (n.id, BasicNode::new(n.peer_addr.clone())))
                .collect(),
        ),
        (None, None) => None,
    };
    let member = args.node_id.is_some() && peers.is_some();
    if !member && args.peer_listen.is_some() {
        bail!("--peer-listen is for a member of a replica group (with --node-id and --peers or --fleet-file)");
    }
    let tls = load_tls(&args, member)?;
    let peer_check = if tls.is_some() {
        PeerCheck::Certificates
    } else {
        tracing::warn!("serving and connecting WITHOUT TLS (--plaintext): development only");
        PeerCheck::Off
    };
    let connector = tls
        .as_ref()
        .and_then(NodeTls::peer_connector)
        .unwrap_or_default();

    let module = args.pkcs11_module.clone();
    let label = args.token_label.clone();
    let setup = if args.require_cloned_keys {
        KeySetup::RequireExisting
    } else {
        KeySetup::GenerateIfMissing
    };
    let user_pin = Arc::new(pin);
    let pin = Arc::clone(&user_pin);
    let partition = tokio::task::spawn_blocking(move || {
        Partition::open_in(&Module::load(&module)?, &label, &pin, setup)
    })
    .await?
    .context("opening the PKCS#11 partition (a node of a group needs the domain keys from the cloning ceremony)")?;
    let audit_path = args
        .audit_log
        .clone()
        .unwrap_or_else(|| args.data_dir.join("audit.log"));
    if let Some(dir) = audit_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let audit = Arc::new(
        AuditLog::open(&audit_path, args.node_id.unwrap_or(0), partition.clone())
            .with_context(|| format!("opening the audit trail {}", audit_path.display()))?,
    );

    let shard_map = fleet
        .as_ref()
        .map_or_else(|| ShardMap::even(1, &[group]), FleetFile::shard_map);
    // Where the other groups' nodes are (their peer listeners), for
    // requests about their records.
    let mut directory: BTreeMap<GroupId, Vec<(u64, String)>> = BTreeMap::new();
    for n in fleet.iter().flat_map(|f| f.nodes.iter()) {
        directory
            .entry(n.group)
            .or_default()
            .push((n.id, n.peer_addr.clone()));
    }
    let mut node_service = None;
    let mut operator_service = None;
    let mut group_raft = None;
    let backend = match (args.node_id, peers) {
        (Some(id), Some(peers)) => {
            let me = peers
                .get(&id)
                .with_context(|| format!("--peers does not name this node ({id})"))?;
            let peer_listen = args.peer_listen.with_context(|| {
                format!(
                    "a member of a replica group needs --peer-listen (its address in the group: {})",
                    me.addr
                )
            })?;
            if !binds(peer_listen, &me.addr) {
                bail!(
                    "--peer-listen {peer_listen} differs from this node's address in the group ({}); \
                     an unspecified address (0.0.0.0 or [::]) with the same port also fits",
                    me.addr
                );
            }
            let db = sled::open(&args.data_dir).context("opening the node's store")?;
            let tree = format!("g{group}");
            let storage = hsm_vault::replication::open_replica(
                &db,
                partition.clone(),
                &tree,
                group,
                hsm_vault::replication::Flush::Background,
            )
            .map_err(anyhow::Error::msg)
            .context("opening the replica's storage")?;
            if let Some(found) = &storage.resynced {
                tracing::warn!(
                    found = %found,
                    "storage was rolled back or altered: erased the stale replica state; \
                     resyncing from the group (no votes until caught up)"
                );
            }
            let (log, sm) = (storage.log, storage.sm);
            let resync_floor = log.resync_floor();
            let heartbeat = args.raft_heartbeat_ms.unwrap_or_else(|| {
                hsm_vault::replication::heartbeat_for(
                    fleet
                        .as_ref()
                        .map_or(Duration::ZERO, |f| f.group_round_trip(group)),
                )
            });
            tracing::info!(heartbeat_ms = heartbeat, "Raft heartbeat");
            let config = hsm_vault::replication::raft_config(
                args.snapshot_every,
                heartbeat,
                args.raft_write_linger_ms,
            )
            .context("Raft configuration")?;
            let geo = Geography::new(id, fleet.clone(), args.faults_file.clone());
            // Raft and forwarded requests share the connections to peers.
            let channels = Channels::new(connector.clone());
            let network = Network {
                id,
                group,
                partition: partition.clone(),
                geo: geo.clone(),
                channels: channels.clone(),
            };
            let raft = hsm_vault::replication::start_raft(
                id,
                config,
                network,
                log,
                sm.clone(),
                resync_floor,
            )
            .await
            .context("starting Raft")?;
            if args.init {
                if let Err(e) = raft.initialize(peers).await {
                    tracing::info!(error = %e, "group already formed");
                }
            }
            if let Some(path) = &args.operator_public_key {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                operator_service = Some(OperatorService {
                    node: id,
                    group,
                    seen: Arc::default(),
                    sm: sm.clone(),
                    raft: raft.clone(),
                    partition: partition.clone(),
                    operator_key: vault_proto::token::parse_verifying_key(&text)
                        .context("operator public key must be a hex SEC1 P-256 point")?,
                    user_pin: Arc::clone(&user_pin),
                    audit: Some(Arc::clone(&audit)),
                    peers: peer_check,
                });
            }
            tokio::spawn(hsm_vault::replication::keep_map_adopted(
                raft.clone(),
                sm.clone(),
                id,
                shard_map,
            ));
            tokio::spawn(hsm_vault::replication::keep_state_checked(
                raft.clone(),
                sm.clone(),
                id,
            ));
            group_raft = Some(raft.clone());
            node_service = Some(NodeService {
                id,
                group,
                raft: raft.clone(),
                partition: partition.clone(),
                resync_floor,
                peers: peer_check,
                inbox: Arc::new(
                    hsm_vault::replication::inbox::SnapshotInbox::new(raft.clone(), sm.clone())
                        .checking_off_the_runtime(),
                ),
            });
            Backend::Replicated(Replica::new(
                (id, group),
                raft,
                sm,
                geo,
                directory,
                channels,
            ))
        }
        (Some(_), None) => bail!("--node-id needs --peers or --fleet-file"),
        (None, Some(_)) if args.peers.is_some() => bail!("--peers needs --node-id"),
        _ => Backend::Local(
            Store::open(&args.data_dir, partition.clone()).context("opening the record store")?,
        ),
    };
    // The PIN stays in memory only for a node that may be a ceremony source.
    drop(user_pin);
    let service = VaultService::new(partition, backend, Authorizer::new(auth_key))?
        .with_limits(Limits {
            per_account: args.recovery_limit_account.0,
            per_address: args.recovery_limit_address.0,
        })
        .with_audit(audit);
    let public_hex = hex::encode(service.server_public_key());
    if let Some(path) = &args.publish_key {
        std::fs::write(path, format!("{public_hex}\n"))
            .with_context(|| format!("publishing the public key to {}", path.display()))?;
    }

    let listener = bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let peer_listener = match args.peer_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let metrics_listener = match args.metrics_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    // Every listener is bound before any line is printed: whoever waits for
    // the client line may use them all.
    if let Some(l) = &metrics_listener {
        let addr = l.local_addr()?;
        tracing::info!(%addr, "metrics listener ready (GET /metrics)");
        println!("hsm-vault metrics on {addr}");
    }
    if let Some(l) = &peer_listener {
        let peer_addr = l.local_addr()?;
        tracing::info!(%peer_addr, "peer listener ready (node-to-node, operator, forwarded requests)");
        println!("hsm-vault peers listening on {peer_addr}");
    }
    tracing::info!(%addr, opaque_public_key = %public_hex, "vault node ready");
    println!("hsm-vault listening on {addr}");

    // gRPC health: a group member serves while it knows its leader; a lone
    // node from the start. NOT_SERVING once shutting down, so balancers
    // drain it.
    let (health, _) = tonic_health::server::health_reporter();
    const CLIENT_SERVICES: &[&str] = &["vault.v1.Vault"];
    let serving = telemetry::Serving::new(health.clone(), CLIENT_SERVICES);
    match group_raft {
        Some(raft) => {
            serving.set(false).await;
            tokio::spawn(telemetry::watch_raft(raft, serving.clone()));
        }
        None => serving.set(true).await,
    }
    let health_server = || {
        tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        )
    };
    let mut peer_services = CLIENT_SERVICES.to_vec();
    if node_service.is_some() {
        peer_services.push("vault.node.v1.Node");
    }
    if operator_service.is_some() {
        peer_services.push("vault.node.v1.Operator");
    }

    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown().await;
        serving.set(false).await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(listener) = metrics_listener {
        let stop = until_stopped(stopped.clone());
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve_metrics(listener, stop).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }

    let mut client_api = Server::builder();
    if let Some(tls) = &tls {
        client_api = client_api
            .tls_config(tls.client_listener())
            .context("the TLS server certificate")?;
    }
    let client_api = client_api
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .layer(RpcLayer)
        .add_service(health_server())
        .add_service(telemetry::reflection(CLIENT_SERVICES).context("reflection service")?)
        .add_service(telemetry::reflection_v1alpha(CLIENT_SERVICES).context("reflection service")?)
        .add_service(InterceptedService::new(
            VaultServer::new(service.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            from_client,
        ))
        .serve_with_incoming_shutdown(
            hsm_vault::proxy::incoming(listener, args.proxy_protocol),
            until_stopped(stopped.clone()),
        );

    let peer_api = async {
        let Some(listener) = peer_listener else {
            return Ok(());
        };
        let mut peer_api = Server::builder();
        if let Some(tls) = &tls {
            let config = tls
                .peer_listener()
                .context("the peer listener needs the fleet CA (--tls-ca)")?;
            peer_api = peer_api
                .tls_config(config)
                .context("the TLS server certificate or the fleet CA")?;
        }
        // Longer than the client API's: the last chunk of a snapshot is
        // answered after the whole snapshot is checked and installed
        // (`network::last_chunk_timeout`), about 10 s per million records.
        peer_api
            .timeout(Duration::from_secs(120))
            .concurrency_limit_per_connection(256)
            .layer(RpcLayer)
            .add_service(health_server())
            .add_service(telemetry::reflection(&peer_services).context("reflection service")?)
            .add_service(
                telemetry::reflection_v1alpha(&peer_services).context("reflection service")?,
            )
            .add_service(Gated::new(
                peer_check,
                Caller::Node,
                VaultServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            ))
            .add_optional_service(operator_service.map(|o| {
                Gated::new(
                    peer_check,
                    Caller::Operator,
                    OperatorServer::new(o)
                        .max_decoding_message_size(MAX_HANDOVER_MESSAGE)
                        .max_encoding_message_size(MAX_HANDOVER_MESSAGE),
                )
            }))
            .add_optional_service(node_service.map(|n| {
                Gated::new(
                    peer_check,
                    Caller::Node,
                    NodeServer::new(n)
                        .max_decoding_message_size(MAX_RAFT_MESSAGE)
                        .max_encoding_message_size(MAX_RAFT_MESSAGE),
                )
            }))
            .serve_with_incoming_shutdown(
                hsm_vault::proxy::peer_incoming(listener),
                until_stopped(stopped.clone()),
            )
            .await
            .context("serving the peer listener")
    };
    tokio::try_join!(
        async { client_api.await.context("serving the client API") },
        peer_api
    )?;
    Ok(())
}

/// Whether listening on `listen` serves `advertised` (this node's peer
/// address in the group): the same address, or an unspecified one (all
/// interfaces) on the same port, as behind a DNS name in a Kubernetes
/// StatefulSet.
fn binds(listen: SocketAddr, advertised: &str) -> bool {
    if listen.to_string() == advertised {
        return true;
    }
    listen.ip().is_unspecified()
        && advertised
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            == Some(listen.port())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// The node's TLS material, or `None` with --plaintext. A member of a
/// replica group needs the fleet CA and its client certificate too.
fn load_tls(args: &Args, member: bool) -> anyhow::Result<Option<NodeTls>> {
    if args.plaintext {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        bail!(
            "no TLS certificate: give --tls-cert and --tls-key (`fleet certs` issues them), \
             or --plaintext to serve without TLS (development only)"
        );
    };
    let tls = NodeTls::server(load_identity(cert, key)?);
    if !member {
        return Ok(Some(tls));
    }
    let (Some(ca), Some(client_cert), Some(client_key)) =
        (&args.tls_ca, &args.tls_client_cert, &args.tls_client_key)
    else {
        bail!(
            "a member of a replica group talks to its peers over mutual TLS: give --tls-ca, \
             --tls-client-cert and --tls-client-key too (`fleet certs` issues them)"
        );
    };
    let tls = tls.with_peers(
        load_certificate(ca)?,
        load_identity(client_cert, client_key)?,
    );
    // Parse the client certificate and key now rather than at the first
    // Raft message.
    if let Some(connector) = tls.peer_connector() {
        connector
            .endpoint(0, "127.0.0.1:1")
            .context("the TLS client certificate or key, or the fleet CA")?;
    }
    Ok(Some(tls))
}

/// Resolves on SIGINT or SIGTERM (what systemd and container runtimes send).
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::binds;

    #[test]
    fn a_peer_listener_serves_its_address_or_any_address_on_its_port() {
        let listen = |s: &str| s.parse().expect("socket address");
        assert!(binds(listen("127.0.0.1:7800"), "127.0.0.1:7800"));
        assert!(binds(
            listen("0.0.0.0:7800"),
            "vault-eu-west-0.vault-peers.vault.svc:7800"
        ));
        assert!(binds(listen("[::]:7800"), "[fd00::1]:7800"));
        assert!(!binds(listen("0.0.0.0:7801"), "vault-0.peers:7800"));
        assert!(!binds(listen("127.0.0.1:7800"), "127.0.0.2:7800"));
        assert!(!binds(listen("10.0.0.1:7800"), "vault-0.peers:7800"));
    }
}
