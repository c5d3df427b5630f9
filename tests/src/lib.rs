//! Fixtures for end-to-end tests: a real `hsm-vault` process on its own
//! SoftHSM2 token and sled directory, reached over loopback gRPC, and the
//! real `vault` CLI.
//!
//! Nodes run in plaintext (`--plaintext`) unless a test asks for TLS
//! ([`VaultNode::start_tls`], [`start_tls_fleet`]): most tests are about
//! the vault, not its transport. TLS nodes use certificates issued by the
//! real `fleet certs` ([`Certs`]).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hsm_vault::core::SecureCore;
use hsm_vault::partition::Partition;
use hsm_vault::types::RecordId;
use softhsm_test_harness::{module_path, TestToken};
use vault_client::{Transport, VaultClient};

/// How long a node may take to start before a test gives up.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Directory holding the workspace's built binaries: the profile directory
/// of the running executable (a test executable lives in its `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run the workspace tests (cargo nextest run --workspace) so binaries are built",
        p.display()
    );
    p
}

/// Certificates issued by `fleet certs` into a directory (its layout).
#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// A new CA in `dir` (if there is none yet) and the certificates of
    /// nodes `ids` and of the operator, issued by the `fleet` binary.
    pub fn issue(dir: &Path, ids: &[u64]) -> Certs {
        let mut cmd = Command::new(bin("fleet"));
        cmd.arg("certs").arg("--out").arg(dir);
        for id in ids {
            cmd.arg(format!("--node-id={id}"));
        }
        let out = cmd.output().expect("fleet certs runs");
        assert!(
            out.status.success(),
            "fleet certs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Certs {
            dir: dir.to_owned(),
        }
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Node `id`'s server certificate and key.
    pub fn server(&self, id: u64) -> (PathBuf, PathBuf) {
        self.pair(&format!("node-{id}"), "server")
    }

    /// Node `id`'s client certificate and key.
    pub fn client(&self, id: u64) -> (PathBuf, PathBuf) {
        self.pair(&format!("node-{id}"), "client")
    }

    /// The operator's client certificate and key.
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        self.pair("operator", "client")
    }

    fn pair(&self, holder: &str, kind: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join(holder);
        (d.join(format!("{kind}.pem")), d.join(format!("{kind}.key")))
    }

    /// The `hsm-vault` flags of node `id`: its server certificate, and for
    /// a group member the CA and its client certificate.
    fn node_args(&self, id: u64, member: bool) -> Vec<String> {
        let (cert, key) = self.server(id);
        let mut args = vec![
            format!("--tls-cert={}", cert.display()),
            format!("--tls-key={}", key.display()),
        ];
        if member {
            let (cert, key) = self.client(id);
            args.extend([
                format!("--tls-ca={}", self.ca().display()),
                format!("--tls-client-cert={}", cert.display()),
                format!("--tls-client-key={}", key.display()),
            ]);
        }
        args
    }
}

/// A node's TLS: the certificates, its id in them, whether it is a group
/// member (mutual TLS with peers).
#[derive(Debug, Clone)]
struct NodeTls {
    certs: Certs,
    id: u64,
    member: bool,
}

/// One vault node and everything it owns, in a temporary directory.
#[derive(Debug)]
pub struct VaultNode {
    /// The SoftHSM configuration this node's token lives in (shared by the
    /// nodes of a group, each with its own token).
    pub token: Arc<TestToken>,
    /// This node's token label and PIN file.
    pub label: String,
    pin_file: PathBuf,
    /// Fixed listen address (a group member), or port 0.
    listen: String,
    /// TLS material, or `None` for a plaintext node (`--plaintext`).
    tls: Option<NodeTls>,
    /// Flags added to every start (group membership, key setup).
    pub extra_args: Vec<String>,
    pub work: tempfile::TempDir,
    child: Option<Child>,
    addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    signing_key: p256::ecdsa::SigningKey,
    /// Extra environment for the next start (e.g. a crash point).
    pub extra_env: Vec<(String, String)>,
}

impl VaultNode {
    /// Creates a token, an identity key pair and a data directory, and
    /// starts the node.
    pub fn start(label: &str) -> Self {
        let token = Arc::new(TestToken::new(label).expect("SoftHSM token"));
        let pin_file = token.pin_file();
        let mut node = Self::prepare(token, label, pin_file, "127.0.0.1:0".into(), Vec::new());
        node.restart();
        node
    }

    /// A node that is not started yet.
    fn prepare(
        token: Arc<TestToken>,
        label: &str,
        pin_file: PathBuf,
        listen: String,
        extra_args: Vec<String>,
    ) -> Self {
        let work = tempfile::Builder::new()
            .prefix("vault-node-")
            .tempdir()
            .expect("work dir");
        let signing_key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        std::fs::write(
            work.path().join("jwks.json"),
            vault_proto::token::jwks(&[*signing_key.verifying_key()]),
        )
        .expect("jwks.json");
        VaultNode {
            token,
            label: label.to_owned(),
            pin_file,
            listen,
            tls: None,
            extra_args,
            work,
            child: None,
            addr: None,
            metrics_addr: None,
            signing_key,
            extra_env: Vec::new(),
        }
    }

    /// Uses `identity` (another node's) as this node's identity service, so
    /// one bearer token works across a group.
    fn share_identity(&mut self, from: &VaultNode) {
        self.signing_key = from.signing_key.clone();
        std::fs::copy(
            from.work.path().join("jwks.json"),
            self.work.path().join("jwks.json"),
        )
        .expect("copy identity");
    }

    /// The file holding this node's token PIN.
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }

    pub fn data_dir(&self) -> PathBuf {
        self.work.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.work.path().join("node.log")
    }

    pub fn public_key_path(&self) -> PathBuf {
        self.work.path().join("vault.pub")
    }

    pub fn pinned_key(&self) -> [u8; 33] {
        let text = std::fs::read_to_string(self.public_key_path()).expect("published key");
        vault_client::parse_pinned_key(&text).expect("valid published key")
    }

    pub fn endpoint(&self) -> String {
        self.endpoint_if_running().expect("node is running")
    }

    /// How clients reach this node: TLS with the test CA, or plaintext.
    pub fn transport(&self) -> Transport {
        match &self.tls {
            Some(t) => Transport::Tls {
                ca_pem: std::fs::read(t.certs.ca()).expect("CA certificate"),
            },
            None => Transport::Plaintext,
        }
    }

    /// The certificates this node runs with (a TLS node).
    pub fn certs(&self) -> Option<&Certs> {
        self.tls.as_ref().map(|t| &t.certs)
    }

    /// A stand-alone node with TLS on its own new token: certificates from
    /// a new test CA (`fleet certs`, in the node's work directory).
    pub fn start_tls(label: &str) -> Self {
        let mut node = Self::unstarted(label, Vec::new());
        let certs = Certs::issue(&node.work.path().join("tls"), &[1]);
        node.tls = Some(NodeTls {
            certs,
            id: 1,
            member: false,
        });
        node.restart();
        node
    }

    /// A stand-alone node on its own new token, not started, with extra
    /// flags.
    pub fn unstarted(label: &str, extra_args: Vec<String>) -> Self {
        Self::unstarted_at(label, "127.0.0.1:0", extra_args)
    }

    /// Like [`VaultNode::unstarted`], listening on a fixed address.
    pub fn unstarted_at(label: &str, listen: &str, extra_args: Vec<String>) -> Self {
        let token = Arc::new(TestToken::new(label).expect("SoftHSM token"));
        let pin_file = token.pin_file();
        Self::prepare(token, label, pin_file, listen.into(), extra_args)
    }

    /// The node's metrics listener (every test node has one).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
            .expect("node started with a metrics listener")
    }

    /// A Prometheus scrape of the node: its `/metrics` text.
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(self.metrics_addr(), "/metrics").expect("scrape");
        assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
        body
    }

    /// The process id, if the node is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The endpoint, if the node is running.
    pub fn endpoint_if_running(&self) -> Option<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.addr.map(|a| format!("{scheme}://{a}"))
    }

    /// The faults file of this node's group (fault switches).
    pub fn faults_file(&self) -> Option<PathBuf> {
        self.extra_args
            .iter()
            .find_map(|a| a.strip_prefix("--faults-file="))
            .map(PathBuf::from)
    }

    /// Flips the group's fault switches (JSON, see `hsm_vault::geo::Faults`).
    pub fn set_faults(&self, json: &str) {
        let path = self.faults_file().expect("a group member");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).expect("write faults");
        std::fs::rename(&tmp, &path).expect("replace faults");
    }

    /// The fleet's nodes as a `--peers` value (`ID=HOST:PORT,...` of their
    /// peer listeners).
    pub fn peers_arg(&self) -> String {
        let path = self
            .extra_args
            .iter()
            .find_map(|a| a.strip_prefix("--fleet-file="))
            .expect("a fleet member");
        let fleet = hsm_vault::geo::FleetFile::load(Path::new(path)).expect("fleet file");
        fleet
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) the node process.
    pub fn restart(&mut self) {
        self.start_process().expect("node starts");
    }

    /// Starts the process; returns its stderr text if it exits instead of
    /// becoming ready.
    pub fn start_process(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut child = Command::new(bin("hsm-vault"))
            .envs(self.token.env())
            .env(
                "RUST_LOG",
                std::env::var("VAULT_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.extra_env.iter().cloned())
            .arg(format!("--listen={}", self.listen))
            .arg("--metrics-listen=127.0.0.1:0")
            .args(match &self.tls {
                Some(t) => t.certs.node_args(t.id, t.member),
                None => vec!["--plaintext".to_owned()],
            })
            .args(&self.extra_args)
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--pkcs11-module={}", module_path().display()))
            .arg(format!("--token-label={}", self.label))
            .arg(format!("--pin-file={}", self.pin_file.display()))
            .arg(format!(
                "--auth-jwks={}",
                self.work.path().join("jwks.json").display()
            ))
            .arg(format!(
                "--publish-key={}",
                self.public_key_path().display()
            ))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn hsm-vault");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The metrics line comes before the client API's.
            let mut metrics = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("hsm-vault metrics on ") {
                    metrics = addr.trim().parse::<SocketAddr>().ok();
                }
                if let Some(addr) = line.strip_prefix("hsm-vault listening on ") {
                    let _ = tx.send((addr.trim().to_owned(), metrics));
                }
            }
        });
        match rx.recv_timeout(START_DEADLINE) {
            Ok((addr, metrics)) => {
                self.addr = Some(addr.parse().expect("address"));
                self.metrics_addr = metrics;
                self.child = Some(child);
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(self.log_path()).unwrap_or_default())
            }
        }
    }

    /// `kill -9`: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
        self.addr = None;
    }

    /// Waits for the process to exit by itself (a crash point), with a
    /// deadline.
    pub fn wait_for_exit(&mut self, deadline: Duration) {
        let mut child = self.child.take().expect("node running");
        let start = Instant::now();
        loop {
            if child.try_wait().expect("poll").is_some() {
                break;
            }
            assert!(start.elapsed() < deadline, "node did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.addr = None;
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// A bearer token for `account` from this node's identity service.
    pub fn bearer(&self, account: &str) -> String {
        self.bearer_expiring(account, 3600)
    }

    pub fn bearer_expiring(&self, account: &str, ttl: i64) -> String {
        self.issuer().bearer_expiring(account, ttl)
    }

    /// This node's identity service, to issue bearer tokens from any thread.
    pub fn issuer(&self) -> Issuer {
        Issuer(self.signing_key.clone())
    }

    pub async fn client(&self) -> VaultClient {
        VaultClient::connect(&self.endpoint(), &self.transport(), self.pinned_key())
            .await
            .expect("client connects")
    }

    /// The `vault` CLI, pointed at this node (with the test CA, or
    /// plaintext for a plaintext node).
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin("vault"));
        c.env("VAULT_ENDPOINT", self.endpoint())
            .env("VAULT_PUBLIC_KEY", self.public_key_path());
        match &self.tls {
            Some(t) => c.env("VAULT_CA_CERT", t.certs.ca()),
            None => c.env("VAULT_PLAINTEXT", "true"),
        };
        c
    }

    /// Opens this node's token in the test process (the node must be
    /// stopped): for looking at what is really stored.
    pub fn inspector(&self) -> Inspector {
        assert!(
            self.child.is_none(),
            "stop the node before inspecting its token"
        );
        self.token.use_in_this_process().expect("token env");
        let partition = Partition::open(&module_path(), self.token.label(), self.token.pin())
            .expect("partition");
        let core = SecureCore::new(partition.ake_public_key()).expect("core");
        Inspector { partition, core }
    }
}

impl VaultNode {
    /// This node's own token (in a group, each node has its own), opened in
    /// the test process; the node must be stopped.
    pub fn own_partition(&self) -> Arc<Partition> {
        assert!(
            self.child.is_none(),
            "stop the node before opening its token"
        );
        self.token.use_in_this_process().expect("token env");
        let pin = std::fs::read_to_string(&self.pin_file).expect("pin");
        Partition::open(&module_path(), &self.label, pin.trim()).expect("partition")
    }
}

/// Issues owner bearer tokens the nodes accept (the identity service of
/// local deployments).
#[derive(Clone, Debug)]
pub struct Issuer(p256::ecdsa::SigningKey);

impl Issuer {
    /// A token for `account`, valid for an hour.
    pub fn bearer(&self, account: &str) -> String {
        self.bearer_expiring(account, 3600)
    }

    /// The identity key as a private JWK (for another JWT library).
    pub fn private_jwk(&self) -> zeroize::Zeroizing<String> {
        vault_proto::token::private_jwk(&self.0)
    }

    /// A token for `account` that expires `ttl` seconds from now (in the
    /// past for a negative `ttl`: issued a minute before it expired).
    pub fn bearer_expiring(&self, account: &str, ttl: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let (issued, lifetime) = match u64::try_from(ttl) {
            Ok(ttl) => (now, ttl),
            Err(_) => (now.saturating_add_signed(ttl).saturating_sub(60), 60),
        };
        vault_proto::token::Issuer::new(&self.0, vault_proto::token::DEFAULT_ISSUER)
            .expect("issuer")
            .issue(
                account.as_bytes(),
                vault_proto::token::DEFAULT_AUDIENCE,
                issued,
                lifetime,
            )
            .expect("issue token")
    }
}

/// A tool `scripts/ensure-deps.sh` installs under `target/tools` (`rel`,
/// e.g. `grpcurl/bin/grpcurl`), or the path in the environment variable
/// `env` when it is set.
pub fn tool(rel: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let path = bin_dir()
        .parent()
        .expect("target dir")
        .join("tools")
        .join(rel);
    assert!(
        path.exists(),
        "{} missing: run scripts/ensure-deps.sh",
        path.display()
    );
    path
}

/// A plain HTTP/1.1 GET on loopback (the metrics and dashboard listeners):
/// the status code and the body. Enough for tests; no client dependency.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The sum of the samples of `name` in a Prometheus text scrape whose
/// labels include every `label="value"` pair in `labels` (0 if none).
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    hsm_vault::telemetry::sample_sum(scrape, name, labels)
}

/// Free loopback ports for the members of a group. They are picked below
/// the kernel's ephemeral range (32768+), so outgoing connections of other
/// tests cannot take one between this check and the node's bind, and at
/// random, so concurrent tests rarely pick the same.
pub fn free_ports(n: usize) -> Vec<u16> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    while ports.len() < n {
        let port = rng.gen_range(20_000..32_000);
        if ports.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

/// Starts a replica group of `n` nodes: one SoftHSM configuration with a
/// token per node, domain keys generated in node 1's token and cloned into
/// the others through the ceremony (run here, in the test process), and `n`
/// `hsm-vault` processes on fixed loopback ports. Returns once every node
/// listens; the group elects its leader on its own.
pub fn start_group(n: usize, prefix: &str) -> Vec<VaultNode> {
    start_fleet(&[n], prefix)
}

/// Starts a fleet of replica groups of the sizes given: nodes are numbered
/// from 1 across the groups (group 1 first), all share one set of domain
/// keys (one ceremony), and the fleet file splits the slots evenly over the
/// groups. Node i is in region ((i - 1) % 3) + 1.
pub fn start_fleet(groups: &[usize], prefix: &str) -> Vec<VaultNode> {
    let mut nodes = prepare_fleet(groups, prefix);
    for node in &mut nodes {
        node.restart();
    }
    nodes
}

/// Where a fleet's nodes are and how far apart its regions are.
#[derive(Debug, Clone)]
pub struct Layout {
    /// One-way delay between two nodes of one region, in milliseconds.
    pub intra_region_ms: u64,
    /// Region names.
    pub regions: Vec<String>,
    /// One-way delays between regions: (region, region, ms).
    pub links: Vec<(String, String, u64)>,
    /// Each node's (region, group), node ids counting from 1.
    pub nodes: Vec<(String, usize)>,
}

impl Layout {
    /// The test default: groups of the sizes given, numbered from 1 across
    /// the groups (group 1 first); node i in region ((i - 1) % 3) + 1, with
    /// small latencies that keep tests quick while still crossing the
    /// emulated links.
    pub fn test_default(groups: &[usize]) -> Self {
        let regions: Vec<String> = (1..=3).map(|r| format!("region-{r}")).collect();
        let nodes = groups
            .iter()
            .enumerate()
            .flat_map(|(g, size)| std::iter::repeat_n(g + 1, *size))
            .enumerate()
            .map(|(i, group)| (regions[i % 3].clone(), group))
            .collect();
        let link = |a: usize, b: usize, ms| (regions[a].clone(), regions[b].clone(), ms);
        Layout {
            intra_region_ms: 1,
            links: vec![link(0, 1, 5), link(0, 2, 10), link(1, 2, 10)],
            regions,
            nodes,
        }
    }

    /// The fleet file text for nodes listening on `ports` (client API) and
    /// `peer_ports` (peer listener).
    fn fleet_file(&self, ports: &[u16], peer_ports: &[u16]) -> String {
        let mut fleet = format!(
            "[fleet]\nname = \"test\"\nintra_region_ms = {}\n\n",
            self.intra_region_ms
        );
        for r in &self.regions {
            fleet.push_str(&format!("[[region]]\nname = \"{r}\"\n"));
        }
        for (a, b, ms) in &self.links {
            fleet.push_str(&format!(
                "\n[[link]]\nbetween = [\"{a}\", \"{b}\"]\nms = {ms}\n"
            ));
        }
        for (i, ((region, group), (port, peer))) in self
            .nodes
            .iter()
            .zip(ports.iter().zip(peer_ports))
            .enumerate()
        {
            fleet.push_str(&format!(
                "\n[[node]]\nid = {}\nregion = \"{region}\"\naddr = \"127.0.0.1:{port}\"\n\
                 peer_addr = \"127.0.0.1:{peer}\"\ngroup = {group}\n",
                i + 1,
            ));
        }
        fleet
    }
}

/// [`start_fleet`] without starting the processes (their tokens can still
/// be opened in the test process, e.g. with [`VaultNode::inspector`]).
pub fn prepare_fleet(groups: &[usize], prefix: &str) -> Vec<VaultNode> {
    prepare_layout(&Layout::test_default(groups), prefix)
}

/// [`start_fleet`] over TLS: certificates from a new test CA, the client
/// API over TLS, Raft and forwarded requests over mutual TLS.
pub fn start_tls_fleet(groups: &[usize], prefix: &str) -> Vec<VaultNode> {
    let mut nodes = prepare_layout_with(&Layout::test_default(groups), prefix, true);
    for node in &mut nodes {
        node.restart();
    }
    nodes
}

/// Prepares the fleet `layout` describes: one SoftHSM configuration with a
/// token per node, domain keys generated in node 1's token and cloned into
/// the others, a fleet file, and unstarted plaintext nodes on fixed
/// loopback ports.
pub fn prepare_layout(layout: &Layout, prefix: &str) -> Vec<VaultNode> {
    prepare_layout_with(layout, prefix, false)
}

/// [`prepare_layout`], with TLS if `tls` (certificates in the token
/// directory's `tls/`).
pub fn prepare_layout_with(layout: &Layout, prefix: &str, tls: bool) -> Vec<VaultNode> {
    let n = layout.nodes.len();
    let group_of: Vec<usize> = layout.nodes.iter().map(|(_, g)| *g).collect();
    use hsm_vault::partition::ceremony::Enrollment;
    use hsm_vault::partition::import::DomainKeyMaterial;
    use hsm_vault::partition::{KeySetup, Module};

    let first = format!("{prefix}-1");
    let token = Arc::new(TestToken::new(&first).expect("token"));
    let mut pins = vec![(first.clone(), token.pin_file())];
    for i in 2..=n {
        let label = format!("{prefix}-{i}");
        let (pin, _) = token.add_token(&label).expect("token");
        let pin_file = token.dir().join(format!("{label}.pin"));
        std::fs::write(&pin_file, pin).expect("pin file");
        pins.push((label, pin_file));
    }
    if !token.provider().can_clone() {
        // No ceremony is possible on this provider (kryoptic: no key can be
        // CKA_TRUSTED): the domain keys are generated here, in memory, and
        // imported into every token, a provisioning path for test fleets
        // only (`hsm_vault::partition::import`).
        token.use_in_this_process().expect("env");
        let module = Module::load(&module_path()).expect("module");
        let material = DomainKeyMaterial::generate();
        for (label, pin_file) in &pins {
            let pin = std::fs::read_to_string(pin_file).expect("pin");
            Partition::import_domain_keys(&module, label, pin.trim(), &material)
                .expect("import domain keys");
        }
    } else {
        token.use_in_this_process().expect("env");
        let module = Module::load(&module_path()).expect("module");
        let source = Partition::open_in(&module, &first, token.pin(), KeySetup::GenerateIfMissing)
            .expect("first token");
        for (label, pin_file) in &pins[1..] {
            let pin = std::fs::read_to_string(pin_file).expect("pin");
            let enrollment = Enrollment::begin(&module, label, &pin).expect("begin");
            let package = source
                .export_for_clone(
                    token.so_pin(),
                    token.pin(),
                    enrollment.transport_public_key(),
                )
                .expect("export");
            enrollment.complete(&package).expect("complete");
        }
    }
    let all_ports = free_ports(2 * n);
    let (ports, peer_ports) = all_ports.split_at(n);
    let fleet = layout.fleet_file(ports, peer_ports);
    let ids: Vec<u64> = (1..=n as u64).collect();
    let certs = tls.then(|| Certs::issue(&token.dir().join("tls"), &ids));
    let fleet_file = token.dir().join("fleet.toml");
    std::fs::write(&fleet_file, fleet).expect("fleet file");
    let faults_file = token.dir().join("faults.json");
    std::fs::write(&faults_file, "{}").expect("faults file");
    let mut nodes: Vec<VaultNode> = Vec::new();
    for (i, (label, pin_file)) in pins.into_iter().enumerate() {
        let mut args = vec![
            format!("--node-id={}", i + 1),
            format!("--fleet-file={}", fleet_file.display()),
            format!("--faults-file={}", faults_file.display()),
            format!("--peer-listen=127.0.0.1:{}", peer_ports[i]),
        ];
        if i == 0 || group_of[i] != group_of[i - 1] {
            args.push("--init".into());
        }
        if i != 0 {
            args.push("--require-cloned-keys".into());
        }
        let listen = format!("127.0.0.1:{}", ports[i]);
        let mut node = VaultNode::prepare(Arc::clone(&token), &label, pin_file, listen, args);
        node.tls = certs.as_ref().map(|certs| NodeTls {
            certs: certs.clone(),
            id: i as u64 + 1,
            member: true,
        });
        if let Some(first) = nodes.first() {
            node.share_identity(first);
        }
        nodes.push(node);
    }
    nodes
}

impl Drop for VaultNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads a stopped node's token and store.
#[derive(Debug)]
pub struct Inspector {
    pub partition: Arc<Partition>,
    pub core: SecureCore,
}

impl Inspector {
    pub fn record_id(&self, account: &str) -> RecordId {
        let s = self.partition.session().expect("session");
        self.core
            .record_id(&s, account.as_bytes())
            .expect("record id")
    }
}

/// Opens a (stopped) node's sled store from the test process. No background
/// flusher thread, so the store's file lock is released as soon as the
/// handle is dropped; retried for a moment in case the lock is still held.
pub fn open_store(path: &Path) -> sled::Db {
    let start = Instant::now();
    loop {
        match sled::Config::new().path(path).flush_every_ms(None).open() {
            Ok(db) => return db,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}

/// Runs `cmd` with `stdin` written to its standard input; captures output.
pub fn run_with_stdin(mut cmd: Command, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// Every file below `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for p in entries.flatten().map(|e| e.path()) {
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every file under `dir`, concatenated: for byte searches.
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .flatten()
        .collect()
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A connection to node `id`'s peer listener at `addr` (HOST:PORT), the
/// node's certificate checked against `ca`, presenting `client` (a
/// certificate and key) if given. Under TLS 1.3 a server that refuses the
/// client certificate may only say so at the first call, so a refusal can
/// show here or there.
pub async fn peer_channel(
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    id: u64,
    addr: &str,
) -> Result<tonic::transport::Channel, String> {
    use tonic::transport::{ClientTlsConfig, Endpoint};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(hsm_vault::tls::load_certificate(ca).map_err(|e| e.to_string())?)
        .domain_name(hsm_vault::tls::node_name(id));
    if let Some((cert, key)) = client {
        tls = tls.identity(hsm_vault::tls::load_identity(cert, key).map_err(|e| e.to_string())?);
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| error_chain(&e))
}

/// A plaintext channel to the client API at `addr` whose connections start
/// with a PROXY protocol v2 header naming `client` as the client, as a load
/// balancer in front of the node would send.
pub async fn proxied_channel(
    addr: SocketAddr,
    client: SocketAddr,
) -> Result<tonic::transport::Channel, String> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    use tokio::io::AsyncWriteExt;
    // The balancer's own address, in the client's family (a header names
    // two addresses of one family).
    let local: SocketAddr = match client {
        SocketAddr::V4(_) => addr,
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
    };
    let header = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (client, local),
    )
    .build()
    .map_err(|e| e.to_string())?;
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let header = header.clone();
            async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await?;
                stream.write_all(&header).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| error_chain(&e))
}

/// An error and its causes, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Runs the `fleet` tool on the fleet in `dir`.
pub fn fleet_tool(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("fleet"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("fleet runs")
}

/// Stops the fleet in its directory when dropped (`fleet down`).
#[derive(Debug)]
pub struct FleetDown(pub PathBuf);

impl Drop for FleetDown {
    fn drop(&mut self) {
        let _ = fleet_tool(&self.0, &["down"]);
    }
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The index in `nodes` of the group's leader, once one is elected (30 s at
/// most; nodes not running are skipped). A node counts as leader only once a
/// majority of its voters say so: a restarted former leader resumes as leader
/// of its old term (openraft restores it) and claims so until its first
/// replication round meets the newer term.
pub async fn leader_of(nodes: &[VaultNode]) -> usize {
    let start = Instant::now();
    loop {
        let mut infos = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let Some(endpoint) = n.endpoint_if_running() else {
                continue;
            };
            let mut c = VaultClient::connect(&endpoint, &n.transport(), n.pinned_key())
                .await
                .expect("connect");
            let info = c
                .raw()
                .get_info(vault_proto::vault::v1::GetInfoRequest {})
                .await
                .expect("info")
                .into_inner();
            infos.push((i, info));
        }
        let acknowledged = infos.iter().find(|(_, claim)| {
            let agree = infos
                .iter()
                .filter(|(_, o)| o.leader_id == claim.node_id && claim.voters.contains(&o.node_id))
                .count();
            claim.leader_id != 0
                && claim.leader_id == claim.node_id
                && 2 * agree > claim.voters.len()
        });
        if let Some((i, _)) = acknowledged {
            return *i;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no leader elected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
