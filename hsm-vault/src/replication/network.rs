//! Raft messages between the nodes of a replica group, over gRPC, each
//! request and response authenticated with a MAC made inside the tokens.
//!
//! The MAC key is a domain key (the record-id key, under its own label), so
//! only tokens that went through the cloning ceremony can produce or check
//! it: a process that is not a member cannot vote, append or install
//! snapshots, and cannot forge an answer. Underneath, the messages travel
//! over mutual TLS between the nodes' peer listeners ([`crate::tls`]): a
//! message is taken only from the certificate of the node it names as its
//! sender.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft};
use serde::de::DeserializeOwned;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vault_proto::vault::node::v1 as pb;
use vault_proto::vault::node::v1::node_client::NodeClient;
use vault_proto::vault::node::v1::node_server::Node;

use super::{NodeId, TypeConfig};
use crate::geo::{Geography, Route};
use crate::partition::{MacKey, Partition, PartitionError};
use crate::shard::GroupId;
use crate::tls::{node_name, PeerCheck, PeerConnector};

const REQUEST_LABEL: &[u8] = b"hsm-vault/v1/peer-request";
const RESPONSE_LABEL: &[u8] = b"hsm-vault/v1/peer-response";

/// Largest Raft message accepted (snapshot chunks are the big ones).
pub const MAX_RAFT_MESSAGE: usize = 8 * 1024 * 1024;

/// Who sent a message to whom, in which group.
#[derive(Clone, Copy, Debug)]
struct Hop {
    group: GroupId,
    from: NodeId,
    to: NodeId,
}

fn mac_input(label: &[u8], kind: &str, hop: Hop, payload: &[u8]) -> Vec<u8> {
    let Hop { group, from, to } = hop;
    let mut d = Vec::with_capacity(label.len() + kind.len() + 25 + payload.len());
    d.extend_from_slice(label);
    d.extend_from_slice(kind.as_bytes());
    d.push(0);
    d.extend_from_slice(&group.to_be_bytes());
    d.extend_from_slice(&from.to_be_bytes());
    d.extend_from_slice(&to.to_be_bytes());
    d.extend_from_slice(payload);
    d
}

fn mac(partition: &Arc<Partition>, input: &[u8]) -> Result<[u8; 32], PartitionError> {
    partition.session()?.hmac(MacKey::RecordId, input)
}

fn verify(partition: &Arc<Partition>, input: &[u8], tag: &[u8]) -> bool {
    match mac(partition, input) {
        Ok(expected) => bool::from(expected.ct_eq(tag)),
        Err(_) => false,
    }
}

/// A snapshot chunk on the wire: the request without its data as JSON
/// (length-prefixed, u32 big-endian), then the data as is. In JSON the
/// data would be an array of numbers, three to four times its size.
pub fn frame_snapshot_chunk(head: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(data);
    out
}

/// Splits a framed snapshot chunk into its JSON head and its data.
pub fn unframe_snapshot_chunk(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = payload.split_at_checked(4)?;
    let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
    rest.split_at_checked(len)
}

/// Makes a client per peer.
#[derive(Clone, Debug)]
pub struct Network {
    pub id: NodeId,
    pub group: GroupId,
    pub partition: Arc<Partition>,
    /// Emulated latency and fault switches on outgoing messages.
    pub geo: Geography,
    /// One HTTP/2 connection per peer address, shared by every client
    /// openraft makes: it makes a new one for each replication stream, vote
    /// round and leadership check, and a TCP and HTTP/2 handshake each time
    /// cost more than the message.
    pub channels: Channels,
}

/// Connections to peers' peer listeners (mutual TLS unless the node runs
/// in plaintext), by node id and address.
#[derive(Clone, Debug, Default)]
pub struct Channels {
    connector: PeerConnector,
    open: Arc<std::sync::Mutex<std::collections::HashMap<(NodeId, String), Channel>>>,
}

impl Channels {
    pub fn new(connector: PeerConnector) -> Self {
        Channels {
            connector,
            open: Default::default(),
        }
    }

    /// The connection to node `id` at `addr`, made (lazily: it connects on
    /// first use, and reconnects by itself after a failure) if there is
    /// none yet.
    pub fn get(&self, id: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id, addr.to_owned());
        if let Some(c) = open.get(&key) {
            return Ok(c.clone());
        }
        let channel = self
            .connector
            .endpoint(id, addr)?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        open.insert(key, channel.clone());
        Ok(channel)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            hop: Hop {
                group: self.group,
                from: self.id,
                to: target,
            },
            addr: node.addr.clone(),
            partition: Arc::clone(&self.partition),
            geo: self.geo.clone(),
            channels: self.channels.clone(),
            client: None,
        }
    }
}

/// The connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    hop: Hop,
    /// The peer's peer listener (HOST:PORT).
    addr: String,
    partition: Arc<Partition>,
    geo: Geography,
    channels: Channels,
    client: Option<NodeClient<Channel>>,
}

type Rpc<T, E> = Result<T, RPCError<NodeId, BasicNode, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: &str,
        req: &Req,
        timeout: Duration,
    ) -> Rpc<Resp, RaftError<NodeId, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = serde_json::to_vec(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))?;
        self.send(kind, payload, timeout).await
    }

    /// Sends `payload` (the encoded request) as a MAC'd Raft message of
    /// `kind` over the emulated link, and checks and decodes the answer.
    async fn send<Resp, E>(
        &mut self,
        kind: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Rpc<Resp, RaftError<NodeId, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable = |e: &dyn std::fmt::Display| {
            RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
        };
        let network = |e: &dyn std::fmt::Display| {
            RPCError::Network(NetworkError::new(&AnyError::error(e.to_string())))
        };
        let delay = match self.geo.route(self.hop.to) {
            Route::Drop => return Err(unreachable(&"link cut or message lost (fault switch)")),
            Route::Deliver(d) => d,
        };
        tokio::time::sleep(delay).await;
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let tag = mac(
            &self.partition,
            &mac_input(
                REQUEST_LABEL,
                kind,
                self.hop,
                &[&nonce[..], &payload].concat(),
            ),
        )
        .map_err(|e| network(&e))?;
        if self.client.is_none() {
            let channel = self
                .channels
                .get(self.hop.to, &self.addr)
                .map_err(|e| unreachable(&e))?;
            self.client = Some(
                NodeClient::new(channel)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE),
            );
        }
        let Some(client) = self.client.as_mut() else {
            return Err(unreachable(&"no connection"));
        };
        let mut request = Request::new(pb::RaftRequest {
            kind: kind.to_owned(),
            group: self.hop.group,
            from: self.hop.from,
            to: self.hop.to,
            payload,
            mac: tag.to_vec(),
            nonce: nonce.to_vec(),
        });
        request.set_timeout(timeout);
        let response = match client.raft(request).await {
            Ok(r) => r.into_inner(),
            // The shared channel reconnects by itself.
            Err(status) => return Err(unreachable(&status)),
        };
        // The answer travels back over the same emulated link.
        tokio::time::sleep(delay).await;
        let input = mac_input(
            RESPONSE_LABEL,
            kind,
            self.hop,
            &[&tag[..], &response.payload].concat(),
        );
        if !verify(&self.partition, &input, &response.mac) {
            return Err(network(&Status::unauthenticated(
                "peer response MAC does not verify",
            )));
        }
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&response.payload).map_err(|e| network(&e))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.hop.to, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        self.call("append_entries", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let mut rpc = rpc;
        let data = std::mem::take(&mut rpc.data);
        let head = serde_json::to_vec(&rpc)
            .map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))?;
        self.send(
            "install_snapshot",
            frame_snapshot_chunk(&head, &data),
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}

/// The server side: checks the MAC, hands the message to Raft, MACs the
/// answer.
#[derive(Clone)]
pub struct NodeService {
    pub id: NodeId,
    pub group: GroupId,
    pub raft: Raft<TypeConfig>,
    pub partition: Arc<Partition>,
    /// While resyncing after a rollback: the log index to reach before this
    /// node votes again (its old votes were cast on a log it no longer has).
    pub resync_floor: Option<u64>,
    /// Under mutual TLS: a message must come from the certificate of the
    /// node it names as its sender.
    pub peers: PeerCheck,
    /// Gathers and checks snapshots before Raft installs them.
    pub inbox: Arc<super::inbox::SnapshotInbox>,
}

impl NodeService {
    fn resyncing(&self) -> bool {
        resyncing(&self.raft, self.resync_floor)
    }
}

/// Whether a replica that reopened after a rollback with `floor` (see
/// [`super::log_store::LogStore::resync_floor`]) must still refuse to vote:
/// its log has not reached the floor again.
pub fn resyncing(raft: &Raft<TypeConfig>, floor: Option<u64>) -> bool {
    let Some(floor) = floor else {
        return false;
    };
    let last = raft.metrics().borrow().last_log_index.unwrap_or(0);
    last < floor
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService")
            .field("id", &self.id)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("malformed Raft message: {e}"))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn raft(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let from = request.get_ref().from;
        self.peers.require(&request, &node_name(from))?;
        let req = request.into_inner();
        if req.to != self.id {
            return Err(Status::failed_precondition(
                "message addressed to another node",
            ));
        }
        if req.group != self.group {
            return Err(Status::failed_precondition(format!(
                "message for group {}, this node is in group {}",
                req.group, self.group
            )));
        }
        let hop = Hop {
            group: req.group,
            from: req.from,
            to: req.to,
        };
        if req.nonce.len() != 16 {
            return Err(Status::invalid_argument(
                "peer message nonce must be 16 bytes",
            ));
        }
        let input = mac_input(
            REQUEST_LABEL,
            &req.kind,
            hop,
            &[&req.nonce[..], &req.payload].concat(),
        );
        // One token HMAC (a session object's): cheaper inline than a hop to
        // a blocking thread and back.
        if !verify(&self.partition, &input, &req.mac) {
            tracing::warn!(from = req.from, kind = %req.kind, "refused a peer message whose MAC does not verify");
            return Err(Status::unauthenticated(
                "peer message MAC does not verify: the sender is not a member of this domain",
            ));
        }
        let payload = match req.kind.as_str() {
            "append_entries" => {
                let rpc: AppendEntriesRequest<TypeConfig> =
                    serde_json::from_slice(&req.payload).map_err(bad_request)?;
                serde_json::to_vec(&self.raft.append_entries(rpc).await)
            }
            "vote" => {
                if self.resyncing() {
                    tracing::warn!(from = req.from, "not voting: resyncing after a rollback");
                    return Err(Status::unavailable(
                        "resyncing after a storage rollback: not voting until caught up",
                    ));
                }
                let rpc: VoteRequest<NodeId> =
                    serde_json::from_slice(&req.payload).map_err(bad_request)?;
                serde_json::to_vec(&self.raft.vote(rpc).await)
            }
            "install_snapshot" => {
                let (head, data) = unframe_snapshot_chunk(&req.payload)
                    .ok_or_else(|| Status::invalid_argument("malformed snapshot chunk"))?;
                let mut rpc: InstallSnapshotRequest<TypeConfig> =
                    serde_json::from_slice(head).map_err(bad_request)?;
                rpc.data = data.to_vec();
                let answer = self
                    .inbox
                    .receive(rpc)
                    .await
                    .map_err(|refused| Status::failed_precondition(refused.to_string()))?;
                serde_json::to_vec(&answer)
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown Raft message kind {other:?}"
                )))
            }
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        let input = mac_input(
            RESPONSE_LABEL,
            &req.kind,
            hop,
            &[&req.mac[..], &payload].concat(),
        );
        let tag =
            mac(&self.partition, &input).map_err(|_| Status::internal("HSM operation failed"))?;
        Ok(Response::new(pb::RaftResponse {
            payload,
            mac: tag.to_vec(),
        }))
    }
}
