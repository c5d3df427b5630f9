//! Replication groundwork (issue 3): the Raft types of a replica group and
//! its storage on sled, with the Raft vote and commit watermark kept in the
//! token where the host cannot roll them back.
//!
//! Design (see ARCHITECTURE.md, *Replication*): every state change of the
//! vault is a [`Command`] — a compare-and-set of one sealed record — so a
//! leader whose view of a record is stale cannot commit a charge computed
//! from it: the state machine refuses a command whose expected sequence
//! number is not the record's current one, and the leader releases a KE2
//! only for a command that committed *and* applied.
//!
//! Not wired into the node yet: the network, leader forwarding, the
//! ceremony over the wire and the fleet manager are the next steps.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes);
// the helpers here return the same type rather than boxing and unboxing it.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod operator;
pub mod state_machine;

use std::io::Cursor;

use openraft::{AnyError, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};

/// A replicated change to the record store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Store `sealed` (a record sealed by the token at `seq`) for `id`, if
    /// the record's current sequence number is `expect` (`None`: absent).
    Put {
        id: [u8; 32],
        expect: Option<u64>,
        seq: u64,
        sealed: Vec<u8>,
    },
    /// Remove the record of `id`, if its current sequence number is
    /// `expect`.
    Delete { id: [u8; 32], expect: Option<u64> },
}

/// The state machine's answer to one log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Applied (or a membership / blank entry).
    #[default]
    Done,
    /// Refused: the record's sequence number was not the expected one.
    Conflict { current: Option<u64> },
}

openraft::declare_raft_types!(
    /// Raft types of a vault replica group.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;

fn io_error(
    make: fn(AnyError) -> StorageIOError<NodeId>,
    e: impl std::error::Error + 'static,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: make(AnyError::new(&e)),
    }
}
