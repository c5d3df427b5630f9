//! A bounded memo of the token's MACs over digest parts.
//!
//! The store's index digest and a replica's state digest are XORs of one
//! token MAC per entry, so every write toggles two: the old value out and
//! the new one in. A recovery writes its record twice (the charge, then the
//! reset), and the second write toggles out exactly what the first toggled
//! in. The MAC is a deterministic function of its input, so remembering the
//! ones toggled in, until they are toggled out, saves the token that work
//! without changing any digest. Entries computed by the token in this
//! process are the only ones kept; nothing is read from storage.

use std::collections::{HashMap, VecDeque};

use super::Token;
use crate::partition::{MacKey, PartitionError};

/// Whether a part enters the digest (keep its MAC) or leaves it (forget it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toggle {
    In,
    Out,
}

/// MACs under [`MacKey::RecordId`] of the parts most recently toggled in,
/// at most `capacity` of them, the oldest forgotten first.
#[derive(Debug)]
pub struct MacMemo {
    tags: HashMap<Vec<u8>, [u8; 32]>,
    order: VecDeque<Vec<u8>>,
    capacity: usize,
}

impl MacMemo {
    /// Room for the parts a busy node toggles in within a few seconds.
    pub const CAPACITY: usize = 16_384;

    pub fn new(capacity: usize) -> Self {
        MacMemo {
            tags: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// The token's MAC of `data`, from the memo when it holds it.
    pub fn mac(
        &mut self,
        token: &impl Token,
        data: Vec<u8>,
        toggle: Toggle,
    ) -> Result<[u8; 32], PartitionError> {
        if toggle == Toggle::Out {
            if let Some(tag) = self.tags.remove(&data) {
                return Ok(tag);
            }
            return token.hmac(MacKey::RecordId, &data);
        }
        if let Some(tag) = self.tags.get(&data) {
            return Ok(*tag);
        }
        let tag = token.hmac(MacKey::RecordId, &data)?;
        if self.capacity == 0 {
            return Ok(tag);
        }
        // Keys already toggled out stay in `order` until they reach its
        // front; they no longer count against the map.
        while self.tags.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.tags.remove(&old);
                }
                None => break,
            }
        }
        if self.order.len() >= 2 * self.capacity {
            let tags = &self.tags;
            self.order.retain(|k| tags.contains_key(k));
        }
        self.order.push_back(data.clone());
        self.tags.insert(data, tag);
        Ok(tag)
    }

    /// How many MACs it holds.
    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }
}

impl Default for MacMemo {
    fn default() -> Self {
        MacMemo::new(MacMemo::CAPACITY)
    }
}
