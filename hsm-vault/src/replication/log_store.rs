//! The Raft log in sled, with the vote and the commit watermark in the
//! token.
//!
//! Invariants:
//! - `append` reports the entries flushed (openraft's `IOFlushed`
//!   callback, after which Raft may acknowledge them) only after sled's
//!   flush and the token's watermark cover them, so an entry a node
//!   acknowledged is on its disk. The flush runs on a task of its own:
//!   appends that arrive meanwhile share the next flush and watermark
//!   update (group commit), and Raft goes on working while it runs.
//! - The vote and the highest committed log id live in the token
//!   (`app_state`), not on the disk: a disk restored from an older copy
//!   cannot make the node vote twice in a term or forget what it committed.
//! - The token also keeps the last log id this replica stored and
//!   acknowledged (set after each append's flush, lowered only by Raft's own
//!   truncation of uncommitted entries).
//! - The token also keeps the last log id purged into a snapshot: what the
//!   rollback check accepts as "no longer in the log" is never decided by
//!   a value the host can edit.
//! - On open, a log that ends before either watermark the token remembers
//!   was rolled back: [`LogStore::open`] refuses it, so the node neither
//!   votes nor acknowledges with stale state (it must be resynced).

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use tokio::sync::{mpsc, oneshot};
use vault_proto::vault::raft::v1 as pb;

use super::codec::{self, Wire, WireError};
use super::{io_error, Entry, LogId, TypeConfig, Vote};
use crate::partition::Partition;

/// What the token keeps for one replica's log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenLogState {
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// The last entry this replica stored and acknowledged: a leader may have
    /// counted it toward a commit before this replica learned of the commit.
    last_log: Option<LogId>,
    /// The last entry purged into a snapshot: kept here, not on the disk,
    /// because the rollback check trusts the log up to it.
    purged: Option<LogId>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogOpenError {
    #[error(
        "raft log was rolled back: it ends at index {log}, but the token recorded index {token} \
         as committed; this replica must be resynced from its peers"
    )]
    RolledBack { log: u64, token: u64 },
    #[error("log storage: {0}")]
    Storage(String),
}

/// One replica's Raft log.
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    partition: Arc<Partition>,
    /// Application name of this log's state object in the token.
    app: String,
    /// Set while resyncing after a rollback: the committed index the token
    /// remembers, which this replica must reach again before it votes.
    resync_floor: Option<u64>,
    /// The token state as last read or written by this process, which is
    /// its only writer while it runs: appends update it without reading
    /// the token back.
    known: Arc<std::sync::Mutex<Known>>,
    /// The group-commit task for appends, started on first use.
    flusher: Arc<std::sync::OnceLock<mpsc::UnboundedSender<FlushJob>>>,
    flush: super::Flush,
}

/// The cached token state, and whether it holds a change not written yet.
#[derive(Default)]
struct Known {
    state: Option<TokenLogState>,
    /// A newer committed log id than the token holds: written with the next
    /// watermark update rather than in a label update of its own.
    unsaved: bool,
}

/// Work for the flusher: entries appended (to flush and report), or a
/// barrier (answered once everything sent before it is flushed).
struct FlushJob {
    last: Option<LogId>,
    callback: Option<IOFlushed<TypeConfig>>,
    barrier: Option<oneshot::Sender<()>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

/// The token state's encoding (`vault.raft.v1.TokenLogState`).
impl Wire for TokenLogState {
    type Proto = pb::TokenLogState;
    fn to_proto(&self) -> pb::TokenLogState {
        pb::TokenLogState {
            vote: self.vote.as_ref().map(codec::vote_to),
            committed: codec::opt_log_id_to(&self.committed),
            last_log: codec::opt_log_id_to(&self.last_log),
            purged: codec::opt_log_id_to(&self.purged),
        }
    }
    fn from_proto(p: pb::TokenLogState) -> Result<Self, WireError> {
        Ok(TokenLogState {
            vote: p.vote.map(codec::vote_from),
            committed: codec::opt_log_id_from(p.committed),
            last_log: codec::opt_log_id_from(p.last_log),
            purged: codec::opt_log_id_from(p.purged),
        })
    }
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, std::io::Error> {
    Ok(codec::decode::<Entry>(bytes)?)
}

/// Token state is read and written through the user's login; a cloning
/// ceremony on this node logs the user out for a few milliseconds. Raft
/// treats a storage error as fatal, so such failures are retried briefly.
pub(crate) fn retry<T>(
    mut op: impl FnMut() -> Result<T, crate::partition::PartitionError>,
) -> Result<T, crate::partition::PartitionError> {
    const ATTEMPTS: u32 = 50;
    let mut attempt = 0;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if attempt + 1 >= ATTEMPTS => return Err(e),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

impl LogStore {
    fn new(db: &sled::Db, partition: Arc<Partition>, group: &str) -> Result<Self, LogOpenError> {
        let storage = |e: sled::Error| LogOpenError::Storage(e.to_string());
        Ok(LogStore {
            log: db.open_tree(format!("raft-log/{group}")).map_err(storage)?,
            meta: db
                .open_tree(format!("raft-meta/{group}"))
                .map_err(storage)?,
            partition,
            app: format!("hsm-vault/v1/raft/{group}"),
            resync_floor: None,
            known: Arc::new(std::sync::Mutex::new(Known::default())),
            flusher: Arc::new(std::sync::OnceLock::new()),
            flush: super::Flush::default(),
        })
    }

    /// Opens the log of replica group `group` in `db`, checking it against
    /// the token.
    pub fn open(
        db: &sled::Db,
        partition: Arc<Partition>,
        group: &str,
    ) -> Result<Self, LogOpenError> {
        let store = Self::new(db, partition, group)?;
        let token = store
            .token_state()
            .map_err(|e| LogOpenError::Storage(e.to_string()))?;
        let last = store
            .last_index()
            .map_err(|e| LogOpenError::Storage(e.to_string()))?;
        // The log must still hold the very entries the token remembers (the
        // same index *and* term): a disk restored from an older copy can be
        // as long as the token's log but hold entries that were truncated
        // and replaced since (found by the simulation).
        for remembered in [token.committed, token.last_log].into_iter().flatten() {
            let held = store
                .holds(&remembered)
                .map_err(|e| LogOpenError::Storage(e.to_string()))?;
            if !held {
                return Err(LogOpenError::RolledBack {
                    log: last.unwrap_or(0),
                    token: remembered.index,
                });
            }
        }
        Ok(store)
    }

    /// Whether the entries after index `applied` (after none: all) are still
    /// in this log, not purged into a snapshot: what a state machine that
    /// is behind must apply again.
    pub(crate) fn replays_after(&self, applied: Option<u64>) -> Result<bool, LogOpenError> {
        let purged = self
            .last_purged()
            .map_err(|e| LogOpenError::Storage(e.to_string()))?;
        Ok(match (purged, applied) {
            (None, _) => true,
            (Some(p), Some(a)) => p.index <= a,
            (Some(_), None) => false,
        })
    }

    /// Whether this log still holds entry `id` (same index and term), or
    /// purged it (into a snapshot) at or after it.
    fn holds(&self, id: &LogId) -> Result<bool, std::io::Error> {
        if let Some(purged) = self.last_purged()? {
            if purged.index > id.index || purged == *id {
                return Ok(true);
            }
        }
        match self.log.get(id.index.to_be_bytes()).map_err(io_error)? {
            Some(v) => Ok(decode_entry(&v)?.log_id == *id),
            None => Ok(false),
        }
    }

    /// Opens the log after [`LogOpenError::RolledBack`]: the stale log (and
    /// the state machine trees named in `wipe`) are erased, so nothing stale
    /// is ever served or acknowledged, and the replica catches up from its
    /// peers. The token keeps its vote and committed watermark; until the
    /// log reaches that watermark again, [`LogStore::resync_floor`] tells the
    /// node not to vote.
    pub fn open_resync(
        db: &sled::Db,
        partition: Arc<Partition>,
        group: &str,
        wipe: &[sled::Tree],
    ) -> Result<Self, LogOpenError> {
        let storage = |e: sled::Error| LogOpenError::Storage(e.to_string());
        let mut store = Self::new(db, partition, group)?;
        let token = store
            .token_state()
            .map_err(|e| LogOpenError::Storage(e.to_string()))?;
        for tree in [&store.log, &store.meta].into_iter().chain(wipe) {
            tree.clear().map_err(storage)?;
            tree.flush().map_err(storage)?;
        }
        store.resync_floor = token
            .committed
            .map(|c| c.index)
            .max(token.last_log.map(|l| l.index));
        // The log is empty now: nothing of it is purged.
        store
            .update_token(|s| s.purged = None)
            .map_err(|e| LogOpenError::Storage(e.to_string()))?;
        Ok(store)
    }

    /// Chooses how flushes wait (see [`super::Flush`]).
    pub fn flushing(mut self, flush: super::Flush) -> Self {
        self.flush = flush;
        self
    }

    /// While resyncing, the log index this replica must reach before it may
    /// vote again.
    pub fn resync_floor(&self) -> Option<u64> {
        self.resync_floor
    }

    /// The token state: the cached copy, or read from the token. Reads and
    /// writes of it are serialized: openraft 0.10 reads the vote from its
    /// replication tasks while the log task writes, and a token read during
    /// a write of the same object can fail.
    fn token_state(&self) -> Result<TokenLogState, std::io::Error> {
        let mut known = self
            .known
            .lock()
            .map_err(|_| io_error("token state lock poisoned"))?;
        self.load(&mut known)
    }

    fn load(&self, known: &mut Known) -> Result<TokenLogState, std::io::Error> {
        if let Some(state) = &known.state {
            return Ok(state.clone());
        }
        let bytes = retry(|| {
            self.partition
                .session()
                .and_then(|s| s.app_state(&self.app))
        })
        .map_err(io_error)?;
        let state = if bytes.is_empty() {
            TokenLogState::default()
        } else {
            codec::decode::<TokenLogState>(&bytes)?
        };
        known.state = Some(state.clone());
        Ok(state)
    }

    /// Changes the token state; the token's label is rewritten only if
    /// something changed (or a committed id is waiting to be written).
    fn update_token(&self, f: impl FnOnce(&mut TokenLogState)) -> Result<(), std::io::Error> {
        let mut known = self
            .known
            .lock()
            .map_err(|_| io_error("token state lock poisoned"))?;
        let before = self.load(&mut known)?;
        let mut state = before.clone();
        f(&mut state);
        if state == before && !known.unsaved {
            return Ok(());
        }
        let bytes = codec::encode(&state);
        let written = retry(|| {
            self.partition
                .session()
                .and_then(|s| s.set_app_state(&self.app, &bytes))
        });
        *known = match written {
            Ok(()) => Known {
                state: Some(state),
                unsaved: false,
            },
            // The next read goes to the token.
            Err(_) => Known::default(),
        };
        written.map_err(io_error)
    }

    /// The flusher's queue, starting the task on first use (appends run
    /// inside the runtime).
    fn flusher(&self) -> &mpsc::UnboundedSender<FlushJob> {
        self.flusher.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(flush_appends(self.clone(), rx));
            tx
        })
    }

    /// Waits until every append made so far is flushed.
    async fn appends_flushed(&self) {
        let (tx, rx) = oneshot::channel();
        let job = FlushJob {
            last: None,
            callback: None,
            barrier: Some(tx),
        };
        if self.flusher().send(job).is_ok() {
            let _ = rx.await;
        }
    }

    fn last_purged(&self) -> Result<Option<LogId>, std::io::Error> {
        Ok(self.token_state()?.purged)
    }

    /// Index of the last entry present, or of the last purged one.
    fn last_index(&self) -> Result<Option<u64>, std::io::Error> {
        let state = self.log_state()?;
        Ok(state.last_log_id.map(|l| l.index))
    }

    fn log_state(&self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let last_purged_log_id = self.last_purged()?;
        let last = self
            .log
            .last()
            .map_err(io_error)?
            .map(|(_, v)| decode_entry(&v))
            .transpose()?
            .map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    /// Makes every write to the log and meta trees durable: the trees of a
    /// sled database share one log, which one flush writes out.
    async fn flush(&self) -> Result<(), std::io::Error> {
        let started = std::time::Instant::now();
        self.flush.tree(&self.log).await.map_err(io_error)?;
        crate::telemetry::metrics().flushed("raft_log", started);
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(i) => *i,
            std::ops::Bound::Excluded(i) => i + 1,
            std::ops::Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (k, v) = item.map_err(io_error)?;
            let index = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| io_error(std::fmt::Error))?,
            );
            if !range.contains(&index) {
                break;
            }
            out.push(decode_entry(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        Ok(self.token_state()?.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        self.log_state()
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        let vote = *vote;
        self.update_token(|s| s.vote = Some(vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        // Kept in memory and written with the next watermark update: a
        // label update of its own per commit would double the token writes.
        // The token's `last_log` (written before any entry is acknowledged)
        // is never below it, so the rollback check loses nothing; after a
        // crash a replica may re-apply fewer entries at start and learns the
        // rest from the leader.
        if let Some(c) = committed {
            crate::telemetry::metrics()
                .raft_commit_index
                .set(i64::try_from(c.index).unwrap_or(i64::MAX));
        }
        let mut known = self
            .known
            .lock()
            .map_err(|_| io_error("token state lock poisoned"))?;
        let mut state = self.load(&mut known)?;
        if committed > state.committed {
            state.committed = committed;
            *known = Known {
                state: Some(state),
                unsaved: true,
            };
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        if self.resync_floor.is_some() {
            // The entries up to the watermark are gone from this disk: Raft
            // must not try to re-apply them; the leader sends them again.
            return Ok(None);
        }
        Ok(self.token_state()?.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            batch.insert(&entry.log_id.index.to_be_bytes()[..], codec::encode(&entry));
        }
        self.log.apply_batch(batch).map_err(io_error)?;
        let job = FlushJob {
            last,
            callback: Some(callback),
            barrier: None,
        };
        if let Err(mpsc::error::SendError(job)) = self.flusher().send(job) {
            if let Some(callback) = job.callback {
                callback.io_completed(Err(std::io::Error::other("log flusher stopped")));
            }
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), std::io::Error> {
        // Appends still being flushed would raise the watermark after it.
        self.appends_flushed().await;
        let mut batch = sled::Batch::default();
        let first = last.map_or(0, |l| l.index + 1);
        for item in self.log.range(first.to_be_bytes()..) {
            let (k, _) = item.map_err(io_error)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(io_error)?;
        self.flush().await?;
        // Raft removed uncommitted entries: the watermark follows the log.
        let end = self.log_state()?.last_log_id;
        self.update_token(|s| s.last_log = end)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        // The token first: a crash after it leaves entries the log no longer
        // needs; the other order would leave a log the token calls short.
        self.update_token(|s| s.purged = s.purged.max(Some(log_id)))?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = item.map_err(io_error)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(io_error)?;
        self.flush().await
    }
}

/// The group-commit loop of a log's appends: one flush and one watermark
/// update for every append queued meanwhile, then each append's callback.
async fn flush_appends(store: LogStore, mut rx: mpsc::UnboundedReceiver<FlushJob>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let last = jobs.iter().filter_map(|j| j.last).max();
        let mut result = Ok(());
        if jobs.iter().any(|j| j.callback.is_some()) {
            result = store.flush().await;
            if result.is_ok() && last.is_some() {
                // Remembered in the token before the appends are
                // acknowledged.
                result = store.update_token(|s| s.last_log = s.last_log.max(last));
            }
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "flushing the Raft log failed");
        }
        for job in jobs {
            if let Some(callback) = job.callback {
                callback.io_completed(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| std::io::Error::other(e.to_string())),
                );
            }
            if let Some(barrier) = job.barrier {
                let _ = barrier.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::log_id;

    /// The token's log state is pinned (`vault.raft.v1.TokenLogState`): a
    /// change would make every replica's token state unreadable.
    #[test]
    fn the_token_log_state_encoding_is_pinned() {
        let state = TokenLogState {
            vote: Some(Vote::new_committed(3, 1)),
            committed: Some(log_id(3, 1, 12)),
            last_log: Some(log_id(3, 1, 14)),
            purged: Some(log_id(2, 2, 5)),
        };
        let bytes = codec::encode(&state);
        assert_eq!(
            hex::encode(&bytes),
            "0a06080310011801120608031001180c1a0608031001180e2206080210021805"
        );
        assert_eq!(
            codec::decode::<TokenLogState>(&bytes).expect("decodes"),
            state
        );
        assert_eq!(codec::encode(&TokenLogState::default()), Vec::<u8>::new());
    }
}
