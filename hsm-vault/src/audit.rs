//! The audit trail: an append-only file of security events, one JSON object
//! per line, each chained to the one before by a MAC made in the token.
//!
//! What an entry holds: a sequence number, the time, the node, the event
//! and — for events about a record — the record id (the token's HMAC of the
//! account id: the vault's own pseudonym, from which the account id cannot
//! be recovered without the token). Never an account id, a password, an
//! OPAQUE message, a key or a stored secret.
//!
//! Why a chain: `mac_n = HMAC(record-id key, label ‖ mac_{n-1} ‖ entry_n)`,
//! computed inside the token. Whoever holds the file but not the token can
//! neither change nor remove an entry in the middle, nor insert one, without
//! the chain failing to verify ([`verify`]; `vault-audit` runs it). Entries
//! cut off the end, or the whole file deleted (the node then starts a new
//! chain at 1), are not detectable from the file alone: the export shows
//! the last sequence number, which the operator compares with the previous
//! export.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::partition::{MacKey, Partition, PartitionError};
use crate::types::RecordId;

/// Domain separation of the chain's MACs from the key's other uses.
const LABEL: &[u8] = b"hsm-vault/v1/audit";

/// A security event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A record was registered (or registered again, replacing the old one).
    Registered { record: String, max_guesses: u8 },
    /// A recovery start charged a guess before its KE2 was released.
    GuessCharged {
        record: String,
        guesses_remaining: u8,
    },
    /// A recovery finished without a valid KE3.
    WrongPassword {
        record: String,
        guesses_remaining: u8,
    },
    /// A valid KE3: the counter reset and the secret released (encrypted
    /// under the session key).
    Recovered { record: String },
    /// The limit was reached: the record's secret destroyed.
    Locked { record: String },
    /// The owner deleted the record.
    Deleted { record: String },
    /// This node's domain keys were cloned into a new token (ceremony), for
    /// the transport key with this SHA-256.
    NodeEnrolled { transport_key_sha256: String },
    /// A node was added to this group as a learner.
    LearnerAdded { learner: u64 },
    /// The group's voters changed.
    MembershipChanged { voters: Vec<u64> },
    /// A step of moving slots between groups.
    SlotsMoved { step: String },
}

impl Event {
    pub fn record(id: &RecordId) -> String {
        hex::encode(id.0)
    }
}

/// One line of the trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub node: u64,
    #[serde(flatten)]
    pub event: Event,
    /// Hex HMAC chaining this entry to the previous one.
    pub mac: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit entry {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("audit entry {seq} does not verify: the trail was changed from here on")]
    Broken { seq: u64 },
    #[error("audit entry {seq} follows {previous}: an entry is missing or reordered")]
    Gap { seq: u64, previous: u64 },
    #[error("token: {0}")]
    Token(#[from] PartitionError),
}

/// The MAC input of an entry: the label, the previous MAC, and the entry
/// without its MAC, as canonical JSON.
fn mac_input(previous: &[u8; 32], entry: &Entry) -> Result<Vec<u8>, AuditError> {
    let mut unsigned = serde_json::to_value(entry).map_err(|e| AuditError::Malformed {
        line: 0,
        reason: e.to_string(),
    })?;
    if let Some(map) = unsigned.as_object_mut() {
        map.remove("mac");
    }
    let body = serde_json::to_vec(&unsigned).map_err(|e| AuditError::Malformed {
        line: 0,
        reason: e.to_string(),
    })?;
    let mut input = LABEL.to_vec();
    input.extend_from_slice(previous);
    input.extend_from_slice(&body);
    Ok(input)
}

fn mac(partition: &Arc<Partition>, input: &[u8]) -> Result<[u8; 32], AuditError> {
    Ok(partition.session()?.hmac(MacKey::RecordId, input)?)
}

struct Tail {
    file: std::fs::File,
    seq: u64,
    previous: [u8; 32],
}

/// A node's audit trail, appended to as events happen.
pub struct AuditLog {
    path: PathBuf,
    node: u64,
    partition: Arc<Partition>,
    tail: Mutex<Tail>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Reads the entries of a trail file (without verifying them).
pub fn read(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut entries = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(&line).map_err(|e| AuditError::Malformed {
            line: i + 1,
            reason: e.to_string(),
        })?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Checks the chain of `entries` in the token; returns how many verified.
pub fn verify(partition: &Arc<Partition>, entries: &[Entry]) -> Result<u64, AuditError> {
    let mut previous = [0u8; 32];
    let mut last_seq = 0;
    for entry in entries {
        if entry.seq != last_seq + 1 {
            return Err(AuditError::Gap {
                seq: entry.seq,
                previous: last_seq,
            });
        }
        let expected = mac(partition, &mac_input(&previous, entry)?)?;
        let given = hex::decode(&entry.mac).unwrap_or_default();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &given[..])) {
            return Err(AuditError::Broken { seq: entry.seq });
        }
        previous = expected;
        last_seq = entry.seq;
    }
    Ok(last_seq)
}

impl AuditLog {
    /// Opens (or creates) the trail at `path`, continuing its chain.
    pub fn open(path: &Path, node: u64, partition: Arc<Partition>) -> Result<Self, AuditError> {
        let existing = read(path)?;
        let (seq, previous) = match existing.last() {
            Some(last) => {
                let mac: [u8; 32] = hex::decode(&last.mac)
                    .ok()
                    .and_then(|m| m.try_into().ok())
                    .ok_or(AuditError::Malformed {
                        line: existing.len(),
                        reason: "MAC is not 32 hex bytes".into(),
                    })?;
                (last.seq, mac)
            }
            None => (0, [0u8; 32]),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            node,
            partition,
            tail: Mutex::new(Tail {
                file,
                seq,
                previous,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event`. A failure is logged, never returned: the request
    /// that caused the event has already taken effect.
    pub fn record(&self, event: Event) {
        if let Err(e) = self.append(event) {
            tracing::error!(error = %e, "audit trail: an event could not be recorded");
        }
    }

    fn append(&self, event: Event) -> Result<(), AuditError> {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = Entry {
            seq: tail.seq + 1,
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            node: self.node,
            event,
            mac: String::new(),
        };
        let tag = mac(&self.partition, &mac_input(&tail.previous, &entry)?)?;
        entry.mac = hex::encode(tag);
        let mut line = serde_json::to_vec(&entry).map_err(|e| AuditError::Malformed {
            line: 0,
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        // One write call per line on a file opened for appending: a line is
        // never interleaved with another.
        tail.file.write_all(&line)?;
        tail.seq = entry.seq;
        tail.previous = tag;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event survives a round trip inside an entry: no event field
    /// collides with the entry's own (`seq`, `time_ms`, `node`, `mac`).
    #[test]
    fn every_event_round_trips_inside_an_entry() {
        let record = "ab".repeat(32);
        let events = [
            Event::Registered {
                record: record.clone(),
                max_guesses: 10,
            },
            Event::GuessCharged {
                record: record.clone(),
                guesses_remaining: 3,
            },
            Event::WrongPassword {
                record: record.clone(),
                guesses_remaining: 3,
            },
            Event::Recovered {
                record: record.clone(),
            },
            Event::Locked {
                record: record.clone(),
            },
            Event::Deleted { record },
            Event::NodeEnrolled {
                transport_key_sha256: "00".repeat(32),
            },
            Event::LearnerAdded { learner: 4 },
            Event::MembershipChanged {
                voters: vec![1, 2, 3],
            },
            Event::SlotsMoved {
                step: "map version 2 adopted".into(),
            },
        ];
        for event in events {
            let entry = Entry {
                seq: 7,
                time_ms: 1,
                node: 2,
                event,
                mac: "ff".repeat(32),
            };
            let text = serde_json::to_string(&entry).expect("serialize");
            let back: Entry = serde_json::from_str(&text).expect(&text);
            assert_eq!(back, entry, "{text}");
        }
    }
}
