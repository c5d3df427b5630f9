//! The operator's API on a node: the source side of a cloning ceremony,
//! membership changes, and the steps of moving slots between groups. It is
//! served on the peer listener: under mutual TLS only the operator's client
//! certificate reaches it ([`crate::tls`]), and every request is also
//! signed by the operator's key and fresh (`vault_proto::operator`);
//! nothing here reveals a secret.

use crate::audit::Event;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Raft;
use openraft::BasicNode;
use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use vault_proto::operator;
use vault_proto::vault::node::v1 as pb;
use vault_proto::vault::node::v1::operator_server::Operator;
use zeroize::Zeroizing;

use super::state_machine::StateMachine;
use super::{Applied, Command, ExportedRecord, NodeId};
use crate::partition::{MacKey, Partition};
use crate::shard::{GroupId, ShardMap};
use crate::tls::{PeerCheck, OPERATOR_NAME};

/// Body of `ExportKeys`.
#[derive(Serialize, Deserialize)]
pub struct ExportKeys {
    /// The target token's ephemeral transport public key (hex SEC1).
    pub transport: String,
    /// This (source) token's security-officer PIN, presented by the
    /// operator for this one ceremony (it marks the transport key trusted).
    /// Serving nodes keep no SO PIN: the node uses it and forgets it.
    pub so_pin: String,
}

impl std::fmt::Debug for ExportKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportKeys")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// Body of `AddLearner`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddLearner {
    pub id: NodeId,
    pub addr: String,
}

/// Body of `ChangeMembership`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeMembership {
    pub voters: BTreeSet<NodeId>,
}

/// Body of `Reshard`: one step of moving slots between groups.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reshard {
    /// The group's adopted map, and the map of a move out under way.
    Show,
    /// In the old group: stop changing the records of the slots `map`
    /// moves away.
    Freeze { map: ShardMap },
    /// In the old group: the frozen records, under a token MAC.
    Export { map: ShardMap },
    /// In the new group: the exported records (MAC checked), then `map`.
    Import(Handover),
    /// Adopt `map` (in the old group, once the new one imported; in the
    /// others, to route by it).
    Adopt { map: ShardMap },
}

/// The records of the slots a map moves, as the old group exported them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub map: ShardMap,
    pub records: Vec<ExportedRecord>,
    /// HMAC (hex) made in the old group's token over the map and records:
    /// whoever carries the handover cannot change it (say, swap in an older
    /// copy of a record with more guesses left).
    pub mac: String,
}

/// Answer to `Reshard::Show`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Maps {
    pub group: GroupId,
    pub adopted: Option<ShardMap>,
    pub frozen: Option<ShardMap>,
}

/// Largest operator message: a handover carries every record of the slots
/// it moves in one message (about 1 KiB per record as JSON).
pub const MAX_HANDOVER_MESSAGE: usize = 256 * 1024 * 1024;

/// Records per Raft entry of an import.
const IMPORT_CHUNK: usize = 1000;

const HANDOVER_LABEL: &[u8] = b"hsm-vault/v1/handover";

fn handover_input(map: &ShardMap, records: &[ExportedRecord]) -> Result<Vec<u8>, Status> {
    let mut input = HANDOVER_LABEL.to_vec();
    let encode = |e: serde_json::Error| Status::internal(e.to_string());
    input.extend(serde_json::to_vec(map).map_err(encode)?);
    input.push(0);
    input.extend(serde_json::to_vec(records).map_err(encode)?);
    Ok(input)
}

/// Nonces of the operator requests a node took within the freshness
/// window: the same request is not taken twice. Entries leave once their
/// request is stale anyway. Kept in memory: a node restarted within the
/// window (two minutes) forgets them.
#[derive(Debug, Default)]
pub struct SeenNonces(std::sync::Mutex<std::collections::HashMap<Vec<u8>, u64>>);

/// More requests than an operator makes in a freshness window by far.
const MAX_SEEN_NONCES: usize = 10_000;

impl SeenNonces {
    /// Takes `nonce` (of a request made at `issued_at`) once: refused if
    /// taken before, or if too many are kept.
    fn first_use(&self, nonce: &[u8], issued_at: u64, now: u64) -> Result<(), Status> {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, expires| *expires >= now);
        if seen.contains_key(nonce) {
            return Err(Status::unauthenticated(
                "operator request replayed: its nonce was seen before",
            ));
        }
        if seen.len() >= MAX_SEEN_NONCES {
            return Err(Status::resource_exhausted(
                "too many operator requests in the freshness window",
            ));
        }
        seen.insert(nonce.to_vec(), issued_at + operator::FRESHNESS_SECS);
        Ok(())
    }
}

/// The operator service of one node.
#[derive(Clone)]
pub struct OperatorService {
    /// This node, and its group: requests must name both.
    pub node: NodeId,
    pub group: GroupId,
    /// Nonces of the requests taken recently (replays are refused).
    pub seen: Arc<SeenNonces>,
    pub sm: StateMachine,
    pub raft: Raft,
    pub partition: Arc<Partition>,
    pub operator_key: VerifyingKey,
    /// This token's user PIN, kept to log the user back in after the
    /// ceremony's security-officer step.
    pub user_pin: Arc<Zeroizing<String>>,
    /// Under mutual TLS: only the operator's certificate may call.
    pub peers: PeerCheck,
    /// Where enrolments, membership changes and slot moves are recorded.
    pub audit: Option<Arc<crate::audit::AuditLog>>,
}

impl std::fmt::Debug for OperatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorService").finish_non_exhaustive()
    }
}

impl OperatorService {
    /// The caller's certificate must be the operator's, then the request
    /// must carry the operator's fresh signature.
    fn check<T: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
        request: &Request<pb::OperatorRequest>,
    ) -> Result<T, Status> {
        self.peers.require(request, OPERATOR_NAME)?;
        let req = request.get_ref();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let me = operator::Target {
            node: self.node,
            group: self.group,
        };
        operator::verify(&self.operator_key, kind, me, req, now).map_err(|e| match e {
            operator::OperatorError::WrongTarget { .. } => Status::permission_denied(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        })?;
        self.seen.first_use(&req.nonce, req.issued_at, now)?;
        serde_json::from_slice(&req.body)
            .map_err(|e| Status::invalid_argument(format!("malformed {kind} body: {e}")))
    }
}

impl OperatorService {
    fn audit(&self, event: Event) {
        if let Some(log) = &self.audit {
            log.record(event);
        }
    }

    /// Commits `command` through this node, which must lead its group.
    async fn propose(&self, command: Command) -> Result<(), Status> {
        match self.raft.client_write(command).await {
            Ok(r) => match r.data {
                Applied::Refused(reason) => Err(Status::failed_precondition(reason)),
                _ => Ok(()),
            },
            Err(e) => Err(Status::unavailable(format!(
                "not committed (ask the group's leader): {e}"
            ))),
        }
    }

    async fn mac(&self, input: Vec<u8>) -> Result<[u8; 32], Status> {
        let partition = Arc::clone(&self.partition);
        tokio::task::spawn_blocking(move || partition.session()?.hmac(MacKey::RecordId, &input))
            .await
            .map_err(|_| Status::internal("worker failed"))?
            .map_err(|_| Status::internal("HSM operation failed"))
    }

    async fn settled(&self) -> Result<(), Status> {
        self.raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| Status::unavailable(format!("not the group's leader: {e}")))
    }
}

fn stored(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("storage: {e}"))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<pb::OperatorReply>, Status> {
    Ok(Response::new(pb::OperatorReply {
        body: serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn export_keys(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let mut body: ExportKeys = self.check("ExportKeys", &request)?;
        drop(request);
        // Held for this ceremony only, and wiped after it.
        let so_pin = Zeroizing::new(std::mem::take(&mut body.so_pin));
        let transport = hex::decode(&body.transport)
            .map_err(|_| Status::invalid_argument("transport key is not hex"))?;
        let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&transport));
        if so_pin.trim().is_empty() {
            return Err(Status::invalid_argument(
                "the operator must present this token's SO PIN for the ceremony",
            ));
        }
        let partition = Arc::clone(&self.partition);
        let user_pin = Arc::clone(&self.user_pin);
        let package = tokio::task::spawn_blocking(move || {
            partition
                .export_for_clone(so_pin.trim(), user_pin.as_str(), &transport)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| Status::internal("worker failed"))?
        .map_err(|e| Status::failed_precondition(format!("ceremony failed: {e}")))?;
        tracing::info!("domain keys exported for an operator-vouched transport key");
        self.audit(Event::NodeEnrolled {
            transport_key_sha256: fingerprint,
        });
        reply(&package)
    }

    async fn add_learner(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let body: AddLearner = self.check("AddLearner", &request)?;
        self.raft
            .add_learner(body.id, BasicNode::new(body.addr), true)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(node = body.id, "learner added");
        self.audit(Event::LearnerAdded { learner: body.id });
        reply(&"ok")
    }

    async fn change_membership(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let body: ChangeMembership = self.check("ChangeMembership", &request)?;
        if body.voters.is_empty() {
            return Err(Status::invalid_argument("a group needs at least one voter"));
        }
        self.raft
            .change_membership(body.voters.clone(), false)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        tracing::info!(voters = ?body.voters, "membership changed");
        self.audit(Event::MembershipChanged {
            voters: body.voters.iter().copied().collect(),
        });
        reply(&"ok")
    }

    async fn reshard(
        &self,
        request: Request<pb::OperatorRequest>,
    ) -> Result<Response<pb::OperatorReply>, Status> {
        let step: Reshard = self.check("Reshard", &request)?;
        match step {
            Reshard::Show => {
                self.settled().await?;
                reply(&Maps {
                    group: self.group,
                    adopted: self.sm.shard_map().map_err(stored)?,
                    frozen: self.sm.frozen_map().map_err(stored)?,
                })
            }
            Reshard::Freeze { map } => {
                self.propose(Command::Freeze { map: map.clone() }).await?;
                tracing::info!(
                    version = map.version,
                    "slots frozen for a move out of this group"
                );
                self.audit(Event::SlotsMoved {
                    step: format!("frozen for map version {}", map.version),
                });
                reply(&"ok")
            }
            Reshard::Export { map } => {
                self.settled().await?;
                if self.sm.frozen_map().map_err(stored)?.as_ref() != Some(&map) {
                    return Err(Status::failed_precondition(
                        "freeze the slots for this map first",
                    ));
                }
                let records = self.sm.export(&map).map_err(stored)?;
                let mac = self.mac(handover_input(&map, &records)?).await?;
                tracing::info!(
                    version = map.version,
                    records = records.len(),
                    "slots exported"
                );
                reply(&Handover {
                    map,
                    records,
                    mac: hex::encode(mac),
                })
            }
            Reshard::Import(handover) => {
                let expected = self
                    .mac(handover_input(&handover.map, &handover.records)?)
                    .await?;
                let given = hex::decode(&handover.mac).unwrap_or_default();
                if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &given[..])) {
                    return Err(Status::unauthenticated(
                        "handover MAC does not verify: not an export of this fleet's tokens, or changed",
                    ));
                }
                let Handover { map, records, .. } = handover;
                let count = records.len();
                let mut chunks: Vec<Vec<ExportedRecord>> = records
                    .chunks(IMPORT_CHUNK)
                    .map(<[ExportedRecord]>::to_vec)
                    .collect();
                if chunks.is_empty() {
                    chunks.push(Vec::new());
                }
                let last = chunks.len() - 1;
                for (i, records) in chunks.into_iter().enumerate() {
                    self.propose(Command::Import {
                        map: map.clone(),
                        records,
                        last: i == last,
                    })
                    .await?;
                }
                tracing::info!(version = map.version, records = count, "slots imported");
                self.audit(Event::SlotsMoved {
                    step: format!("{count} records imported for map version {}", map.version),
                });
                reply(&"ok")
            }
            Reshard::Adopt { map } => {
                self.propose(Command::AdoptMap { map: map.clone() }).await?;
                tracing::info!(version = map.version, "shard map adopted");
                self.audit(Event::SlotsMoved {
                    step: format!("map version {} adopted", map.version),
                });
                reply(&"ok")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_taken_once_within_its_window_and_forgotten_after() {
        let seen = SeenNonces::default();
        seen.first_use(b"n1", 1000, 1000).expect("first");
        let again = seen.first_use(b"n1", 1000, 1001).expect_err("replay");
        assert_eq!(again.code(), tonic::Code::Unauthenticated);
        seen.first_use(b"n2", 1000, 1001).expect("another nonce");
        // Once stale, the request is refused by its time; its nonce is let go.
        seen.first_use(b"n3", 2000, 1000 + operator::FRESHNESS_SECS + 1)
            .expect("kept small");
        assert_eq!(seen.0.lock().expect("lock").len(), 1);
    }
}
