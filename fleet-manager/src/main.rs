//! `fleet`: the operator's tool for a local fleet of vault nodes.
//!
//! - `fleet up` makes one SoftHSM2 token per node, generates the domain keys
//!   in the first and clones them into the others through the ceremony
//!   (wrapped under trusted transport keys, inside the tokens), starts one
//!   `hsm-vault` process per node of the fleet file, and records what it did
//!   in `DIR/state.json`. Run again, it reuses the tokens and data and only
//!   starts what is not running. The fleet file may split the nodes into
//!   several replica groups (`group = N` per node); records are spread over
//!   them by the shard map.
//! - `fleet status` shows regions, groups, nodes, each group's leader, health,
//!   replication lag and the shard map (which group holds which slots).
//! - `fleet faults` flips the fault switches (isolate a node or a region,
//!   add delay or loss); `fleet down` stops the nodes.
//! - `fleet certs` issues the fleet's TLS certificates ([`certs`]); `fleet
//!   up` issues whatever is missing and starts every node with TLS: the
//!   client API over TLS, the node-to-node and operator APIs on a separate
//!   peer listener over mutual TLS. The tool itself talks to the operator
//!   API with the operator's client certificate.
//!
//! The data path never depends on this tool: nodes keep serving while it is
//! not running.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hsm_vault::geo::{Faults, FleetFile};
use hsm_vault::partition::ceremony::{self, ClonePackage, Enrollment};
use hsm_vault::partition::import::DomainKeyMaterial;
use hsm_vault::partition::{KeySetup, Module, Partition};
use serde::{Deserialize, Serialize};
use softhsm_test_harness::{Provider, TokenStore};
use vault_proto::vault::node::v1::operator_client::OperatorClient;
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_client::VaultClient;

mod certs;
mod dashboard;
mod roles;

/// How long `fleet up` waits for a node to listen.
const START_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(version, about = "Run and watch a local fleet of HSM vault nodes")]
struct Cli {
    /// The fleet's working directory (tokens, data, logs, state).
    #[arg(long, env = "FLEET_DIR", default_value = ".fleet", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

/// The PKCS#11 module, for the commands that touch tokens.
#[derive(Debug, clap::Args)]
struct ModuleArg {
    /// PKCS#11 module (it finds its tokens through its usual
    /// configuration, e.g. SOFTHSM2_CONF, where the fleet does not set it).
    #[arg(
        long,
        env = "PKCS11_MODULE",
        default_value = "/usr/lib/softhsm/libsofthsm2.so"
    )]
    pkcs11_module: PathBuf,
}

/// `fleet enroll-token`'s arguments.
#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// The new token's label (initialised, with a user PIN, no keys).
    #[arg(long)]
    label: String,
    #[arg(long)]
    pin_file: PathBuf,
    #[command(flatten)]
    module: ModuleArg,
    /// The fleet's published vault public key (hex SEC1, `vault.pub`).
    #[arg(long)]
    vault_public_key: PathBuf,
    /// Where to write the enrollment request.
    #[arg(long)]
    request: PathBuf,
    /// Where the package will be put.
    #[arg(long)]
    package: PathBuf,
    /// How long to wait for the package.
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the fleet (first time) and start every node that is not running.
    Up {
        #[arg(long, default_value = "deploy/local-fleet/fleet.toml")]
        fleet_file: PathBuf,
        /// The `hsm-vault` binary (default: beside this one).
        #[arg(long)]
        hsm_vault_bin: Option<PathBuf>,
        #[command(flatten)]
        module: ModuleArg,
    },
    /// Issue the fleet's TLS certificates that are missing: a fleet CA,
    /// each node's server and client certificates, the operator's client
    /// certificate (private keys mode 0600). `fleet up` does it by itself.
    Certs {
        /// The nodes to issue for (their ids and addresses); default: the
        /// local fleet's file, unless --node-id is given.
        #[arg(long, conflicts_with = "node_id")]
        fleet_file: Option<PathBuf>,
        /// Issue for node ID (a lone node, or nodes without a fleet file).
        #[arg(long)]
        node_id: Vec<u64>,
        /// Another name or IP address every node's server certificate is
        /// valid for (besides node-<id>, localhost, 127.0.0.1, ::1 and the
        /// hosts of the fleet file's addresses).
        #[arg(long)]
        host: Vec<String>,
        /// Where to write them (default: DIR/tls, where `fleet up` looks).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show regions, nodes, roles, health and replication lag.
    Status {
        /// Watch the nodes of this fleet file instead of the fleet `fleet
        /// up` started in DIR (DIR then needs only `tls/` and `operator/`).
        #[arg(long)]
        fleet_file: Option<PathBuf>,
    },
    /// Flip fault switches: isolate nodes or regions, delay, loss; --heal clears them.
    Faults {
        #[arg(long)]
        isolate_node: Vec<u64>,
        #[arg(long)]
        isolate_region: Vec<String>,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value_t = 0)]
        drop_percent: u8,
        #[arg(long, conflicts_with_all = ["isolate_node", "isolate_region"])]
        heal: bool,
    },
    /// Replace a node whose disk and token are lost: a new token, enrolled
    /// by a ceremony with a running member, and a fresh process that
    /// catches up from the group.
    ReplaceNode {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        module: ModuleArg,
    },
    /// Add a node declared in the fleet file: token, ceremony, process,
    /// then learner and voter through joint consensus.
    AddNode {
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        module: ModuleArg,
    },
    /// Remove a node from its group (joint consensus), then stop it.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Remove every node of a region from the group, then stop them.
    DrainRegion {
        #[arg(long)]
        region: String,
    },
    /// Move slots FIRST..=LAST of the shard map to group TO: frozen in the
    /// group holding them, their records copied (sealed, under a token MAC),
    /// then every group adopts the new map version. Rerun after an
    /// interruption, it resumes the move under way.
    MoveSlots {
        #[arg(long)]
        first: u16,
        #[arg(long)]
        last: u16,
        #[arg(long)]
        to_group: u64,
    },
    /// Stop one node: SIGTERM, or SIGKILL with --kill (a crash).
    StopNode {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        kill: bool,
    },
    /// Stop every node of the fleet (SIGTERM).
    Down,
    /// On a new node's machine: enroll its empty token into the fleet's key
    /// domain by a ceremony across machines. Writes an enrollment request,
    /// waits for the package `fleet export-keys` makes from it, checks that
    /// it carries the vault public key clients pin, and unwraps it into the
    /// token. Needs no fleet directory.
    EnrollToken(EnrollArgs),
    /// On the operator's machine: have a running member wrap the domain keys
    /// for the token that wrote REQUEST (the operator's certificate and
    /// signature from the fleet directory); the package goes to OUT. Only
    /// once the request's transport key has the fingerprint that
    /// `enroll-token` showed on the new node's machine.
    ExportKeys {
        /// The member's node id (its peer certificate names it).
        #[arg(long)]
        member: u64,
        /// The transport key fingerprint `enroll-token` printed on the new
        /// node's machine, read from that screen (not from the request
        /// file): a request swapped on the way is refused.
        #[arg(long)]
        expect_fingerprint: String,
        /// The member's peer listener, HOST:PORT.
        #[arg(long)]
        peer_addr: String,
        #[arg(long)]
        request: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve the live dashboard (regions, nodes, groups, health, lag,
    /// recoveries/s, lockouts, recent audit events) and the fleet's own
    /// Prometheus metrics, until interrupted.
    Dashboard {
        /// Address of the dashboard (plain HTTP: keep it on loopback or
        /// behind the operators' proxy).
        #[arg(long, default_value = "127.0.0.1:9470")]
        listen: std::net::SocketAddr,
        /// Watch the nodes of this fleet file (their `metrics_addr` for the
        /// rates) instead of the fleet `fleet up` started in DIR. Audit
        /// events are shown only for local fleets.
        #[arg(long)]
        fleet_file: Option<PathBuf>,
    },
    /// Verify and export the nodes' audit trails (security events chained
    /// by token MACs): JSON lines, each with its node, or a table.
    Audit {
        /// Only this node (default: every node).
        #[arg(long)]
        node: Option<u64>,
        #[arg(long)]
        table: bool,
    },
}

/// What `fleet up` knows about the fleet, kept in `DIR/state.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    fleet_file: PathBuf,
    /// The token store's configuration file (every node's token).
    #[serde(alias = "softhsm_conf")]
    token_conf: PathBuf,
    /// The PKCS#11 implementation holding the tokens (`VAULT_PKCS11` when
    /// the fleet was made): `softhsm` or `kryoptic`.
    #[serde(default = "default_provider")]
    pkcs11: String,
    nodes: BTreeMap<u64, NodeState>,
    /// Whether the group was formed (`--init` is passed once, never to a
    /// node that comes back with a blank disk).
    #[serde(default)]
    initialized: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeState {
    region: String,
    /// The client API.
    addr: String,
    /// The peer listener (node-to-node and operator APIs).
    #[serde(default)]
    peer_addr: String,
    label: String,
    pid: Option<u32>,
    #[serde(default = "first_group")]
    group: u64,
    /// The metrics listener (`GET /metrics`), as the node printed it.
    #[serde(default)]
    metrics_addr: Option<String>,
}

fn default_provider() -> String {
    Provider::SoftHsm.name().into()
}

impl State {
    fn provider(&self) -> anyhow::Result<Provider> {
        Ok(Provider::parse(&self.pkcs11)?)
    }

    /// The environment variable and value through which a process's module
    /// finds this fleet's tokens.
    fn token_env(&self) -> anyhow::Result<(&'static str, &Path)> {
        Ok((self.provider()?.conf_env(), &self.token_conf))
    }

    fn store(&self, module: &Path) -> anyhow::Result<TokenStore> {
        let dir = self
            .token_conf
            .parent()
            .context("token configuration without a directory")?;
        Ok(TokenStore::open(self.provider()?, dir, module))
    }
}

fn first_group() -> u64 {
    1
}

impl State {
    /// The nodes of one replica group.
    fn group(&self, group: u64) -> impl Iterator<Item = (&u64, &NodeState)> {
        self.nodes.iter().filter(move |(_, n)| n.group == group)
    }

    fn group_of(&self, id: u64) -> anyhow::Result<u64> {
        Ok(self
            .nodes
            .get(&id)
            .with_context(|| format!("node {id} is not in the fleet"))?
            .group)
    }
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn load_state(dir: &Path) -> anyhow::Result<Option<State>> {
    match std::fs::read_to_string(state_path(dir)) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).context("state.json is malformed")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading state.json"),
    }
}

/// The nodes an operator command watches: those of `fleet_file` when one
/// is given (a fleet this tool did not start, e.g. on Kubernetes: nothing
/// of it is local but the fleet CA and the operator's certificate and key
/// in DIR), else those `fleet up` recorded in DIR/state.json.
fn watched(dir: &Path, fleet_file: Option<&Path>) -> anyhow::Result<State> {
    let Some(path) = fleet_file else {
        return load_state(dir)?
            .context("no fleet here: run `fleet up` first, or give --fleet-file");
    };
    let fleet = FleetFile::load(path)?;
    let nodes = fleet
        .nodes
        .iter()
        .map(|n| {
            let node = NodeState {
                region: n.region.clone(),
                addr: n.addr.clone(),
                peer_addr: n.peer_addr.clone(),
                label: format!("vault-node-{}", n.id),
                pid: None,
                group: n.group,
                metrics_addr: n.metrics_addr.clone(),
            };
            (n.id, node)
        })
        .collect();
    Ok(State {
        fleet_file: path.to_owned(),
        nodes,
        ..State::default()
    })
}

fn save_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, state_path(dir))?;
    Ok(())
}

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    hex::encode(b)
}

fn is_running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// First-time setup: tokens, identity key, ceremony.
fn create(
    dir: &Path,
    fleet: &FleetFile,
    fleet_file: &Path,
    module: &Path,
) -> anyhow::Result<State> {
    let provider = Provider::from_env()?;
    let hsm = dir.join(provider.name());
    std::fs::create_dir_all(&hsm)?;
    let store = TokenStore::create(provider, &hsm, module)?;
    let conf = store.conf_path();
    let mut nodes = BTreeMap::new();
    for n in &fleet.nodes {
        let label = format!("vault-node-{}", n.id);
        init_token(&store, dir, n.id, &label)?;
        nodes.insert(
            n.id,
            NodeState {
                region: n.region.clone(),
                addr: n.addr.clone(),
                peer_addr: n.peer_addr.clone(),
                label,
                pid: None,
                group: n.group,
                metrics_addr: None,
            },
        );
    }

    // The identity service's key for owner tokens (local stand-in).
    let identity = dir.join("identity");
    std::fs::create_dir_all(&identity)?;
    let sk = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    write_secret(
        &identity.join("identity.key"),
        hex::encode(sk.to_bytes()).as_bytes(),
    )?;
    std::fs::write(
        identity.join("identity.pub"),
        hex::encode(sk.verifying_key().to_encoded_point(true).as_bytes()),
    )?;
    // What the nodes trust: the key as a JWKS (owner tokens are ES256 JWTs).
    std::fs::write(
        identity.join("jwks.json"),
        vault_proto::token::jwks(&[*sk.verifying_key()]),
    )?;

    // The operator's key: signs ceremonies and membership changes.
    let operator = dir.join("operator");
    std::fs::create_dir_all(&operator)?;
    let ok = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    write_secret(
        &operator.join("operator.key"),
        hex::encode(ok.to_bytes()).as_bytes(),
    )?;
    std::fs::write(
        operator.join("operator.pub"),
        hex::encode(ok.verifying_key().to_encoded_point(true).as_bytes()),
    )?;

    // The ceremony: keys generated in the first token, cloned into the rest.
    std::env::set_var(provider.conf_env(), &conf);
    let module = Module::load(module).context("loading the PKCS#11 module")?;
    let read = |p: PathBuf| std::fs::read_to_string(p).map(zeroize::Zeroizing::new);
    let mut ids = nodes.keys().copied();
    let first = ids.next().context("the fleet file names no node")?;
    let first_dir = dir.join(format!("node-{first}"));
    let (pin, so_pin) = (read(first_dir.join("user.pin"))?, read_so_pin(dir, first)?);
    if !provider.can_clone() {
        import_into_every_token(dir, &module, &nodes)?;
        std::fs::write(dir.join("faults.json"), "{}")?;
        return Ok(State {
            fleet_file: fleet_file.canonicalize()?,
            token_conf: conf,
            pkcs11: provider.name().into(),
            nodes,
            initialized: false,
        });
    }
    let source = Partition::open_in(
        &module,
        &nodes[&first].label,
        &pin,
        KeySetup::GenerateIfMissing,
    )?;
    let targets: Vec<u64> = ids.collect();
    let ceremony = Instant::now();
    println!(
        "ceremony: domain keys generated in node {first}'s token; cloning them into {} more",
        targets.len()
    );
    for (step, id) in targets.iter().enumerate() {
        let target_pin = read(dir.join(format!("node-{id}/user.pin")))?;
        let enrollment = Enrollment::begin(&module, &nodes[id].label, &target_pin)?;
        let package = source.export_for_clone(&so_pin, &pin, enrollment.transport_public_key())?;
        enrollment.complete(&package)?;
        println!(
            "[{}/{}] node {id}: domain keys cloned from node {first} (wrapped under a trusted \
             transport key), {:.1} s",
            step + 1,
            targets.len(),
            ceremony.elapsed().as_secs_f64()
        );
    }
    std::fs::write(dir.join("faults.json"), "{}")?;
    Ok(State {
        fleet_file: fleet_file.canonicalize()?,
        token_conf: conf,
        pkcs11: provider.name().into(),
        nodes,
        initialized: false,
    })
}

/// Provisioning for tokens that cannot clone (kryoptic): the domain keys
/// are generated in this process's memory and imported into every node's
/// token (`hsm_vault::partition::import`). They exist outside a token while
/// this runs, which the ceremony avoids; it is a local and test fleet's
/// path, said so on the terminal. Nodes added later still need a ceremony
/// (`add-node`), which such tokens refuse.
fn import_into_every_token(
    dir: &Path,
    module: &std::sync::Arc<Module>,
    nodes: &BTreeMap<u64, NodeState>,
) -> anyhow::Result<()> {
    println!(
        "provisioning: these tokens cannot clone keys (no key can be marked CKA_TRUSTED), \
         so the domain keys are generated in the fleet manager's memory and imported into \
         each of the {} tokens; they exist outside a token until this step ends (zeroized \
         then). For test fleets only: production HSMs use the cloning ceremony",
        nodes.len()
    );
    let material = DomainKeyMaterial::generate();
    let start = Instant::now();
    for (step, (id, node)) in nodes.iter().enumerate() {
        let pin = zeroize::Zeroizing::new(std::fs::read_to_string(
            dir.join(format!("node-{id}/user.pin")),
        )?);
        Partition::import_domain_keys(module, &node.label, &pin, &material)
            .with_context(|| format!("importing the domain keys into node {id}'s token"))?;
        println!(
            "[{}/{}] node {id}: domain keys imported (not cloned), {:.1} s",
            step + 1,
            nodes.len(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Waits until node `id` prints its listening line, or says why it died.
fn wait_listening(dir: &Path, id: u64, pid: u32) -> anyhow::Result<()> {
    let out = dir.join(format!("node-{id}/node.out"));
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("listening on")
    {
        if start.elapsed() > START_DEADLINE || !is_running(pid) {
            let log = dir.join(format!("node-{id}/node.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let reason: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.starts_with("Error"))
                .take(4)
                .collect();
            bail!(
                "node {id} did not start: {} (see {})",
                reason.join(" / "),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn up(dir: &Path, fleet_file: &Path, bin: Option<PathBuf>, module: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let fleet = FleetFile::load(fleet_file)?;
    let mut state = match load_state(&dir)? {
        Some(s) => s,
        None if dir.join("softhsm").exists() || dir.join("kryoptic").exists() => bail!(
            "{} holds tokens but no state.json: an earlier `fleet up` failed midway; \
             remove the directory and run `fleet up` again",
            dir.display()
        ),
        None => {
            let s = create(&dir, &fleet, fleet_file, module)?;
            save_state(&dir, &s)?;
            s
        }
    };
    // Certificates: whatever is missing (all of them the first time, a new
    // node's after `add-node`).
    let issued = certs::issue(&tls_layout(&dir), &node_hosts(&fleet, &[]))?;
    if !issued.files.is_empty() {
        println!(
            "TLS certificates issued in {} ({} new{})",
            tls_layout(&dir).0.display(),
            issued.files.len(),
            if issued.new_ca {
                ", a new fleet CA"
            } else {
                ""
            }
        );
    }
    for n in &fleet.nodes {
        if let Some(node) = state.nodes.get_mut(&n.id) {
            node.peer_addr.clone_from(&n.peer_addr);
        }
    }
    let tls = tls_layout(&dir);
    let bin = match bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("hsm-vault"),
    };
    let first = *state.nodes.keys().next().context("no node")?;
    let ids: Vec<u64> = state.nodes.keys().copied().collect();
    let started = Instant::now();
    // One node per group forms it, on the fleet's first start.
    let founders: Vec<u64> = {
        let mut seen = std::collections::BTreeSet::new();
        ids.iter()
            .copied()
            .filter(|id| seen.insert(state.nodes[id].group))
            .collect()
    };
    let (conf_env, token_conf) = {
        let (env, conf) = state.token_env()?;
        (env, conf.to_owned())
    };
    for id in &ids {
        let node = state.nodes.get_mut(id).context("node")?;
        if node.pid.is_some_and(is_running) {
            continue;
        }
        let node_dir = dir.join(format!("node-{id}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("node.log"))?;
        let out = std::fs::File::create(node_dir.join("node.out"))?;
        let mut cmd = Command::new(&bin);
        cmd.env(conf_env, &token_conf)
            .arg(format!("--node-id={id}"))
            .arg(format!("--listen={}", node.addr))
            .arg(format!("--peer-listen={}", node.peer_addr))
            .arg("--metrics-listen=127.0.0.1:0")
            .arg(format!("--tls-cert={}", tls.server(*id).0.display()))
            .arg(format!("--tls-key={}", tls.server(*id).1.display()))
            .arg(format!("--tls-ca={}", tls.ca().display()))
            .arg(format!("--tls-client-cert={}", tls.client(*id).0.display()))
            .arg(format!("--tls-client-key={}", tls.client(*id).1.display()))
            .arg(format!("--fleet-file={}", state.fleet_file.display()))
            .arg(format!(
                "--faults-file={}",
                dir.join("faults.json").display()
            ))
            .arg(format!("--data-dir={}", node_dir.join("data").display()))
            .arg(format!("--pkcs11-module={}", module.display()))
            .arg(format!("--token-label={}", node.label))
            .arg(format!(
                "--pin-file={}",
                node_dir.join("user.pin").display()
            ))
            .arg(format!(
                "--auth-jwks={}",
                dir.join("identity/jwks.json").display()
            ))
            .arg(format!(
                "--publish-key={}",
                node_dir.join("vault.pub").display()
            ))
            .arg("--require-cloned-keys")
            .arg(format!(
                "--operator-public-key={}",
                dir.join("operator/operator.pub").display()
            ))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log);
        if founders.contains(id) && !state.initialized {
            cmd.arg("--init");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        node.pid = Some(child.id());
        let (region, addr, group) = (node.region.clone(), node.addr.clone(), node.group);
        // Recorded before waiting, so `fleet down` can stop whatever started.
        save_state(&dir, &state)?;
        // One at a time: the nodes share a SoftHSM token directory, and a
        // node opening its token while another writes its own can fail.
        wait_listening(&dir, *id, child.id())?;
        if let Some(node) = state.nodes.get_mut(id) {
            node.metrics_addr = std::fs::read_to_string(node_dir.join("node.out"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("hsm-vault metrics on "))
                .map(|a| a.trim().to_owned());
        }
        save_state(&dir, &state)?;
        println!(
            "[{}/{}] node {id} ({region}, group {group}) listening on {addr}, {:.1} s",
            ids.iter().position(|i| i == id).map_or(0, |p| p + 1),
            ids.len(),
            started.elapsed().as_secs_f64()
        );
    }
    // Formed: a node that later comes back with a blank disk must rejoin
    // through membership changes, never form a group of its own.
    state.initialized = true;
    save_state(&dir, &state)?;
    std::fs::copy(
        dir.join(format!("node-{first}/vault.pub")),
        dir.join("vault.pub"),
    )?;
    println!(
        "vault public key (clients pin it): {}",
        dir.join("vault.pub").display()
    );
    println!(
        "fleet CA (clients trust it: --ca-cert): {}",
        tls.ca().display()
    );
    println!(
        "identity key (issues owner tokens): {}",
        dir.join("identity/identity.key").display()
    );
    Ok(())
}

async fn status(dir: &Path, fleet_file: Option<&Path>) -> anyhow::Result<()> {
    let state = watched(dir, fleet_file)?;
    let mut rows = Vec::new();
    for (id, node) in &state.nodes {
        let info = async {
            let channel = client_api(dir, &node.addr, Duration::from_secs(2)).await?;
            let info = VaultClient::new(channel)
                .get_info(pb::GetInfoRequest {})
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>(info)
        }
        .await
        .ok();
        rows.push((*id, node, info));
    }
    // Per group: the acknowledged leader (its applied index and voters).
    let answers: Vec<roles::Answer> = rows
        .iter()
        .filter_map(|(id, node, info)| Some((*id, node.group, info.as_ref()?)))
        .collect();
    let leaders = roles::acknowledged_leaders(&answers);
    println!(
        "{:<6}{:<7}{:<12}{:<18}{:<10}{:<13}{:>8}{:>6}",
        "node", "group", "region", "address", "health", "role", "applied", "lag"
    );
    for (id, node, info) in &rows {
        let (id, leader) = (*id, leaders.get(&node.group).copied());
        match info {
            Some(i) => println!(
                "{:<6}{:<7}{:<12}{:<18}{:<10}{:<13}{:>8}{:>6}",
                id,
                node.group,
                node.region,
                node.addr,
                "up",
                roles::role(id, i, leader),
                i.applied_index,
                leader.map_or(0, |(_, l)| l.applied_index.saturating_sub(i.applied_index))
            ),
            None => println!(
                "{:<6}{:<7}{:<12}{:<18}{:<10}",
                id, node.group, node.region, node.addr, "DOWN"
            ),
        }
    }
    let file_map = FleetFile::load(&state.fleet_file)?.shard_map();
    println!("shard map (fleet file: version {}):", file_map.version);
    let groups: std::collections::BTreeSet<u64> = state.nodes.values().map(|n| n.group).collect();
    for group in groups {
        // The group's own adopted map, if its leader answers.
        let line = match maps(dir, &state, group).await {
            Ok(m) => match m.adopted {
                Some(a) => format!(
                    "{} of {} slots (group adopted version {}{})",
                    a.slots_of(group),
                    hsm_vault::shard::SLOTS,
                    a.version,
                    m.frozen.map_or(String::new(), |f| format!(
                        "; moving slots out, to version {}",
                        f.version
                    ))
                ),
                None => "no map adopted yet".to_owned(),
            },
            Err(_) => format!(
                "{} of {} slots in the fleet file (group unreachable)",
                file_map.slots_of(group),
                hsm_vault::shard::SLOTS
            ),
        };
        println!("  group {group}: {line}");
    }
    let faults: Faults =
        serde_json::from_str(&std::fs::read_to_string(dir.join("faults.json")).unwrap_or_default())
            .unwrap_or_default();
    if faults != Faults::default() {
        println!("fault switches: {}", serde_json::to_string(&faults)?);
    }
    Ok(())
}

/// Where the operator keeps node `id`'s SO PIN: with the operator's key,
/// not in the node's directory. A serving node never holds it; the operator
/// presents it for a ceremony in which the node is the source.
fn so_pin_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("operator/so-pins/node-{id}.pin"))
}

/// Node `id`'s SO PIN, as the operator keeps it.
fn read_so_pin(dir: &Path, id: u64) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let path = so_pin_path(dir, id);
    Ok(zeroize::Zeroizing::new(
        std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned(),
    ))
}

/// Initializes the token `label` of node `id` in the fleet's store, with
/// random PINs (mode 0600): the user PIN in the node's directory, the SO
/// PIN with the operator ([`so_pin_path`]).
fn init_token(store: &TokenStore, dir: &Path, id: u64, label: &str) -> anyhow::Result<()> {
    let (pin, so_pin) = (
        zeroize::Zeroizing::new(random_hex(16)),
        zeroize::Zeroizing::new(random_hex(16)),
    );
    let node_dir = dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&node_dir)?;
    write_secret(&node_dir.join("user.pin"), pin.as_bytes())?;
    let so_path = so_pin_path(dir, id);
    if let Some(parent) = so_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    write_secret(&so_path, so_pin.as_bytes())?;
    store
        .init_token(label, &pin, &so_pin)
        .with_context(|| format!("initializing token {label}"))
}

/// The fleet's certificate directory.
fn tls_layout(dir: &Path) -> certs::Layout {
    certs::Layout(dir.join("tls"))
}

/// The nodes of `fleet` (and `extra` ids) with the hosts of their addresses.
fn node_hosts(fleet: &FleetFile, extra: &[String]) -> Vec<certs::NodeHosts> {
    fleet
        .nodes
        .iter()
        .map(|n| certs::NodeHosts {
            id: n.id,
            hosts: [certs::host_of(&n.addr), certs::host_of(&n.peer_addr)]
                .into_iter()
                .chain(extra.iter().cloned())
                .collect(),
        })
        .collect()
}

/// A connection to a node's client API at `addr`, over TLS checked against
/// the fleet CA.
async fn client_api(
    dir: &Path,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<tonic::transport::Channel> {
    let ca = hsm_vault::tls::load_certificate(&tls_layout(dir).ca())?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            .connect()
            .await?,
    )
}

/// A connection to node `id`'s operator API, on its peer listener, with
/// the operator's client certificate (mutual TLS).
async fn operator_api(
    dir: &Path,
    id: u64,
    peer_addr: &str,
) -> anyhow::Result<OperatorClient<tonic::transport::Channel>> {
    let layout = tls_layout(dir);
    let ca = hsm_vault::tls::load_certificate(&layout.ca())?;
    let (cert, key) = layout.operator();
    let connector = hsm_vault::tls::PeerConnector::Tls {
        ca,
        identity: hsm_vault::tls::load_identity(&cert, &key)?,
    };
    let channel = connector
        .endpoint(id, peer_addr)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .connect()
        .await?;
    Ok(OperatorClient::new(channel)
        .max_decoding_message_size(hsm_vault::replication::operator::MAX_HANDOVER_MESSAGE)
        .max_encoding_message_size(hsm_vault::replication::operator::MAX_HANDOVER_MESSAGE))
}

/// A signed operator request.
/// An operator request of `kind` for node `node` of group `group`, signed
/// with the operator's key (fresh time and nonce).
fn signed(
    dir: &Path,
    kind: &str,
    (node, group): (u64, u64),
    body: &impl Serialize,
) -> anyhow::Result<vault_proto::vault::node::v1::OperatorRequest> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(dir.join("operator/operator.key"))?);
    let key = vault_proto::token::parse_signing_key(&text)?;
    let body = serde_json::to_vec(body)?;
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let target = vault_proto::operator::Target { node, group };
    Ok(vault_proto::operator::request(
        &key, kind, target, issued_at, body,
    ))
}

/// The id and address of `group`'s leader: the one a majority of its
/// voters acknowledge, asked of its running nodes.
async fn leader(dir: &Path, state: &State, group: u64) -> anyhow::Result<(u64, NodeState)> {
    let mut infos = Vec::new();
    let mut last = None;
    for (id, node) in state.group(group) {
        let asked = async {
            let channel = client_api(dir, &node.addr, Duration::from_secs(10)).await?;
            let info = VaultClient::new(channel)
                .get_info(pb::GetInfoRequest {})
                .await?;
            Ok::<_, anyhow::Error>(info.into_inner())
        };
        match asked.await {
            Ok(info) => infos.push((*id, info)),
            Err(e) => last = Some(e),
        }
    }
    let answers: Vec<roles::Answer> = infos.iter().map(|(id, i)| (*id, group, i)).collect();
    if let Some((id, _)) = roles::acknowledged_leaders(&answers).get(&group) {
        if let Some(l) = state.nodes.get(id) {
            return Ok((*id, l.clone()));
        }
    }
    match last {
        Some(e) => bail!("no leader of group {group} is acknowledged by a majority of its voters (last error: {e:#})"),
        None => bail!("no leader of group {group} is acknowledged by a majority of its voters"),
    }
}

/// Gives node `id` a new token holding the domain keys: the ceremony with
/// a running member as the source, vouched for by the operator's signature.
/// A node enrolled into a running fleet gets the domain keys only by a
/// ceremony with a member (`ExportKeys`): refused up front, before any
/// node is stopped or token deleted, where the tokens cannot clone.
fn refuse_without_ceremony(state: &State) -> anyhow::Result<()> {
    let provider = state.provider()?;
    if !provider.can_clone() {
        bail!(
            "this fleet's tokens ({}) cannot clone keys (no key can be marked CKA_TRUSTED): \
             a node can join a running fleet only by a cloning ceremony; its keys were \
             imported at `fleet up` instead, which is done only when the fleet is made",
            provider.name()
        );
    }
    Ok(())
}

async fn enroll(dir: &Path, state: &State, id: u64, module: &Path) -> anyhow::Result<()> {
    let node = state.nodes.get(&id).context("unknown node")?;
    let node_dir = dir.join(format!("node-{id}"));
    // The old token (if any) is gone with the old disk.
    let store = state.store(module)?;
    store.delete_token(&node.label)?;
    let _ = std::fs::remove_dir_all(node_dir.join("data"));
    init_token(&store, dir, id, &node.label)?;

    let (conf_env, conf) = state.token_env()?;
    std::env::set_var(conf_env, conf);
    let module = Module::load(module)?;
    let pin = zeroize::Zeroizing::new(std::fs::read_to_string(node_dir.join("user.pin"))?);
    let enrollment = Enrollment::begin(&module, &node.label, &pin)?;
    let mut last = None;
    for (source, member) in state
        .nodes
        .iter()
        .filter(|(i, n)| **i != id && n.pid.is_some_and(is_running))
    {
        match export_keys(
            dir,
            (*source, member.group),
            &member.peer_addr,
            enrollment.transport_public_key(),
        )
        .await
        {
            Ok(package) => {
                enrollment.complete(&package)?;
                println!("node {id}: new token enrolled; domain keys cloned from node {source}");
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no running member to clone the keys from")))
}

/// Asks member `source` (on its peer listener, as the operator) for the
/// domain keys wrapped for the enrolling token's transport key.
async fn export_keys(
    dir: &Path,
    (source, group): (u64, u64),
    peer_addr: &str,
    transport: &[u8],
) -> anyhow::Result<ClonePackage> {
    let mut body = hsm_vault::replication::operator::ExportKeys {
        transport: hex::encode(transport),
        so_pin: read_so_pin(dir, source)?.to_string(),
    };
    let request = signed(dir, "ExportKeys", (source, group), &body);
    zeroize::Zeroize::zeroize(&mut body.so_pin);
    let mut c = operator_api(dir, source, peer_addr).await?;
    let reply = c.export_keys(request?).await?.into_inner();
    Ok(serde_json::from_slice(&reply.body)?)
}

/// What `fleet enroll-token` hands the operator: the token's label (for
/// the operator's eyes) and its ephemeral transport public key.
#[derive(Debug, Serialize, Deserialize)]
struct EnrollmentRequest {
    label: String,
    transport: String,
}

/// Writes `bytes` to `path` whole or not at all (a reader polling for the
/// file never sees half of it).
fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The target side of a ceremony across machines (`fleet enroll-token`).
/// The transport key pair lives in the token only as long as this process,
/// so it writes the request, waits for the package and completes in one run.
fn enroll_token(args: &EnrollArgs) -> anyhow::Result<()> {
    let pinned = std::fs::read_to_string(&args.vault_public_key)
        .with_context(|| format!("reading {}", args.vault_public_key.display()))?;
    let pinned = p256::PublicKey::from_sec1_bytes(&hex::decode(pinned.trim())?)
        .context("the vault public key file is not a hex SEC1 P-256 key")?;
    if args.package.exists() {
        bail!(
            "{} exists already (from an earlier enrollment?): a package answers one request; remove it first",
            args.package.display()
        );
    }
    let module = Module::load(&args.module.pkcs11_module)?;
    let pin = zeroize::Zeroizing::new(
        std::fs::read_to_string(&args.pin_file)
            .with_context(|| format!("reading {}", args.pin_file.display()))?,
    );
    let enrollment = Enrollment::begin(&module, &args.label, pin.trim())?;
    let request = EnrollmentRequest {
        label: args.label.clone(),
        transport: hex::encode(enrollment.transport_public_key()),
    };
    write_whole(&args.request, &serde_json::to_vec_pretty(&request)?)?;
    let fingerprint = enrollment.transport_fingerprint();
    println!(
        "enrollment request for token {} written to {}; answer it with `fleet export-keys` \
         and put the package at {} (waiting up to {} s)",
        args.label,
        args.request.display(),
        args.package.display(),
        args.wait_secs
    );
    println!("transport key fingerprint: {fingerprint}");
    println!(
        "tell the operator this fingerprint over another channel than the request file; \
         they pass it to `fleet export-keys --expect-fingerprint`"
    );
    let deadline = Instant::now() + Duration::from_secs(args.wait_secs);
    let text = loop {
        match std::fs::read(&args.package) {
            Ok(text) => break text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "no package at {} after {} s; the token was not enrolled",
                    args.package.display(),
                    args.wait_secs
                )
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", args.package.display())),
        }
    };
    let package: ClonePackage =
        serde_json::from_slice(&text).context("the package is not a ceremony package")?;
    // A package from another fleet (or made up) would give this token
    // another key domain: its AKE public key must be the one clients pin.
    let ake = p256::PublicKey::from_sec1_bytes(&package.ake_public)
        .context("the package's AKE public key is not a P-256 key")?;
    if ake != pinned {
        bail!(
            "the package belongs to another key domain (its AKE public key is not {}); the token was not enrolled",
            args.vault_public_key.display()
        );
    }
    enrollment.complete(&package)?;
    println!(
        "token {}: enrolled; it holds the fleet's domain keys",
        args.label
    );
    Ok(())
}

/// The operator's side of a ceremony across machines (`fleet export-keys`).
async fn export_keys_for(
    dir: &Path,
    (member, peer_addr): (u64, &str),
    (request, expect_fingerprint): (&Path, &str),
    out: &Path,
) -> anyhow::Result<()> {
    let text = std::fs::read(request).with_context(|| format!("reading {}", request.display()))?;
    let request: EnrollmentRequest =
        serde_json::from_slice(&text).context("not an enrollment request")?;
    let transport =
        hex::decode(&request.transport).context("the request's transport key is not hex")?;
    if !ceremony::fingerprint_matches(&transport, expect_fingerprint) {
        bail!(
            "the request's transport key has fingerprint {}, not the {expect_fingerprint} \
             expected: the request is not the one `enroll-token` wrote on the new node's \
             machine (swapped or mixed up on the way); no keys were exported",
            ceremony::transport_fingerprint(&transport)
        );
    }
    let state = load_state(dir)?.context("no fleet here: run `fleet up` first")?;
    let group = state
        .nodes
        .get(&member)
        .with_context(|| format!("node {member} is not in this fleet"))?
        .group;
    let package = export_keys(dir, (member, group), peer_addr, &transport).await?;
    write_whole(out, &serde_json::to_vec(&package)?)?;
    println!(
        "package for token {} (from node {member}) written to {}; carry it to the new node's machine",
        request.label,
        out.display()
    );
    Ok(())
}

/// How far a learner is behind its leader, printed as one line: entries
/// applied, the rate since the first line, and the time left at that rate.
struct CatchUp {
    dir: PathBuf,
    id: u64,
    addr: String,
    leader_addr: String,
    started: Instant,
    first: Option<u64>,
}

impl CatchUp {
    async fn applied(&self, addr: &str) -> Option<u64> {
        let channel = client_api(&self.dir, addr, Duration::from_secs(1))
            .await
            .ok()?;
        VaultClient::new(channel)
            .get_info(pb::GetInfoRequest {})
            .await
            .ok()
            .map(|i| i.into_inner().applied_index)
    }

    async fn report(&mut self) {
        let Some(target) = self.applied(&self.leader_addr).await else {
            return;
        };
        let done = self.applied(&self.addr).await.unwrap_or(0);
        let from = *self.first.get_or_insert(done);
        let rate = (done - from.min(done)) as f64 / self.started.elapsed().as_secs_f64();
        let left = target.saturating_sub(done);
        println!(
            "node {} catching up: applied {done} of {target} entries ({:.0}%), {rate:.0} entries/s{}",
            self.id,
            if target == 0 { 100.0 } else { done as f64 * 100.0 / target as f64 },
            if rate >= 1.0 {
                format!(", about {:.0} s left", left as f64 / rate)
            } else {
                String::new()
            }
        );
    }

    /// Reports once now, then every second until aborted.
    async fn start(mut self) -> tokio::task::JoinHandle<()> {
        self.report().await;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.report().await;
            }
        })
    }
}

async fn membership(
    dir: &Path,
    state: &State,
    (group, voters): (u64, std::collections::BTreeSet<u64>),
    learner: Option<u64>,
) -> anyhow::Result<()> {
    let (leader_id, leader_node) = leader(dir, state, group).await?;
    let mut c = operator_api(dir, leader_id, &leader_node.peer_addr).await?;
    if let Some(id) = learner {
        let node = state.nodes.get(&id).context("unknown node")?;
        let body = hsm_vault::replication::operator::AddLearner {
            id,
            addr: node.peer_addr.clone(),
        };
        // The leader answers once the learner has caught up (from a
        // snapshot, then the log): meanwhile, show how far it is.
        let progress = CatchUp {
            dir: dir.to_owned(),
            id,
            addr: node.addr.clone(),
            leader_addr: leader_node.addr.clone(),
            started: Instant::now(),
            first: None,
        }
        .start()
        .await;
        let added = c
            .add_learner(signed(dir, "AddLearner", (leader_id, group), &body)?)
            .await;
        progress.abort();
        added?;
        println!("node {id}: added as a learner (caught up) via leader {leader_id}");
    }
    let body = hsm_vault::replication::operator::ChangeMembership {
        voters: voters.clone(),
    };
    c.change_membership(signed(dir, "ChangeMembership", (leader_id, group), &body)?)
        .await?;
    println!("group {group}: voters are now {voters:?} (joint consensus, via leader {leader_id})");
    Ok(())
}

/// One step of a slot move, sent to `group`'s leader.
async fn reshard(
    dir: &Path,
    state: &State,
    group: u64,
    step: &hsm_vault::replication::operator::Reshard,
) -> anyhow::Result<Vec<u8>> {
    let (leader_id, leader_node) = leader(dir, state, group).await?;
    let mut c = operator_api(dir, leader_id, &leader_node.peer_addr).await?;
    let reply = c
        .reshard(signed(dir, "Reshard", (leader_id, group), step)?)
        .await;
    Ok(reply
        .map_err(|s| anyhow::anyhow!("group {group}: {}", s.message()))?
        .into_inner()
        .body)
}

/// The maps `group` holds (adopted, and frozen for a move under way).
async fn maps(
    dir: &Path,
    state: &State,
    group: u64,
) -> anyhow::Result<hsm_vault::replication::operator::Maps> {
    use hsm_vault::replication::operator::Reshard;
    Ok(serde_json::from_slice(
        &reshard(dir, state, group, &Reshard::Show).await?,
    )?)
}

async fn move_slots(
    dir: &Path,
    state: &State,
    (first, last): (u16, u16),
    to: u64,
) -> anyhow::Result<()> {
    use hsm_vault::replication::operator::{Handover, Reshard};
    if first > last {
        bail!("--first must not be above --last");
    }
    let groups: std::collections::BTreeSet<u64> = state.nodes.values().map(|n| n.group).collect();
    if !groups.contains(&to) {
        bail!("group {to} has no node in this fleet");
    }
    let mut adopted = BTreeMap::new();
    let mut frozen = None;
    for g in &groups {
        let m = maps(dir, state, *g).await?;
        adopted.insert(
            *g,
            m.adopted.context("a group has adopted no shard map yet")?,
        );
        if let Some(f) = m.frozen {
            frozen = Some((*g, f));
        }
    }
    let (source, next) = match frozen {
        Some((g, f)) => {
            println!(
                "resuming the interrupted move out of group {g} (map version {})",
                f.version
            );
            (g, f)
        }
        None => {
            let current = &adopted[&to];
            let owners: std::collections::BTreeSet<Option<u64>> =
                (first..=last).map(|s| current.group_of_slot(s)).collect();
            let source = match owners.into_iter().collect::<Vec<_>>()[..] {
                [Some(g)] if g != to => g,
                [Some(_)] => bail!("slots {first}..={last} are in group {to} already"),
                _ => bail!(
                    "slots {first}..={last} are held by several groups: move one group's at a time"
                ),
            };
            let version = adopted.values().map(|m| m.version).max().unwrap_or(0) + 1;
            (source, current.reassign(first, last, to, version))
        }
    };
    // The group gaining slots, compared with the source's map before the move.
    let before = &adopted[&source];
    let target = next
        .groups()
        .into_iter()
        .find(|g| next.slots_of(*g) > before.slots_of(*g))
        .context("the move gives no slot to any group")?;
    reshard(dir, state, source, &Reshard::Freeze { map: next.clone() }).await?;
    println!(
        "group {source}: slots frozen (map version {})",
        next.version
    );
    let handover: Handover = serde_json::from_slice(
        &reshard(dir, state, source, &Reshard::Export { map: next.clone() }).await?,
    )?;
    let count = handover.records.len();
    reshard(dir, state, target, &Reshard::Import(handover)).await?;
    println!("group {target}: {count} records imported; it serves the slots now");
    for g in std::iter::once(source).chain(
        groups
            .iter()
            .copied()
            .filter(|g| *g != source && *g != target),
    ) {
        if adopted.get(&g) == Some(&next) {
            continue;
        }
        reshard(dir, state, g, &Reshard::Adopt { map: next.clone() }).await?;
        println!("group {g}: adopted map version {}", next.version);
    }
    Ok(())
}

/// A group's voters, as its leader knows them.
async fn voters(
    dir: &Path,
    state: &State,
    group: u64,
) -> anyhow::Result<std::collections::BTreeSet<u64>> {
    let (_, node) = leader(dir, state, group).await?;
    let info = VaultClient::new(client_api(dir, &node.addr, Duration::from_secs(10)).await?)
        .get_info(pb::GetInfoRequest {})
        .await?
        .into_inner();
    Ok(info.voters.into_iter().collect())
}

/// Drops removed nodes from the fleet's state (their directories stay, for
/// the record; `add-node` makes them anew).
fn forget(dir: &Path, ids: &[u64]) -> anyhow::Result<()> {
    let mut state = load_state(dir)?.context("no fleet here")?;
    for id in ids {
        state.nodes.remove(id);
    }
    save_state(dir, &state)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn signal(pid: u32, kill: bool) {
    let mut cmd = Command::new("kill");
    if kill {
        cmd.arg("-9");
    }
    let _ = cmd.arg(pid.to_string()).status();
}

fn down(dir: &Path, only: Option<u64>, kill: bool) -> anyhow::Result<()> {
    let Some(mut state) = load_state(dir)? else {
        return Ok(());
    };
    for (id, node) in state.nodes.iter_mut() {
        if only.is_some_and(|o| o != *id) {
            continue;
        }
        if let Some(pid) = node.pid.take().filter(|p| is_running(*p)) {
            signal(pid, kill);
            println!("node {id}: {}", if kill { "killed" } else { "stopped" });
        }
    }
    save_state(dir, &state)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up {
            fleet_file,
            hsm_vault_bin,
            module: ModuleArg { pkcs11_module },
        } => up(&cli.dir, &fleet_file, hsm_vault_bin, &pkcs11_module),
        Cmd::Certs {
            fleet_file,
            node_id,
            host,
            out,
        } => {
            let nodes = if node_id.is_empty() {
                let path = fleet_file.unwrap_or_else(|| "deploy/local-fleet/fleet.toml".into());
                node_hosts(&FleetFile::load(&path)?, &host)
            } else {
                node_id
                    .iter()
                    .map(|id| certs::NodeHosts {
                        id: *id,
                        hosts: host.clone(),
                    })
                    .collect()
            };
            let layout = out.map_or_else(|| tls_layout(&cli.dir), certs::Layout);
            let issued = certs::issue(&layout, &nodes)?;
            if issued.new_ca {
                println!("new fleet CA: {}", layout.ca().display());
            }
            for f in &issued.files {
                println!("issued {}", f.display());
            }
            println!(
                "{} certificates issued in {} (private keys mode 0600)",
                issued.files.len(),
                layout.0.display()
            );
            Ok(())
        }
        Cmd::Status { fleet_file } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(status(&cli.dir, fleet_file.as_deref())),
        Cmd::Faults {
            isolate_node,
            isolate_region,
            delay_ms,
            drop_percent,
            heal,
        } => {
            let faults = if heal {
                Faults::default()
            } else {
                Faults {
                    isolated_nodes: isolate_node.into_iter().collect(),
                    isolated_regions: isolate_region.into_iter().collect(),
                    extra_delay_ms: delay_ms,
                    drop_percent: drop_percent.min(100),
                }
            };
            let path = cli.dir.join("faults.json");
            let tmp = cli.dir.join("faults.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&faults)?)?;
            std::fs::rename(&tmp, &path)?;
            println!("fault switches: {}", serde_json::to_string(&faults)?);
            Ok(())
        }
        Cmd::ReplaceNode {
            id,
            module: ModuleArg { pkcs11_module },
        } => {
            // The old incarnation's vote is gone with its token, so the new
            // one must not vote until it is a fresh member: remove the id,
            // enroll a new token, rejoin as a learner, promote once caught up.
            let dir = cli.dir.canonicalize()?;
            refuse_without_ceremony(&load_state(&dir)?.context("no fleet here")?)?;
            down(&dir, Some(id), true)?;
            let state = load_state(&dir)?.context("no fleet here")?;
            let group = state.group_of(id)?;
            let rt = runtime()?;
            let mut voters = rt.block_on(voters(&dir, &state, group))?;
            if voters.remove(&id) {
                rt.block_on(membership(&dir, &state, (group, voters.clone()), None))?;
            }
            rt.block_on(enroll(&dir, &state, id, &pkcs11_module))?;
            up(&dir, &state.fleet_file.clone(), None, &pkcs11_module)?;
            let state = load_state(&dir)?.context("state")?;
            voters.insert(id);
            rt.block_on(membership(&dir, &state, (group, voters), Some(id)))
        }
        Cmd::AddNode {
            id,
            module: ModuleArg { pkcs11_module },
        } => {
            let dir = cli.dir.canonicalize()?;
            let mut state = load_state(&dir)?.context("no fleet here")?;
            refuse_without_ceremony(&state)?;
            if state.nodes.contains_key(&id) {
                bail!("node {id} is already in the fleet");
            }
            let fleet = FleetFile::load(&state.fleet_file)?;
            let spec = fleet
                .node(id)
                .context("declare the node in the fleet file first")?;
            state.nodes.insert(
                id,
                NodeState {
                    region: spec.region.clone(),
                    addr: spec.addr.clone(),
                    peer_addr: spec.peer_addr.clone(),
                    label: format!("vault-node-{id}"),
                    pid: None,
                    group: spec.group,
                    metrics_addr: None,
                },
            );
            save_state(&dir, &state)?;
            let rt = runtime()?;
            if let Err(e) = rt.block_on(enroll(&dir, &state, id, &pkcs11_module)) {
                forget(&dir, &[id])?;
                return Err(e);
            }
            up(&dir, &state.fleet_file.clone(), None, &pkcs11_module)?;
            let state = load_state(&dir)?.context("state")?;
            let group = state.group_of(id)?;
            let mut voters = rt.block_on(voters(&dir, &state, group))?;
            voters.insert(id);
            rt.block_on(membership(&dir, &state, (group, voters), Some(id)))
        }
        Cmd::RemoveNode { id } => {
            let state = load_state(&cli.dir)?.context("no fleet here")?;
            let group = state.group_of(id)?;
            let rt = runtime()?;
            let mut voters = rt.block_on(voters(&cli.dir, &state, group))?;
            voters.remove(&id);
            rt.block_on(membership(&cli.dir, &state, (group, voters), None))?;
            down(&cli.dir, Some(id), false)?;
            forget(&cli.dir, &[id])
        }
        Cmd::DrainRegion { region } => {
            let state = load_state(&cli.dir)?.context("no fleet here")?;
            let rt = runtime()?;
            let drained: Vec<u64> = state
                .nodes
                .iter()
                .filter(|(_, n)| n.region == region)
                .map(|(i, _)| *i)
                .collect();
            if drained.is_empty() {
                bail!("no node in region {region:?}");
            }
            let groups: std::collections::BTreeSet<u64> =
                drained.iter().map(|id| state.nodes[id].group).collect();
            for group in groups {
                let voters: std::collections::BTreeSet<u64> = rt
                    .block_on(voters(&cli.dir, &state, group))?
                    .into_iter()
                    .filter(|i| !drained.contains(i))
                    .collect();
                rt.block_on(membership(&cli.dir, &state, (group, voters), None))?;
            }
            for id in &drained {
                down(&cli.dir, Some(*id), false)?;
            }
            forget(&cli.dir, &drained)
        }
        Cmd::MoveSlots {
            first,
            last,
            to_group,
        } => {
            let state = load_state(&cli.dir)?.context("no fleet here")?;
            runtime()?.block_on(move_slots(&cli.dir, &state, (first, last), to_group))
        }
        Cmd::StopNode { id, kill } => down(&cli.dir, Some(id), kill),
        Cmd::Down => down(&cli.dir, None, false),
        Cmd::Dashboard { listen, fleet_file } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(dashboard::serve(
                cli.dir.canonicalize()?,
                listen,
                fleet_file,
            )),
        Cmd::Audit { node, table } => audit(&cli.dir, node, table),
        Cmd::EnrollToken(args) => enroll_token(&args),
        Cmd::ExportKeys {
            member,
            expect_fingerprint,
            peer_addr,
            request,
            out,
        } => runtime()?.block_on(export_keys_for(
            &cli.dir,
            (member, &peer_addr),
            (&request, &expect_fingerprint),
            &out,
        )),
    }
}

/// Runs `vault-audit` (beside this binary) on each node's trail with that
/// node's token; fails if any chain does not verify.
fn audit(dir: &Path, only: Option<u64>, table: bool) -> anyhow::Result<()> {
    let state = load_state(dir)?.context("no fleet here: run `fleet up` first")?;
    let tool = std::env::current_exe()?
        .parent()
        .context("no directory for this binary")?
        .join("vault-audit");
    let mut broken = Vec::new();
    for (id, node) in &state.nodes {
        if only.is_some_and(|o| o != *id) {
            continue;
        }
        let node_dir = dir.join(format!("node-{id}"));
        let mut cmd = std::process::Command::new(&tool);
        let (conf_env, conf) = state.token_env()?;
        cmd.env(conf_env, conf)
            .arg("--log")
            .arg(node_dir.join("data/audit.log"))
            .arg("--token-label")
            .arg(&node.label)
            .arg("--pin-file")
            .arg(node_dir.join("user.pin"));
        if table {
            cmd.arg("--table");
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        println!(
            "# node {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            broken.push(*id);
        }
    }
    if !broken.is_empty() {
        bail!("the audit trail of node(s) {broken:?} does not verify");
    }
    Ok(())
}
