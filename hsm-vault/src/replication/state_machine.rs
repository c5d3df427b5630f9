//! The replicated state machine in sled: sealed records and their sequence
//! numbers, applied from committed [`Command`]s as compare-and-set writes.
//!
//! Layout of the group's tree (keys of distinct lengths):
//! `id (32 B) → seq:u64be || sealed record`, `"applied"` → last applied log
//! id, `"membership"` → last membership, `"shard-map"` → the adopted shard
//! map, `"snapshot"` → the current snapshot.
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

use super::{io_error, Applied, Command, NodeId, TypeConfig};
use crate::shard::ShardMap;

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
const SNAPSHOT: &[u8] = b"snapshot";
const SHARD_MAP: &[u8] = b"shard-map";

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    #[serde(default)]
    shard_map: Option<ShardMap>,
    /// (id, seq, sealed record)
    records: Vec<([u8; 32], u64, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// One replica's state machine.
#[derive(Clone, Debug)]
pub struct StateMachine {
    db: sled::Db,
    tree: sled::Tree,
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
        })
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

    fn snapshot_body(&self) -> Result<SnapshotBody, StorageError<NodeId>> {
        let mut records = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(sm_err)?;
            let Ok(id) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            if let Some((seq, sealed)) = split_value(&v) {
                records.push((id, seq, sealed.to_vec()));
            }
        }
        Ok(SnapshotBody {
            last_applied: get_json(&self.tree, APPLIED)?.flatten(),
            membership: get_json(&self.tree, MEMBERSHIP)?.unwrap_or_default(),
            shard_map: self.shard_map()?,
            records,
        })
    }
}

/// Whether a group holding `current` may adopt `next`: a valid map, newer,
/// and keeping every slot with its group.
fn adoptable(current: Option<&ShardMap>, next: &ShardMap) -> Result<(), String> {
    next.validate()?;
    let Some(current) = current else {
        return Ok(());
    };
    if next.version <= current.version {
        return Err(format!(
            "shard map version {} is not newer than the adopted {}",
            next.version, current.version
        ));
    }
    match current.moved_slots(next) {
        0 => Ok(()),
        n => Err(format!(
            "shard map version {} moves {n} slots to other groups; moving slots needs a record \
             migration, which this version does not do",
            next.version
        )),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let body = self.snapshot_body()?;
        let data = json(&body)?;
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.membership,
            snapshot_id: format!(
                "{}-{}",
                body.last_applied.map_or(0, |l| l.index),
                self.db.generate_id().map_err(sm_err)?
            ),
        };
        self.tree
            .insert(
                SNAPSHOT,
                json(&StoredSnapshot {
                    meta: meta.clone(),
                    data: data.clone(),
                })?,
            )
            .map_err(sm_err)?;
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
                    match adoptable(map.as_ref(), &next) {
                        Ok(()) => {
                            batch.insert(SHARD_MAP, json(&next)?);
                            map = Some(next);
                            Applied::Done
                        }
                        Err(reason) => Applied::Refused(reason),
                    }
                }
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
        let body: SnapshotBody = serde_json::from_slice(&data)
            .map_err(|e| io_error(StorageIOError::read_state_machine, e))?;
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (k, _) = item.map_err(sm_err)?;
            batch.remove(k);
        }
        for (id, seq, sealed) in &body.records {
            let mut v = seq.to_be_bytes().to_vec();
            v.extend_from_slice(sealed);
            batch.insert(&id[..], v);
        }
        if let Some(map) = &body.shard_map {
            batch.insert(SHARD_MAP, json(map)?);
        }
        batch.insert(APPLIED, json(&meta.last_log_id)?);
        batch.insert(MEMBERSHIP, json(&meta.last_membership)?);
        batch.insert(
            SNAPSHOT,
            json(&StoredSnapshot {
                meta: meta.clone(),
                data,
            })?,
        );
        self.tree.apply_batch(batch).map_err(sm_err)?;
        self.tree.flush_async().await.map_err(sm_err)?;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(
            get_json::<StoredSnapshot>(&self.tree, SNAPSHOT)?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}
