//! One simulated run: the replicas, their disks, the fault schedule, the
//! clients, and the checks.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hsm_vault::auth::Authorizer;
use hsm_vault::backend::{Backend, Replica};
use hsm_vault::geo::Geography;
use hsm_vault::partition::Partition;
use hsm_vault::replication::inbox::SnapshotInbox;
use hsm_vault::replication::network::Channels;
use hsm_vault::replication::state_machine::StateMachine;
use hsm_vault::replication::Raft;
use hsm_vault::replication::{raft_config, start_raft, Flush, NodeId};
use hsm_vault::service::VaultService;
use hsm_vault::shard::{GroupId, ShardMap};
use openraft::{BasicNode, ServerState};
use p256::ecdsa::SigningKey;
use rand::rngs::{OsRng, StdRng};
use rand::{Rng, SeedableRng};
use softhsm_test_harness::{module_path, TestToken};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Status;

use crate::broken::Broken;
use crate::client::{act, Action};
use crate::model::{Account, Answer, Op, Seen};
use crate::net::{Endpoint, NodeNet, SimNet, Weather};

const GROUP: GroupId = 1;

/// Longest a simulated client waits for one answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the healed group gets to agree again before the run counts as
/// stuck (simulated time).
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);

/// What every run of a process shares: one SoftHSM token (each replica
/// keeps its Raft vote and watermarks under its own name in it; the domain
/// keys are the same, as the cloning ceremony makes them), the identity
/// service's key, and a scratch directory (in memory where `/dev/shm` is).
#[allow(missing_debug_implementations)]
pub struct Fixture {
    _token: TestToken,
    partition: Arc<Partition>,
    issuer: SigningKey,
    root: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> anyhow::Result<Self> {
        let token = TestToken::new("vault-sim")?;
        token.use_in_this_process()?;
        let partition = Partition::open(&module_path(), "vault-sim", token.pin())?;
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let root = tempfile::Builder::new()
            .prefix("vault-sim-")
            .tempdir_in(base)?;
        Ok(Fixture {
            _token: token,
            partition,
            issuer: SigningKey::random(&mut OsRng),
            root,
        })
    }
}

/// A deliberately broken vault, to show that the simulation catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokenKind {
    /// The recovery releases the KE2 before its charge is committed
    /// ([`crate::broken`]).
    EarlyKe2,
    /// A replica without the token anchor over its state machine: after each
    /// edit of a stopped replica's state (a record spliced back, a map
    /// deleted) the simulation makes the token vouch for the edited state,
    /// as a vault that never checked would accept it.
    NoAnchor,
}

/// The shape of a run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Run a deliberately broken vault.
    pub broken: Option<BrokenKind>,
    pub nodes: u64,
    pub clients: usize,
    pub accounts: usize,
    /// Simulated time under load and faults, before healing.
    pub load: Duration,
    /// Raft snapshot interval (small, so snapshots and log purges happen).
    pub snapshot_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            broken: None,
            nodes: 3,
            clients: 3,
            accounts: 5,
            load: Duration::from_secs(8),
            snapshot_every: 40,
        }
    }
}

/// Counts of one or more runs.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub seeds: u64,
    pub faults: BTreeMap<String, u64>,
    pub checked: BTreeMap<String, u64>,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub simulated: Duration,
}

impl Figures {
    pub fn add(&mut self, other: &Figures) {
        self.seeds += other.seeds;
        for (k, v) in &other.faults {
            *self.faults.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.checked {
            *self.checked.entry(k.clone()).or_default() += v;
        }
        self.messages += other.messages;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.simulated += other.simulated;
    }

    pub fn operations_checked(&self) -> u64 {
        self.checked.values().sum()
    }

    pub fn faults_injected(&self) -> u64 {
        self.faults.values().sum::<u64>() + self.lost + self.duplicated
    }
}

/// The result of one seed.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub figures: Figures,
    /// A digest of everything that happened, in order: equal for two runs
    /// of one seed.
    pub digest: u64,
    pub violation: Option<String>,
    pub trace: Vec<String>,
}

/// A node as the clients reach it.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Target {
    service: VaultService,
    broken: Option<Arc<Broken>>,
    down: watch::Receiver<bool>,
}

impl Target {
    pub fn broken(&self) -> Option<&Arc<Broken>> {
        self.broken.as_ref()
    }

    /// Calls the node's service; if the node goes down meanwhile, the call
    /// is cut off as a lost connection would be.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(VaultService) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let service = self.service.clone();
        self.call_raw(move || f(service)).await
    }

    pub async fn call_raw<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut down = self.down.clone();
        tokio::select! {
            biased;
            _ = down.wait_for(|d| *d) => Err(Status::unavailable("connection lost: the node went down")),
            answer = tokio::time::timeout(CLIENT_TIMEOUT, f()) => {
                answer.unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")))
            }
        }
    }
}

struct Slot {
    model: Account,
    busy: bool,
}

/// What the controller and the clients share.
struct Shared {
    targets: Mutex<BTreeMap<NodeId, (Target, Raft)>>,
    accounts: Mutex<Vec<Slot>>,
    trace: Mutex<Vec<String>>,
    violation: Mutex<Option<String>>,
    checked: Mutex<BTreeMap<String, u64>>,
    stop: AtomicBool,
    start: tokio::time::Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn log(&self, line: String) {
        let ms = self.start.elapsed().as_millis();
        lock(&self.trace).push(format!("{ms:>6} ms  {line}"));
    }

    fn fail(&self, why: String) {
        self.log(format!("VIOLATION: {why}"));
        lock(&self.violation).get_or_insert(why);
    }

    fn failed(&self) -> bool {
        lock(&self.violation).is_some()
    }

    /// Checks an observation and counts it.
    fn check(&self, account: usize, op: Op, seen: Seen) {
        let what = match seen {
            Seen::Answer(a) => answer_name(a),
            Seen::NotApplied => "refused",
            Seen::Unknown => "unknown",
        };
        let name = format!("{}→{what}", op_name(op));
        *lock(&self.checked).entry(name).or_default() += 1;
        let result = lock(&self.accounts)[account].model.observe(op, seen);
        self.log(format!("account {account}: {op:?} → {seen:?}"));
        if let Err(e) = result {
            self.fail(format!("account {account}: {e}"));
        }
    }

    /// The node the clients believe leads, or any node up.
    fn target(&self, rng: &mut StdRng) -> Option<Target> {
        let targets = lock(&self.targets);
        let leader = targets
            .values()
            .find_map(|(_, raft)| raft.metrics().borrow_watched().current_leader)
            .filter(|l| targets.contains_key(l));
        let ids: Vec<NodeId> = targets.keys().copied().collect();
        let pick = match leader {
            Some(l) if rng.gen_range(0..100) < 85 => l,
            _ => *ids.get(rng.gen_range(0..ids.len().max(1)))?,
        };
        targets.get(&pick).map(|(t, _)| t.clone())
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Register { .. } => "RegisterFinish",
        Op::Charge => "RecoverStart",
        Op::FinishWrong => "RecoverFinish(no KE3)",
        Op::FinishRight => "RecoverFinish(KE3)",
        Op::Delete => "Delete",
        Op::Status => "Status",
    }
}

fn answer_name(a: Answer) -> &'static str {
    match a {
        Answer::Registered => "registered",
        Answer::Challenge => "challenge",
        Answer::Locked => "locked",
        Answer::WrongPassword => "wrong_password",
        Answer::Recovered { .. } => "recovered",
        Answer::Deleted => "deleted",
        Answer::NotRegistered => "not_registered",
        Answer::Active { .. } => "active",
        Answer::LockedStatus { .. } => "locked_status",
        Answer::Refused => "refused",
    }
}

/// What the nodes trust: the simulation's identity key, with the defaults.
fn identity_verifier(issuer: &SigningKey) -> anyhow::Result<vault_proto::token::Verifier> {
    use vault_proto::token::{
        jwks, Verifier, DEFAULT_AUDIENCE, DEFAULT_ISSUER, DEFAULT_MAX_LIFETIME_SECS,
    };
    Ok(Verifier::from_jwks(
        &jwks(&[*issuer.verifying_key()]),
        DEFAULT_AUDIENCE,
        DEFAULT_ISSUER,
        DEFAULT_MAX_LIFETIME_SECS,
    )?)
}

fn bearer(issuer: &SigningKey, account: usize) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    use vault_proto::token::{Issuer, DEFAULT_AUDIENCE, DEFAULT_ISSUER};
    Issuer::new(issuer, DEFAULT_ISSUER)
        .and_then(|i| {
            i.issue(
                format!("account-{account}").as_bytes(),
                DEFAULT_AUDIENCE,
                now,
                3600,
            )
        })
        .unwrap_or_default()
}

/// One simulated client: picks a free account, does something to it, tells
/// the oracle what it saw, and thinks a little.
async fn client(shared: Arc<Shared>, issuer: SigningKey, mut rng: StdRng, broken: bool) {
    let mut next_secret = 0u32;
    while !shared.stop.load(Ordering::SeqCst) && !shared.failed() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..300))).await;
        let account = {
            let mut accounts = lock(&shared.accounts);
            let free: Vec<usize> = (0..accounts.len()).filter(|i| !accounts[*i].busy).collect();
            let Some(&a) = free.get(rng.gen_range(0..free.len().max(1))) else {
                continue;
            };
            accounts[a].busy = true;
            a
        };
        let action = match rng.gen_range(0..100) {
            0..15 => {
                next_secret += 1;
                Action::Register {
                    secret: next_secret * 100 + rng.gen_range(0..100),
                    max: rng.gen_range(1..=4),
                }
            }
            15..50 => Action::RecoverRight,
            50..85 => Action::RecoverWrong,
            85..90 => Action::Delete,
            _ => Action::Status,
        };
        if let Some(target) = shared.target(&mut rng) {
            let token = bearer(&issuer, account);
            match act(&target, account, action, &token, broken).await {
                Ok(seen) => {
                    for (op, s) in seen {
                        shared.check(account, op, s);
                    }
                }
                Err(e) => shared.fail(format!("account {account}: {action:?}: {e}")),
            }
        }
        lock(&shared.accounts)[account].busy = false;
    }
}

struct Node {
    dir: PathBuf,
    db: sled::Db,
    raft: Raft,
    /// Set when the node reopened behind its token: it votes again once its
    /// log reaches this index.
    floor: Option<u64>,
    sm: StateMachine,
    kill: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

enum Place {
    Up(Box<Node>),
    /// Down; its disk is this directory.
    Down(PathBuf),
}

struct World<'a> {
    fx: &'a Fixture,
    opts: Options,
    rng: StdRng,
    net: SimNet,
    dir: PathBuf,
    nodes: BTreeMap<NodeId, Place>,
    checkpoints: BTreeMap<NodeId, Vec<PathBuf>>,
    /// A replica whose disk was rolled back, until it holds this applied
    /// index again: only one at a time (a minority).
    degraded: Option<(NodeId, u64)>,
    dirs_made: u64,
    faults: BTreeMap<String, u64>,
    shared: Arc<Shared>,
    last_leader: Option<(u64, NodeId)>,
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Opens a replica's sled store. A store just closed by this process can
/// still be locked for a moment while sled's own threads let go of it (seen
/// under load): that is retried, for up to 10 s of real time (the simulated
/// clock does not move meanwhile).
fn open_disk(dir: &Path) -> sled::Result<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(dir).flush_every_ms(None).open() {
            // sled reports it as an `Other` I/O error naming the lock.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// The name a replica's Raft state goes by in the sled store and the token.
fn replica_name(id: NodeId) -> String {
    format!("sim-n{id}")
}

impl<'a> World<'a> {
    fn fresh_dir(&mut self, id: NodeId, what: &str) -> PathBuf {
        self.dirs_made += 1;
        self.dir.join(format!("n{id}-{what}-{}", self.dirs_made))
    }

    fn fault(&mut self, kind: &str, detail: String) {
        *self.faults.entry(kind.to_owned()).or_default() += 1;
        self.shared.log(format!("fault: {kind} {detail}"));
    }

    async fn open_node(&mut self, id: NodeId, dir: PathBuf) -> anyhow::Result<Node> {
        let db = open_disk(&dir)?;
        let name = replica_name(id);
        let p = self.fx.partition.clone();
        let storage =
            hsm_vault::replication::open_replica(&db, p.clone(), &name, GROUP, Flush::Inline)
                .map_err(anyhow::Error::msg)?;
        if let Some(found) = &storage.resynced {
            self.shared.log(format!(
                "node {id}: disk does not match its token ({found}): resyncing"
            ));
        }
        let (log, sm) = (storage.log, storage.sm);
        let floor = log.resync_floor();
        let config = raft_config(
            self.opts.snapshot_every,
            hsm_vault::replication::HEARTBEAT_MS,
            hsm_vault::replication::WRITE_LINGER_MS,
        )?;
        let net = NodeNet {
            net: self.net.clone(),
            me: id,
        };
        let raft = start_raft(id, config, net, log, sm.clone(), floor).await?;
        let replica = |raft: &Raft| {
            Replica::new(
                (id, GROUP),
                raft.clone(),
                sm.clone(),
                Geography::new(id, None, None),
                BTreeMap::new(),
                Channels::default(),
            )
        };
        let service = VaultService::new(
            p.clone(),
            Backend::Replicated(replica(&raft)),
            Authorizer::new(identity_verifier(&self.fx.issuer)?),
        )?;
        let broken = if self.opts.broken == Some(BrokenKind::EarlyKe2) {
            Some(Arc::new(Broken::new(
                p,
                Backend::Replicated(replica(&raft)),
            )?))
        } else {
            None
        };
        let map_task = tokio::spawn(hsm_vault::replication::keep_map_adopted(
            raft.clone(),
            sm.clone(),
            id,
            ShardMap::even(1, &[GROUP]),
        ));
        let check_task = tokio::spawn(hsm_vault::replication::keep_state_checked(
            raft.clone(),
            sm.clone(),
            id,
        ));
        self.net.attach(
            id,
            Endpoint {
                raft: raft.clone(),
                resync_floor: floor,
                inbox: Arc::new(SnapshotInbox::new(raft.clone(), sm.clone())),
            },
        );
        let (kill, down) = watch::channel(false);
        lock(&self.shared.targets).insert(
            id,
            (
                Target {
                    service,
                    broken,
                    down,
                },
                raft.clone(),
            ),
        );
        Ok(Node {
            dir,
            db,
            raft,
            floor,
            sm,
            kill,
            tasks: vec![map_task, check_task],
        })
    }

    /// Stops node `id` as a crash would: its calls in flight are cut off,
    /// its Raft stops; its disk keeps what was written.
    async fn crash(&mut self, id: NodeId) -> Option<PathBuf> {
        let Some(Place::Up(node)) = self.nodes.remove(&id) else {
            return None;
        };
        let _ = node.kill.send(true);
        lock(&self.shared.targets).remove(&id);
        self.net.detach(id);
        let _ = tokio::time::timeout(Duration::from_secs(10), node.raft.shutdown()).await;
        for t in &node.tasks {
            t.abort();
        }
        // Let appends already handed to the log's flusher finish, as the
        // writes a process made before it died are on disk.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        let _ = node.db.flush();
        let disk = self.fresh_dir(id, "disk");
        if let Err(e) = copy_dir(&node.dir, &disk) {
            self.shared.fail(format!("copying node {id}'s disk: {e}"));
        }
        Some(disk)
    }

    async fn restart(&mut self, id: NodeId, disk: PathBuf) {
        match self.open_node(id, disk).await {
            Ok(node) => {
                self.nodes.insert(id, Place::Up(Box::new(node)));
            }
            Err(e) => self.shared.fail(format!("node {id} does not start: {e:#}")),
        }
    }

    fn up(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, p)| matches!(p, Place::Up(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    fn down(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, p)| matches!(p, Place::Down(_)))
            .map(|(id, _)| *id)
            .collect()
    }

    fn applied(&self, id: NodeId) -> u64 {
        match self.nodes.get(&id) {
            Some(Place::Up(n)) => n
                .raft
                .metrics()
                .borrow_watched()
                .last_applied
                .map_or(0, |l| l.index),
            _ => 0,
        }
    }

    /// The highest index the running nodes other than `id` applied: what a
    /// replica losing its state must reach again.
    fn applied_elsewhere(&self, id: NodeId) -> u64 {
        self.up()
            .into_iter()
            .filter(|o| *o != id)
            .map(|o| self.applied(o))
            .max()
            .unwrap_or(0)
    }

    fn pick(&mut self, ids: &[NodeId]) -> Option<NodeId> {
        if ids.is_empty() {
            return None;
        }
        Some(ids[self.rng.gen_range(0..ids.len())])
    }

    /// One step of the fault schedule (every 100 ms of simulated time).
    async fn faults_step(&mut self) {
        let minority = (self.opts.nodes as usize - 1) / 2;
        let roll = self.rng.gen_range(0..1000);
        match roll {
            0..25 if self.down().len() < minority => {
                if let Some(id) = self.pick(&self.up()) {
                    self.fault("crash", format!("node {id}"));
                    if let Some(disk) = self.crash(id).await {
                        self.nodes.insert(id, Place::Down(disk));
                    }
                }
            }
            25..45 if self.degraded.is_none() && self.down().is_empty() => {
                let Some(id) = self.pick(&self.up()) else {
                    return;
                };
                let target = self.applied_elsewhere(id);
                if self.crash(id).await.is_none() {
                    return;
                }
                let saved = self.checkpoints.get(&id).cloned().unwrap_or_default();
                let disk = self.fresh_dir(id, "rolled-back");
                match saved.len() {
                    n if n > 0 && self.rng.gen_range(0..100) < 70 => {
                        let from = saved[self.rng.gen_range(0..n)].clone();
                        self.fault("disk-rollback", format!("node {id} to {}", from.display()));
                        if let Err(e) = copy_dir(&from, &disk) {
                            self.shared.fail(format!("restoring a checkpoint: {e}"));
                        }
                    }
                    _ => {
                        self.fault("disk-lost", format!("node {id}"));
                        let _ = std::fs::create_dir_all(&disk);
                    }
                }
                self.degraded = Some((id, target));
                self.nodes.insert(id, Place::Down(disk));
            }
            45..80 => {
                if let Some(id) = self.pick(&self.up()) {
                    if let Some(Place::Up(node)) = self.nodes.get(&id) {
                        let _ = node.db.flush();
                        let from = node.dir.clone();
                        let to = self.fresh_dir(id, "checkpoint");
                        if copy_dir(&from, &to).is_ok() {
                            self.checkpoints.entry(id).or_default().push(to);
                        }
                    }
                }
            }
            80..110 => {
                let ids: Vec<NodeId> = (1..=self.opts.nodes).collect();
                if let Some(id) = self.pick(&ids) {
                    self.fault("partition", format!("node {id} isolated"));
                    let mut w = self.net.weather();
                    for other in ids.iter().filter(|o| **o != id) {
                        w.cut.insert((id, *other));
                        w.cut.insert((*other, id));
                    }
                    self.net.set_weather(w);
                }
            }
            110..125 => {
                let ids: Vec<NodeId> = (1..=self.opts.nodes).collect();
                let (a, b) = (self.pick(&ids), self.pick(&ids));
                if let (Some(a), Some(b)) = (a, b) {
                    if a != b {
                        self.fault("one-way-cut", format!("{a} → {b}"));
                        let mut w = self.net.weather();
                        w.cut.insert((a, b));
                        self.net.set_weather(w);
                    }
                }
            }
            125..200 if !self.net.weather().cut.is_empty() => {
                self.fault("heal", "links restored".into());
                let mut w = self.net.weather();
                w.cut.clear();
                self.net.set_weather(w);
            }
            200..225 => {
                let mut w = self.net.weather();
                w.loss = self.rng.gen_range(0..30);
                w.duplicate = self.rng.gen_range(0..25);
                w.max_delay_ms = self.rng.gen_range(1..80);
                self.fault(
                    "weather",
                    format!(
                        "loss {}%, duplicates {}%, delays ≤ {} ms",
                        w.loss, w.duplicate, w.max_delay_ms
                    ),
                );
                self.net.set_weather(w);
            }
            300..320 if self.degraded.is_none() && self.down().is_empty() => {
                self.tamper(Tamper::Splice).await
            }
            320..330 if self.degraded.is_none() && self.down().is_empty() => {
                self.tamper(Tamper::MapDeleted).await
            }
            330..340 if self.degraded.is_none() && self.down().is_empty() => {
                self.tamper(Tamper::MetaEdited).await
            }
            225..300 if !self.down().is_empty() => {
                if let Some(id) = self.pick(&self.down()) {
                    self.fault("restart", format!("node {id}"));
                    if let Some(Place::Down(disk)) = self.nodes.remove(&id) {
                        self.restart(id, disk).await;
                    }
                }
            }
            _ => {}
        }
    }

    /// Stops a replica and edits its disk as a hostile host would (see
    /// [`Tamper`]); it is restarted later by the schedule. Must be found at
    /// open (the replica resyncs), like a disk rolled back.
    async fn tamper(&mut self, kind: Tamper) {
        let Some(id) = self.pick(&self.up()) else {
            return;
        };
        let target = self.applied_elsewhere(id);
        let Some(mut disk) = self.crash(id).await else {
            return;
        };
        let name = replica_name(id);
        if kind == Tamper::MetaEdited {
            let saved = self.checkpoints.get(&id).cloned().unwrap_or_default();
            if saved.is_empty() {
                self.nodes.insert(id, Place::Down(disk));
                return;
            }
            let from = saved[self.rng.gen_range(0..saved.len())].clone();
            disk = self.fresh_dir(id, "restored");
            if let Err(e) = copy_dir(&from, &disk) {
                self.shared.fail(format!("restoring a checkpoint: {e}"));
            }
        }
        let done = edit_disk(&self.fx.partition, &disk, &name, kind);
        let reanchored = match (&done, self.opts.broken) {
            (Ok(Some(_)), Some(BrokenKind::NoAnchor)) if kind != Tamper::MetaEdited => {
                reanchor(&self.fx.partition, &disk, &name)
            }
            _ => Ok(()),
        };
        match (done, reanchored) {
            (Ok(Some(detail)), Ok(())) => {
                self.fault(kind.name(), format!("node {id}: {detail}"));
                self.degraded = Some((id, target));
            }
            (Ok(None), Ok(())) => {}
            (Err(e), _) | (_, Err(e)) => self.shared.fail(format!("editing node {id}'s disk: {e}")),
        }
        self.nodes.insert(id, Place::Down(disk));
    }

    /// Checks after every step: at most one leader per term, and whether
    /// the rolled-back replica has caught up.
    fn check_step(&mut self) {
        let mut leaders: BTreeMap<u64, NodeId> = BTreeMap::new();
        for id in self.up() {
            let Some(Place::Up(n)) = self.nodes.get(&id) else {
                continue;
            };
            let m = n.raft.metrics().borrow_watched().clone();
            if m.state == ServerState::Leader {
                if let Some(other) = leaders.insert(m.current_term, id) {
                    self.shared.fail(format!(
                        "two leaders in term {}: nodes {other} and {id}",
                        m.current_term
                    ));
                }
            }
        }
        if let Some((&term, &id)) = leaders.iter().next_back() {
            if self.last_leader != Some((term, id)) {
                self.last_leader = Some((term, id));
                self.shared.log(format!("leader: node {id}, term {term}"));
            }
        }
        if let Some((id, target)) = self.degraded {
            // Caught up as the vault itself counts it: it has applied what
            // the others had, and votes again (its log reached the floor
            // its token set).
            let voting = match self.nodes.get(&id) {
                Some(Place::Up(n)) => !hsm_vault::replication::network::resyncing(&n.raft, n.floor),
                _ => false,
            };
            if voting && self.applied(id) >= target {
                self.shared
                    .log(format!("node {id} caught up after its rollback"));
                self.degraded = None;
            }
        }
    }

    /// Heals everything and waits until every replica applied the same log.
    async fn heal_and_converge(&mut self) -> bool {
        self.net.set_weather(Weather {
            max_delay_ms: 10,
            ..Weather::default()
        });
        for id in self.down() {
            if let Some(Place::Down(disk)) = self.nodes.remove(&id) {
                self.restart(id, disk).await;
            }
        }
        self.shared
            .log("healed: every node up, every link restored".into());
        let start = tokio::time::Instant::now();
        while start.elapsed() < CONVERGE_WITHIN {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.check_step();
            let metrics: Vec<_> = self
                .nodes
                .values()
                .filter_map(|p| match p {
                    Place::Up(n) => Some(n.raft.metrics().borrow_watched().clone()),
                    Place::Down(_) => None,
                })
                .collect();
            let Some(leader) = metrics.iter().find(|m| m.state == ServerState::Leader) else {
                continue;
            };
            let Some(last) = leader.last_log_index else {
                continue;
            };
            if metrics.len() as u64 == self.opts.nodes
                && metrics
                    .iter()
                    .all(|m| m.last_applied.map(|l| l.index) == Some(last))
            {
                return true;
            }
        }
        false
    }

    /// After convergence: every replica holds the same records, and every
    /// account's status is one the model allows.
    async fn final_checks(&mut self) {
        // Every replica's records at one applied index: a write still on its
        // way when the group converged (a reset committed behind its answer,
        // or a request whose client gave up) may apply between two reads,
        // so the views are taken again until they are of the same index.
        let mut views: Vec<(NodeId, BTreeMap<[u8; 32], u64>)> = Vec::new();
        for _ in 0..50 {
            views.clear();
            let mut indexes = std::collections::BTreeSet::new();
            for (id, place) in &self.nodes {
                if let Place::Up(n) = place {
                    let applied = || n.raft.metrics().borrow_watched().last_applied;
                    let before = applied();
                    let mut records = BTreeMap::new();
                    for rid in n.sm.record_ids() {
                        if let Ok(Some((seq, _))) = n.sm.get(&rid) {
                            records.insert(rid, seq);
                        }
                    }
                    indexes.insert(before);
                    indexes.insert(applied());
                    views.push((*id, records));
                }
            }
            if indexes.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (id, place) in &self.nodes {
            if let Place::Up(n) = place {
                if n.sm.diverged() {
                    self.shared.fail(format!(
                        "replica {id}: a state check found its state different from its leader's"
                    ));
                }
            }
        }
        if let Some((first, reference)) = views.first() {
            for (id, records) in &views[1..] {
                if records != reference {
                    let differ: Vec<String> = reference
                        .keys()
                        .chain(records.keys())
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .filter(|k| reference.get(*k) != records.get(*k))
                        .map(|k| {
                            format!(
                                "{}…: {:?} vs {:?}",
                                hex::encode(&k[..4]),
                                reference.get(k),
                                records.get(k)
                            )
                        })
                        .collect();
                    self.shared.fail(format!(
                        "replicas {first} and {id} hold different records after converging: {}",
                        differ.join("; ")
                    ));
                }
            }
        }
        for account in 0..self.opts.accounts {
            // The leader may still move after converging: ask it, and again
            // (for up to 5 s) while the answer is "unavailable".
            let token = bearer(&self.fx.issuer, account);
            let mut last = None;
            for _ in 0..20 {
                let Some(target) = self.leader_target() else {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                };
                match act(&target, account, Action::Status, &token, false).await {
                    Ok(seen) if seen.iter().all(|(_, s)| *s == Seen::Unknown) => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    other => {
                        last = Some(other);
                        break;
                    }
                }
            }
            match last {
                Some(Ok(seen)) => {
                    for (op, s) in seen {
                        self.shared.check(account, op, s);
                    }
                }
                Some(Err(e)) => self
                    .shared
                    .fail(format!("account {account}: final status: {e}")),
                None => self.shared.fail(format!(
                    "account {account}: no status from the healed group in 5 s"
                )),
            }
        }
    }

    /// The node that leads now (the highest term among those that say so).
    fn leader_target(&self) -> Option<Target> {
        let leader = self
            .nodes
            .iter()
            .filter_map(|(id, p)| match p {
                Place::Up(n) => {
                    let m = n.raft.metrics().borrow_watched().clone();
                    (m.state == ServerState::Leader).then_some((m.current_term, *id))
                }
                Place::Down(_) => None,
            })
            .max()?;
        lock(&self.shared.targets)
            .get(&leader.1)
            .map(|(t, _)| t.clone())
    }

    async fn run(&mut self) {
        let ids: Vec<NodeId> = (1..=self.opts.nodes).collect();
        for id in &ids {
            // A fresh replica: no vote, no watermarks.
            let reset = self.fx.partition.session().and_then(|s| {
                for app in ["raft", "raft-sm"] {
                    s.set_app_state(&format!("hsm-vault/v1/{app}/{}", replica_name(*id)), b"")?;
                }
                Ok(())
            });
            if let Err(e) = reset {
                self.shared
                    .fail(format!("resetting node {id}'s token state: {e}"));
                return;
            }
            let disk = self.fresh_dir(*id, "disk");
            self.restart(*id, disk).await;
        }
        let members: BTreeMap<NodeId, BasicNode> = ids
            .iter()
            .map(|id| (*id, BasicNode::new(format!("sim-{id}"))))
            .collect();
        if let Some(Place::Up(first)) = self.nodes.get(&1) {
            if let Err(e) = first.raft.initialize(members).await {
                self.shared.fail(format!("initializing the group: {e}"));
            }
        }
        let mut clients = Vec::new();
        for c in 0..self.opts.clients {
            let rng = StdRng::seed_from_u64(self.rng.gen());
            clients.push(tokio::spawn(client(
                self.shared.clone(),
                self.fx.issuer.clone(),
                rng,
                self.opts.broken == Some(BrokenKind::EarlyKe2),
            )));
            let _ = c;
        }
        let steps = self.opts.load.as_millis() / 100;
        for _ in 0..steps {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.faults_step().await;
            self.check_step();
            if self.shared.failed() {
                break;
            }
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in clients {
            let _ = c.await;
        }
        if !self.shared.failed() {
            if self.heal_and_converge().await {
                self.final_checks().await;
            } else {
                self.shared.fail(format!(
                    "the healed group did not converge within {CONVERGE_WITHIN:?}"
                ));
            }
        }
        for id in ids {
            let _ = self.crash(id).await;
        }
    }
}

/// What a hostile host does to a stopped replica's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tamper {
    /// One record of the state machine put back to an older sealed copy
    /// found in the replica's own log (it unseals: its sequence number is
    /// its own), the applied index and the log left alone.
    Splice,
    /// The shard map (and a frozen map) deleted from the state machine.
    MapDeleted,
    /// The whole disk restored from an older copy, then `last_purged` in
    /// the log's metadata and `applied` in the state machine raised to the
    /// watermark the token remembers (what once passed the log's check).
    MetaEdited,
}

impl Tamper {
    fn name(self) -> &'static str {
        match self {
            Tamper::Splice => "record-splice",
            Tamper::MapDeleted => "map-deleted",
            Tamper::MetaEdited => "meta-edited",
        }
    }
}

/// Makes `kind`'s edit on the disk of replica `name`; what it did, or
/// `None` when there was nothing to edit.
fn edit_disk(
    partition: &Arc<Partition>,
    disk: &Path,
    name: &str,
    kind: Tamper,
) -> anyhow::Result<Option<String>> {
    use hsm_vault::replication::{Command, Entry};
    use openraft::EntryPayload;
    let db = open_disk(disk)?;
    let sm = db.open_tree(format!("raft-sm/{name}"))?;
    let detail = match kind {
        Tamper::Splice => {
            let log = db.open_tree(format!("raft-log/{name}"))?;
            let mut found = None;
            for item in log.iter() {
                let (_, v) = item?;
                let Ok(entry) = hsm_vault::replication::codec::decode::<Entry>(&v) else {
                    continue;
                };
                if let EntryPayload::Normal(Command::Put {
                    id, seq, sealed, ..
                }) = entry.payload
                {
                    if sm
                        .get(id)?
                        .is_some_and(|now| now.get(8..) != Some(&sealed[..]))
                    {
                        found = Some((id, seq, sealed));
                        break;
                    }
                }
            }
            let Some((id, seq, sealed)) = found else {
                return Ok(None);
            };
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&sealed);
            sm.insert(id, value)?;
            // (Not its sequence number: it comes from the clock, and the
            // trace must be the same in every run of a seed.)
            format!("record {}… back to an older copy", hex::encode(&id[..4]))
        }
        Tamper::MapDeleted => {
            if sm.remove("shard-map")?.is_none() {
                return Ok(None);
            }
            sm.remove("frozen-map")?;
            "shard map deleted".to_owned()
        }
        Tamper::MetaEdited => {
            let state = partition
                .session()?
                .app_state(&format!("hsm-vault/v1/raft/{name}"))?;
            use prost::Message;
            use vault_proto::vault::raft::v1 as pb;
            let state = pb::TokenLogState::decode(&state[..])?;
            let newest = [state.last_log, state.committed]
                .into_iter()
                .flatten()
                .max_by_key(|l| l.index);
            let Some(newest) = newest else {
                return Ok(None);
            };
            let raised = pb::Applied {
                log_id: Some(newest),
            }
            .encode_to_vec();
            db.open_tree(format!("raft-meta/{name}"))?
                .insert("last_purged", raised.clone())?;
            sm.insert("applied", raised)?;
            format!(
                "last_purged and applied raised to T{}-N{}.{}",
                newest.term, newest.node, newest.index
            )
        }
    };
    db.flush()?;
    Ok(Some(detail))
}

/// The attacker of [`BrokenKind::NoAnchor`]: makes the token vouch for the
/// state machine as it now is on `disk`.
fn reanchor(partition: &Arc<Partition>, disk: &Path, name: &str) -> anyhow::Result<()> {
    let db = open_disk(disk)?;
    hsm_vault::replication::state_machine::vouch_for_disk_state(
        &db,
        name,
        GROUP,
        partition.clone(),
    )?;
    Ok(())
}

/// FNV-1a: a digest that is the same in every process.
fn digest(lines: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in lines {
        for b in line.as_bytes().iter().chain(b"\n") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Runs one seed to the end and reports what happened.
pub fn run_seed(fx: &Fixture, seed: u64, opts: &Options) -> Outcome {
    let dir = fx.root.path().join(format!("seed-{seed}"));
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    // Which branch of a `select!` goes first is tokio's own random choice.
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                seed,
                figures: Figures::default(),
                digest: 0,
                violation: Some(format!("no runtime: {e}")),
                trace: Vec::new(),
            }
        }
    };
    hsm_vault::replication::runtime::seed_this_thread(seed);
    let (shared, faults, simulated, counters) = runtime.block_on(async {
        let shared = Arc::new(Shared {
            targets: Mutex::new(BTreeMap::new()),
            accounts: Mutex::new(
                (0..opts.accounts)
                    .map(|_| Slot {
                        model: Account::default(),
                        busy: false,
                    })
                    .collect(),
            ),
            trace: Mutex::new(Vec::new()),
            violation: Mutex::new(None),
            checked: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            start: tokio::time::Instant::now(),
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let net = SimNet::new(StdRng::seed_from_u64(rng.gen()));
        let mut world = World {
            fx,
            opts: opts.clone(),
            rng,
            net: net.clone(),
            dir: dir.clone(),
            nodes: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            degraded: None,
            dirs_made: 0,
            faults: BTreeMap::new(),
            shared: shared.clone(),
            last_leader: None,
        };
        world.run().await;
        let simulated = shared.start.elapsed();
        (shared, world.faults, simulated, net.counters())
    });
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    let trace = std::mem::take(&mut *lock(&shared.trace));
    let checked = lock(&shared.checked).clone();
    let violation = lock(&shared.violation).clone();
    let (messages, lost, duplicated) = counters;
    Outcome {
        seed,
        figures: Figures {
            seeds: 1,
            faults,
            checked,
            messages,
            lost,
            duplicated,
            simulated,
        },
        digest: digest(&trace),
        violation,
        trace,
    }
}
