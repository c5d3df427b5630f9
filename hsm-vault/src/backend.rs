//! Where the service keeps records: one node's token-anchored store, or a
//! Raft replica group. Host code: it moves sealed bytes and sequence numbers
//! only.
//!
//! A fleet may run several replica groups, each holding the records of its
//! slots of the shard map ([`crate::shard`]). A node routes a client request
//! to the group of its record ([`Backend::route`]): a node of another group
//! if the record is not its group's, then, inside the group, the leader
//! (only the leader serves). A write commits on a
//! majority and applies as a compare-and-set on the record's sequence
//! number, so a leader whose view of a record was stale cannot commit a
//! change computed from it (it gets `ABORTED`, and the client retries).

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::replication::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tonic::transport::Channel;
use tonic::Status;
use vault_proto::vault::v1::vault_client::VaultClient;

use crate::core::record::{SealedRecord, Stored};
use crate::geo::{Geography, Route};
use crate::replication::network::Channels;
use crate::replication::state_machine::StateMachine;
use crate::replication::{Applied, Command, NodeId};
use crate::shard::{GroupId, ShardMap};
use crate::store::{Store, StoreError, Write};
use crate::types::Seq;

/// A node of a replica group.
pub struct Replica {
    pub id: NodeId,
    pub group: GroupId,
    pub raft: Raft,
    pub sm: StateMachine,
    /// Forwarded client requests cross the same emulated links as Raft.
    pub geo: Geography,
    /// Peer-listener addresses of the other groups' nodes (from the fleet
    /// file).
    directory: BTreeMap<GroupId, Vec<(NodeId, String)>>,
    /// Connections to peer listeners, shared with the Raft network: a
    /// forwarded request travels over the same mutual TLS as Raft.
    channels: Channels,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Replica {
    pub fn new(
        (id, group): (NodeId, GroupId),
        raft: Raft,
        sm: StateMachine,
        geo: Geography,
        directory: BTreeMap<GroupId, Vec<(NodeId, String)>>,
        channels: Channels,
    ) -> Self {
        Replica {
            id,
            group,
            raft,
            sm,
            geo,
            directory,
            channels,
        }
    }

    /// A client for the client API that node `id` serves on its peer
    /// listener at `addr` (the connection is made once and kept).
    fn client(&self, id: NodeId, addr: &str) -> Result<VaultClient<Channel>, Status> {
        Ok(VaultClient::new(
            self.channels.get(id, addr).map_err(no_quorum)?,
        ))
    }

    /// The shard map this group adopted; right after the group formed it
    /// may not have committed one yet, so this waits a little for it.
    async fn shard_map(&self) -> Result<ShardMap, Status> {
        let start = tokio::time::Instant::now();
        loop {
            match self.sm.shard_map() {
                Ok(Some(map)) => return Ok(map),
                Ok(None) if start.elapsed() < MAP_WAIT => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Ok(None) => return Err(Status::unavailable(
                    "this replica group has not adopted the fleet's shard map yet; retry shortly",
                )),
                Err(e) => {
                    tracing::error!(error = %e, "reading the shard map");
                    return Err(Status::unavailable("storage is unavailable; retry shortly"));
                }
            }
        }
    }

    /// A node of group `group` to hand a request to: the nearest one this
    /// node can reach (it forwards to its own leader).
    async fn to_group(&self, group: GroupId) -> Result<VaultClient<Channel>, Status> {
        let nodes = self.directory.get(&group).ok_or_else(|| {
            Status::unavailable(format!("no node of replica group {group} is known here"))
        })?;
        let nearest = nodes
            .iter()
            .filter_map(|(id, addr)| match self.geo.route(*id) {
                Route::Deliver(d) => Some((d, *id, addr)),
                Route::Drop => None,
            })
            .min_by_key(|(d, id, _)| (*d, *id));
        let Some((delay, id, addr)) = nearest else {
            return Err(Status::unavailable(format!(
                "cut off from every node of replica group {group}, which holds this record; \
                 nothing was changed, retry shortly"
            )));
        };
        tokio::time::sleep(2 * delay).await;
        self.client(id, addr)
    }
}

/// How long a request waits for its group to adopt the shard map.
const MAP_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How a client request reached this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// From the client.
    Client,
    /// From a node of another group (it may still go to this group's leader).
    Group,
    /// From a member of this group, to its leader (it goes nowhere else).
    Leader,
    /// From the member of this group a client reached, to its leader, which
    /// routes it as if from the client: the member's map may trail the
    /// leader's (or be missing, while it catches up), so the record may be
    /// another group's after all.
    Unrouted,
}

impl Hop {
    /// The value of the forwarding mark in the request metadata.
    pub fn mark(self) -> &'static str {
        match self {
            Hop::Client => "",
            Hop::Group => "group",
            Hop::Leader => "leader",
            Hop::Unrouted => "member",
        }
    }

    pub fn from_mark(mark: Option<&str>) -> Hop {
        match mark {
            None => Hop::Client,
            Some("group") => Hop::Group,
            Some("member") => Hop::Unrouted,
            // Any other mark: forwarded at least once, no further hop.
            Some(_) => Hop::Leader,
        }
    }
}

/// This node's place in its replica group, as `GetInfo` reports it.
#[derive(Debug, Default)]
pub struct Roles {
    pub node_id: u64,
    /// The leader this node knows of (0: none).
    pub leader_id: u64,
    /// The last log index applied here.
    pub applied_index: u64,
    /// The last log index covered by this node's latest snapshot.
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
}

/// The record storage behind the service.
pub enum Backend {
    Local(Store),
    Replicated(Replica),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Local(_) => f.write_str("Backend::Local"),
            Backend::Replicated(r) => write!(f, "Backend::Replicated(node {})", r.id),
        }
    }
}

/// How long a replicated read or write waits for a majority before it
/// answers UNAVAILABLE (a node cut off from its group must say so, not hang).
pub const QUORUM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage failure");
    Status::unavailable(
        "storage is unavailable; the request may not have been applied (check with Status)",
    )
}

/// The answer of a replica whose state diverged from its group's.
fn diverged() -> Status {
    Status::unavailable(
        "this replica's state differs from its group's (found by a state check); it serves \
         nothing until it is resynced; retry through another node",
    )
}

fn no_quorum(detail: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "this vault node cannot reach a majority of its replica group ({detail}); \
         nothing was changed, retry shortly"
    ))
}

/// Confirms leadership with a majority before a read. Right after an
/// election, or across slow links, one round may miss the quorum: it is
/// retried until [`QUORUM_TIMEOUT`].
async fn linearizable(raft: &Raft) -> Result<(), Status> {
    let start = tokio::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        let left = QUORUM_TIMEOUT.saturating_sub(start.elapsed());
        match tokio::time::timeout(
            left,
            raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RaftError::APIError(e))) if start.elapsed() + pause < QUORUM_TIMEOUT => {
                tracing::debug!(error = %e, "linearizable read not confirmed yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            Ok(Err(e)) => return Err(no_quorum(e)),
            Err(_) => return Err(no_quorum("timed out")),
        }
    }
}

impl Backend {
    /// The record of `id` as currently committed: this leader confirms with
    /// a majority that it still leads and has applied everything committed
    /// before (a round trip to a majority). For answers that no write
    /// backs, like Status.
    pub async fn read(&self, id: &crate::types::RecordId) -> Result<Stored, Status> {
        self.confirm().await?;
        self.read_for_update(id)
    }

    /// Confirms that what this node applied is current (a no-op on a lone
    /// node).
    pub async fn confirm(&self) -> Result<(), Status> {
        match self {
            Backend::Local(_) => Ok(()),
            Backend::Replicated(r) => linearizable(&r.raft).await,
        }
    }

    /// The record of `id` as this node applied it, for a change that
    /// [`Backend::commit`] then writes as a compare-and-set on the record's
    /// sequence number. No leadership round trip: if this node's view was
    /// stale (a deposed leader, entries committed but not applied yet), the
    /// compare-and-set fails when applied in log order and nothing computed
    /// from the stale view takes effect; a KE2 or a secret is released only
    /// after the write applied.
    pub fn read_for_update(&self, id: &crate::types::RecordId) -> Result<Stored, Status> {
        match self {
            Backend::Local(store) => store.get(id).map_err(store_status),
            Backend::Replicated(r) => {
                if r.sm.diverged() {
                    return Err(diverged());
                }
                let got =
                    r.sm.get(&id.0)
                        .map_err(|e| store_status(StoreError::from(e)))?;
                Ok(match got {
                    Some((seq, sealed)) => Stored {
                        record: Some(SealedRecord::from_stored(sealed)),
                        index: Some(Seq(seq)),
                    },
                    None => Stored::default(),
                })
            }
        }
    }

    /// The sequence number for the next write of a record read as `stored`.
    pub fn reserve(&self, stored: &Stored) -> Seq {
        match self {
            Backend::Local(store) => store.reserve(),
            Backend::Replicated(_) => {
                // Larger than the record's current one, and (through the
                // clock) than any of its earlier lives before a deletion.
                let micros = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0);
                Seq(micros.max(stored.index.map_or(0, |s| s.0) + 1))
            }
        }
    }

    /// Makes `write` durable: flushed and anchored on one node, or committed
    /// on a majority and applied (if the record is still at `expect`).
    pub async fn commit(&self, seq: Seq, write: Write, expect: Option<Seq>) -> Result<(), Status> {
        match self {
            Backend::Local(store) => store.commit(seq, write).await.map_err(store_status),
            Backend::Replicated(r) => {
                if r.sm.diverged() {
                    return Err(diverged());
                }
                let expect = expect.map(|s| s.0);
                let command = match write {
                    Write::Put(id, sealed) => Command::Put {
                        id: id.0,
                        expect,
                        seq: seq.0,
                        sealed: sealed.as_bytes().to_vec(),
                    },
                    Write::Delete(id) => Command::Delete { id: id.0, expect },
                };
                let started = tokio::time::Instant::now();
                let written = tokio::time::timeout(QUORUM_TIMEOUT, r.raft.client_write(command))
                    .await
                    .map_err(|_| {
                        no_quorum("timed out waiting for a majority; the write may still commit")
                    })?;
                let elapsed = started.elapsed();
                tracing::debug!(?elapsed, "replicated write");
                crate::telemetry::metrics()
                    .raft_write_seconds
                    .observe(elapsed.as_secs_f64());
                match written {
                    Ok(resp) => match resp.data {
                        Applied::Done => Ok(()),
                        Applied::Conflict { .. } => Err(Status::aborted(
                            "the record changed while this request ran; retry",
                        )),
                        Applied::Refused(reason) => Err(Status::unavailable(reason)),
                    },
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                        Err(no_quorum("leadership moved"))
                    }
                    Err(e) => Err(no_quorum(e)),
                }
            }
        }
    }

    /// This node's place in its group (zeros and empty when alone).
    pub async fn roles(&self) -> Roles {
        match self {
            Backend::Local(_) => Roles::default(),
            Backend::Replicated(r) => {
                let (applied, snapshot, voters) = {
                    let metrics = r.raft.metrics();
                    let m = metrics.borrow_watched();
                    (
                        m.last_applied.map_or(0, |l| l.index),
                        m.snapshot.map_or(0, |l| l.index),
                        m.membership_config.membership().voter_ids().collect(),
                    )
                };
                Roles {
                    node_id: r.id,
                    leader_id: r.raft.current_leader().await.unwrap_or(0),
                    applied_index: applied,
                    snapshot_index: snapshot,
                    voters,
                }
            }
        }
    }

    /// This node's group and the version of the shard map it routes by
    /// (zeros for a lone node, or before the group adopted a map).
    pub fn shard(&self) -> (GroupId, u64) {
        match self {
            Backend::Local(_) => (0, 0),
            Backend::Replicated(r) => (
                r.group,
                r.sm.shard_map().ok().flatten().map_or(0, |m| m.version),
            ),
        }
    }

    /// The group holding record `id` (0 for a lone node).
    pub async fn group_of(&self, id: &crate::types::RecordId) -> Result<GroupId, Status> {
        match self {
            Backend::Local(_) => Ok(0),
            Backend::Replicated(r) => {
                if matches!(r.sm.shard_map(), Ok(None))
                    && r.raft.current_leader().await.is_some_and(|l| l != r.id)
                {
                    // A member that has not caught up (new, or resyncing
                    // from a snapshot) holds no map yet: its leader, which
                    // does, routes the request.
                    return Ok(r.group);
                }
                let group = r.shard_map().await?.group_of(&id.0).ok_or_else(|| {
                    Status::internal("the adopted shard map does not cover a slot")
                })?;
                let frozen = r.sm.frozen_map().ok().flatten();
                match frozen.and_then(|f| f.group_of(&id.0)) {
                    Some(to) if to != group => Err(Status::unavailable(format!(
                        "this record is moving from replica group {group} to {to}; retry shortly"
                    ))),
                    _ => Ok(group),
                }
            }
        }
    }

    /// Where a request for group `group` that reached this node by `hop`
    /// goes: `None` when this node serves it, else the node to forward it to
    /// and the hop it makes. A request crosses to another group at most once
    /// and reaches a leader at most once.
    pub async fn route(
        &self,
        hop: Hop,
        group: GroupId,
    ) -> Result<Option<(VaultClient<Channel>, Hop)>, Status> {
        let Backend::Replicated(r) = self else {
            return Ok(None);
        };
        let elsewhere = || {
            Status::unavailable(format!(
                "a forwarded request reached group {} but its record is in group {group} \
                 by this node's shard map (maps are changing); retry",
                r.group
            ))
        };
        // Another group's record by this node's map. Sent here by a node of
        // another group, the map that counts is this group's as its leader
        // has applied it (a member's may trail it by a few entries just
        // after a map was adopted): the request goes on to the leader,
        // which serves it or says so.
        let trailing = group != r.group;
        if trailing {
            match hop {
                Hop::Client | Hop::Unrouted => {
                    return r.to_group(group).await.map(|c| Some((c, Hop::Group)))
                }
                Hop::Leader => return Err(elsewhere()),
                Hop::Group => {}
            }
        }
        let leader = r.raft.current_leader().await.ok_or_else(|| {
            no_quorum("no leader: an election is in progress or this node is cut off")
        })?;
        if leader == r.id {
            return if trailing { Err(elsewhere()) } else { Ok(None) };
        }
        if hop == Hop::Leader {
            return Err(no_quorum("leadership is moving"));
        }
        match r.geo.route(leader) {
            Route::Drop => return Err(no_quorum("cut off from the leader")),
            // The emulated link delay, both ways, paid up front.
            Route::Deliver(d) => tokio::time::sleep(2 * d).await,
        }
        let addr = {
            let metrics = r.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
        }
        .or_else(|| {
            // A member that has not caught up knows no membership yet: the
            // fleet's directory of its group does.
            r.directory
                .get(&r.group)?
                .iter()
                .find(|(id, _)| *id == leader)
                .map(|(_, addr)| addr.clone())
        })
        .ok_or_else(|| no_quorum("the leader's address is unknown"))?;
        // Straight from a client: the leader's map decides where it goes.
        let next = if hop == Hop::Client {
            Hop::Unrouted
        } else {
            Hop::Leader
        };
        r.client(leader, &addr).map(|c| Some((c, next)))
    }
}
