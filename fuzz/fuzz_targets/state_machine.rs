//! What the replicated state machine does with decoded bytes
//! (`hsm-vault/src/replication/state_machine.rs`, on a temporary sled
//! database):
//!
//! 0. installing snapshot data from a peer: it installs only data that
//!    parses (and carries a token MAC over what it holds: fuzzed data almost
//!    never does, so most inputs stop there), and after an install a
//!    snapshot built right after holds the same records (the last copy of a
//!    repeated id) and the same shard map;
//! 1. applying log entries (commands, as a JSON list) to a group that adopted an
//!    even map: one answer per entry, the applied log id is the last entry's,
//!    whatever maps the group adopts or freezes are valid, and the state
//!    digest kept up to date entry by entry is the one a full scan at open
//!    computes (the replica reopens against its token).
//!
//! Input: a selector byte, then the snapshot data or the JSON commands.

#![no_main]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::OnceLock;

use hsm_vault::replication::state_machine::{parse_snapshot, StateMachine};
use hsm_vault::replication::{Command, Entry, LogId, SnapshotMeta, StoredMembership};
use hsm_vault::shard::ShardMap;
use libfuzzer_sys::fuzz_target;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder};
use vault_fuzz::{select, SoftKeeper};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn db() -> &'static sled::Db {
    static DB: OnceLock<sled::Db> = OnceLock::new();
    DB.get_or_init(|| {
        sled::Config::new()
            .temporary(true)
            .open()
            .expect("temporary sled")
    })
}

fn keeper() -> &'static SoftKeeper {
    static KEEPER: OnceLock<SoftKeeper> = OnceLock::new();
    KEEPER.get_or_init(SoftKeeper::default)
}

fn open() -> StateMachine<SoftKeeper> {
    StateMachine::open(db(), "fuzz", 1, keeper().clone())
        .expect("the state machine matches what its token vouches for")
}

/// A fresh state machine of group 1 (the same tree, erased).
fn fresh() -> StateMachine<SoftKeeper> {
    let sm = open();
    sm.erase().expect("erase");
    sm
}

fn log_id(index: u64) -> LogId {
    hsm_vault::replication::log_id(1, 1, index)
}

fuzz_target!(init: vault_fuzz::seeds::init("state_machine"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 2 {
        0 => runtime().block_on(install(bytes)),
        _ => runtime().block_on(apply(bytes)),
    }
});

async fn install(data: &[u8]) {
    // The receiver's check (before Raft sees the snapshot), on a state
    // machine of its own so that the install below redoes every check.
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(9)),
        last_membership: StoredMembership::default(),
    };
    let checked = fresh().check_snapshot(&meta, data);
    let mut sm = fresh();
    let parsed = parse_snapshot(data);
    let installed = sm.install_snapshot(&meta, Cursor::new(data.to_vec())).await;
    assert_eq!(
        checked.is_ok(),
        installed.is_ok(),
        "the receiver's check and the install disagree"
    );
    let (header, records) = match (parsed, installed) {
        (Ok(p), Ok(())) => (p.header, p.records),
        (_, Err(_)) => return,
        (Err(_), Ok(())) => panic!("data that does not parse was installed"),
    };
    open();
    // The last copy of each id wins, in id order.
    let expected: BTreeMap<[u8; 32], (u64, &[u8])> = records
        .iter()
        .map(|(id, seq, sealed)| (*id, (*seq, *sealed)))
        .collect();
    for (id, (seq, sealed)) in &expected {
        assert_eq!(
            sm.get(id).expect("get"),
            Some((*seq, sealed.to_vec())),
            "an installed record"
        );
    }
    assert_eq!(sm.record_count(), expected.len());
    let installed_map = sm.shard_map().expect("shard map");
    assert_eq!(installed_map.as_ref(), header.shard_map());
    let built = sm.build_snapshot().await.expect("a snapshot builds");
    let data = built.snapshot.into_inner();
    let again = parse_snapshot(&data).expect("a built snapshot parses");
    let again: BTreeMap<[u8; 32], (u64, &[u8])> = again
        .records
        .iter()
        .map(|(id, seq, sealed)| (*id, (*seq, *sealed)))
        .collect();
    assert_eq!(again, expected);
}

async fn apply(bytes: &[u8]) {
    let Ok(commands) = serde_json::from_slice::<Vec<Command>>(bytes) else {
        return;
    };
    let mut sm = fresh();
    let start = Entry {
        log_id: log_id(1),
        payload: EntryPayload::Normal(Command::AdoptMap {
            map: ShardMap::even(1, &[1, 2]),
        }),
    };
    sm.apply_entries([start])
        .await
        .expect("the first map is adopted");
    let n = commands.len();
    let entries: Vec<Entry> = commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: log_id(2 + i as u64),
            payload: EntryPayload::Normal(c),
        })
        .collect();
    let answers = sm.apply_entries(entries).await.expect("apply");
    assert_eq!(answers.len(), n);
    let (applied, _) = sm.applied_state().await.expect("applied state");
    assert_eq!(applied, Some(log_id(1 + n as u64)));
    let adopted = sm.shard_map().expect("map").expect("a map stays adopted");
    adopted.validate().expect("an adopted map is valid");
    if let Some(frozen) = sm.frozen_map().expect("frozen") {
        frozen.validate().expect("a frozen map is valid");
        assert!(frozen.version > adopted.version);
    }
    drop(sm);
    open();
}
