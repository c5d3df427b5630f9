//! The simulated network between the replicas: every Raft message is
//! handed straight to the target's real `Raft` after a delay drawn from the
//! seed, unless the link is cut or the message is lost; some messages are
//! delivered twice, and random delays reorder them. A leader's pipelined
//! AppendEntries travel as the nodes send them, on a stream: in order, each
//! frame with its own delay, and a lost frame breaks the stream.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hsm_vault::replication::inbox::{
    send_in_chunks, streaming_error, SnapshotChunk, SnapshotInbox,
};
use hsm_vault::replication::network::{well_formed, StreamTasks};
use hsm_vault::replication::{NodeId, Raft, SnapshotData, TypeConfig, VaultSnapshot, Vote};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, BasicNode};
use rand::rngs::StdRng;
use rand::Rng;
use tokio::time::Instant;

/// What the network does to messages, changed by the fault schedule.
#[derive(Debug, Default, Clone)]
pub struct Weather {
    /// Directed links that drop everything (a partition cuts both ways).
    pub cut: BTreeSet<(NodeId, NodeId)>,
    /// Chance that a message is lost, in percent.
    pub loss: u32,
    /// Chance that a message is delivered twice, in percent.
    pub duplicate: u32,
    /// Largest one-way delay (at least 1 ms); each message draws its own.
    pub max_delay_ms: u64,
}

/// A replica as the network sees it: its Raft, whether it refuses votes
/// because it is resyncing after a rollback, and its snapshot receiver.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Endpoint {
    pub raft: Raft,
    pub resync_floor: Option<u64>,
    pub inbox: Arc<SnapshotInbox>,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
}

struct State {
    rng: StdRng,
    weather: Weather,
    up: BTreeMap<NodeId, Endpoint>,
    counters: Counters,
}

/// The network of one simulated run.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct SimNet(Arc<Mutex<State>>);

/// A decision about one message, drawn when it is sent.
struct Fate {
    there: Duration,
    back: Duration,
    lost: bool,
    copy: Option<Duration>,
}

impl SimNet {
    pub fn new(rng: StdRng) -> Self {
        SimNet(Arc::new(Mutex::new(State {
            rng,
            weather: Weather {
                max_delay_ms: 20,
                ..Weather::default()
            },
            up: BTreeMap::new(),
            counters: Counters::default(),
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock already failed the run.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn attach(&self, id: NodeId, endpoint: Endpoint) {
        self.state().up.insert(id, endpoint);
    }

    pub fn detach(&self, id: NodeId) {
        self.state().up.remove(&id);
    }

    pub fn weather(&self) -> Weather {
        self.state().weather.clone()
    }

    pub fn set_weather(&self, weather: Weather) {
        self.state().weather = weather;
    }

    /// Messages sent, lost and duplicated so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        let s = self.state();
        (s.counters.sent, s.counters.lost, s.counters.duplicated)
    }

    fn fate(&self, from: NodeId, to: NodeId) -> Fate {
        let mut s = self.state();
        let max = s.weather.max_delay_ms.max(1);
        let (loss, duplicate) = (s.weather.loss, s.weather.duplicate);
        let cut = s.weather.cut.contains(&(from, to));
        let rng = &mut s.rng;
        let fate = Fate {
            there: Duration::from_millis(rng.gen_range(1..=max)),
            back: Duration::from_millis(rng.gen_range(1..=max)),
            lost: cut || rng.gen_range(0..100) < loss,
            copy: (rng.gen_range(0..100) < duplicate)
                .then(|| Duration::from_millis(rng.gen_range(1..=4 * max))),
        };
        s.counters.sent += 1;
        if fate.lost {
            s.counters.lost += 1;
        }
        if fate.copy.is_some() {
            s.counters.duplicated += 1;
        }
        fate
    }

    /// Whether the answer can travel back from `to` to `from` now.
    fn answer_lost(&self, from: NodeId, to: NodeId) -> bool {
        self.state().weather.cut.contains(&(to, from))
    }

    fn endpoint(&self, id: NodeId) -> Option<Endpoint> {
        self.state().up.get(&id).cloned()
    }

    /// Carries one request from `from` to `to` and its answer back; a
    /// failure at the far end comes back as its text.
    async fn carry<Req, Resp, F, Fut>(
        &self,
        (from, to): (NodeId, NodeId),
        request: Req,
        deliver: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        F: Fn(Endpoint, Req) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = Result<Resp, String>> + Send + 'static,
    {
        let fate = self.fate(from, to);
        if let Some(later) = fate.copy {
            // A stray copy, delivered late; its answer goes nowhere.
            let (net, copy, deliver) = (self.clone(), request.clone(), deliver.clone());
            tokio::spawn(async move {
                tokio::time::sleep(later).await;
                if let Some(target) = net.endpoint(to) {
                    let _ = deliver(target, copy).await;
                }
            });
        }
        tokio::time::sleep(fate.there).await;
        let unreachable = |why: &str| unreachable(to, why);
        if fate.lost {
            return Err(unreachable("message lost"));
        }
        let Some(target) = self.endpoint(to) else {
            return Err(unreachable("down"));
        };
        let answer = deliver(target, request).await;
        tokio::time::sleep(fate.back).await;
        if self.answer_lost(from, to) {
            return Err(unreachable("answer lost"));
        }
        answer.map_err(|e| unreachable(&e))
    }

    /// Carries a pipelined AppendEntries stream from `from` to `to`: frames
    /// arrive in order, each after its own delay (never before the frame
    /// ahead of it), and their answers come back the same way. A lost frame
    /// or a lost answer breaks the stream, as a reset connection does.
    fn carry_stream<S>(
        &self,
        (from, to): (NodeId, NodeId),
        input: S,
    ) -> BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stamped, mut due) = tokio::sync::mpsc::unbounded_channel();
        let (back, mut arrived) = tokio::sync::mpsc::unbounded_channel();
        // The sender's side: each frame draws its fate as it is sent.
        let (net, lost) = (self.clone(), broken.clone());
        let mut tasks = StreamTasks::default();
        tasks.spawn(async move {
            let mut input = input;
            let mut last = Instant::now();
            while let Some(req) = input.next().await {
                let fate = net.fate(from, to);
                if fate.lost {
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                last = last.max(Instant::now() + fate.there);
                if stamped.send((last, req)).is_err() {
                    break;
                }
            }
        });
        // The far end: frames reach the target's Raft in order; its answers
        // start back as it gives them.
        let (net, lost) = (self.clone(), broken.clone());
        tasks.spawn(async move {
            let mut back = Some(back);
            let mut target_input = None;
            while let Some((at, req)) = due.recv().await {
                tokio::time::sleep_until(at).await;
                if let Some(back) = back.take() {
                    let Some(target) = net.endpoint(to) else {
                        lost.store(true, std::sync::atomic::Ordering::SeqCst);
                        break;
                    };
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    target_input = Some(tx);
                    let answers = target
                        .raft
                        .stream_append(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
                    let (net, lost) = (net.clone(), lost.clone());
                    tokio::spawn(async move {
                        let mut answers = Box::pin(answers);
                        let mut last = Instant::now();
                        while let Some(answer) = answers.next().await {
                            let delay = net.fate(to, from).back;
                            if net.answer_lost(from, to) {
                                lost.store(true, std::sync::atomic::Ordering::SeqCst);
                                break;
                            }
                            last = last.max(Instant::now() + delay);
                            if back.send((last, answer)).is_err() {
                                break;
                            }
                        }
                    });
                }
                let Some(tx) = target_input.as_ref() else {
                    break;
                };
                // The node service's refusal of a malformed frame, which
                // breaks the stream.
                if well_formed(&req).is_err() {
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                if tx.send(req).is_err() {
                    break;
                }
            }
        });
        let ended = futures_util::stream::unfold(Some(broken), move |broken| async move {
            let broken = broken?;
            broken.load(std::sync::atomic::Ordering::SeqCst).then(|| {
                (
                    Err(unreachable(to, "stream broken: a frame or answer lost")),
                    None,
                )
            })
        });
        let answers = futures_util::stream::poll_fn(move |cx| {
            // The stream's tasks live as long as its answers are read.
            let _tasks = &tasks;
            arrived.poll_recv(cx)
        })
        .then(move |(at, answer)| async move {
            tokio::time::sleep_until(at).await;
            answer.map_err(|fatal| unreachable(to, &format!("Raft stopped: {fatal}")))
        });
        Box::pin(answers.chain(ended))
    }
}

fn unreachable(to: NodeId, why: &str) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(format!(
        "node {to}: {why}"
    ))))
}

/// A factory bound to the sending node.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct NodeNet {
    pub net: SimNet,
    pub me: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for NodeNet {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Link {
        Link {
            net: self.net.clone(),
            from: self.me,
            to: target,
        }
    }
}

/// One sender's link to one target.
#[allow(missing_debug_implementations)]
pub struct Link {
    net: SimNet,
    from: NodeId,
    to: NodeId,
}

impl Link {
    fn ends(&self) -> (NodeId, NodeId) {
        (self.from, self.to)
    }
}

type Rpc<T> = Result<T, RPCError<TypeConfig>>;

/// The size of the snapshot chunks the simulation sends: small, so that a
/// snapshot takes several messages, each of which can be lost.
const SNAPSHOT_CHUNK: usize = 16 * 1024;

impl Link {
    async fn send_snapshot(
        &mut self,
        vote: Vote,
        snapshot: VaultSnapshot,
    ) -> Rpc<SnapshotResponse<TypeConfig>> {
        let to = self.to;
        let ends = self.ends();
        let net = self.net.clone();
        let transfer = self.net.state().rng.gen::<u64>();
        send_in_chunks(
            vote,
            snapshot,
            transfer,
            SNAPSHOT_CHUNK,
            |chunk: SnapshotChunk| {
                let net = net.clone();
                async move {
                    let answer = net
                        .carry(ends, chunk, |t: Endpoint, c| async move {
                            // Through the node's own receiver, which checks a
                            // snapshot before Raft installs it.
                            Ok(t.inbox.receive(c).await)
                        })
                        .await?;
                    // A refusal reaches the sender as the node service's does: a
                    // failed call, which it retries later.
                    answer.map_err(|refused| {
                        RPCError::Network(NetworkError::new(&AnyError::error(format!(
                            "node {to}: {refused}"
                        ))))
                    })
                }
            },
            |fatal| unreachable(to, &format!("Raft stopped: {fatal}")),
        )
        .await
    }
}

impl RaftNetworkV2<TypeConfig> for Link {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<TypeConfig>> {
        self.net
            .carry(self.ends(), rpc, |t: Endpoint, r| async move {
                well_formed(&r)?;
                t.raft.append_entries(r).await.map_err(|e| e.to_string())
            })
            .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<'s, Rpc<BoxStream<'s, Rpc<StreamAppendResult<TypeConfig>>>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let answers = self.net.carry_stream(self.ends(), input);
        Box::pin(async move { Ok(answers) })
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: VaultSnapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            sent = self.send_snapshot(vote, snapshot) => sent.map_err(streaming_error),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Rpc<VoteResponse<TypeConfig>> {
        let to = self.to;
        let answer = self
            .net
            .carry(self.ends(), rpc, |t: Endpoint, r| async move {
                // The same refusal as the node service's: no vote while
                // resyncing after a rollback.
                if hsm_vault::replication::network::resyncing(&t.raft, t.resync_floor) {
                    return Ok(None);
                }
                t.raft.vote(r).await.map(Some).map_err(|e| e.to_string())
            })
            .await?;
        answer.ok_or_else(|| {
            RPCError::Network(NetworkError::new(&AnyError::error(format!(
                "node {to} is resyncing and does not vote"
            ))))
        })
    }
}
