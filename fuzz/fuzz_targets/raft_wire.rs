//! Raft log entries and messages in their binary encoding
//! (`hsm-vault/src/replication/codec.rs`, `vault.raft.v1`): what the sled
//! log, the state machine's tree and the token's log state hold on disk,
//! and what peers send and answer. Whatever decodes must encode, decode
//! again and encode to the same bytes; decoded commands and shard maps then
//! go through the checks the state machine makes.
//!
//! Input: a selector byte, then the encoded message.

#![no_main]

use hsm_vault::core::record::SealedRecord;
use hsm_vault::replication::inbox::{ChunkAnswer, SnapshotChunk};
use hsm_vault::replication::log_store::TokenLogState;
use hsm_vault::replication::state_machine::SnapshotHeader;
use hsm_vault::replication::{Command, Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig};
use hsm_vault::shard::{ShardMap, SLOTS};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, StreamAppendResult, VoteRequest, VoteResponse,
};
use openraft::EntryPayload;
use vault_fuzz::{select, wire_round_trip as rt};

fuzz_target!(init: vault_fuzz::seeds::init("raft_wire"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 16 {
        // On disk: the log, the state machine's tree, the token.
        0 => {
            if let Some(e) = rt::<Entry>(bytes) {
                if let EntryPayload::Normal(c) = e.payload {
                    command(&c);
                }
            }
        }
        1 => {
            if let Some(c) = rt::<Command>(bytes) {
                command(&c);
            }
        }
        2 => {
            if let Some(h) = rt::<SnapshotHeader>(bytes) {
                if let Some(m) = h.shard_map() {
                    shard_map(m);
                }
            }
        }
        3 => {
            rt::<TokenLogState>(bytes);
        }
        4 => {
            rt::<Option<LogId>>(bytes);
        }
        5 => {
            rt::<Option<LogId>>(bytes);
        }
        6 => {
            rt::<StoredMembership>(bytes);
        }
        7 => {
            rt::<SnapshotMeta>(bytes);
        }
        8 => {
            if let Some(m) = rt::<ShardMap>(bytes) {
                shard_map(&m);
            }
        }
        // From peers: requests.
        9 => {
            if let Some(r) = rt::<AppendEntriesRequest<TypeConfig>>(bytes) {
                for e in &r.entries {
                    if let EntryPayload::Normal(c) = &e.payload {
                        command(c);
                    }
                }
            }
        }
        10 => {
            rt::<VoteRequest<TypeConfig>>(bytes);
        }
        11 => {
            rt::<SnapshotChunk>(bytes);
        }
        // From peers: answers, as `network.rs` decodes them (a failure of
        // the peer's Raft travels as its text).
        12 => {
            rt::<Result<AppendEntriesResponse<TypeConfig>, String>>(bytes);
            rt::<Result<StreamAppendResult<TypeConfig>, String>>(bytes);
        }
        13 => {
            rt::<Result<VoteResponse<TypeConfig>, String>>(bytes);
        }
        14 => {
            rt::<Result<ChunkAnswer, String>>(bytes);
        }
        _ => {
            rt::<Entry>(bytes);
        }
    }
});

fn command(c: &Command) {
    match c {
        Command::Put { sealed, seq, .. } => {
            // The state machine stores the bytes as they came; the core
            // reads the header when it unseals.
            let s = SealedRecord::from_stored(sealed.clone());
            if sealed.len() >= 8 {
                assert!(s.seq().is_some());
            }
            let _ = seq;
        }
        Command::Delete { .. } | Command::Check { .. } => {}
        Command::AdoptMap { map } | Command::Freeze { map } => shard_map(map),
        Command::Import { map, records, .. } => {
            shard_map(map);
            for (id, _, _) in records {
                let _ = map.group_of(id);
            }
        }
    }
}

/// The checks a group makes on a map: valid ones give every slot a group.
fn shard_map(m: &ShardMap) {
    if m.validate().is_ok() {
        assert!(m.version >= 1);
        for s in [0u16, 1, 255, 256, 32767, 32768, u16::MAX] {
            assert!(m.group_of_slot(s).is_some_and(|g| g != 0));
        }
        let total: u32 = m.groups().iter().map(|g| m.slots_of(*g)).sum();
        assert_eq!(total, SLOTS);
        assert_eq!(m.moved_slots(m), 0);
    } else {
        for s in [0u16, u16::MAX] {
            let _ = m.group_of_slot(s);
        }
    }
}
