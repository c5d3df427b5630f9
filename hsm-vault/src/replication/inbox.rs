//! Receiving a snapshot. The leader's network sends a snapshot in chunks
//! of its own ([`SnapshotChunk`]); they are gathered here, and the whole
//! snapshot is checked ([`StateMachine::check_snapshot`]: token MAC,
//! digest, maps) before Raft sees it. openraft treats an error while
//! installing a snapshot as fatal to the replica, and panics on a snapshot
//! inconsistent with its vote or its committed log; a snapshot that fails
//! its check is instead refused to its sender, and the replica keeps
//! serving (through its leader) and takes a good snapshot from whichever
//! member leads next.
//!
//! Chunks follow the rules openraft's own chunked receiver used: a new
//! transfer starts at offset 0, a chunk continues at or before the end of
//! what was received (a resent chunk overwrites), and a chunk from a vote
//! older than this replica's is answered with its vote and ignored.

use openraft::async_runtime::WatchReceiver;
use std::cmp::Ordering;

use openraft::storage::Snapshot;

use super::state_machine::StateMachine;
use super::{Raft, SnapshotMeta, Vote};

/// One chunk of a snapshot on its way to a follower (its data travels
/// beside this header, not in it).
#[derive(Clone, Debug)]
pub struct SnapshotChunk {
    /// The sender's vote.
    pub vote: Vote,
    pub meta: SnapshotMeta,
    /// Names one transfer: a new one restarts the receiver's buffer.
    pub transfer: u64,
    /// Where `data` goes in the snapshot.
    pub offset: u64,
    /// Whether this is the last chunk.
    pub done: bool,
    /// The chunk's bytes (they travel after the encoded header).
    pub data: Vec<u8>,
}

/// The receiver's answer to one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkAnswer {
    /// Taken (the last one: installed); the receiver's vote.
    Taken { vote: Vote },
    /// Not taken: the transfer must go on from `offset` (0: start again).
    Resend { offset: u64 },
    /// The receiver's Raft has stopped.
    Stopped(String),
}

/// A snapshot that failed its check: the reason (what failed, never data).
#[derive(Debug, thiserror::Error)]
#[error("snapshot refused: {0}")]
pub struct Refused(pub String);

/// One replica's snapshot receiver.
#[allow(missing_debug_implementations)]
pub struct SnapshotInbox {
    raft: Raft,
    sm: StateMachine,
    /// The transfer being received: its id and the bytes so far.
    receiving: tokio::sync::Mutex<Option<(u64, Vec<u8>)>>,
    /// Whether a snapshot is checked on a blocking thread (a node) or on
    /// the task that received it (the simulation, whose runtime is one
    /// seeded thread).
    off_the_runtime: bool,
}

impl SnapshotInbox {
    pub fn new(raft: Raft, sm: StateMachine) -> Self {
        SnapshotInbox {
            raft,
            sm,
            receiving: tokio::sync::Mutex::new(None),
            off_the_runtime: false,
        }
    }

    /// Checks each snapshot on a blocking thread: a token MAC per record,
    /// about 10 s for a million, which would otherwise hold one of the
    /// runtime's threads (and every peer message waiting for it).
    pub fn checking_off_the_runtime(mut self) -> Self {
        self.off_the_runtime = true;
        self
    }

    async fn check(&self, meta: &SnapshotMeta, data: Vec<u8>) -> (Result<(), String>, Vec<u8>) {
        if !self.off_the_runtime {
            let checked = self.sm.check_snapshot(meta, &data);
            return (checked, data);
        }
        let (sm, meta) = (self.sm.clone(), meta.clone());
        let task = tokio::task::spawn_blocking(move || (sm.check_snapshot(&meta, &data), data));
        match task.await {
            Ok(done) => done,
            Err(e) => (Err(format!("the check did not finish: {e}")), Vec::new()),
        }
    }

    /// Takes one chunk; on the last, checks the snapshot and has Raft
    /// install it. `Err` when the snapshot was refused (nothing installed,
    /// the bytes dropped).
    pub async fn receive(&self, mut chunk: SnapshotChunk) -> Result<ChunkAnswer, Refused> {
        let vote = self.raft.metrics().borrow_watched().vote;
        if matches!(chunk.vote.partial_cmp(&vote), None | Some(Ordering::Less)) {
            // Not from the leader this replica follows (a deposed one, say):
            // its vote tells the sender so.
            return Ok(ChunkAnswer::Taken { vote });
        }
        let id = chunk.transfer;
        let mut receiving = self.receiving.lock().await;
        if receiving.as_ref().is_none_or(|(current, _)| *current != id) {
            if chunk.offset != 0 {
                return Ok(ChunkAnswer::Resend { offset: 0 });
            }
            *receiving = None;
        }
        let (_, buf) = receiving.get_or_insert_with(|| (id, Vec::new()));
        let offset = usize::try_from(chunk.offset).unwrap_or(usize::MAX);
        if offset > buf.len() {
            return Ok(ChunkAnswer::Resend {
                offset: buf.len() as u64,
            });
        }
        buf.truncate(offset);
        buf.append(&mut chunk.data);
        if !chunk.done {
            return Ok(ChunkAnswer::Taken { vote });
        }
        let data = std::mem::take(buf);
        *receiving = None;
        drop(receiving);
        let (checked, data) = self.check(&chunk.meta, data).await;
        if let Err(reason) = checked {
            tracing::error!(
                snapshot = ?chunk.meta.last_log_id,
                reason = %reason,
                "refused a snapshot: this replica keeps its state, keeps serving through its \
                 leader, and installs the next snapshot that checks"
            );
            return Err(Refused(reason));
        }
        let snapshot = Snapshot {
            meta: chunk.meta,
            snapshot: std::io::Cursor::new(data),
        };
        Ok(
            match self.raft.install_full_snapshot(chunk.vote, snapshot).await {
                Ok(resp) => ChunkAnswer::Taken { vote: resp.vote },
                Err(fatal) => ChunkAnswer::Stopped(fatal.to_string()),
            },
        )
    }
}

/// Sends `snapshot` as transfer `transfer`, in chunks of `chunk_size` bytes through `send` (one
/// chunk per call, its data in `SnapshotChunk::data`), the sending side of
/// [`SnapshotInbox`]: resends from where the receiver asks, stops at a
/// higher vote or once the last chunk is taken. `stopped` makes the error
/// for a receiver whose Raft has stopped.
pub async fn send_in_chunks<E, F, Fut>(
    vote: Vote,
    snapshot: super::VaultSnapshot,
    transfer: u64,
    chunk_size: usize,
    mut send: F,
    stopped: impl Fn(String) -> E,
) -> Result<openraft::raft::SnapshotResponse<super::TypeConfig>, E>
where
    F: FnMut(SnapshotChunk) -> Fut,
    Fut: std::future::Future<Output = Result<ChunkAnswer, E>> + Send,
{
    let data = snapshot.snapshot.into_inner();
    let mut offset = 0usize;
    loop {
        let end = data.len().min(offset + chunk_size);
        let done = end == data.len();
        let chunk = SnapshotChunk {
            vote,
            meta: snapshot.meta.clone(),
            transfer,
            offset: offset as u64,
            done,
            data: data[offset..end].to_vec(),
        };
        match send(chunk).await? {
            ChunkAnswer::Taken { vote: theirs } if theirs > vote || done => {
                return Ok(openraft::raft::SnapshotResponse { vote: theirs });
            }
            ChunkAnswer::Taken { .. } => offset = end,
            ChunkAnswer::Resend { offset: from } => {
                offset = usize::try_from(from).unwrap_or(0).min(offset);
            }
            ChunkAnswer::Stopped(fatal) => return Err(stopped(fatal)),
        }
    }
}

/// A failed snapshot send as openraft's snapshot transmitter takes it.
pub fn streaming_error(
    e: openraft::error::RPCError<super::TypeConfig>,
) -> openraft::error::StreamingError<super::TypeConfig> {
    use openraft::error::{NetworkError, RPCError, StreamingError};
    match e {
        RPCError::Timeout(e) => StreamingError::Timeout(e),
        RPCError::Unreachable(e) => StreamingError::Unreachable(e),
        RPCError::Network(e) => StreamingError::Network(e),
        RPCError::RemoteError(e) => {
            StreamingError::Network(NetworkError::new(&openraft::AnyError::error(e.to_string())))
        }
    }
}
