//! Where the service keeps records: one node's token-anchored store, or a
//! Raft replica group. Host code: it moves sealed bytes and sequence numbers
//! only.
//!
//! In a replica group only the leader serves; other nodes forward client
//! requests to it ([`Backend::leader_client`]). A write commits on a
//! majority and applies as a compare-and-set on the record's sequence
//! number, so a leader whose view of a record was stale cannot commit a
//! change computed from it (it gets `ABORTED`, and the client retries).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::Status;
use vault_proto::vault::v1::vault_client::VaultClient;

use crate::core::record::{SealedRecord, Stored};
use crate::geo::{Geography, Route};
use crate::replication::state_machine::StateMachine;
use crate::replication::{Applied, Command, NodeId, TypeConfig};
use crate::store::{Store, StoreError, Write};
use crate::types::Seq;

/// A node of a replica group.
pub struct Replica {
    pub id: NodeId,
    pub raft: Raft<TypeConfig>,
    pub sm: StateMachine,
    /// Forwarded client requests cross the same emulated links as Raft.
    pub geo: Geography,
    peers: Mutex<HashMap<NodeId, VaultClient<Channel>>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Replica {
    pub fn new(id: NodeId, raft: Raft<TypeConfig>, sm: StateMachine, geo: Geography) -> Self {
        Replica {
            id,
            raft,
            sm,
            geo,
            peers: Mutex::new(HashMap::new()),
        }
    }
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

fn no_quorum(detail: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "this vault node cannot reach a majority of its replica group ({detail}); \
         nothing was changed, retry shortly"
    ))
}

/// Confirms leadership with a majority before a read. Right after an
/// election, or across slow links, one round may miss the quorum: it is
/// retried until [`QUORUM_TIMEOUT`].
async fn linearizable(raft: &Raft<TypeConfig>) -> Result<(), Status> {
    let start = tokio::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        let left = QUORUM_TIMEOUT.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, raft.ensure_linearizable()).await {
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
    /// The record of `id` as currently committed.
    pub async fn read(&self, id: &crate::types::RecordId) -> Result<Stored, Status> {
        match self {
            Backend::Local(store) => store.get(id).map_err(store_status),
            Backend::Replicated(r) => {
                // Make sure this leader has applied everything committed
                // before it, so the charge starts from the current count.
                linearizable(&r.raft).await?;
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
                let written = tokio::time::timeout(QUORUM_TIMEOUT, r.raft.client_write(command))
                    .await
                    .map_err(|_| {
                        no_quorum("timed out waiting for a majority; the write may still commit")
                    })?;
                match written {
                    Ok(resp) => match resp.data {
                        Applied::Done => Ok(()),
                        Applied::Conflict { .. } => Err(Status::aborted(
                            "the record changed while this request ran; retry",
                        )),
                    },
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                        Err(no_quorum("leadership moved"))
                    }
                    Err(e) => Err(no_quorum(e)),
                }
            }
        }
    }

    /// This node's id, the leader it knows of, the last log index it
    /// applied and the voters it knows (zeros and empty when alone).
    pub async fn roles(&self) -> (u64, u64, u64, Vec<u64>) {
        match self {
            Backend::Local(_) => (0, 0, 0, Vec::new()),
            Backend::Replicated(r) => {
                let (applied, voters) = {
                    let metrics = r.raft.metrics();
                    let m = metrics.borrow();
                    (
                        m.last_applied.map_or(0, |l| l.index),
                        m.membership_config.membership().voter_ids().collect(),
                    )
                };
                (
                    r.id,
                    r.raft.current_leader().await.unwrap_or(0),
                    applied,
                    voters,
                )
            }
        }
    }

    /// The leader to forward a client request to, or `None` when this node
    /// serves it itself. A request that was already forwarded once is never
    /// forwarded again.
    pub async fn leader_client(
        &self,
        already_forwarded: bool,
    ) -> Result<Option<VaultClient<Channel>>, Status> {
        let Backend::Replicated(r) = self else {
            return Ok(None);
        };
        let leader = r.raft.current_leader().await.ok_or_else(|| {
            no_quorum("no leader: an election is in progress or this node is cut off")
        })?;
        if leader == r.id {
            return Ok(None);
        }
        if already_forwarded {
            return Err(no_quorum("leadership is moving"));
        }
        match r.geo.route(leader) {
            Route::Drop => return Err(no_quorum("cut off from the leader")),
            // The emulated link delay, both ways, paid up front.
            Route::Deliver(d) => tokio::time::sleep(2 * d).await,
        }
        let mut peers = r.peers.lock().await;
        if let Some(c) = peers.get(&leader) {
            return Ok(Some(c.clone()));
        }
        let addr = {
            let metrics = r.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
        }
        .ok_or_else(|| no_quorum("the leader's address is unknown"))?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(no_quorum)?
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy();
        let client = VaultClient::new(channel);
        peers.insert(leader, client.clone());
        Ok(Some(client))
    }
}
