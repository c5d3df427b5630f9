//! The token-anchored record index: how the vault knows which copy of each
//! record is the current one, so a host cannot roll back the store or a
//! single record.
//!
//! Beside every sealed record the store keeps an index entry
//! `record id → sequence number` (written in the same atomic batch). The
//! token keeps the **anchor**: the highest committed sequence number and a
//! digest of the whole index,
//!
//! ```text
//! digest = XOR over index entries of HMAC(record-id key, "hsm-vault/v1/index:" || id || seq)
//! ```
//!
//! The HMAC key never leaves the token, so the host cannot compute any term
//! and cannot make a changed index match the digest. The invariants:
//!
//! - At open, the index must match the anchor (or the pending anchor of a
//!   batch that was being committed when the process died). Otherwise the
//!   store was rolled back or its index altered, and the node refuses to
//!   serve.
//! - At use, a record must carry exactly the sequence number its index entry
//!   names. An older copy spliced back is refused (`Stale`), one record at a
//!   time; a record whose bytes were altered or moved fails to unseal and is
//!   refused on its own too. Other records keep being served.
//! - The anchor is updated in two steps around the store's flush: first the
//!   new anchor is recorded as *pending*, then, once the batch is durable,
//!   as *committed*. A crash between the two leaves a store that matches one
//!   of them.

use crate::core::memo::{MacMemo, Toggle};
use crate::core::Token;
use crate::partition::{MacKey, PartitionError};
use crate::types::{RecordId, Seq};

const INDEX_LABEL: &[u8] = b"hsm-vault/v1/index:";

/// Sequence number and index digest at one commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub seq: Seq,
    pub digest: [u8; 32],
}

impl Anchor {
    pub const GENESIS: Anchor = Anchor {
        seq: Seq(0),
        digest: [0; 32],
    };
}

/// What the token holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnchorState {
    pub committed: Anchor,
    pub pending: Option<Anchor>,
}

impl AnchorState {
    /// Encoding in the token: `seq:digest` or `seq:digest;seq:digest`
    /// (committed, then pending); empty on a fresh token.
    pub fn encode(&self) -> Vec<u8> {
        let one = |a: &Anchor| format!("{}:{}", a.seq.0, hex::encode(a.digest));
        let mut s = one(&self.committed);
        if let Some(p) = &self.pending {
            s.push(';');
            s.push_str(&one(p));
        }
        s.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(AnchorState {
                committed: Anchor::GENESIS,
                pending: None,
            });
        }
        let text = std::str::from_utf8(bytes).ok()?;
        let one = |t: &str| -> Option<Anchor> {
            let (seq, digest) = t.split_once(':')?;
            let mut d = [0u8; 32];
            hex::decode_to_slice(digest, &mut d).ok()?;
            Some(Anchor {
                seq: Seq(seq.parse().ok()?),
                digest: d,
            })
        };
        let mut parts = text.split(';');
        let committed = one(parts.next()?)?;
        let pending = match parts.next() {
            Some(p) => Some(one(p)?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(AnchorState { committed, pending })
    }
}

/// Toggles the entry `(id, seq)` in `digest` (adding and removing are the
/// same operation).
pub fn toggle(
    token: &impl Token,
    digest: &mut [u8; 32],
    id: &RecordId,
    seq: Seq,
) -> Result<(), PartitionError> {
    let mac = token.hmac(MacKey::RecordId, &entry_input(id, seq))?;
    xor(digest, &mac);
    Ok(())
}

/// [`toggle`], with the MAC taken from (or kept in) `memo`.
pub fn toggle_memo(
    token: &impl Token,
    digest: &mut [u8; 32],
    (id, seq): (&RecordId, Seq),
    memo: &mut MacMemo,
    toggle: Toggle,
) -> Result<(), PartitionError> {
    let mac = memo.mac(token, entry_input(id, seq), toggle)?;
    xor(digest, &mac);
    Ok(())
}

/// What the token MACs for the index entry `(id, seq)`.
fn entry_input(id: &RecordId, seq: Seq) -> Vec<u8> {
    let mut data = Vec::with_capacity(INDEX_LABEL.len() + 40);
    data.extend_from_slice(INDEX_LABEL);
    data.extend_from_slice(&id.0);
    data.extend_from_slice(&seq.0.to_be_bytes());
    data
}

fn xor(digest: &mut [u8; 32], mac: &[u8; 32]) {
    for (d, m) in digest.iter_mut().zip(mac) {
        *d ^= m;
    }
}

/// How a store found at open relates to the token's anchor.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenCheck {
    /// The store is exactly what was last committed.
    Current,
    /// The process died after the batch reached the disk but before the
    /// anchor was marked committed: the pending anchor becomes committed.
    RollForward(Anchor),
    /// The process died before the batch reached the disk: the pending
    /// anchor is dropped (nothing of that batch was acknowledged).
    DropPending,
    /// The store is older than what the token has seen.
    RolledBack { store: Seq, token: Seq },
    /// The index does not match the digest: records were added, removed or
    /// rolled back behind the vault's back.
    Altered,
}

/// Compares the store's (head, digest) with the token's anchor state.
pub fn check_open(token_state: &AnchorState, store: Anchor) -> OpenCheck {
    if store == token_state.committed {
        return match token_state.pending {
            None => OpenCheck::Current,
            Some(_) => OpenCheck::DropPending,
        };
    }
    if token_state.pending == Some(store) {
        return OpenCheck::RollForward(store);
    }
    // Only the committed anchor was ever acknowledged: a store behind it is
    // stale. A store at the committed (or pending) sequence whose digest
    // differs was edited, whether or not a batch was in flight when the
    // process died; so was a store the token never saw.
    if store.seq < token_state.committed.seq {
        OpenCheck::RolledBack {
            store: store.seq,
            token: token_state.committed.seq,
        }
    } else {
        OpenCheck::Altered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_state_round_trips_and_rejects_garbage() {
        let a = Anchor {
            seq: Seq(7),
            digest: [1; 32],
        };
        let b = Anchor {
            seq: Seq(9),
            digest: [2; 32],
        };
        for s in [
            AnchorState {
                committed: a,
                pending: None,
            },
            AnchorState {
                committed: a,
                pending: Some(b),
            },
        ] {
            assert_eq!(AnchorState::decode(&s.encode()), Some(s));
        }
        assert_eq!(
            AnchorState::decode(b""),
            Some(AnchorState {
                committed: Anchor::GENESIS,
                pending: None
            })
        );
        for junk in [&b"x"[..], b"1:zz", b"1:00;2", b"1:;;", b"-1:00"] {
            assert_eq!(AnchorState::decode(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn open_check_decides_every_case() {
        let old = Anchor {
            seq: Seq(5),
            digest: [5; 32],
        };
        let new = Anchor {
            seq: Seq(6),
            digest: [6; 32],
        };
        let settled = AnchorState {
            committed: new,
            pending: None,
        };
        let midway = AnchorState {
            committed: old,
            pending: Some(new),
        };
        assert_eq!(check_open(&settled, new), OpenCheck::Current);
        assert_eq!(check_open(&midway, new), OpenCheck::RollForward(new));
        assert_eq!(check_open(&midway, old), OpenCheck::DropPending);
        assert_eq!(
            check_open(&settled, old),
            OpenCheck::RolledBack {
                store: Seq(5),
                token: Seq(6)
            }
        );
        let forged = Anchor {
            seq: Seq(6),
            digest: [9; 32],
        };
        assert_eq!(check_open(&settled, forged), OpenCheck::Altered);
        let ahead = Anchor {
            seq: Seq(8),
            digest: [9; 32],
        };
        assert_eq!(check_open(&settled, ahead), OpenCheck::Altered);
        // Killed with a batch in flight, then the committed store edited:
        // the edit is named as such, not as a rollback.
        let edited = Anchor {
            seq: Seq(5),
            digest: [9; 32],
        };
        assert_eq!(check_open(&midway, edited), OpenCheck::Altered);
        let older = Anchor {
            seq: Seq(4),
            digest: [4; 32],
        };
        assert_eq!(
            check_open(&midway, older),
            OpenCheck::RolledBack {
                store: Seq(4),
                token: Seq(5)
            }
        );
    }
}
