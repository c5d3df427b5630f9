//! Replication groundwork (issue 3): the Raft types of a replica group and
//! its storage on sled, with the Raft vote and commit watermark kept in the
//! token where the host cannot roll them back.
//!
//! Design (see ARCHITECTURE.md, *Replication*): every state change of the
//! vault is a [`Command`] — a compare-and-set of one sealed record — so a
//! leader whose view of a record is stale cannot commit a charge computed
//! from it: the state machine refuses a command whose expected sequence
//! number is not the record's current one, and the leader releases a KE2
//! only for a command that committed *and* applied.
//!
//! A fleet may run several groups, each holding the records of its slots
//! of the shard map ([`crate::shard`]); each group commits the map it serves
//! in its own log ([`Command::AdoptMap`]).

pub mod codec;
pub mod inbox;
pub mod log_store;
pub mod network;
pub mod operator;
pub mod runtime;
pub mod state_machine;

use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};

use crate::shard::ShardMap;

/// A replicated change to the record store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store `sealed` (a record sealed by the token at `seq`) for `id`, if
    /// the record's current sequence number is `expect` (`None`: absent).
    Put {
        id: [u8; 32],
        expect: Option<u64>,
        seq: u64,
        sealed: Vec<u8>,
    },
    /// Remove the record of `id`, if its current sequence number is
    /// `expect`.
    Delete { id: [u8; 32], expect: Option<u64> },
    /// Adopt a newer version of the fleet's shard map. Refused if it is not
    /// newer, if it takes slots from this group that were not frozen for
    /// exactly this map, or if it gives slots to this group (that takes an
    /// [`Command::Import`]). Adopting a map that takes frozen slots away
    /// drops their records.
    AdoptMap { map: ShardMap },
    /// First step of moving slots out of this group: from this entry on, the
    /// records of the slots `map` gives to other groups never change here
    /// again (writes to them are refused), so they can be copied out.
    Freeze { map: ShardMap },
    /// Records of slots `map` gives to this group, copied from the group
    /// that froze them; with `last`, the group adopts `map` and starts
    /// serving those slots.
    Import {
        map: ShardMap,
        records: Vec<ExportedRecord>,
        last: bool,
    },
    /// A leader's statement of its state: after applying entry `index`,
    /// its state digest ([`crate::core::replica`]) was `digest`. Every
    /// replica compares it with its own digest at that index; one that
    /// differs has diverged from its group (its state was changed behind the
    /// vault's back while it ran, or by a bug) and stops serving from it.
    /// Always applies as [`Applied::Done`].
    Check { index: u64, digest: [u8; 32] },
}

/// What a log shows of a command: its kind and record, never sealed bytes.
impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |id: &[u8; 32]| hex::encode(&id[..4]);
        match self {
            Command::Put {
                id, expect, seq, ..
            } => {
                write!(f, "put {}… seq {seq} (expect {expect:?})", short(id))
            }
            Command::Delete { id, expect } => {
                write!(f, "delete {}… (expect {expect:?})", short(id))
            }
            Command::AdoptMap { map } => write!(f, "adopt map v{}", map.version),
            Command::Freeze { map } => write!(f, "freeze for map v{}", map.version),
            Command::Import { map, records, last } => write!(
                f,
                "import {} records for map v{}{}",
                records.len(),
                map.version,
                if *last { " (last)" } else { "" }
            ),
            Command::Check { index, .. } => write!(f, "state check at {index}"),
        }
    }
}

/// One record on its way between groups: id, sequence number, sealed bytes.
pub type ExportedRecord = ([u8; 32], u64, Vec<u8>);

/// The state machine's answer to one log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Applied (or a membership / blank entry).
    #[default]
    Done,
    /// Refused: the record's sequence number was not the expected one.
    Conflict { current: Option<u64> },
    /// Refused for the reason given (a shard map that may not be adopted).
    Refused(String),
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Applied::Done => f.write_str("done"),
            Applied::Conflict { current } => write!(f, "conflict (current {current:?})"),
            Applied::Refused(reason) => write!(f, "refused: {reason}"),
        }
    }
}

openraft::declare_raft_types!(
    /// Raft types of a vault replica group.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        AsyncRuntime = runtime::VaultRuntime,
);

pub type NodeId = u64;

/// A log entry's id: the leader's term and node, and its index.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote (term, candidate, whether committed).
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// The membership a replica has applied, with the id of its entry.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A snapshot's data: the bytes described at [`state_machine::SNAPSHOT_MAGIC`].
pub type SnapshotData = std::io::Cursor<Vec<u8>>;
/// A snapshot: metadata and data.
pub type VaultSnapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
/// The id of entry `index` written by leader `node` in term `term`.
pub fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    openraft::LogId {
        leader_id: openraft::impls::leader_id_adv::LeaderId {
            term,
            node_id: node,
        },
        index,
    }
}

/// A replica group's Raft.
pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;

/// What a replica's storage needs of its token: MACs (through a session)
/// and small state kept where the host cannot roll it back. The partition
/// is the one implementation the vault runs; the fuzz targets use a
/// software token.
pub trait ReplicaToken: Clone + Send + Sync + 'static {
    type Session: crate::core::Token + Send;
    fn session(&self) -> Result<Self::Session, crate::partition::PartitionError>;
    fn app_state(&self, app: &str) -> Result<Vec<u8>, crate::partition::PartitionError>;
    fn set_app_state(
        &self,
        app: &str,
        state: &[u8],
    ) -> Result<(), crate::partition::PartitionError>;
}

impl ReplicaToken for std::sync::Arc<crate::partition::Partition> {
    type Session = crate::partition::PartitionSession;
    fn session(&self) -> Result<Self::Session, crate::partition::PartitionError> {
        crate::partition::Partition::session(self)
    }
    fn app_state(&self, app: &str) -> Result<Vec<u8>, crate::partition::PartitionError> {
        crate::partition::Partition::session(self)?.app_state(app)
    }
    fn set_app_state(
        &self,
        app: &str,
        state: &[u8],
    ) -> Result<(), crate::partition::PartitionError> {
        crate::partition::Partition::session(self)?.set_app_state(app, state)
    }
}

/// How a replica waits for sled to make its writes durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flush {
    /// On sled's own threads, the runtime's worker free meanwhile (nodes).
    #[default]
    Background,
    /// On the calling thread: the deterministic simulation, whose paused
    /// clock would jump ahead while a wake-up from another thread is due.
    Inline,
}

impl Flush {
    pub async fn tree(self, tree: &sled::Tree) -> sled::Result<()> {
        match self {
            Flush::Background => tree.flush_async().await.map(|_| ()),
            Flush::Inline => tree.flush().map(|_| ()),
        }
    }
}

/// The heartbeat of a group whose members are close (the simulation's, and
/// the floor of every group's).
pub const HEARTBEAT_MS: u64 = 100;

/// How long a leader waits for more writes before it appends what it has
/// (openraft's `api_batch_linger_ms`). Each append costs every replica a
/// sled flush and a token label write, and each apply another pair,
/// whatever the number of entries: gathering writes for 10 ms made a
/// recovery cost a 3-node group 2,093 µs of CPU instead of 3,690 (issue 15,
/// docs/BENCHMARKS.md), for at most 10 ms more per write.
pub const WRITE_LINGER_MS: u64 = 10;

/// The heartbeat for a group whose longest round trip between members is
/// `round_trip`: openraft gives every heartbeat (a one-frame AppendEntries
/// stream, which also serves a read's leadership check) one heartbeat
/// interval to be answered, so
/// the interval must exceed the round trip, with room for the work at the
/// far end. Otherwise a leader in a far region never hears back in time and
/// the group stalls (while its heartbeats keep the followers from electing
/// another).
pub fn heartbeat_for(round_trip: std::time::Duration) -> u64 {
    let rtt = u64::try_from(round_trip.as_millis()).unwrap_or(u64::MAX);
    HEARTBEAT_MS.max(rtt.saturating_mul(5) / 4 + 100)
}

/// Starts the Raft of a replica opened by [`open_replica`] (a node and the
/// simulation both start theirs here). A replica that reopened behind its
/// token, with `resync_floor`, does not stand for election until its log
/// reaches the floor ([`network::elect_once_caught_up`]).
pub async fn start_raft<N, LS>(
    id: u64,
    mut config: openraft::Config,
    network: N,
    log: LS,
    sm: state_machine::StateMachine,
    resync_floor: Option<u64>,
) -> Result<Raft, openraft::error::Fatal<TypeConfig>>
where
    N: openraft::network::RaftNetworkFactory<TypeConfig>,
    N::Network: openraft::network::NetSnapshot<TypeConfig, SnapshotData = std::io::Cursor<Vec<u8>>>,
    LS: openraft::storage::RaftLogStorage<TypeConfig>,
{
    config.enable_elect = resync_floor.is_none();
    let raft = Raft::new(id, std::sync::Arc::new(config), network, log, sm).await?;
    network::elect_once_caught_up(&raft, resync_floor);
    Ok(raft)
}

/// How long one snapshot chunk may take to be sent and taken.
pub const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 10_000;

/// The Raft settings of every replica group (nodes and the simulation):
/// heartbeats every `heartbeat_ms` (see [`heartbeat_for`]; 100 ms in one
/// region), elections after 5–10 heartbeats of silence (at least
/// 0.5–1 s), a snapshot every
/// `snapshot_every` entries (the log then keeps at most 1,000 behind it),
/// snapshots sent in binary chunks well under the largest Raft message
/// (see `network.rs`), and the leader gathering writes for up to
/// `write_linger_ms` into one append (see [`WRITE_LINGER_MS`]).
pub fn raft_config(
    snapshot_every: u64,
    heartbeat_ms: u64,
    write_linger_ms: u64,
) -> Result<openraft::Config, openraft::ConfigError> {
    let heartbeat = heartbeat_ms.max(1);
    let election = heartbeat.saturating_mul(5).max(500);
    openraft::Config {
        cluster_name: "hsm-vault".into(),
        heartbeat_interval: heartbeat,
        election_timeout_min: election,
        election_timeout_max: election.saturating_mul(2),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: snapshot_every.min(1000),
        allow_log_reversion: Some(true),
        api_batch_linger_ms: write_linger_ms,
        // Per snapshot chunk (4 MiB, `network::SNAPSHOT_CHUNK`); openraft's
        // 200 ms is less than such a chunk takes on a loaded node or a slow
        // link, and every timeout restarts the transfer from its start.
        install_snapshot_timeout: SNAPSHOT_CHUNK_TIMEOUT_MS,
        ..Default::default()
    }
    .validate()
}

/// A replica's Raft storage, opened and checked against its token.
#[derive(Debug)]
pub struct ReplicaStorage {
    pub log: log_store::LogStore,
    pub sm: state_machine::StateMachine,
    /// Set when the replica's disk did not match its token: what was found.
    /// Its log and state machine were erased; it resyncs from its peers and
    /// does not vote until its log reaches [`log_store::LogStore::resync_floor`].
    pub resynced: Option<String>,
}

/// Opens the log and state machine of the replica `name` of group `group`
/// and checks both against the token: the log must still hold the entries
/// the token remembers, and the state machine must be the state the token
/// vouches for. If either check fails, the replica's Raft state is erased
/// (nothing stale is ever served, acknowledged or voted with) and it
/// resyncs from its peers.
pub fn open_replica(
    db: &sled::Db,
    partition: std::sync::Arc<crate::partition::Partition>,
    name: &str,
    group: crate::shard::GroupId,
    flush: Flush,
) -> Result<ReplicaStorage, String> {
    use log_store::{LogOpenError, LogStore};
    use state_machine::{SmOpenError, StateMachine};
    let sm = StateMachine::unchecked(db, name, group, partition.clone())
        .map_err(|e| e.to_string())?
        .flushing(flush);
    let (mut found, behind) = match sm.verify() {
        Ok(behind) => (None, behind),
        Err(e @ SmOpenError::Mismatch { .. }) => (Some(e.to_string()), None),
        Err(e) => return Err(e.to_string()),
    };
    let log = match LogStore::open(db, partition.clone(), name) {
        // The state machine is one apply behind its token: fine if the log
        // can apply the rest again (a crash before that apply's flush);
        // not if those entries were purged (a host put the older state
        // back after a snapshot, or after the disk was lost).
        Ok(log)
            if found.is_none()
                && behind.is_some_and(|applied| !log.replays_after(applied).unwrap_or(false)) =>
        {
            found = Some(
                "the state machine is the state before the token's last apply, and the log no \
                 longer holds the entries to apply again"
                    .to_owned(),
            );
            LogStore::open_resync(db, partition.clone(), name, &[]).map_err(|e| e.to_string())?
        }
        Ok(log) if found.is_none() => log,
        Ok(_) => {
            LogStore::open_resync(db, partition.clone(), name, &[]).map_err(|e| e.to_string())?
        }
        Err(e @ LogOpenError::RolledBack { .. }) => {
            found.get_or_insert(e.to_string());
            LogStore::open_resync(db, partition.clone(), name, &[]).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    }
    .flushing(flush);
    if found.is_some() {
        sm.erase().map_err(|e| e.to_string())?;
    }
    Ok(ReplicaStorage {
        log,
        sm,
        resynced: found,
    })
}

/// A storage failure as openraft takes it: an `io::Error` carrying what
/// failed.
fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// How often a leader states its state digest ([`Command::Check`]) while
/// entries are applied: a divergence is found within this (plus a round
/// trip), and an idle group writes nothing.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs for the life of the node: while it leads and entries were applied
/// since its last statement, commits a [`Command::Check`] of its state
/// digest every [`CHECK_EVERY`], for every replica to compare with its own.
pub async fn keep_state_checked(raft: Raft, sm: state_machine::StateMachine, me: NodeId) {
    let mut stated = 0;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        if raft.metrics().borrow_watched().current_leader != Some(me) {
            continue;
        }
        let (index, digest) = sm.state_digest().await;
        if index <= stated {
            continue;
        }
        match raft.client_write(Command::Check { index, digest }).await {
            Ok(_) => stated = index + 1,
            Err(e) => tracing::debug!(error = %e, "state check not committed; retrying"),
        }
    }
}

/// Runs for the life of the node: whenever this node leads its group and
/// the group's adopted shard map is older than `map` (the fleet file's),
/// proposes `map` through the log. A map the group refuses (one that moves
/// slots) is reported once and not proposed again.
pub async fn keep_map_adopted(
    raft: Raft,
    sm: state_machine::StateMachine,
    me: NodeId,
    map: ShardMap,
) {
    let mut refused = false;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let leading = raft.metrics().borrow_watched().current_leader == Some(me);
        let adopted = match sm.shard_map() {
            Ok(m) => m.map_or(0, |m| m.version),
            Err(_) => continue,
        };
        if refused || !leading || adopted >= map.version {
            continue;
        }
        let proposed = raft
            .client_write(Command::AdoptMap { map: map.clone() })
            .await;
        match proposed.map(|r| r.data) {
            Ok(Applied::Refused(reason)) => {
                tracing::error!(version = map.version, %reason, "the group refused the fleet's shard map");
                refused = true;
            }
            Ok(_) => tracing::info!(version = map.version, "shard map adopted"),
            Err(e) => tracing::debug!(error = %e, "shard map not adopted yet; retrying"),
        }
    }
}
