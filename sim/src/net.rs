//! The simulated network between the replicas: every Raft message is
//! handed straight to the target's real `Raft` after a delay drawn from the
//! seed, unless the link is cut or the message is lost; some messages are
//! delivered twice, and random delays reorder them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hsm_vault::replication::inbox::SnapshotInbox;
use hsm_vault::replication::{NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode, Raft};
use rand::rngs::StdRng;
use rand::Rng;

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

    /// Carries one request from `from` to `to` and its answer back.
    async fn carry<Req, Resp, E, F, Fut>(
        &self,
        (from, to): (NodeId, NodeId),
        request: Req,
        deliver: F,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        E: std::error::Error + Send + 'static,
        F: Fn(Endpoint, Req) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = Result<Resp, RaftError<NodeId, E>>> + Send + 'static,
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
        let unreachable = |why: &str| {
            RPCError::Unreachable(Unreachable::new(&AnyError::error(format!(
                "node {to}: {why}"
            ))))
        };
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
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
    }
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

type Rpc<T, E> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.net
            .carry(self.ends(), rpc, |t: Endpoint, r| async move {
                t.raft.append_entries(r).await
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let to = self.to;
        let answer = self
            .net
            .carry(self.ends(), rpc, |t: Endpoint, r| async move {
                // Through the node's own receiver, which checks a snapshot
                // before Raft installs it.
                match t.inbox.receive(r).await {
                    Ok(answer) => answer.map(Ok),
                    Err(refused) => Ok(Err(refused)),
                }
            })
            .await?;
        // A refusal reaches the sender as the node service's does: a failed
        // call, which it retries later.
        answer.map_err(|refused| {
            RPCError::Network(NetworkError::new(&AnyError::error(format!(
                "node {to}: {refused}"
            ))))
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>, openraft::error::Infallible> {
        let to = self.to;
        let answer = self
            .net
            .carry(self.ends(), rpc, |t: Endpoint, r| async move {
                // The same refusal as the node service's: no vote while
                // resyncing after a rollback.
                if hsm_vault::replication::network::resyncing(&t.raft, t.resync_floor) {
                    return Ok(None);
                }
                t.raft.vote(r).await.map(Some)
            })
            .await?;
        answer.ok_or_else(|| {
            RPCError::Network(NetworkError::new(&AnyError::error(format!(
                "node {to} is resyncing and does not vote"
            ))))
        })
    }
}
