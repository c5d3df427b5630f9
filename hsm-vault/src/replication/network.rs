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

use openraft::async_runtime::WatchReceiver;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, BasicNode};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use vault_proto::vault::node::v1 as pb;
use vault_proto::vault::node::v1::node_client::NodeClient;
use vault_proto::vault::node::v1::node_server::Node;
use zeroize::Zeroizing;

use super::codec::{self, Remote, Wire};
use super::inbox::SnapshotChunk;
use super::{NodeId, Raft, SnapshotData, TypeConfig, VaultSnapshot, Vote};
use crate::geo::{Geography, Route};
use crate::partition::{MacKey, Partition, PartitionError};
use crate::shard::GroupId;
use crate::tls::{node_name, PeerCheck, PeerConnector};

const REQUEST_LABEL: &[u8] = b"hsm-vault/v1/peer-request";
const RESPONSE_LABEL: &[u8] = b"hsm-vault/v1/peer-response";
const STREAM_KEY_LABEL: &[u8] = b"hsm-vault/v1/peer-stream-key";
const STREAM_REQUEST_LABEL: &[u8] = b"hsm-vault/v1/peer-stream-request";
const STREAM_RESPONSE_LABEL: &[u8] = b"hsm-vault/v1/peer-stream-response";

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

/// The key of one AppendEntries stream over `hop`, opened with the 16-byte
/// `nonce`: `HMAC(record-id key, "hsm-vault/v1/peer-stream-key" || group ||
/// from || to || nonce)`, made inside the token, so only a member of the
/// domain can make it; each end makes it once per stream, and the frames
/// are then MAC'd with it in software (see [`frame_mac`]).
fn stream_key(
    partition: &Arc<Partition>,
    hop: Hop,
    nonce: &[u8],
) -> Result<Zeroizing<[u8; 32]>, PartitionError> {
    mac(partition, &mac_input(STREAM_KEY_LABEL, "", hop, nonce)).map(Zeroizing::new)
}

/// The MAC of frame `seq` of a stream (a request with `label`
/// [`STREAM_REQUEST_LABEL`], or the answer to it with
/// [`STREAM_RESPONSE_LABEL`]) under the stream's key.
fn frame_mac(key: &[u8; 32], label: &[u8], hop: Hop, seq: u64, payload: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .expect("HMAC takes a key of any length");
    m.update(&mac_input(label, "", hop, &seq.to_be_bytes()));
    m.update(payload);
    m.finalize().into_bytes().into()
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
            link: Link {
                hop: Hop {
                    group: self.group,
                    from: self.id,
                    to: target,
                },
                partition: Arc::clone(&self.partition),
                geo: self.geo.clone(),
            },
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            client: None,
        }
    }
}

/// The largest snapshot chunk sent in one message.
pub const SNAPSHOT_CHUNK: usize = 4 * 1024 * 1024;

/// How long the last chunk of a snapshot of `len` bytes may take. The
/// receiver answers it only after checking the whole snapshot (a token MAC
/// per record) and installing it: about 10 s for a million records here.
/// Held to the per-chunk timeout (openraft's `install_snapshot_timeout`,
/// 200 ms), that answer never arrived in time, so the leader sent the
/// snapshot again and again and the member never caught up; the bound
/// allows 5 MB/s of checking after a 10 s start.
pub fn last_chunk_timeout(chunk_timeout: Duration, len: usize) -> Duration {
    const CHECKED_PER_SECOND: usize = 5 * 1024 * 1024;
    let checking = Duration::from_secs(10 + (len / CHECKED_PER_SECOND) as u64);
    chunk_timeout.max(checking)
}

/// One direction of the path to a peer: who talks to whom, the token that
/// MACs, and the emulated geography.
#[derive(Clone, Debug)]
struct Link {
    hop: Hop,
    partition: Arc<Partition>,
    geo: Geography,
}

impl Link {
    /// The emulated one-way delay to the peer now, or `None` when the fault
    /// switches drop the message.
    fn delay(&self) -> Option<Duration> {
        match self.geo.route(self.hop.to) {
            Route::Drop => None,
            Route::Deliver(d) => Some(d),
        }
    }

    /// A request of `kind` carrying `payload`, with a fresh nonce and its
    /// token MAC.
    fn request(&self, kind: &str, payload: Vec<u8>) -> Result<pb::RaftRequest, PartitionError> {
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
        )?;
        Ok(pb::RaftRequest {
            kind: kind.to_owned(),
            group: self.hop.group,
            from: self.hop.from,
            to: self.hop.to,
            payload,
            mac: tag.to_vec(),
            nonce: nonce.to_vec(),
        })
    }

    /// Checks the answer to the request whose MAC was `request_mac`, and
    /// decodes it.
    fn answer<T: Wire>(
        &self,
        kind: &str,
        request_mac: &[u8],
        response: &pb::RaftResponse,
    ) -> Result<T, RPCError<TypeConfig>> {
        let input = mac_input(
            RESPONSE_LABEL,
            kind,
            self.hop,
            &[request_mac, &response.payload].concat(),
        );
        if !verify(&self.partition, &input, &response.mac) {
            return Err(network(&"peer response MAC does not verify"));
        }
        codec::decode(&response.payload).map_err(|e| network(&e))
    }
}

fn unreachable(e: &dyn std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
}

fn network(e: &dyn std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&AnyError::error(e.to_string())))
}

/// The connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    link: Link,
    /// The peer's peer listener (HOST:PORT).
    addr: String,
    channels: Channels,
    client: Option<NodeClient<Channel>>,
}

type Rpc<T> = Result<T, RPCError<TypeConfig>>;

impl PeerClient {
    fn client(&mut self) -> Rpc<NodeClient<Channel>> {
        if self.client.is_none() {
            let channel = self
                .channels
                .get(self.link.hop.to, &self.addr)
                .map_err(|e| unreachable(&e))?;
            self.client = Some(
                NodeClient::new(channel)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE),
            );
        }
        self.client
            .clone()
            .ok_or_else(|| unreachable(&"no connection"))
    }

    async fn call<Req, Resp>(&mut self, kind: &str, req: &Req, timeout: Duration) -> Rpc<Resp>
    where
        Req: Wire,
        Remote<Resp>: Wire,
    {
        let payload = codec::encode(req);
        self.send(kind, payload, timeout).await
    }

    /// Sends `payload` (the encoded request) as a MAC'd Raft message of
    /// `kind` over the emulated link, and checks and decodes the answer.
    async fn send<Resp>(&mut self, kind: &str, payload: Vec<u8>, timeout: Duration) -> Rpc<Resp>
    where
        Remote<Resp>: Wire,
    {
        let client = self.client()?;
        send_over(self.link.clone(), client, kind, payload, timeout).await
    }

    /// Sends a snapshot in chunks of [`SNAPSHOT_CHUNK`], each a MAC'd
    /// message the receiver gathers and checks before installing.
    async fn send_snapshot(
        &mut self,
        vote: Vote,
        snapshot: VaultSnapshot,
        timeout: Duration,
    ) -> Rpc<SnapshotResponse<TypeConfig>> {
        let (link, client) = (self.link.clone(), self.client()?);
        super::inbox::send_in_chunks(
            vote,
            snapshot,
            rand::random(),
            SNAPSHOT_CHUNK,
            |mut chunk: SnapshotChunk| {
                let (link, client) = (link.clone(), client.clone());
                async move {
                    let data = std::mem::take(&mut chunk.data);
                    let timeout = if chunk.done {
                        last_chunk_timeout(timeout, chunk.offset as usize + data.len())
                    } else {
                        timeout
                    };
                    let head = codec::encode(&chunk);
                    let framed = frame_snapshot_chunk(&head, &data);
                    send_over(link, client, "install_snapshot", framed, timeout).await
                }
            },
            |fatal| unreachable(&format!("the peer's Raft stopped: {fatal}")),
        )
        .await
    }

    /// Opens the pipelined AppendEntries stream: requests go out as openraft
    /// produces them, each delayed by the emulated link; answers come back
    /// in order. The stream's key is made by the token once; each frame
    /// and each answer is MAC'd with it and its place in the stream.
    async fn open_stream<S>(&mut self, input: S) -> Rpc<AppendStream>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let link = self.link.clone();
        let hop = link.hop;
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let key = stream_key(&link.partition, hop, &nonce).map_err(|e| network(&e))?;
        let (to_peer, outgoing) = tokio::sync::mpsc::unbounded_channel::<pb::RaftRequest>();
        // Frames leave in order, each once its emulated delay has passed
        // since openraft produced it, so the link stays full.
        let (stamped, mut due) = tokio::sync::mpsc::unbounded_channel();
        let (sender, sending_key) = (link.clone(), key.clone());
        let mut tasks = StreamTasks::default();
        tasks.spawn(async move {
            let mut input = input;
            let mut seq = 0u64;
            while let Some(req) = input.next().await {
                let Some(delay) = sender.delay() else {
                    break;
                };
                let payload = codec::encode(&req);
                let tag = frame_mac(&sending_key, STREAM_REQUEST_LABEL, hop, seq, &payload);
                seq += 1;
                let frame = pb::RaftRequest {
                    kind: STREAM_KIND.to_owned(),
                    group: hop.group,
                    from: hop.from,
                    to: hop.to,
                    payload,
                    mac: tag.to_vec(),
                    nonce: nonce.to_vec(),
                };
                if stamped.send((Instant::now() + delay, frame)).is_err() {
                    break;
                }
            }
        });
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = sent.clone();
        tasks.spawn(async move {
            while let Some((at, frame)) = due.recv().await {
                tokio::time::sleep_until(at).await;
                if to_peer.send(frame).is_err() {
                    break;
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing);
        let responses = match self.client()?.raft_stream(outgoing).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(unreachable(&status)),
        };
        // Answers come back over the same emulated link.
        let (back, arrived) = tokio::sync::mpsc::unbounded_channel();
        tasks.spawn(async move {
            let mut responses = responses;
            loop {
                let next = responses.next().await;
                let delay = link.delay().unwrap_or_default();
                let end = !matches!(next, Some(Ok(_)));
                if back.send((Instant::now() + delay, next)).is_err() || end {
                    break;
                }
            }
        });
        let answers =
            futures_util::stream::unfold((key, arrived, 0u64), move |(key, mut arrived, seq)| {
                // The stream's tasks live as long as its answers are read.
                let _tasks = &tasks;
                let sent = sent.clone();
                async move {
                    if seq == u64::MAX {
                        return None;
                    }
                    // A peer that stops answering (a frozen process, a
                    // connection that hangs) ends the stream, so that openraft
                    // opens a new one; an idle stream waits.
                    let (at, next) = loop {
                        match tokio::time::timeout(STREAM_SILENCE, arrived.recv()).await {
                            Ok(arrival) => break arrival?,
                            Err(_) if sent.load(std::sync::atomic::Ordering::SeqCst) > seq => {
                                return Some((
                                    Err(unreachable(&"the peer stopped answering its stream")),
                                    (key, arrived, u64::MAX),
                                ));
                            }
                            Err(_) => continue,
                        }
                    };
                    tokio::time::sleep_until(at).await;
                    let response = match next {
                        Some(Ok(r)) => r,
                        Some(Err(status)) => {
                            return Some((Err(unreachable(&status)), (key, arrived, seq)))
                        }
                        None => return None,
                    };
                    let expected =
                        frame_mac(&key, STREAM_RESPONSE_LABEL, hop, seq, &response.payload);
                    let answer = if bool::from(expected.ct_eq(&response.mac)) {
                        codec::decode::<Remote<StreamAppendResult<TypeConfig>>>(&response.payload)
                            .map_err(|e| network(&e))
                            .and_then(|a| {
                                a.map_err(|fatal| {
                                    unreachable(&format!("the peer's Raft stopped: {fatal}"))
                                })
                            })
                    } else {
                        Err(network(&"peer stream answer MAC does not verify"))
                    };
                    Some((answer, (key, arrived, seq + 1)))
                }
            });
        Ok(Box::pin(answers))
    }
}

/// Tasks that serve one stream, stopped when it is dropped. openraft drops
/// the answers of a stream it is done with (after a conflict, an error, or
/// when it starts another); the task reading its requests must stop then,
/// or it keeps polling openraft's request stream, which holds the
/// replication's state locked while it waits for entries, and the next
/// stream to that follower never starts.
#[derive(Debug, Default)]
pub struct StreamTasks(Vec<tokio::task::AbortHandle>);

impl StreamTasks {
    /// Runs `task` for as long as this lives.
    pub fn spawn<F>(&mut self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.0.push(tokio::spawn(task).abort_handle());
    }
}

impl Drop for StreamTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// How long a stream with frames awaiting answers may stay silent before
/// it is given up (openraft then opens another).
const STREAM_SILENCE: Duration = Duration::from_secs(5);

/// Sends `payload` (the encoded request) as a MAC'd Raft message of `kind`
/// over the emulated `link` with `client`, and checks and decodes the answer.
async fn send_over<Resp>(
    link: Link,
    mut client: NodeClient<Channel>,
    kind: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Rpc<Resp>
where
    Remote<Resp>: Wire,
{
    let delay = link
        .delay()
        .ok_or_else(|| unreachable(&"link cut or message lost (fault switch)"))?;
    tokio::time::sleep(delay).await;
    let request = link.request(kind, payload).map_err(|e| network(&e))?;
    let tag = request.mac.clone();
    let mut request = Request::new(request);
    request.set_timeout(timeout);
    let response = match client.raft(request).await {
        Ok(r) => r.into_inner(),
        // The shared channel reconnects by itself.
        Err(status) => return Err(unreachable(&status)),
    };
    // The answer travels back over the same emulated link.
    tokio::time::sleep(delay).await;
    let answer: Remote<Resp> = link.answer(kind, &tag, &response)?;
    answer.map_err(|fatal| unreachable(&format!("the peer's Raft stopped: {fatal}")))
}

/// The kind of every frame of an AppendEntries stream.
const STREAM_KIND: &str = "append_entries";

/// The answers of an AppendEntries stream.
type AppendStream = BoxStream<'static, Rpc<StreamAppendResult<TypeConfig>>>;

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<TypeConfig>> {
        self.call("append_entries", &rpc, option.hard_ttl()).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<'s, Rpc<BoxStream<'s, Rpc<StreamAppendResult<TypeConfig>>>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let answers: BoxStream<'s, _> = self.open_stream(input).await?;
            Ok(answers)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<TypeConfig>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: VaultSnapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let timeout = option.hard_ttl();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot, timeout) => {
                sent.map_err(super::inbox::streaming_error)
            }
        }
    }
}

/// The server side: checks the MAC, hands the message to Raft, MACs the
/// answer.
#[derive(Clone)]
pub struct NodeService {
    pub id: NodeId,
    pub group: GroupId,
    pub raft: Raft,
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

    /// Checks a request's addressing and MAC: the hop it travelled.
    fn check(&self, req: &pb::RaftRequest) -> Result<Hop, Status> {
        check_request(self.id, self.group, &self.partition, req)
    }

    /// The MAC'd answer to the request `req` (of hop `hop`).
    fn answer(
        &self,
        req: &pb::RaftRequest,
        hop: Hop,
        payload: Vec<u8>,
    ) -> Result<pb::RaftResponse, Status> {
        let input = mac_input(
            RESPONSE_LABEL,
            &req.kind,
            hop,
            &[&req.mac[..], &payload].concat(),
        );
        let tag =
            mac(&self.partition, &input).map_err(|_| Status::internal("HSM operation failed"))?;
        Ok(pb::RaftResponse {
            payload,
            mac: tag.to_vec(),
        })
    }
}

/// Checks a request to node `me` of group `group`: addressed here, a
/// 16-byte nonce, and a MAC the token verifies.
fn check_request(
    me: NodeId,
    group: GroupId,
    partition: &Arc<Partition>,
    req: &pb::RaftRequest,
) -> Result<Hop, Status> {
    if req.to != me {
        return Err(Status::failed_precondition(
            "message addressed to another node",
        ));
    }
    if req.group != group {
        return Err(Status::failed_precondition(format!(
            "message for group {}, this node is in group {group}",
            req.group
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
    if !verify(partition, &input, &req.mac) {
        tracing::warn!(from = req.from, kind = %req.kind, "refused a peer message whose MAC does not verify");
        return Err(Status::unauthenticated(
            "peer message MAC does not verify: the sender is not a member of this domain",
        ));
    }
    Ok(hop)
}

/// Whether a replica that reopened after a rollback with `floor` (see
/// [`super::log_store::LogStore::resync_floor`]) must still refuse to vote:
/// its log has not reached the floor again.
pub fn resyncing(raft: &Raft, floor: Option<u64>) -> bool {
    let Some(floor) = floor else {
        return false;
    };
    let last = raft.metrics().borrow_watched().last_log_index.unwrap_or(0);
    last < floor
}

/// Refuses an AppendEntries whose entries do not follow its `prev_log_id`
/// one index at a time. A follower that took one would log them with a hole
/// before them and apply them without the entries they follow. openraft
/// 0.10.0-alpha.37 can send one: when an error it sees for an earlier
/// stream resets the leader's current one, the leader may purge logs the
/// stream is still reading, and the stream then sends the entries after the
/// purge under a `prev_log_id` from before it (openraft issue #1795
/// describes the same malformed request; found by the simulation, seeds 418
/// and 521). Refusing it breaks the stream; the leader starts again from
/// what the follower holds, by a snapshot if those entries are gone.
pub fn well_formed(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let first = rpc.prev_log_id.map_or(0, |p| p.index + 1);
    for (at, entry) in rpc.entries.iter().enumerate() {
        let expected = first + at as u64;
        if entry.log_id.index != expected {
            return Err(format!(
                "AppendEntries after {} carries entry {} where entry {expected} belongs",
                rpc.prev_log_id
                    .map_or("nothing".to_owned(), |p| p.to_string()),
                entry.log_id
            ));
        }
    }
    Ok(())
}

/// A replica that reopened after a rollback with `floor` must not stand for
/// election either until its log reaches the floor: it may have
/// acknowledged entries that only it and a minority still hold, and a
/// leader elected by it and that minority, whose log lacks them, would
/// overwrite committed entries (the simulation found it: seed 49, a replica
/// that lost its disk elected itself with the third member's shorter log
/// while the member holding the committed entry was cut off). Its Raft
/// starts with elections off ([`super::start_raft`] sets `enable_elect`);
/// this turns them on once the log reaches the floor.
pub(crate) fn elect_once_caught_up(raft: &Raft, floor: Option<u64>) {
    let Some(floor) = floor else {
        return;
    };
    let raft = raft.clone();
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        loop {
            if metrics.borrow_watched().last_log_index.unwrap_or(0) >= floor {
                break;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
        tracing::info!(
            floor,
            "caught up after a rollback: standing for election again"
        );
        raft.runtime_config().elect(true);
    });
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

/// A Raft result as sent back: a fatal error of this node's Raft travels as
/// its text.
fn remote<T, E: std::fmt::Display>(result: Result<T, E>) -> Vec<u8>
where
    Remote<T>: Wire,
{
    codec::encode(&result.map_err(|e| e.to_string()))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::RaftResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    async fn raft(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let from = request.get_ref().from;
        self.peers.require(&request, &node_name(from))?;
        let req = request.into_inner();
        let hop = self.check(&req)?;
        let payload = match req.kind.as_str() {
            "append_entries" => {
                let rpc: AppendEntriesRequest<TypeConfig> =
                    codec::decode(&req.payload).map_err(bad_request)?;
                well_formed(&rpc).map_err(bad_request)?;
                remote(self.raft.append_entries(rpc).await)
            }
            "vote" => {
                if self.resyncing() {
                    tracing::warn!(from = req.from, "not voting: resyncing after a rollback");
                    return Err(Status::unavailable(
                        "resyncing after a storage rollback: not voting until caught up",
                    ));
                }
                let rpc: VoteRequest<TypeConfig> =
                    codec::decode(&req.payload).map_err(bad_request)?;
                remote(self.raft.vote(rpc).await)
            }
            "install_snapshot" => {
                let (head, data) = unframe_snapshot_chunk(&req.payload)
                    .ok_or_else(|| Status::invalid_argument("malformed snapshot chunk"))?;
                let mut chunk: SnapshotChunk = codec::decode(head).map_err(bad_request)?;
                chunk.data = data.to_vec();
                let answer = self
                    .inbox
                    .receive(chunk)
                    .await
                    .map_err(|refused| Status::failed_precondition(refused.to_string()))?;
                remote(Ok::<_, String>(answer))
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown Raft message kind {other:?}"
                )))
            }
        };
        Ok(Response::new(self.answer(&req, hop, payload)?))
    }

    type RaftStreamStream = ResponseStream;

    /// A leader's pipelined AppendEntries to this follower: each frame is
    /// checked as a message of its own (addressing, the sender's
    /// certificate, the token MAC) and answered in order, its answer MAC'd
    /// over its request's MAC. The first frame that fails ends the stream
    /// with its status.
    async fn raft_stream(
        &self,
        request: Request<Streaming<pb::RaftRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        // One connection, one certificate: it must name the sender of the
        // first frame, and every frame names the same sender.
        let mut request = request;
        let Some(first) = request.get_mut().message().await? else {
            return Err(Status::invalid_argument("an empty AppendEntries stream"));
        };
        let from = first.from;
        self.peers.require(&request, &node_name(from))?;
        let mut frames = request.into_inner();
        // The stream's key, from the first frame's nonce, made by this
        // node's token: a sender that is not a member of the domain cannot
        // make it, so none of its frames verifies.
        if first.nonce.len() != 16 {
            return Err(Status::invalid_argument(
                "peer message nonce must be 16 bytes",
            ));
        }
        let hop = Hop {
            group: first.group,
            from,
            to: first.to,
        };
        if hop.to != self.id || hop.group != self.group {
            return Err(Status::failed_precondition(
                "stream addressed to another node or group",
            ));
        }
        let nonce = first.nonce.clone();
        let key = stream_key(&self.partition, hop, &nonce)
            .map_err(|_| Status::internal("HSM operation failed"))?;
        let (requests, input) = tokio::sync::mpsc::unbounded_channel();
        let (refusal, refused) = tokio::sync::oneshot::channel::<Status>();
        let checking = key.clone();
        tokio::spawn(async move {
            let mut next = Some(first);
            let mut seq = 0u64;
            let failure = loop {
                let req = match next.take() {
                    Some(req) => req,
                    None => match frames.next().await {
                        Some(Ok(req)) => req,
                        Some(Err(status)) => break status,
                        None => return,
                    },
                };
                if req.kind != STREAM_KIND {
                    break Status::invalid_argument("only AppendEntries travel on a stream");
                }
                if req.from != hop.from
                    || req.to != hop.to
                    || req.group != hop.group
                    || req.nonce != nonce
                {
                    break Status::permission_denied("every frame of a stream has its first frame's sender, receiver, group and nonce");
                }
                let expected = frame_mac(&checking, STREAM_REQUEST_LABEL, hop, seq, &req.payload);
                if !bool::from(expected.ct_eq(&req.mac)) {
                    tracing::warn!(
                        from = req.from,
                        "refused a stream frame whose MAC does not verify"
                    );
                    break Status::unauthenticated(
                        "peer message MAC does not verify: the sender is not a member of this domain",
                    );
                }
                seq += 1;
                let rpc: AppendEntriesRequest<TypeConfig> = match codec::decode(&req.payload) {
                    Ok(rpc) => rpc,
                    Err(e) => break bad_request(e),
                };
                if let Err(e) = well_formed(&rpc) {
                    tracing::error!(from = req.from, "refused a malformed AppendEntries: {e}");
                    break bad_request(e);
                }
                if requests.send(rpc).is_err() {
                    return;
                }
            };
            let _ = refusal.send(failure);
        });
        let input = tokio_stream::wrappers::UnboundedReceiverStream::new(input);
        let results = Box::pin(self.raft.stream_append(input));
        let answers = futures_util::stream::unfold(
            (key, results, 0u64, Some(refused)),
            move |(key, mut results, seq, mut refused)| async move {
                let answer = match results.next().await {
                    Some(result) => {
                        let payload = remote(result);
                        Ok(pb::RaftResponse {
                            mac: frame_mac(&key, STREAM_RESPONSE_LABEL, hop, seq, &payload)
                                .to_vec(),
                            payload,
                        })
                    }
                    // The input ended: say why, if a frame was refused.
                    None => Err(refused.take()?.await.ok()?),
                };
                Some((answer, (key, results, seq + 1, refused)))
            },
        );
        let answers: ResponseStream = Box::pin(answers);
        Ok(Response::new(answers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOP: Hop = Hop {
        group: 1,
        from: 2,
        to: 3,
    };

    /// An AppendEntries is taken only if its entries follow its
    /// `prev_log_id` one index at a time: the request openraft sent after
    /// purging under an open stream (entries from 2 after nothing) is
    /// refused, as are a gap and a repeat; heartbeats and well-formed
    /// batches pass.
    #[test]
    fn an_append_whose_entries_do_not_follow_its_prev_log_id_is_refused() {
        let blank = |index| crate::replication::Entry {
            log_id: crate::replication::log_id(1, 1, index),
            payload: openraft::EntryPayload::Blank,
        };
        let request = |prev: Option<u64>, indexes: &[u64]| AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev.map(|i| crate::replication::log_id(1, 1, i)),
            entries: indexes.iter().map(|&i| blank(i)).collect(),
            leader_commit: None,
        };
        assert!(well_formed(&request(None, &[])).is_ok());
        assert!(well_formed(&request(None, &[0, 1, 2])).is_ok());
        assert!(well_formed(&request(Some(1), &[2, 3])).is_ok());
        assert!(well_formed(&request(Some(7), &[])).is_ok());
        let refused =
            well_formed(&request(None, &[2, 3])).expect_err("entries from 2 after nothing");
        assert!(refused.contains("where entry 0 belongs"), "{refused}");
        assert!(well_formed(&request(Some(1), &[3])).is_err());
        assert!(well_formed(&request(Some(1), &[2, 4])).is_err());
        assert!(well_formed(&request(Some(1), &[2, 2])).is_err());
    }

    /// A frame's MAC binds the stream's key, the direction, the hop and the
    /// frame's place in the stream: a frame or answer moved to another
    /// place, stream, direction or pair of nodes does not verify.
    #[test]
    fn a_frame_mac_binds_key_direction_hop_and_place() {
        let key = [7u8; 32];
        let mac = frame_mac(&key, STREAM_REQUEST_LABEL, HOP, 5, b"entries");
        assert_ne!(
            mac,
            frame_mac(&[8u8; 32], STREAM_REQUEST_LABEL, HOP, 5, b"entries")
        );
        assert_ne!(
            mac,
            frame_mac(&key, STREAM_RESPONSE_LABEL, HOP, 5, b"entries")
        );
        assert_ne!(
            mac,
            frame_mac(&key, STREAM_REQUEST_LABEL, HOP, 6, b"entries")
        );
        assert_ne!(
            mac,
            frame_mac(
                &key,
                STREAM_REQUEST_LABEL,
                Hop { to: 4, ..HOP },
                5,
                b"entries"
            )
        );
        assert_ne!(
            mac,
            frame_mac(
                &key,
                STREAM_REQUEST_LABEL,
                Hop { group: 2, ..HOP },
                5,
                b"entries"
            )
        );
        assert_ne!(
            mac,
            frame_mac(&key, STREAM_REQUEST_LABEL, HOP, 5, b"entriez")
        );
        // Pinned: HMAC-SHA256(key, label || 0 || group || from || to || seq
        // || payload), integers u64 big-endian.
        assert_eq!(
            hex::encode(mac),
            hex::encode({
                use hmac::Mac;
                let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("key");
                m.update(b"hsm-vault/v1/peer-stream-request\0");
                for n in [1u64, 2, 3, 5] {
                    m.update(&n.to_be_bytes());
                }
                m.update(b"entries");
                <[u8; 32]>::from(m.finalize().into_bytes())
            })
        );
    }
}
