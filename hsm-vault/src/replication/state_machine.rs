//! The replicated state machine in sled: sealed records and their sequence
//! numbers, applied from committed [`Command`]s as compare-and-set writes,
//! with the applied state anchored in the token.
//!
//! Layout of the group's tree (keys of distinct lengths):
//! `id (32 B) → seq:u64be || sealed record`, `"applied"` → last applied log
//! id, `"membership"` → last membership, `"shard-map"` → the adopted shard
//! map, `"frozen-map"` → the map of a move out of this group in progress,
//! `"snapshot"` / `"snapshot-data"` → the current snapshot.
//!
//! Invariants:
//! - **The token vouches for the applied state.** It keeps, under
//!   `hsm-vault/v1/raft-sm/<name>`, the applied log id and the digest of
//!   the records, maps and membership ([`crate::core::replica`]) of the
//!   state as it is durable (`current`), and, while an apply is being made
//!   durable, of the state after it (`next`). An apply records `next` in the
//!   token, writes its batch and flushes: after a crash the tree is one of
//!   the two. [`StateMachine::open`] recomputes the digest and refuses a tree
//!   that is neither (one record spliced from an older copy, a map deleted,
//!   `applied` edited, a whole older disk): the replica must be resynced.
//! - One apply call is one atomic sled batch and one token update; applies,
//!   snapshot builds and installs take turns (one lock), so a snapshot is
//!   the state at exactly its `last_applied`.
//! - **Snapshots carry a token MAC** over the group, the applied log id,
//!   the state digest and the header; [`RaftStateMachine::install_snapshot`]
//!   recomputes the digest from the data, checks the MAC with its own token
//!   (the key is the fleet's), and puts the header's maps through the rules
//!   of [`installable`] before anything is written.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use vault_proto::vault::raft::v1 as pb;

use super::codec::{self, Wire, WireError};
use super::{
    io_error, Applied, Command, Entry, ExportedRecord, LogId, ReplicaToken, SnapshotData,
    SnapshotMeta, StoredMembership, TypeConfig, VaultSnapshot,
};
use crate::core::memo::{MacMemo, Toggle};
use crate::core::replica::{snapshot_mac, AppliedAt, Part, StateDigest};
use crate::shard::{slot, GroupId, ShardMap};

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const SNAPSHOT: &[u8] = b"snapshot";
const SHARD_MAP: &[u8] = b"shard-map";
const FROZEN: &[u8] = b"frozen-map";

type Membership = StoredMembership;

/// What a snapshot holds besides the records.
#[derive(Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    last_applied: Option<LogId>,
    membership: Membership,
    shard_map: Option<ShardMap>,
    frozen: Option<ShardMap>,
}

impl SnapshotHeader {
    /// The shard map the snapshot's group had adopted.
    pub fn shard_map(&self) -> Option<&ShardMap> {
        self.shard_map.as_ref()
    }
}

/// `vault.raft.v1.SnapshotHeader`.
impl Wire for SnapshotHeader {
    type Proto = pb::SnapshotHeader;
    fn to_proto(&self) -> pb::SnapshotHeader {
        pb::SnapshotHeader {
            last_applied: codec::opt_log_id_to(&self.last_applied),
            membership: Some(self.membership.to_proto()),
            shard_map: self.shard_map.as_ref().map(Wire::to_proto),
            frozen: self.frozen.as_ref().map(Wire::to_proto),
        }
    }
    fn from_proto(p: pb::SnapshotHeader) -> Result<Self, WireError> {
        Ok(SnapshotHeader {
            last_applied: codec::opt_log_id_from(p.last_applied),
            membership: Membership::from_proto(p.membership.unwrap_or_default())?,
            shard_map: p.shard_map.map(ShardMap::from_proto).transpose()?,
            frozen: p.frozen.map(ShardMap::from_proto).transpose()?,
        })
    }
}

/// Snapshot data, binary so that a million records stay a few hundred
/// megabytes: `SNAPSHOT_MAGIC`, the token MAC (32 bytes, see
/// [`crate::core::replica::snapshot_mac`]), the header's length (u32
/// big-endian), the header (`vault.raft.v1.SnapshotHeader`), then each record as id (32 bytes),
/// sequence number (u64 big-endian), sealed length (u16 big-endian) and the
/// sealed bytes.
pub const SNAPSHOT_MAGIC: &[u8; 4] = b"HVS3";

/// The stored snapshot's metadata (its data is under `SNAPSHOT_DATA`).
struct StoredSnapshot {
    meta: SnapshotMeta,
}

/// `vault.raft.v1.StoredSnapshot`.
impl Wire for StoredSnapshot {
    type Proto = pb::StoredSnapshot;
    fn to_proto(&self) -> pb::StoredSnapshot {
        pb::StoredSnapshot {
            meta: Some(codec::snapshot_meta_to(&self.meta)),
        }
    }
    fn from_proto(p: pb::StoredSnapshot) -> Result<Self, WireError> {
        Ok(StoredSnapshot {
            meta: codec::snapshot_meta_from(p.meta.ok_or(WireError::Missing("snapshot meta"))?)?,
        })
    }
}

const SNAPSHOT_DATA: &[u8] = b"snapshot-data";

/// A record in snapshot data: id, sequence number, sealed bytes.
pub type SnapshotRecord<'a> = ([u8; 32], u64, &'a [u8]);

/// Snapshot data, parsed (nothing checked but the layout).
#[derive(Debug)]
pub struct ParsedSnapshot<'a> {
    pub mac: [u8; 32],
    pub header: SnapshotHeader,
    /// The header as it was MAC'd.
    pub header_bytes: &'a [u8],
    pub records: Vec<SnapshotRecord<'a>>,
}

/// Reads snapshot data back: the MAC, the header and the records, in order.
pub fn parse_snapshot(data: &[u8]) -> Result<ParsedSnapshot<'_>, std::io::Error> {
    let bad = |what: &str| io_error(format!("snapshot data: {what}"));
    let rest = data
        .strip_prefix(&SNAPSHOT_MAGIC[..])
        .ok_or_else(|| bad("unknown format"))?;
    let (mac, rest) = rest
        .split_at_checked(32)
        .ok_or_else(|| bad("truncated MAC"))?;
    let mac: [u8; 32] = mac.try_into().map_err(|_| bad("MAC"))?;
    let (len, rest) = rest
        .split_at_checked(4)
        .ok_or_else(|| bad("truncated header"))?;
    let len = u32::from_be_bytes(len.try_into().map_err(|_| bad("header length"))?) as usize;
    let (header_bytes, mut rest) = rest
        .split_at_checked(len)
        .ok_or_else(|| bad("truncated header"))?;
    let header: SnapshotHeader = codec::decode(header_bytes)?;
    let mut records = Vec::new();
    while !rest.is_empty() {
        let (fixed, tail) = rest
            .split_at_checked(42)
            .ok_or_else(|| bad("truncated record"))?;
        let id: [u8; 32] = fixed[..32].try_into().map_err(|_| bad("record id"))?;
        let seq = u64::from_be_bytes(fixed[32..40].try_into().map_err(|_| bad("record seq"))?);
        let n = usize::from(u16::from_be_bytes(
            fixed[40..42].try_into().map_err(|_| bad("record length"))?,
        ));
        let (sealed, tail) = tail
            .split_at_checked(n)
            .ok_or_else(|| bad("truncated record"))?;
        records.push((id, seq, sealed));
        rest = tail;
    }
    Ok(ParsedSnapshot {
        mac,
        header,
        header_bytes,
        records,
    })
}

/// The ids of the records in the state machine `name` of a store, read
/// without a token and without any check (for tests and audits of what is
/// on a stopped node's disk).
pub fn record_ids_in(db: &sled::Db, name: &str) -> sled::Result<Vec<[u8; 32]>> {
    Ok(db
        .open_tree(format!("raft-sm/{name}"))?
        .iter()
        .keys()
        .flatten()
        .filter_map(|k| <[u8; 32]>::try_from(k.as_ref()).ok())
        .collect())
}

/// Makes the token vouch for the state machine `name` exactly as it is on
/// disk now. Never called by a node: it is for tools that build a replica's
/// state outside the log (the benchmark's filler records, written into
/// every member as if replicated) and for the simulation's broken variant
/// (a replica that never checked its state). Like every token operation,
/// it needs the token's PIN.
pub fn vouch_for_disk_state<K: ReplicaToken>(
    db: &sled::Db,
    name: &str,
    group: GroupId,
    token: K,
) -> Result<(), SmOpenError> {
    let failed = |e: std::io::Error| SmOpenError::Storage(e.to_string());
    let sm = StateMachine::unchecked(db, name, group, token)?;
    let state = sm.scan().map_err(failed)?;
    sm.set_token_state(&TokenSmState {
        current: state,
        next: None,
    })
    .map_err(failed)
}

/// One point of the applied state: what the token vouches for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Anchor {
    applied: Option<LogId>,
    digest: StateDigest,
}

/// The token's record of one replica's state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TokenSmState {
    current: Anchor,
    /// The state an apply in progress leads to (durable or not yet).
    next: Option<Anchor>,
}

fn anchor_to(a: &Anchor) -> pb::Anchor {
    pb::Anchor {
        applied: codec::opt_log_id_to(&a.applied),
        digest: a.digest.0.to_vec(),
    }
}

fn anchor_from(p: pb::Anchor) -> Result<Anchor, WireError> {
    let digest =
        p.digest.as_slice().try_into().map_err(|_| {
            WireError::Invalid(format!("a state digest of {} bytes", p.digest.len()))
        })?;
    Ok(Anchor {
        applied: codec::opt_log_id_from(p.applied),
        digest: StateDigest(digest),
    })
}

/// The token's state (`vault.raft.v1.TokenSmState`).
impl Wire for TokenSmState {
    type Proto = pb::TokenSmState;
    fn to_proto(&self) -> pb::TokenSmState {
        pb::TokenSmState {
            current: Some(anchor_to(&self.current)),
            next: self.next.as_ref().map(anchor_to),
        }
    }
    fn from_proto(p: pb::TokenSmState) -> Result<Self, WireError> {
        Ok(TokenSmState {
            current: anchor_from(p.current.ok_or(WireError::Missing("current anchor"))?)?,
            next: p.next.map(anchor_from).transpose()?,
        })
    }
}

/// Why a state machine cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SmOpenError {
    #[error(
        "the state machine does not match what the token vouches for (applied index {tree} on \
         disk, {token} in the token; a record, a map or the applied index was changed or rolled \
         back): this replica must be resynced from its peers"
    )]
    Mismatch { tree: u64, token: u64 },
    #[error("state machine storage: {0}")]
    Storage(String),
}

fn applied_at(id: Option<LogId>) -> Option<AppliedAt> {
    id.map(|l| AppliedAt {
        index: l.index,
        term: l.leader_id.term,
        node: l.leader_id.node_id,
    })
}

/// One replica's state machine.
#[derive(Clone)]
pub struct StateMachine<K: ReplicaToken = Arc<crate::partition::Partition>> {
    tree: sled::Tree,
    /// The replica group this state machine belongs to.
    group: GroupId,
    flush: super::Flush,
    token: K,
    /// Application name of this state machine's anchor in the token.
    app: String,
    /// What the clones of this state machine share.
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The anchor of the durable state; held by applies, installs and
    /// snapshot builds, which therefore take turns.
    anchor: tokio::sync::Mutex<Anchor>,
    /// The state digest after each recent applied entry, oldest first (at
    /// most [`DIGEST_HISTORY`]), for [`Command::Check`].
    history: std::sync::Mutex<std::collections::VecDeque<(u64, StateDigest)>>,
    /// Set when a [`Command::Check`] found this replica's state different
    /// from its leader's at the same index.
    diverged: std::sync::atomic::AtomicBool,
    /// The last snapshot [`StateMachine::check_snapshot`] passed.
    vetted: std::sync::Mutex<Option<VettedSnapshot>>,
    /// The MACs of the record values applied last, for the digest.
    memo: std::sync::Mutex<MacMemo>,
}

/// How many applied entries' digests a replica remembers for
/// [`Command::Check`]: a leader states the digest of an index it had just
/// applied, which the followers apply within a round trip; far more than a
/// group applies in that time.
const DIGEST_HISTORY: usize = 4096;

impl<K: ReplicaToken> std::fmt::Debug for StateMachine<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("group", &self.group)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

fn sm_err(e: impl std::error::Error + 'static) -> std::io::Error {
    io_error(e)
}

fn sm_fail(what: impl Into<String>) -> std::io::Error {
    sm_err(std::io::Error::other(what.into()))
}

/// The value under `key`, decoded (`vault.raft.v1`).
fn get_value<T: Wire>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, std::io::Error> {
    match tree.get(key).map_err(sm_err)? {
        Some(v) => Ok(Some(codec::decode(&v).map_err(sm_err)?)),
        None => Ok(None),
    }
}

/// A value's encoding as stored (`vault.raft.v1`); what the state digest
/// covers of the membership and the shard maps.
fn value<T: Wire>(v: &T) -> Result<Vec<u8>, std::io::Error> {
    Ok(codec::encode(v))
}

fn split_value(v: &[u8]) -> Option<(u64, &[u8])> {
    let (seq, sealed) = v.split_at_checked(8)?;
    Some((u64::from_be_bytes(seq.try_into().ok()?), sealed))
}

fn record_value(seq: u64, sealed: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + sealed.len());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(sealed);
    v
}

/// The membership part of the digest: the stored one, or the empty one
/// when none was applied yet (as a snapshot installs it).
fn membership_bytes(stored: Option<&[u8]>) -> Result<Vec<u8>, std::io::Error> {
    match stored {
        Some(b) => Ok(b.to_vec()),
        None => value(&Membership::default()),
    }
}

/// A record's current value during an apply: this batch's, else the tree's.
type Pending = HashMap<[u8; 32], Option<(u64, Vec<u8>)>>;

/// Token work of one apply, batch or install: toggles parts in a digest.
struct Toggler<'a, K: ReplicaToken> {
    session: K::Session,
    group: GroupId,
    digest: &'a mut StateDigest,
    memo: &'a std::sync::Mutex<MacMemo>,
}

impl<K: ReplicaToken> Toggler<'_, K> {
    fn part(&mut self, part: Part<'_>) -> Result<(), std::io::Error> {
        self.digest
            .toggle(&self.session, self.group, part)
            .map_err(sm_err)
    }

    /// Toggles a record's value in (a write) or out (what it replaced); the
    /// MAC of a value toggled in is kept until that value is toggled out.
    fn record(
        &mut self,
        id: &[u8; 32],
        value: Option<&(u64, Vec<u8>)>,
        toggle: Toggle,
    ) -> Result<(), std::io::Error> {
        let Some((seq, sealed)) = value else {
            return Ok(());
        };
        let part = Part::Record {
            id,
            seq: *seq,
            sealed,
        };
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        self.digest
            .toggle_memo(&self.session, self.group, part, &mut memo, toggle)
            .map_err(sm_err)
    }
}

impl<K: ReplicaToken> StateMachine<K> {
    /// Opens the state machine of replica group `group` (tree and token
    /// state named `name`) and checks it against the token's anchor.
    ///
    /// A tree that is the state before the token's last recorded apply is
    /// accepted here (Raft re-applies the rest from its log); a replica
    /// opens through [`super::open_replica`], which also checks that its log
    /// can.
    pub fn open(db: &sled::Db, name: &str, group: GroupId, token: K) -> Result<Self, SmOpenError> {
        let sm = Self::unchecked(db, name, group, token)?;
        sm.verify()?;
        Ok(sm)
    }

    /// Opens the state machine without checking it: only to [`Self::verify`]
    /// it, or to [`Self::erase`] it.
    pub(crate) fn unchecked(
        db: &sled::Db,
        name: &str,
        group: GroupId,
        token: K,
    ) -> Result<Self, SmOpenError> {
        let storage = |e: sled::Error| SmOpenError::Storage(e.to_string());
        Ok(StateMachine {
            tree: db.open_tree(format!("raft-sm/{name}")).map_err(storage)?,
            group,
            flush: super::Flush::default(),
            token,
            app: format!("hsm-vault/v1/raft-sm/{name}"),
            shared: Arc::default(),
        })
    }

    /// Recomputes the digest of the tree and compares it (and the applied
    /// log id) with what the token vouches for.
    ///
    /// `Ok(Some(applied))` when the tree is the state *before* the last
    /// apply the token recorded (that apply's batch never reached the disk,
    /// or the host put the previous state back): the Raft log must still
    /// hold the entries after `applied` to apply them again, which the
    /// caller checks ([`super::open_replica`]).
    pub(crate) fn verify(&self) -> Result<Option<Option<u64>>, SmOpenError> {
        let failed = |e: std::io::Error| SmOpenError::Storage(e.to_string());
        let on_disk = self.scan().map_err(failed)?;
        let kept = self.token_state().map_err(failed)?;
        let (current, next) = (kept.current, kept.next);
        if on_disk != current && Some(on_disk) != next {
            let newest = next.map_or(current.applied, |n| n.applied.max(current.applied));
            return Err(SmOpenError::Mismatch {
                tree: on_disk.applied.map_or(0, |l| l.index),
                token: newest.map_or(0, |l| l.index),
            });
        }
        if let Ok(mut anchor) = self.shared.anchor.try_lock() {
            *anchor = on_disk;
        }
        self.remember(on_disk.applied.map(|l| l.index), on_disk.digest, true);
        let behind = next.is_some_and(|n| n != on_disk);
        Ok(behind.then_some(on_disk.applied.map(|l| l.index)))
    }

    /// Remembers the digest of the state after entry `index` (after
    /// `reset`, as the only one: the state jumped there).
    fn remember(&self, index: Option<u64>, digest: StateDigest, reset: bool) {
        let Some(index) = index else {
            return;
        };
        if let Ok(mut history) = self.shared.history.lock() {
            if reset {
                history.clear();
            }
            if history.len() >= DIGEST_HISTORY {
                history.pop_front();
            }
            history.push_back((index, digest));
        }
    }

    /// Compares a leader's statement with this replica's digest at the same
    /// index (if it still remembers it); a difference is reported loudly
    /// and the replica stops serving.
    fn check(&self, index: u64, stated: &[u8; 32]) {
        let mine = self
            .shared
            .history
            .lock()
            .ok()
            .and_then(|h| h.iter().rev().find(|(i, _)| *i == index).map(|(_, d)| *d));
        match mine {
            Some(d) if d.0 != *stated => {
                self.shared
                    .diverged
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                crate::telemetry::metrics().replica_diverged.set(1);
                tracing::error!(
                    index,
                    "this replica's state differs from its leader's at the same log index: it \
                     was changed behind the vault's back while the node ran, or by a bug; it \
                     serves nothing from it and must be resynced (restart it: its token's check \
                     then decides)"
                );
            }
            _ => {}
        }
    }

    /// Whether a [`Command::Check`] found this replica's state different
    /// from its group's.
    pub fn diverged(&self) -> bool {
        self.shared
            .diverged
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Erases the state machine (a replica found rolled back, before it
    /// resyncs) and tells the token it is empty.
    pub fn erase(&self) -> Result<(), SmOpenError> {
        let storage = |e: sled::Error| SmOpenError::Storage(e.to_string());
        self.tree.clear().map_err(storage)?;
        self.tree.flush().map_err(storage)?;
        let empty = self
            .scan()
            .map_err(|e| SmOpenError::Storage(e.to_string()))?;
        self.set_token_state(&TokenSmState {
            current: empty,
            next: None,
        })
        .map_err(|e| SmOpenError::Storage(e.to_string()))?;
        if let Ok(mut anchor) = self.shared.anchor.try_lock() {
            *anchor = empty;
        }
        Ok(())
    }

    /// Chooses how flushes wait (see [`super::Flush`]).
    pub fn flushing(mut self, flush: super::Flush) -> Self {
        self.flush = flush;
        self
    }

    fn token_state(&self) -> Result<TokenSmState, std::io::Error> {
        let bytes = super::log_store::retry(|| self.token.app_state(&self.app)).map_err(sm_err)?;
        if bytes.is_empty() {
            // A fresh token: the empty state.
            let empty = Anchor {
                applied: None,
                digest: self.digest_of_empty()?,
            };
            return Ok(TokenSmState {
                current: empty,
                next: None,
            });
        }
        Ok(codec::decode::<TokenSmState>(&bytes)?)
    }

    fn set_token_state(&self, state: &TokenSmState) -> Result<(), std::io::Error> {
        let bytes = codec::encode(state);
        super::log_store::retry(|| self.token.set_app_state(&self.app, &bytes)).map_err(sm_err)
    }

    fn toggler<'a>(
        &'a self,
        digest: &'a mut StateDigest,
    ) -> Result<Toggler<'a, K>, std::io::Error> {
        Ok(Toggler {
            session: super::log_store::retry(|| self.token.session()).map_err(sm_err)?,
            group: self.group,
            digest,
            memo: &self.shared.memo,
        })
    }

    /// The digest of a state with nothing applied (only the empty
    /// membership).
    fn digest_of_empty(&self) -> Result<StateDigest, std::io::Error> {
        let mut digest = StateDigest::default();
        let membership = membership_bytes(None)?;
        self.toggler(&mut digest)?
            .part(Part::Membership(&membership))?;
        Ok(digest)
    }

    /// The applied log id and the digest of the tree as it is on disk.
    fn scan(&self) -> Result<Anchor, std::io::Error> {
        let mut digest = StateDigest::default();
        let mut t = self.toggler(&mut digest)?;
        let mut applied = None;
        let mut membership = None;
        for item in self.tree.iter() {
            let (k, v) = item.map_err(sm_err)?;
            match k.as_ref() {
                APPLIED => applied = codec::decode::<Option<LogId>>(&v).map_err(sm_err)?,
                MEMBERSHIP => membership = Some(v.to_vec()),
                SHARD_MAP => t.part(Part::ShardMap(&v))?,
                FROZEN => t.part(Part::Frozen(&v))?,
                key => {
                    if let (Ok(id), Some((seq, sealed))) =
                        (<[u8; 32]>::try_from(key), split_value(&v))
                    {
                        t.part(Part::Record {
                            id: &id,
                            seq,
                            sealed,
                        })?;
                    }
                }
            }
        }
        let membership = membership_bytes(membership.as_deref())?;
        t.part(Part::Membership(&membership))?;
        drop(t);
        Ok(Anchor { applied, digest })
    }

    /// The map of a move of slots out of this group, while one is under way.
    pub fn frozen_map(&self) -> Result<Option<ShardMap>, std::io::Error> {
        get_value(&self.tree, FROZEN)
    }

    /// The records of the slots `map` takes from this group (frozen first).
    pub fn export(&self, map: &ShardMap) -> Result<Vec<ExportedRecord>, std::io::Error> {
        self.leaving(self.shard_map()?.as_ref(), map)
    }

    /// The records of the slots that `adopted` gives this group and `map`
    /// gives to another.
    fn leaving(
        &self,
        adopted: Option<&ShardMap>,
        map: &ShardMap,
    ) -> Result<Vec<ExportedRecord>, std::io::Error> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(sm_err)?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let s = slot(&id);
            let leaving = adopted.and_then(|a| a.group_of_slot(s)) == Some(self.group)
                && map.group_of_slot(s) != Some(self.group);
            if let (true, Some((seq, sealed))) = (leaving, split_value(&v)) {
                out.push((id, seq, sealed.to_vec()));
            }
        }
        Ok(out)
    }

    /// The tree holding this state machine.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The record of `id`: its sequence number and sealed bytes.
    pub fn get(&self, id: &[u8; 32]) -> Result<Option<(u64, Vec<u8>)>, sled::Error> {
        Ok(self
            .tree
            .get(id)?
            .and_then(|v| split_value(&v).map(|(s, b)| (s, b.to_vec()))))
    }

    /// The shard map this group has adopted (`None` before the first).
    pub fn shard_map(&self) -> Result<Option<ShardMap>, std::io::Error> {
        get_value(&self.tree, SHARD_MAP)
    }

    /// How many records this replica holds.
    pub fn record_count(&self) -> usize {
        self.tree
            .iter()
            .keys()
            .flatten()
            .filter(|k| k.len() == 32)
            .count()
    }

    /// The ids of the records this replica holds.
    pub fn record_ids(&self) -> Vec<[u8; 32]> {
        self.tree
            .iter()
            .keys()
            .flatten()
            .filter_map(|k| <[u8; 32]>::try_from(k.as_ref()).ok())
            .collect()
    }

    /// The applied log index and state digest this replica's token vouches
    /// for (equal on replicas that applied the same log).
    pub async fn state_digest(&self) -> (u64, [u8; 32]) {
        let anchor = self.shared.anchor.lock().await;
        (anchor.applied.map_or(0, |l| l.index), anchor.digest.0)
    }

    fn current(
        &self,
        pending: &Pending,
        id: &[u8; 32],
    ) -> Result<Option<(u64, Vec<u8>)>, std::io::Error> {
        if let Some(p) = pending.get(id) {
            return Ok(p.clone());
        }
        self.get(id).map_err(sm_err)
    }

    /// Makes `batch` (which leads to `next`) durable, the token first.
    async fn commit(
        &self,
        anchor: &mut Anchor,
        next: Anchor,
        batch: sled::Batch,
    ) -> Result<(), std::io::Error> {
        self.set_token_state(&TokenSmState {
            current: *anchor,
            next: Some(next),
        })?;
        self.tree.apply_batch(batch).map_err(sm_err)?;
        let started = std::time::Instant::now();
        self.flush.tree(&self.tree).await.map_err(sm_err)?;
        crate::telemetry::metrics().flushed("state_machine", started);
        *anchor = next;
        Ok(())
    }
}
/// Slots whose owner differs between `from` and `to`, as (slot, old, new).
fn changes(from: &ShardMap, to: &ShardMap) -> Vec<(u16, Option<GroupId>, Option<GroupId>)> {
    (0..crate::shard::SLOTS)
        .map(|s| s as u16)
        .filter_map(|s| {
            let (a, b) = (from.group_of_slot(s), to.group_of_slot(s));
            (a != b).then_some((s, a, b))
        })
        .collect()
}

/// A valid map, newer than the adopted one (which must exist).
fn newer<'a>(current: Option<&'a ShardMap>, next: &ShardMap) -> Result<&'a ShardMap, String> {
    next.validate()?;
    let current = current.ok_or("this group has adopted no shard map yet")?;
    if next.version <= current.version {
        return Err(format!(
            "shard map version {} is not newer than the adopted {}",
            next.version, current.version
        ));
    }
    Ok(current)
}

/// Whether the record `id` is in a slot frozen for a move away.
fn moving(current: Option<&ShardMap>, frozen: Option<&ShardMap>, id: &[u8; 32]) -> bool {
    match (current, frozen) {
        (Some(c), Some(f)) => c.group_of(id) != f.group_of(id),
        _ => false,
    }
}

/// Whether group `me`, holding `current` (and `frozen`, if a move out is
/// under way), may adopt `next`. Slots may leave this group only once frozen
/// for exactly `next`, and reach it only through an import.
fn adoptable(
    me: GroupId,
    current: Option<&ShardMap>,
    frozen: Option<&ShardMap>,
    next: &ShardMap,
) -> Result<(), String> {
    if current.is_none() {
        return next.validate();
    }
    let current = newer(current, next)?;
    // While slots are frozen for a move out, a map as new as the move's
    // would leave the move's own map "not newer" for ever: its slots would
    // stay frozen (refusing every write) with no way to finish.
    if let Some(f) = frozen.filter(|f| *f != next && next.version >= f.version) {
        return Err(format!(
            "a move out of this group to shard map version {} is under way: adopt that map first",
            f.version
        ));
    }
    let moved = changes(current, next);
    if moved.iter().any(|(_, _, to)| *to == Some(me)) {
        return Err(format!(
            "shard map version {} gives slots to this group: that takes an import of their records",
            next.version
        ));
    }
    let leaving = moved
        .iter()
        .filter(|(_, from, _)| *from == Some(me))
        .count();
    if leaving > 0 && frozen != Some(next) {
        return Err(format!(
            "shard map version {} moves {leaving} slots to other groups; they must be frozen and \
             their records imported there first",
            next.version
        ));
    }
    Ok(())
}

/// Whether group `me` may freeze slots for a move to `next`: every slot that
/// changes owner leaves this group, and no other move is under way.
fn freezable(
    me: GroupId,
    current: Option<&ShardMap>,
    frozen: Option<&ShardMap>,
    next: &ShardMap,
) -> Result<(), String> {
    if frozen == Some(next) {
        return Ok(());
    }
    if frozen.is_some() {
        return Err("another move out of this group is under way".into());
    }
    let current = newer(current, next)?;
    let moved = changes(current, next);
    if moved.is_empty() || moved.iter().any(|(_, from, _)| *from != Some(me)) {
        return Err("a freeze must move slots of this group, and only those".into());
    }
    Ok(())
}

/// Whether group `me` may import `records` for `next`: `Ok(true)` if it has
/// adopted `next` already (a replayed last step), `Ok(false)` to apply.
fn importable(
    me: GroupId,
    current: Option<&ShardMap>,
    next: &ShardMap,
    records: &[ExportedRecord],
) -> Result<bool, String> {
    if current == Some(next) {
        return Ok(true);
    }
    let current = newer(current, next)?;
    let moved = changes(current, next);
    if moved.is_empty() || moved.iter().any(|(_, _, to)| *to != Some(me)) {
        return Err("an import must move slots to this group, and only those".into());
    }
    if records
        .iter()
        .any(|(id, _, _)| next.group_of(id) != Some(me) || current.group_of(id) == Some(me))
    {
        return Err("an imported record is not in a slot moving to this group".into());
    }
    Ok(false)
}

/// Whether a snapshot's header may be installed by group `me`, which holds
/// `current`: its maps must be valid, not older than the group's, and a
/// frozen map must be a move out of this group from the snapshot's own map.
/// (The MAC already says that a replica of this group built it.)
fn installable(
    me: GroupId,
    current: Option<&ShardMap>,
    header: &SnapshotHeader,
) -> Result<(), String> {
    let Some(map) = &header.shard_map else {
        if current.is_some() || header.frozen.is_some() {
            return Err("the snapshot has no shard map".into());
        }
        return Ok(());
    };
    map.validate()?;
    if let Some(c) = current.filter(|c| map.version < c.version) {
        return Err(format!(
            "the snapshot's shard map (version {}) is older than this group's ({})",
            map.version, c.version
        ));
    }
    if let Some(frozen) = &header.frozen {
        freezable(me, Some(map), None, frozen)?;
    }
    Ok(())
}

/// Why a snapshot was not vetted.
enum Vet {
    /// It is not to be installed here: the reason.
    Refused(String),
    /// The check itself failed (the token or the disk).
    Storage(std::io::Error),
}

impl From<std::io::Error> for Vet {
    fn from(e: std::io::Error) -> Self {
        Vet::Storage(e)
    }
}

/// A snapshot that passed every check: what installing it writes.
struct Vetted<'a> {
    /// Each record's last entry in the data.
    latest: HashMap<[u8; 32], (u64, &'a [u8])>,
    map: Option<Vec<u8>>,
    frozen: Option<Vec<u8>>,
    membership: Vec<u8>,
    /// The digest of the state the snapshot describes.
    digest: StateDigest,
}

/// A snapshot the receiver vetted: its identity, a hash of its data and
/// the digest it computed, so that installing it does not redo the token
/// work.
struct VettedSnapshot {
    last_log_id: Option<LogId>,
    sha256: [u8; 32],
    digest: StateDigest,
}

impl<K: ReplicaToken> StateMachine<K> {
    /// Checks snapshot data before it is handed to Raft to install: the
    /// header matches `meta`, the token MAC matches the records and header
    /// (so no record, map or applied id was edited, and a replica of this
    /// group made it), and the maps are [`installable`] here. A refusal is
    /// counted in `vault_snapshots_refused` and leaves nothing changed; the
    /// reason names what failed, never a secret.
    pub fn check_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), String> {
        let refused = |reason: String| {
            crate::telemetry::metrics().snapshots_refused.inc();
            reason
        };
        let parsed = parse_snapshot(data).map_err(|e| refused(e.to_string()))?;
        match self.vet(meta, &parsed, None) {
            Ok(vetted) => {
                if let Ok(mut last) = self.shared.vetted.lock() {
                    *last = Some(VettedSnapshot {
                        last_log_id: meta.last_log_id,
                        sha256: sha256(data),
                        digest: vetted.digest,
                    });
                }
                Ok(())
            }
            Err(Vet::Refused(reason)) => Err(refused(reason)),
            Err(Vet::Storage(e)) => Err(format!("the snapshot could not be checked: {e}")),
        }
    }

    /// The digest [`Self::check_snapshot`] computed for exactly this data,
    /// if it was the last snapshot checked.
    fn vetted_digest(&self, meta: &SnapshotMeta, data: &[u8]) -> Option<StateDigest> {
        let last = self.shared.vetted.lock().ok()?.take()?;
        (last.last_log_id == meta.last_log_id && last.sha256 == sha256(data)).then_some(last.digest)
    }

    /// Every check of a snapshot; `known` is the digest of these exact
    /// bytes when already verified against their MAC.
    fn vet<'a>(
        &self,
        meta: &SnapshotMeta,
        parsed: &ParsedSnapshot<'a>,
        known: Option<StateDigest>,
    ) -> Result<Vetted<'a>, Vet> {
        let header = &parsed.header;
        if header.last_applied != meta.last_log_id || header.membership != meta.last_membership {
            return Err(Vet::Refused(
                "its header does not match the snapshot's metadata".into(),
            ));
        }
        let mut latest: HashMap<[u8; 32], (u64, &[u8])> = HashMap::new();
        for (id, seq, sealed) in &parsed.records {
            latest.insert(*id, (*seq, sealed));
        }
        let map = header.shard_map.as_ref().map(value).transpose()?;
        let frozen = header.frozen.as_ref().map(value).transpose()?;
        let membership = value(&meta.last_membership)?;
        let digest = match known {
            Some(digest) => digest,
            None => {
                // The digest of the state this snapshot describes, as this
                // replica will store it.
                let mut digest = StateDigest::default();
                let mut t = self.toggler(&mut digest)?;
                for (id, (seq, sealed)) in &latest {
                    t.part(Part::Record {
                        id,
                        seq: *seq,
                        sealed,
                    })?;
                }
                if let Some(m) = &map {
                    t.part(Part::ShardMap(m))?;
                }
                if let Some(f) = &frozen {
                    t.part(Part::Frozen(f))?;
                }
                t.part(Part::Membership(&membership))?;
                let expected = snapshot_mac(
                    &t.session,
                    self.group,
                    applied_at(meta.last_log_id),
                    t.digest,
                    parsed.header_bytes,
                )
                .map_err(sm_err)?;
                drop(t);
                if expected != parsed.mac {
                    return Err(Vet::Refused(
                        "its token MAC does not match its contents (altered, or not made by a \
                         replica of this group)"
                            .into(),
                    ));
                }
                digest
            }
        };
        installable(self.group, self.shard_map()?.as_ref(), header).map_err(Vet::Refused)?;
        Ok(Vetted {
            latest,
            map,
            frozen,
            membership,
            digest,
        })
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

impl<K: ReplicaToken> StateMachine<K> {
    /// Applies committed entries, in order, as one durable batch: each
    /// entry's answer, in order.
    pub async fn apply_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Vec<Applied>, std::io::Error> {
        let mut anchor = self.shared.anchor.lock().await;
        let mut digest = anchor.digest;
        let mut batch = sled::Batch::default();
        let mut pending: Pending = HashMap::new();
        let mut map = self.shard_map()?;
        let mut frozen = self.frozen_map()?;
        let mut out = Vec::new();
        let mut last = None;
        // Each entry's digest, and the leader's statements to compare.
        let mut digests = Vec::new();
        let mut checks = Vec::new();
        let mut t = self.toggler(&mut digest)?;
        for entry in entries {
            last = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Applied::Done,
                EntryPayload::Membership(m) => {
                    let old =
                        membership_bytes(self.tree.get(MEMBERSHIP).map_err(sm_err)?.as_deref())?;
                    let new = value(&StoredMembership::new(Some(entry.log_id), m))?;
                    t.part(Part::Membership(&old))?;
                    t.part(Part::Membership(&new))?;
                    batch.insert(MEMBERSHIP, new);
                    Applied::Done
                }
                EntryPayload::Normal(Command::Put { id, .. } | Command::Delete { id, .. })
                    if moving(map.as_ref(), frozen.as_ref(), &id) =>
                {
                    Applied::Refused(
                        "this record is moving to another replica group; retry shortly".into(),
                    )
                }
                EntryPayload::Normal(Command::Put {
                    id,
                    expect,
                    seq,
                    sealed,
                }) => {
                    let old = self.current(&pending, &id)?;
                    let current = old.as_ref().map(|(s, _)| *s);
                    if current == expect {
                        t.record(&id, old.as_ref(), Toggle::Out)?;
                        let new = (seq, sealed);
                        t.record(&id, Some(&new), Toggle::In)?;
                        batch.insert(&id[..], record_value(new.0, &new.1));
                        pending.insert(id, Some(new));
                        Applied::Done
                    } else {
                        Applied::Conflict { current }
                    }
                }
                EntryPayload::Normal(Command::AdoptMap { map: next }) => {
                    match adoptable(self.group, map.as_ref(), frozen.as_ref(), &next) {
                        Ok(()) => {
                            if frozen.as_ref() == Some(&next) {
                                // The handover is done: the moved records
                                // now live in their new group only.
                                for (id, _, _) in self.leaving(map.as_ref(), &next)? {
                                    let old = self.current(&pending, &id)?;
                                    t.record(&id, old.as_ref(), Toggle::Out)?;
                                    batch.remove(&id[..]);
                                    pending.insert(id, None);
                                }
                                if let Some(f) = &frozen {
                                    t.part(Part::Frozen(&value(f)?))?;
                                }
                                batch.remove(FROZEN);
                                frozen = None;
                            }
                            if let Some(m) = &map {
                                t.part(Part::ShardMap(&value(m)?))?;
                            }
                            let new = value(&next)?;
                            t.part(Part::ShardMap(&new))?;
                            batch.insert(SHARD_MAP, new);
                            map = Some(next);
                            Applied::Done
                        }
                        Err(reason) => Applied::Refused(reason),
                    }
                }
                EntryPayload::Normal(Command::Freeze { map: next }) => {
                    match freezable(self.group, map.as_ref(), frozen.as_ref(), &next) {
                        Ok(()) => {
                            if frozen.as_ref() != Some(&next) {
                                let new = value(&next)?;
                                t.part(Part::Frozen(&new))?;
                                batch.insert(FROZEN, new);
                                frozen = Some(next);
                            }
                            Applied::Done
                        }
                        Err(reason) => Applied::Refused(reason),
                    }
                }
                EntryPayload::Normal(Command::Import {
                    map: next,
                    records,
                    last,
                }) => match importable(self.group, map.as_ref(), &next, &records) {
                    Ok(true) => Applied::Done,
                    Ok(false) => {
                        for (id, seq, sealed) in records {
                            let old = self.current(&pending, &id)?;
                            t.record(&id, old.as_ref(), Toggle::Out)?;
                            let new = (seq, sealed);
                            t.record(&id, Some(&new), Toggle::In)?;
                            batch.insert(&id[..], record_value(new.0, &new.1));
                            pending.insert(id, Some(new));
                        }
                        if last {
                            if let Some(m) = &map {
                                t.part(Part::ShardMap(&value(m)?))?;
                            }
                            let new = value(&next)?;
                            t.part(Part::ShardMap(&new))?;
                            batch.insert(SHARD_MAP, new);
                            map = Some(next);
                        }
                        Applied::Done
                    }
                    Err(reason) => Applied::Refused(reason),
                },
                EntryPayload::Normal(Command::Check { index, digest }) => {
                    checks.push((index, digest));
                    Applied::Done
                }
                EntryPayload::Normal(Command::Delete { id, expect }) => {
                    let old = self.current(&pending, &id)?;
                    let current = old.as_ref().map(|(s, _)| *s);
                    if current == expect {
                        t.record(&id, old.as_ref(), Toggle::Out)?;
                        batch.remove(&id[..]);
                        pending.insert(id, None);
                        Applied::Done
                    } else {
                        Applied::Conflict { current }
                    }
                }
            };
            out.push(result);
            digests.push((entry.log_id.index, *t.digest));
        }
        drop(t);
        for (index, digest) in digests {
            self.remember(Some(index), digest, false);
        }
        for (index, digest) in checks {
            self.check(index, &digest);
        }
        if let Some(last) = last {
            batch.insert(APPLIED, value(&Some(last))?);
            let next = Anchor {
                applied: Some(last),
                digest,
            };
            self.commit(&mut anchor, next, batch).await?;
        }
        Ok(out)
    }
}

impl<K: ReplicaToken> RaftSnapshotBuilder<TypeConfig> for StateMachine<K> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<VaultSnapshot, std::io::Error> {
        let anchor = self.shared.anchor.lock().await;
        let header = SnapshotHeader {
            last_applied: anchor.applied,
            membership: get_value(&self.tree, MEMBERSHIP)?.unwrap_or_default(),
            shard_map: self.shard_map()?,
            frozen: self.frozen_map()?,
        };
        let head = value(&header)?;
        let mac = {
            let session = super::log_store::retry(|| self.token.session()).map_err(sm_err)?;
            snapshot_mac(
                &session,
                self.group,
                applied_at(anchor.applied),
                &anchor.digest,
                &head,
            )
            .map_err(sm_err)?
        };
        let mut data = Vec::with_capacity(40 + head.len() + 360 * self.tree.len());
        data.extend_from_slice(SNAPSHOT_MAGIC);
        data.extend_from_slice(&mac);
        let head_len = u32::try_from(head.len()).map_err(sm_err)?;
        data.extend_from_slice(&head_len.to_be_bytes());
        data.extend_from_slice(&head);
        for item in self.tree.iter() {
            let (k, v) = item.map_err(sm_err)?;
            if k.len() != 32 {
                continue;
            }
            if let Some((seq, sealed)) = split_value(&v) {
                let n = u16::try_from(sealed.len()).map_err(sm_err)?;
                data.extend_from_slice(&k);
                data.extend_from_slice(&seq.to_be_bytes());
                data.extend_from_slice(&n.to_be_bytes());
                data.extend_from_slice(sealed);
            }
        }
        let meta = SnapshotMeta {
            last_log_id: header.last_applied,
            last_membership: header.membership,
        };
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT, value(&StoredSnapshot { meta: meta.clone() })?);
        batch.insert(SNAPSHOT_DATA, data.clone());
        self.tree.apply_batch(batch).map_err(sm_err)?;
        drop(anchor);
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl<K: ReplicaToken> RaftStateMachine<TypeConfig> for StateMachine<K> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), std::io::Error> {
        Ok((
            get_value(&self.tree, APPLIED)?.flatten(),
            get_value(&self.tree, MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    async fn apply<S>(&mut self, entries: S) -> Result<(), std::io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>> + Unpin + Send,
    {
        // One apply takes what the stream holds: a batch of committed
        // entries, applied and made durable together, each answered after.
        let (entries, responders): (Vec<Entry>, Vec<_>) =
            entries.try_collect::<Vec<_>>().await?.into_iter().unzip();
        let out = self.apply_entries(entries).await?;
        for (responder, applied) in responders.into_iter().zip(out) {
            if let Some(responder) = responder {
                responder.send(applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), std::io::Error> {
        let data = snapshot.into_inner();
        let parsed = parse_snapshot(&data)?;
        let mut anchor = self.shared.anchor.lock().await;
        // The receiver ([`super::inbox`]) checked these very bytes; a
        // snapshot that reaches this point without that check is checked
        // here, and its refusal is fatal to this replica's Raft.
        let known = self.vetted_digest(meta, &data);
        let vetted = match self.vet(meta, &parsed, known) {
            Ok(v) => v,
            Err(Vet::Storage(e)) => return Err(e),
            Err(Vet::Refused(reason)) => {
                crate::telemetry::metrics().snapshots_refused.inc();
                return Err(sm_fail(format!("snapshot refused: {reason}")));
            }
        };
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (k, _) = item.map_err(sm_err)?;
            batch.remove(k);
        }
        for (id, (seq, sealed)) in &vetted.latest {
            batch.insert(&id[..], record_value(*seq, sealed));
        }
        if let Some(m) = vetted.map {
            batch.insert(SHARD_MAP, m);
        }
        if let Some(f) = vetted.frozen {
            batch.insert(FROZEN, f);
        }
        batch.insert(APPLIED, value(&meta.last_log_id)?);
        batch.insert(MEMBERSHIP, vetted.membership);
        batch.insert(SNAPSHOT, value(&StoredSnapshot { meta: meta.clone() })?);
        let digest = vetted.digest;
        drop(vetted.latest);
        drop(parsed);
        batch.insert(SNAPSHOT_DATA, data);
        let next = Anchor {
            applied: meta.last_log_id,
            digest,
        };
        self.commit(&mut anchor, next, batch).await?;
        self.remember(next.applied.map(|l| l.index), next.digest, true);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<VaultSnapshot>, std::io::Error> {
        let Some(stored) = get_value::<StoredSnapshot>(&self.tree, SNAPSHOT)? else {
            return Ok(None);
        };
        let data = self.tree.get(SNAPSHOT_DATA).map_err(sm_err)?;
        Ok(data.map(|d| Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(d.to_vec()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::log_id;

    /// The token's state machine state and the snapshot header are pinned
    /// (`vault.raft.v1.TokenSmState`, `SnapshotHeader`): a change would make
    /// every replica's token state and every snapshot unreadable.
    #[test]
    fn the_token_state_and_snapshot_header_encodings_are_pinned() {
        let state = TokenSmState {
            current: Anchor {
                applied: Some(log_id(3, 1, 12)),
                digest: StateDigest([0x55; 32]),
            },
            next: Some(Anchor {
                applied: Some(log_id(3, 1, 13)),
                digest: StateDigest([0x66; 32]),
            }),
        };
        let bytes = codec::encode(&state);
        assert_eq!(hex::encode(&bytes), "0a2a0a0608031001180c12205555555555555555555555555555555555555555555555555555555555555555122a0a0608031001180d12206666666666666666666666666666666666666666666666666666666666666666");
        assert_eq!(
            codec::decode::<TokenSmState>(&bytes).expect("decodes"),
            state
        );

        let header = SnapshotHeader {
            last_applied: Some(log_id(3, 1, 40)),
            membership: Membership::default(),
            shard_map: Some(ShardMap::even(1, &[1])),
            frozen: None,
        };
        let bytes = codec::encode(&header);
        assert_eq!(
            hex::encode(&bytes),
            "0a06080310011828120212001a0a0801120610ffff031801"
        );
        assert_eq!(
            codec::decode::<SnapshotHeader>(&bytes).expect("decodes"),
            header
        );
    }
}
