//! The replicated state machine in sled: sealed records and their sequence
//! numbers, applied from committed [`Command`]s as compare-and-set writes.
//!
//! Layout of the group's tree (keys of distinct lengths):
//! `id (32 B) → seq:u64be || sealed record`, `"applied"` → last applied log
//! id, `"membership"` → last membership, `"shard-map"` → the adopted shard
//! map, `"frozen-map"` → the map of a move out of this group in progress,
//! `"snapshot"` → the current snapshot.
//! One apply call is one atomic sled batch, so a crash leaves the tree at a
//! whole number of entries, and Raft re-applies the rest from the log.

use std::collections::HashMap;
use std::io::Cursor;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{io_error, Applied, Command, ExportedRecord, NodeId, TypeConfig};
use crate::shard::{slot, GroupId, ShardMap};

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const SNAPSHOT: &[u8] = b"snapshot";
const SHARD_MAP: &[u8] = b"shard-map";
const FROZEN: &[u8] = b"frozen-map";

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// What a snapshot holds besides the records.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    #[serde(default)]
    shard_map: Option<ShardMap>,
    #[serde(default)]
    frozen: Option<ShardMap>,
}

/// Snapshot data, binary so that a million records stay a few hundred
/// megabytes: `SNAPSHOT_MAGIC`, the header's length (u32 big-endian), the
/// header as JSON, then each record as id (32 bytes), sequence number (u64
/// big-endian), sealed length (u16 big-endian) and the sealed bytes.
pub const SNAPSHOT_MAGIC: &[u8; 4] = b"HVS1";

/// The stored snapshot's metadata (its data is under `SNAPSHOT_DATA`).
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
}

const SNAPSHOT_DATA: &[u8] = b"snapshot-data";

/// A record in snapshot data: id, sequence number, sealed bytes.
pub type SnapshotRecord<'a> = ([u8; 32], u64, &'a [u8]);

/// Reads snapshot data back: the header and the records, in order.
pub fn parse_snapshot(
    data: &[u8],
) -> Result<(SnapshotHeader, Vec<SnapshotRecord<'_>>), StorageError<NodeId>> {
    let bad = |what: &str| {
        io_error(
            StorageIOError::read_state_machine,
            std::io::Error::other(format!("snapshot data: {what}")),
        )
    };
    let rest = data
        .strip_prefix(&SNAPSHOT_MAGIC[..])
        .ok_or_else(|| bad("unknown format"))?;
    let (len, rest) = rest
        .split_at_checked(4)
        .ok_or_else(|| bad("truncated header"))?;
    let len = u32::from_be_bytes(len.try_into().map_err(|_| bad("header length"))?) as usize;
    let (header, mut rest) = rest
        .split_at_checked(len)
        .ok_or_else(|| bad("truncated header"))?;
    let header: SnapshotHeader = serde_json::from_slice(header)
        .map_err(|e| io_error(StorageIOError::read_state_machine, e))?;
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
    Ok((header, records))
}

/// One replica's state machine.
#[derive(Clone, Debug)]
pub struct StateMachine {
    db: sled::Db,
    tree: sled::Tree,
    /// The replica group this state machine belongs to (0: unnamed).
    group: GroupId,
    flush: super::Flush,
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_error(StorageIOError::write_state_machine, e)
}

fn get_json<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<T>, StorageError<NodeId>> {
    match tree.get(key).map_err(sm_err)? {
        Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(sm_err)?)),
        None => Ok(None),
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    serde_json::to_vec(v).map_err(sm_err)
}

fn split_value(v: &[u8]) -> Option<(u64, &[u8])> {
    let (seq, sealed) = v.split_at_checked(8)?;
    Some((u64::from_be_bytes(seq.try_into().ok()?), sealed))
}

impl StateMachine {
    pub fn open(db: &sled::Db, group: &str) -> Result<Self, sled::Error> {
        Ok(StateMachine {
            db: db.clone(),
            tree: db.open_tree(format!("raft-sm/{group}"))?,
            group: 0,
            flush: super::Flush::default(),
        })
    }

    /// Names the replica group this state machine belongs to, so it can
    /// tell slots moving away from it from slots moving to it.
    pub fn in_group(mut self, group: GroupId) -> Self {
        self.group = group;
        self
    }

    /// Chooses how flushes wait (see [`super::Flush`]).
    pub fn flushing(mut self, flush: super::Flush) -> Self {
        self.flush = flush;
        self
    }

    /// The map of a move of slots out of this group, while one is under way.
    pub fn frozen_map(&self) -> Result<Option<ShardMap>, StorageError<NodeId>> {
        get_json(&self.tree, FROZEN)
    }

    /// The records of the slots `map` takes from this group (frozen first).
    pub fn export(&self, map: &ShardMap) -> Result<Vec<ExportedRecord>, StorageError<NodeId>> {
        self.leaving(self.shard_map()?.as_ref(), map)
    }

    /// The records of the slots that `adopted` gives this group and `map`
    /// gives to another.
    fn leaving(
        &self,
        adopted: Option<&ShardMap>,
        map: &ShardMap,
    ) -> Result<Vec<ExportedRecord>, StorageError<NodeId>> {
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

    /// The tree holding this state machine (erased by a resync).
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
    pub fn shard_map(&self) -> Result<Option<ShardMap>, StorageError<NodeId>> {
        get_json(&self.tree, SHARD_MAP)
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

    fn current_seq(
        &self,
        pending: &HashMap<[u8; 32], Option<u64>>,
        id: &[u8; 32],
    ) -> Result<Option<u64>, StorageError<NodeId>> {
        if let Some(p) = pending.get(id) {
            return Ok(*p);
        }
        Ok(self.get(id).map_err(sm_err)?.map(|(s, _)| s))
    }

    /// This state machine as snapshot data, and what it was applied up to.
    fn snapshot_data(&self) -> Result<(Vec<u8>, SnapshotHeader), StorageError<NodeId>> {
        let header = SnapshotHeader {
            last_applied: get_json(&self.tree, APPLIED)?.flatten(),
            membership: get_json(&self.tree, MEMBERSHIP)?.unwrap_or_default(),
            shard_map: self.shard_map()?,
            frozen: self.frozen_map()?,
        };
        let head = json(&header)?;
        let mut data = Vec::with_capacity(8 + head.len() + 360 * self.tree.len());
        data.extend_from_slice(SNAPSHOT_MAGIC);
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
        Ok((data, header))
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

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (data, header) = self.snapshot_data()?;
        let meta = SnapshotMeta {
            last_log_id: header.last_applied,
            last_membership: header.membership,
            snapshot_id: format!(
                "{}-{}",
                header.last_applied.map_or(0, |l| l.index),
                self.db.generate_id().map_err(sm_err)?
            ),
        };
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT, json(&StoredSnapshot { meta: meta.clone() })?);
        batch.insert(SNAPSHOT_DATA, data.clone());
        self.tree.apply_batch(batch).map_err(sm_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((
            get_json(&self.tree, APPLIED)?.flatten(),
            get_json(&self.tree, MEMBERSHIP)?.unwrap_or_default(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        let mut pending: HashMap<[u8; 32], Option<u64>> = HashMap::new();
        let mut map = self.shard_map()?;
        let mut frozen = self.frozen_map()?;
        let mut out = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => Applied::Done,
                EntryPayload::Membership(m) => {
                    batch.insert(
                        MEMBERSHIP,
                        json(&StoredMembership::new(Some(entry.log_id), m))?,
                    );
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
                    let current = self.current_seq(&pending, &id)?;
                    if current == expect {
                        let mut v = seq.to_be_bytes().to_vec();
                        v.extend_from_slice(&sealed);
                        batch.insert(&id[..], v);
                        pending.insert(id, Some(seq));
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
                                    batch.remove(&id[..]);
                                    pending.insert(id, None);
                                }
                                batch.remove(FROZEN);
                                frozen = None;
                            }
                            batch.insert(SHARD_MAP, json(&next)?);
                            map = Some(next);
                            Applied::Done
                        }
                        Err(reason) => Applied::Refused(reason),
                    }
                }
                EntryPayload::Normal(Command::Freeze { map: next }) => {
                    match freezable(self.group, map.as_ref(), frozen.as_ref(), &next) {
                        Ok(()) => {
                            batch.insert(FROZEN, json(&next)?);
                            frozen = Some(next);
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
                            let mut v = seq.to_be_bytes().to_vec();
                            v.extend_from_slice(&sealed);
                            batch.insert(&id[..], v);
                            pending.insert(id, Some(seq));
                        }
                        if last {
                            batch.insert(SHARD_MAP, json(&next)?);
                            map = Some(next);
                        }
                        Applied::Done
                    }
                    Err(reason) => Applied::Refused(reason),
                },
                EntryPayload::Normal(Command::Delete { id, expect }) => {
                    let current = self.current_seq(&pending, &id)?;
                    if current == expect {
                        batch.remove(&id[..]);
                        pending.insert(id, None);
                        Applied::Done
                    } else {
                        Applied::Conflict { current }
                    }
                }
            };
            out.push(result);
        }
        if let Some(last) = last {
            batch.insert(APPLIED, json(&Some(last))?);
        }
        self.tree.apply_batch(batch).map_err(sm_err)?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let (header, records) = parse_snapshot(&data)?;
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (k, _) = item.map_err(sm_err)?;
            batch.remove(k);
        }
        for (id, seq, sealed) in &records {
            let mut v = seq.to_be_bytes().to_vec();
            v.extend_from_slice(sealed);
            batch.insert(&id[..], v);
        }
        if let Some(map) = &header.shard_map {
            batch.insert(SHARD_MAP, json(map)?);
        }
        if let Some(map) = &header.frozen {
            batch.insert(FROZEN, json(map)?);
        }
        batch.insert(APPLIED, json(&meta.last_log_id)?);
        batch.insert(MEMBERSHIP, json(&meta.last_membership)?);
        batch.insert(SNAPSHOT, json(&StoredSnapshot { meta: meta.clone() })?);
        drop(records);
        batch.insert(SNAPSHOT_DATA, data);
        self.tree.apply_batch(batch).map_err(sm_err)?;
        let started = std::time::Instant::now();
        self.flush.tree(&self.tree).await.map_err(sm_err)?;
        crate::telemetry::metrics().flushed("state_machine", started);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some(stored) = get_json::<StoredSnapshot>(&self.tree, SNAPSHOT)? else {
            return Ok(None);
        };
        let data = self.tree.get(SNAPSHOT_DATA).map_err(sm_err)?;
        Ok(data.map(|d| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(d.to_vec())),
        }))
    }
}
