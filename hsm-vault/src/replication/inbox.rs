//! Receiving a snapshot. The chunks a leader sends are gathered here rather
//! than by openraft, so that the whole snapshot is checked
//! ([`StateMachine::check_snapshot`]: token MAC, digest, maps) before Raft
//! sees it. openraft treats an error while installing a snapshot as fatal to
//! the replica; a snapshot that fails its check is instead refused to its
//! sender, and the replica keeps serving (through its leader) and takes a
//! good snapshot from whichever member leads next.
//!
//! Chunks follow openraft's own rules: a new snapshot id starts at offset
//! 0, a chunk continues at or before the end of what was received (a resent
//! chunk overwrites), and a chunk from a vote older than this replica's is
//! answered with its vote and ignored.

use std::cmp::Ordering;
use std::io::Cursor;

use openraft::error::{InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{InstallSnapshotRequest, InstallSnapshotResponse};
use openraft::storage::Snapshot;
use openraft::{Raft, SnapshotSegmentId};

use super::state_machine::StateMachine;
use super::{NodeId, TypeConfig};

/// The answer to one chunk, as openraft's own receiver gives it.
pub type ChunkAnswer =
    Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;

/// A snapshot that failed its check: the reason (what failed, never data).
#[derive(Debug, thiserror::Error)]
#[error("snapshot refused: {0}")]
pub struct Refused(pub String);

/// One replica's snapshot receiver.
#[allow(missing_debug_implementations)]
pub struct SnapshotInbox {
    raft: Raft<TypeConfig>,
    sm: StateMachine,
    /// The snapshot being received: its id and the bytes so far.
    receiving: tokio::sync::Mutex<Option<(String, Vec<u8>)>>,
}

impl SnapshotInbox {
    pub fn new(raft: Raft<TypeConfig>, sm: StateMachine) -> Self {
        SnapshotInbox {
            raft,
            sm,
            receiving: tokio::sync::Mutex::new(None),
        }
    }

    /// Takes one chunk; on the last, checks the snapshot and has Raft
    /// install it. `Err` when the snapshot was refused (nothing installed,
    /// the bytes dropped).
    pub async fn receive(
        &self,
        mut req: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<ChunkAnswer, Refused> {
        let vote = self.raft.metrics().borrow().vote;
        if matches!(req.vote.partial_cmp(&vote), None | Some(Ordering::Less)) {
            // Not from the leader this replica follows (a deposed one, say):
            // its vote tells the sender so.
            return Ok(Ok(InstallSnapshotResponse { vote }));
        }
        let id = req.meta.snapshot_id.clone();
        let mut receiving = self.receiving.lock().await;
        if receiving.as_ref().is_none_or(|(current, _)| *current != id) {
            if req.offset != 0 {
                return Ok(Err(mismatch(&id, 0, req.offset)));
            }
            *receiving = None;
        }
        let (_, buf) = receiving.get_or_insert_with(|| (id.clone(), Vec::new()));
        let offset = usize::try_from(req.offset).unwrap_or(usize::MAX);
        if offset > buf.len() {
            return Ok(Err(mismatch(&id, buf.len() as u64, req.offset)));
        }
        buf.truncate(offset);
        buf.append(&mut req.data);
        if !req.done {
            return Ok(Ok(InstallSnapshotResponse { vote }));
        }
        let data = std::mem::take(buf);
        *receiving = None;
        drop(receiving);
        if let Err(reason) = self.sm.check_snapshot(&req.meta, &data) {
            tracing::error!(
                snapshot = %id,
                reason = %reason,
                "refused a snapshot: this replica keeps its state, keeps serving through its \
                 leader, and installs the next snapshot that checks"
            );
            return Err(Refused(reason));
        }
        let snapshot = Snapshot {
            meta: req.meta,
            snapshot: Box::new(Cursor::new(data)),
        };
        Ok(
            match self.raft.install_full_snapshot(req.vote, snapshot).await {
                Ok(resp) => Ok(resp.into()),
                Err(fatal) => Err(RaftError::Fatal(fatal)),
            },
        )
    }
}

fn mismatch(id: &str, expect: u64, got: u64) -> RaftError<NodeId, InstallSnapshotError> {
    let segment = |offset| SnapshotSegmentId {
        id: id.to_owned(),
        offset,
    };
    RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
        expect: segment(expect),
        got: segment(got),
    }))
}
