//! What the token vouches for in a replica's applied state, so that the host
//! of one replica can neither roll back nor splice its state machine.
//!
//! A replica's state machine (its records, the shard map and frozen map of
//! its group, its last membership) is summarized by a **state digest**:
//!
//! ```text
//! digest = XOR over the parts of the state of
//!          HMAC(record-id key, "hsm-vault/v1/replica-state:" || group:u64be || part)
//! part   = "r" || record id || seq:u64be || SHA-256(sealed record)
//!        | "m" || SHA-256(shard map)   | "f" || SHA-256(frozen map)
//!        | "c" || SHA-256(membership)  (each map and membership in its stored JSON)
//! ```
//!
//! The HMAC key never leaves the token, so the host can compute no term:
//! a state with one record replaced by any other sealed copy (an older one
//! of the same record, from the log, a snapshot or a backup: each sealing
//! draws a fresh IV, so no two copies have the same bytes), a record added or
//! removed, or a map edited or deleted has another digest. Each applied
//! change toggles O(1) terms (a record's old and new term), so an applied
//! entry costs two token HMACs, not a pass over the state.
//!
//! The token keeps the digest of the applied state beside the applied log
//! id (the host stores and flushes the state; see
//! `replication::state_machine`). The key is a domain key, the same in every
//! token of the fleet, so replicas that applied the same log hold the same
//! digest, and a snapshot one replica built can be checked by another:
//!
//! ```text
//! snapshot MAC = HMAC(record-id key, "hsm-vault/v1/replica-snapshot:" || group:u64be
//!                     || applied || digest || SHA-256(snapshot header))
//! applied      = 0x00 (nothing applied) | 0x01 || index:u64be || term:u64be || node:u64be
//! ```

use sha2::{Digest, Sha256};

use crate::core::memo::{MacMemo, Toggle};
use crate::core::Token;
use crate::partition::{MacKey, PartitionError};

const STATE_LABEL: &[u8] = b"hsm-vault/v1/replica-state:";
const SNAPSHOT_LABEL: &[u8] = b"hsm-vault/v1/replica-snapshot:";

/// One part of a replica's state.
#[derive(Clone, Copy, Debug)]
pub enum Part<'a> {
    /// A record: its id, sequence number and sealed bytes.
    Record {
        id: &'a [u8; 32],
        seq: u64,
        sealed: &'a [u8],
    },
    /// The adopted shard map, as stored.
    ShardMap(&'a [u8]),
    /// The map of a move out of the group under way, as stored.
    Frozen(&'a [u8]),
    /// The last membership applied, as stored.
    Membership(&'a [u8]),
}

impl Part<'_> {
    fn encode(&self, group: u64) -> Vec<u8> {
        let mut data = Vec::with_capacity(STATE_LABEL.len() + 8 + 1 + 32 + 8 + 32);
        data.extend_from_slice(STATE_LABEL);
        data.extend_from_slice(&group.to_be_bytes());
        let (tag, bytes): (u8, &[u8]) = match self {
            Part::Record { id, seq, sealed } => {
                data.push(b'r');
                data.extend_from_slice(&id[..]);
                data.extend_from_slice(&seq.to_be_bytes());
                data.extend_from_slice(&Sha256::digest(sealed));
                return data;
            }
            Part::ShardMap(b) => (b'm', b),
            Part::Frozen(b) => (b'f', b),
            Part::Membership(b) => (b'c', b),
        };
        data.push(tag);
        data.extend_from_slice(&Sha256::digest(bytes));
        data
    }
}

/// The digest of a replica's applied state (all zeros: the empty state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateDigest(pub [u8; 32]);

impl StateDigest {
    /// Adds `part` to the digest, or removes it (the same operation).
    pub fn toggle(
        &mut self,
        token: &impl Token,
        group: u64,
        part: Part<'_>,
    ) -> Result<(), PartitionError> {
        let mac = token.hmac(MacKey::RecordId, &part.encode(group))?;
        self.xor(&mac);
        Ok(())
    }

    /// [`Self::toggle`], with the MAC taken from (or kept in) `memo`.
    pub fn toggle_memo(
        &mut self,
        token: &impl Token,
        group: u64,
        part: Part<'_>,
        memo: &mut MacMemo,
        toggle: Toggle,
    ) -> Result<(), PartitionError> {
        let mac = memo.mac(token, part.encode(group), toggle)?;
        self.xor(&mac);
        Ok(())
    }

    fn xor(&mut self, mac: &[u8; 32]) {
        for (d, m) in self.0.iter_mut().zip(mac) {
            *d ^= m;
        }
    }
}

/// The last log entry a state covers: index, term, and the node that led
/// that term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedAt {
    pub index: u64,
    pub term: u64,
    pub node: u64,
}

/// The MAC a replica's token puts on snapshot data: it vouches that the
/// state with `digest`, applied up to `applied`, is group `group`'s, with
/// the header `header` (maps and membership).
pub fn snapshot_mac(
    token: &impl Token,
    group: u64,
    applied: Option<AppliedAt>,
    digest: &StateDigest,
    header: &[u8],
) -> Result<[u8; 32], PartitionError> {
    let mut data = Vec::with_capacity(SNAPSHOT_LABEL.len() + 8 + 25 + 32 + 32);
    data.extend_from_slice(SNAPSHOT_LABEL);
    data.extend_from_slice(&group.to_be_bytes());
    match applied {
        None => data.push(0),
        Some(a) => {
            data.push(1);
            data.extend_from_slice(&a.index.to_be_bytes());
            data.extend_from_slice(&a.term.to_be_bytes());
            data.extend_from_slice(&a.node.to_be_bytes());
        }
    }
    data.extend_from_slice(&digest.0);
    data.extend_from_slice(&Sha256::digest(header));
    token.hmac(MacKey::RecordId, &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact bytes each MAC covers: a change to a label or a layout
    /// shows here (it would split a fleet running two versions).
    #[test]
    fn mac_inputs_are_pinned() {
        let id = [7u8; 32];
        let record = Part::Record {
            id: &id,
            seq: 9,
            sealed: b"sealed",
        }
        .encode(1);
        assert_eq!(
            hex::encode(&record),
            concat!(
                "68736d2d7661756c742f76312f7265706c6963612d73746174653a", // label
                "0000000000000001",                                       // group
                "72",                                                     // "r"
                "0707070707070707070707070707070707070707070707070707070707070707",
                "0000000000000009", // seq
                "c9d0036bed6744bcdf692fc980d8717d7e5f5a4f4e8266b4a84982602fb1cd09", // SHA-256("sealed")
            )
        );
        let map = Part::ShardMap(b"{}").encode(2);
        assert_eq!(&map[..STATE_LABEL.len()], STATE_LABEL);
        assert_eq!(map[STATE_LABEL.len() + 8], b'm');
        assert_eq!(&map[STATE_LABEL.len() + 9..], &Sha256::digest(b"{}")[..]);
        let tags: Vec<u8> = [
            Part::Frozen(b"x"),
            Part::Membership(b"x"),
            Part::ShardMap(b"x"),
        ]
        .iter()
        .map(|p| p.encode(0)[STATE_LABEL.len() + 8])
        .collect();
        assert_eq!(tags, b"fcm");
    }
}
