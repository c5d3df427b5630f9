//! The seed corpus of each target, made by the code that writes each format
//! (so the seeds follow the formats when they change): every target calls
//! [`init`] first, and when `VAULT_FUZZ_SEEDS` names a directory it writes
//! its seeds there and exits. `scripts/fuzz.sh` does that before each run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use hsm_vault::core::record::{self, Record, RecordBody, PASSWORD_FILE_LEN};
use hsm_vault::core::Purpose;
use hsm_vault::geo::Faults;
use hsm_vault::partition::ceremony::{ClonePackage, KeyKind, WrappedKey};
use hsm_vault::replication::inbox::{ChunkAnswer, SnapshotChunk};
use hsm_vault::replication::network::frame_snapshot_chunk;
use hsm_vault::replication::operator::{
    AddLearner, ChangeMembership, ExportKeys, Handover, Maps, Reshard,
};
use hsm_vault::replication::state_machine::SNAPSHOT_MAGIC;
use hsm_vault::replication::{
    Command, Entry, LogId, NodeId, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use hsm_vault::shard::ShardMap;
use hsm_vault::types::Seq;
use opaque_ke::{ClientRegistration, ClientRegistrationFinishParameters, Identifiers};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, EntryPayload, Membership};
use p256::ecdsa::SigningKey;
use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use vault_proto::suite::Suite;
use vault_proto::vault::node::v1 as node;
use vault_proto::vault::raft::v1 as raft_pb;
use vault_proto::vault::v1 as pb;
use zeroize::Zeroizing;

use crate::{fixture, ACCOUNT, PASSWORD};

/// Seeds as (file name, bytes).
type Seeds = Vec<(String, Vec<u8>)>;

/// Writes `target`'s seeds to `$VAULT_FUZZ_SEEDS` and exits, if it is set.
pub fn init(target: &str) {
    let Ok(dir) = std::env::var("VAULT_FUZZ_SEEDS") else {
        return;
    };
    let seeds = match target {
        "grpc_vault" => grpc_vault(),
        "grpc_node" => grpc_node(),
        "opaque_messages" => opaque_messages(),
        "opaque_login" => opaque_login(),
        "record" => record_seeds(),
        "raft_wire" => raft_wire(),
        "snapshot" => snapshot(),
        "anchor_state" => anchor_state(),
        "bearer_token" => bearer_token(),
        "fleet_file" => fleet_file(),
        "faults_file" => faults_file(),
        "backup_file" => backup_file(),
        "state_machine" => state_machine(),
        other => panic!("no seeds for {other}"),
    };
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (name, bytes) in &seeds {
        std::fs::write(std::path::Path::new(&dir).join(name), bytes).expect("write a seed");
    }
    eprintln!("{target}: {} seeds written to {dir}", seeds.len());
    std::process::exit(0);
}

fn sel(which: u8, bytes: impl AsRef<[u8]>) -> Vec<u8> {
    let mut v = vec![which];
    v.extend_from_slice(bytes.as_ref());
    v
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("seed encodes")
}

/// `v` in the replication's binary encoding.
fn wire<T: hsm_vault::replication::codec::Wire>(v: &T) -> Vec<u8> {
    hsm_vault::replication::codec::encode(v)
}

/// Real OPAQUE messages of one registration and one login.
struct Flow {
    registration_request: Vec<u8>,
    registration_response: Vec<u8>,
    registration_upload: Vec<u8>,
    generation: Vec<u8>,
    ke1: Vec<u8>,
    ke2: Vec<u8>,
    ke3: Vec<u8>,
    password_file: Vec<u8>,
}

fn flow() -> Flow {
    let f = fixture();
    let mut rng = StdRng::seed_from_u64(99);
    let start = ClientRegistration::<Suite>::start(&mut rng, PASSWORD).expect("start");
    let (response, generation) = f
        .core
        .registration_start(&f.token, &f.id, &start.message.serialize())
        .expect("registration start");
    let finish = start
        .state
        .finish(
            &mut rng,
            PASSWORD,
            opaque_ke::RegistrationResponse::deserialize(&response).expect("response"),
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&f.ksf)),
        )
        .expect("client finish");
    let login = f.start_login(5);
    let (ke3, _) = f.client_finish(&login, 6);
    // Consume the login.
    f.core
        .finish(
            &f.token,
            &login.login_id,
            &[],
            &login.stored,
            Purpose::Recover,
            Seq(3),
            Instant::now(),
        )
        .expect("give up");
    let upload = finish.message.serialize().to_vec();
    let password_file = opaque_ke::ServerRegistration::<Suite>::finish(finish.message)
        .serialize()
        .to_vec();
    Flow {
        registration_request: start.message.serialize().to_vec(),
        registration_response: response,
        registration_upload: upload,
        generation: generation.to_vec(),
        ke1: login.ke1,
        ke2: login.ke2,
        ke3,
        password_file,
    }
}

fn grpc_vault() -> Seeds {
    let fl = flow();
    let login_id = [0u8; 24].to_vec();
    let msgs: Vec<(u8, &str, Vec<u8>)> = vec![
        (
            0,
            "register_start",
            pb::RegisterStartRequest {
                account_id: ACCOUNT.to_vec(),
                registration_request: fl.registration_request.clone(),
            }
            .encode_to_vec(),
        ),
        (
            1,
            "register_finish",
            pb::RegisterFinishRequest {
                account_id: ACCOUNT.to_vec(),
                registration_upload: fl.registration_upload.clone(),
                secret: vec![7; 60],
                max_guesses: 5,
                registration_id: fl.generation.clone(),
            }
            .encode_to_vec(),
        ),
        (
            2,
            "recover_start",
            pb::RecoverStartRequest {
                account_id: ACCOUNT.to_vec(),
                ke1: fl.ke1.clone(),
            }
            .encode_to_vec(),
        ),
        (
            2,
            "recover_start_unknown",
            pb::RecoverStartRequest {
                account_id: b"nobody".to_vec(),
                ke1: fl.ke1.clone(),
            }
            .encode_to_vec(),
        ),
        (
            3,
            "recover_finish",
            pb::RecoverFinishRequest {
                login_id: login_id.clone(),
                ke3: fl.ke3.clone(),
            }
            .encode_to_vec(),
        ),
        (
            4,
            "delete",
            pb::DeleteRequest {
                account_id: ACCOUNT.to_vec(),
                login_id: login_id.clone(),
                ke3: fl.ke3.clone(),
            }
            .encode_to_vec(),
        ),
        (
            5,
            "status",
            pb::StatusRequest {
                account_id: ACCOUNT.to_vec(),
            }
            .encode_to_vec(),
        ),
        (6, "get_info", pb::GetInfoRequest {}.encode_to_vec()),
        (
            7,
            "get_info_response",
            pb::GetInfoResponse {
                cipher_suite: vault_proto::suite::SUITE_NAME.into(),
                server_public_key: fixture().token.ake_public(),
                max_secret_len: 128,
                max_guesses_limit: 10,
                default_max_guesses: 10,
                max_account_id_len: 256,
                node_id: 1,
                leader_id: 2,
                applied_index: 77,
                voters: vec![1, 2, 3],
                group_id: 1,
                shard_map_version: 1,
                snapshot_index: 50,
            }
            .encode_to_vec(),
        ),
        (
            8,
            "register_start_response",
            pb::RegisterStartResponse {
                registration_response: fl.registration_response.clone(),
                registration_id: fl.generation.clone(),
            }
            .encode_to_vec(),
        ),
        (
            9,
            "register_finish_response",
            pb::RegisterFinishResponse { max_guesses: 10 }.encode_to_vec(),
        ),
        (
            10,
            "recover_start_response",
            pb::RecoverStartResponse {
                outcome: Some(pb::recover_start_response::Outcome::Challenge(
                    pb::Challenge {
                        login_id: login_id.clone(),
                        ke2: fl.ke2.clone(),
                    },
                )),
            }
            .encode_to_vec(),
        ),
        (
            11,
            "recover_finish_response",
            pb::RecoverFinishResponse {
                outcome: Some(pb::recover_finish_response::Outcome::Recovered(
                    pb::Recovered {
                        nonce: vec![1; 12],
                        sealed_secret: vec![2; 76],
                    },
                )),
            }
            .encode_to_vec(),
        ),
        (
            12,
            "delete_response",
            pb::DeleteResponse {
                outcome: Some(pb::delete_response::Outcome::WrongPassword(
                    pb::WrongPassword {},
                )),
            }
            .encode_to_vec(),
        ),
        (
            13,
            "status_response",
            pb::StatusResponse {
                state: pb::status_response::State::Registered as i32,
                guesses_remaining: 9,
                max_guesses: 10,
            }
            .encode_to_vec(),
        ),
    ];
    msgs.into_iter()
        .map(|(w, name, bytes)| (name.to_owned(), sel(w, bytes)))
        .collect()
}

fn log_id(term: u64, index: u64) -> LogId {
    hsm_vault::replication::log_id(term, 1, index)
}

fn membership() -> Membership<NodeId, BasicNode> {
    let nodes: BTreeMap<NodeId, BasicNode> = (1..=3)
        .map(|i| (i, BasicNode::new(format!("127.0.0.1:770{i}"))))
        .collect();
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes).expect("a valid membership")
}

fn maps() -> (ShardMap, ShardMap) {
    let one = ShardMap::even(1, &[1, 2]);
    let two = one.reassign(0, 99, 2, 2);
    (one, two)
}

fn commands() -> Vec<Command> {
    let f = fixture();
    let sealed = f
        .stored
        .record
        .as_ref()
        .expect("registered")
        .as_bytes()
        .to_vec();
    let (one, two) = maps();
    vec![
        Command::Put {
            id: f.id.0,
            expect: None,
            seq: 1,
            sealed: sealed.clone(),
        },
        Command::Delete {
            id: f.id.0,
            expect: Some(1),
        },
        Command::AdoptMap { map: one },
        Command::Freeze { map: two.clone() },
        Command::Import {
            map: two,
            records: vec![([0; 32], 4, sealed)],
            last: true,
        },
    ]
}

fn entries() -> Vec<Entry> {
    let mut out: Vec<Entry> = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(membership()),
        },
    ];
    for (i, c) in commands().into_iter().enumerate() {
        out.push(Entry {
            log_id: log_id(2, 3 + i as u64),
            payload: EntryPayload::Normal(c),
        });
    }
    out
}

fn snapshot_meta() -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(log_id(2, 40)),
        last_membership: StoredMembership::new(Some(log_id(1, 2)), membership()),
    }
}

fn raft_wire() -> Seeds {
    let mut seeds = Seeds::new();
    let mut add = |which: u8, name: &str, bytes: Vec<u8>| {
        seeds.push((format!("{which:02}-{name}"), sel(which, bytes)))
    };
    for (i, e) in entries().iter().enumerate() {
        add(0, &format!("entry{i}"), wire(e));
    }
    for (i, c) in commands().iter().enumerate() {
        add(1, &format!("command{i}"), wire(c));
    }
    add(2, "snapshot_header", snapshot_header());
    add(
        3,
        "token_state",
        prost::Message::encode_to_vec(&raft_pb::TokenLogState {
            vote: Some(raft_pb::Vote {
                term: 3,
                node: 1,
                committed: true,
            }),
            committed: Some(raft_pb::LogId {
                term: 3,
                node: 1,
                index: 12,
            }),
            last_log: Some(raft_pb::LogId {
                term: 3,
                node: 1,
                index: 14,
            }),
            purged: None,
        }),
    );
    add(4, "log_id", wire(&Some(log_id(3, 9))));
    add(5, "no_log_id", wire(&None::<hsm_vault::replication::LogId>));
    add(
        6,
        "membership",
        wire(&StoredMembership::new(Some(log_id(1, 2)), membership())),
    );
    add(7, "snapshot_meta", wire(&snapshot_meta()));
    add(8, "shard_map", wire(&maps().1));
    add(9, "append_entries", wire(&append_entries()));
    add(
        10,
        "vote_request",
        wire(&VoteRequest::<TypeConfig>::new(
            Vote::new(4, 2),
            Some(log_id(3, 9)),
        )),
    );
    add(11, "install_snapshot", wire(&install_snapshot()));
    let ok: Result<AppendEntriesResponse<TypeConfig>, String> = Ok(AppendEntriesResponse::Success);
    add(12, "append_ok", wire(&ok));
    let conflict: Result<AppendEntriesResponse<TypeConfig>, String> =
        Ok(AppendEntriesResponse::HigherVote(Vote::new(5, 3)));
    add(12, "append_higher", wire(&conflict));
    let fatal: Result<AppendEntriesResponse<TypeConfig>, String> = Err("raft stopped".to_owned());
    add(12, "append_fatal", wire(&fatal));
    let streamed: Result<openraft::raft::StreamAppendResult<TypeConfig>, String> =
        Ok(Ok(Some(log_id(2, 9))));
    add(12, "stream_ok", wire(&streamed));
    let vote: Result<VoteResponse<TypeConfig>, String> =
        Ok(VoteResponse::new(Vote::new(4, 2), Some(log_id(3, 9)), true));
    add(13, "vote_ok", wire(&vote));
    add(
        14,
        "snapshot_ok",
        wire(&Ok::<_, String>(ChunkAnswer::Taken {
            vote: Vote::new_committed(4, 2),
        })),
    );
    seeds
}

fn append_entries() -> AppendEntriesRequest<TypeConfig> {
    AppendEntriesRequest {
        vote: Vote::new_committed(2, 1),
        prev_log_id: Some(log_id(1, 2)),
        entries: entries().into_iter().skip(2).collect(),
        leader_commit: Some(log_id(1, 2)),
    }
}

fn install_snapshot() -> SnapshotChunk {
    SnapshotChunk {
        vote: Vote::new_committed(2, 1),
        meta: snapshot_meta(),
        transfer: 7,
        offset: 0,
        done: true,
        data: Vec::new(),
    }
}

/// Snapshot data as the state machine writes it.
/// A snapshot header as the state machine writes it.
fn snapshot_header() -> Vec<u8> {
    let membership = raft_pb::StoredMembership::decode(
        &wire(&StoredMembership::new(Some(log_id(1, 2)), membership()))[..],
    )
    .expect("a membership decodes");
    let map = raft_pb::ShardMap::decode(&wire(&maps().0)[..]).expect("a map decodes");
    raft_pb::SnapshotHeader {
        last_applied: Some(raft_pb::LogId {
            term: 2,
            node: 1,
            index: 40,
        }),
        membership: Some(membership),
        shard_map: Some(map),
        frozen: None,
    }
    .encode_to_vec()
}

fn snapshot_data() -> Vec<u8> {
    let head = snapshot_header();
    let mut data = SNAPSHOT_MAGIC.to_vec();
    // The token MAC's place (a seed cannot make a valid one: fuzzed data
    // is refused by it, which is what the targets check).
    data.extend_from_slice(&[0x5a; 32]);
    data.extend_from_slice(&(head.len() as u32).to_be_bytes());
    data.extend_from_slice(&head);
    let f = fixture();
    let sealed = f.stored.record.as_ref().expect("registered").as_bytes();
    for (id, seq) in [([1u8; 32], 5u64), (f.id.0, 1)] {
        data.extend_from_slice(&id);
        data.extend_from_slice(&seq.to_be_bytes());
        data.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
        data.extend_from_slice(sealed);
    }
    data
}

fn snapshot() -> Seeds {
    let data = snapshot_data();
    let head = wire(&install_snapshot());
    vec![
        ("data".into(), sel(0, &data)),
        (
            "data_empty".into(),
            sel(0, &data[..data.len() - 2 * (42 + 314)]),
        ),
        ("chunk".into(), sel(1, frame_snapshot_chunk(&head, &data))),
    ]
}

fn grpc_node() -> Seeds {
    let mut seeds = Seeds::new();
    let raft = |kind: &str, payload: Vec<u8>| {
        node::RaftRequest {
            kind: kind.into(),
            from: 1,
            to: 2,
            payload,
            mac: vec![0xaa; 32],
            nonce: vec![0xbb; 16],
            group: 1,
        }
        .encode_to_vec()
    };
    seeds.push((
        "append".into(),
        sel(0, raft("append_entries", wire(&append_entries()))),
    ));
    seeds.push((
        "vote".into(),
        sel(
            0,
            raft(
                "vote",
                wire(&VoteRequest::<TypeConfig>::new(
                    Vote::new(4, 2),
                    Some(log_id(3, 9)),
                )),
            ),
        ),
    ));
    seeds.push((
        "install_snapshot".into(),
        sel(
            0,
            raft(
                "install_snapshot",
                frame_snapshot_chunk(&wire(&install_snapshot()), &snapshot_data()),
            ),
        ),
    ));
    let ok: Result<AppendEntriesResponse<TypeConfig>, String> = Ok(AppendEntriesResponse::Success);
    seeds.push((
        "raft_response".into(),
        sel(
            1,
            node::RaftResponse {
                payload: wire(&ok),
                mac: vec![0xcc; 32],
            }
            .encode_to_vec(),
        ),
    ));
    let key = SigningKey::from_slice(&[5u8; 32]).expect("a valid scalar");
    let (one, two) = maps();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "ExportKeys",
            json(&ExportKeys {
                transport: hex::encode(fixture().token.ake_public()),
                so_pin: "0123456789abcdef".into(),
            }),
        ),
        (
            "AddLearner",
            json(&AddLearner {
                id: 4,
                addr: "127.0.0.1:7704".into(),
            }),
        ),
        (
            "ChangeMembership",
            json(&ChangeMembership {
                voters: BTreeSet::from([1, 2, 4]),
            }),
        ),
        ("Reshard", json(&Reshard::Show)),
        ("Reshard", json(&Reshard::Freeze { map: two.clone() })),
        (
            "Reshard",
            json(&Reshard::Import(Handover {
                map: two.clone(),
                records: vec![([0; 32], 4, vec![1, 2, 3])],
                mac: hex::encode([9u8; 32]),
            })),
        ),
    ];
    for (i, (kind, body)) in bodies.into_iter().enumerate() {
        let target = vault_proto::operator::Target { node: 1, group: 1 };
        let request = vault_proto::operator::request(&key, kind, target, 1_000_000, body);
        seeds.push((format!("operator{i}"), sel(2, request.encode_to_vec())));
    }
    let replies: Vec<Vec<u8>> = vec![
        json(&Maps {
            group: 1,
            adopted: Some(one),
            frozen: Some(two.clone()),
        }),
        json(&Handover {
            map: two,
            records: vec![([0; 32], 4, vec![1, 2, 3])],
            mac: hex::encode([9u8; 32]),
        }),
        json(&ClonePackage {
            source_transport: fixture().token.ake_public(),
            keys: vec![WrappedKey {
                label: "hsm-vault/v1/seal".into(),
                kind: KeyKind::Aes,
                wrapped: vec![4; 40],
            }],
            ake_public: fixture().token.ake_public(),
        }),
        json(&"ok"),
    ];
    for (i, body) in replies.into_iter().enumerate() {
        seeds.push((
            format!("reply{i}"),
            sel(3, node::OperatorReply { body }.encode_to_vec()),
        ));
    }
    seeds
}

fn opaque_messages() -> Seeds {
    let fl = flow();
    vec![
        (
            "registration_request".into(),
            sel(0, &fl.registration_request),
        ),
        (
            "registration_upload".into(),
            sel(1, &fl.registration_upload),
        ),
        ("ke1".into(), sel(2, &fl.ke1)),
        ("ke3".into(), sel(3, &fl.ke3)),
        (
            "registration_response".into(),
            sel(4, &fl.registration_response),
        ),
        ("ke2".into(), sel(5, &fl.ke2)),
        ("password_file".into(), sel(6, &fl.password_file)),
        ("ake_public".into(), sel(7, fixture().token.ake_public())),
    ]
}

fn opaque_login() -> Seeds {
    let fl = flow();
    vec![
        ("foreign_ke3".into(), sel(0, &fl.ke3)),
        ("foreign_ke3_delete".into(), sel(1, &fl.ke3)),
        ("genuine_ke3".into(), sel(2, [])),
        ("edited_ke3".into(), sel(2, [3, 0x40])),
        ("extended_ke3".into(), sel(2, [32, 0x01])),
        ("truncated_ke3".into(), sel(2, [31])),
        ("ke1".into(), sel(3, &fl.ke1)),
        ("policy_fresh".into(), sel(4, [0, 9, 0])),
        ("policy_limit".into(), sel(4, [0, 9, 10])),
        ("policy_locked".into(), sel(4, [1, 9, 10])),
        ("policy_phantom".into(), sel(4, [2, 9, 3])),
    ]
}

fn record_seeds() -> Seeds {
    let f = fixture();
    let registered = Record {
        body: RecordBody::Registered {
            password_file: [3; PASSWORD_FILE_LEN],
            secret: vec![7; 60],
        },
        max_guesses: 10,
        guesses_used: 2,
        generation: [8; 16],
    };
    let locked = Record {
        body: RecordBody::Locked,
        max_guesses: 5,
        guesses_used: 5,
        generation: [8; 16],
    };
    let sealed = f
        .stored
        .record
        .as_ref()
        .expect("registered")
        .as_bytes()
        .to_vec();
    let mut seal_mode = 7u64.to_be_bytes().to_vec();
    seal_mode.extend_from_slice(&[0, 200]);
    seal_mode.extend_from_slice(&record::encode(&registered));
    vec![
        (
            "plain_registered".into(),
            sel(0, record::encode(&registered)),
        ),
        ("plain_locked".into(), sel(0, record::encode(&locked))),
        ("sealed".into(), sel(1, &sealed)),
        ("sealed_short".into(), sel(1, &sealed[..20])),
        ("seal_and_open".into(), sel(2, &seal_mode)),
    ]
}

fn anchor_state() -> Seeds {
    let d1 = hex::encode([0x12; 32]);
    let d2 = hex::encode([0x34; 32]);
    let mut store = vec![0xff];
    store.extend_from_slice(&6u64.to_be_bytes());
    store.extend_from_slice(&[0x34; 32]);
    vec![
        ("empty".into(), Vec::new()),
        ("committed".into(), format!("5:{d1}").into_bytes()),
        ("pending".into(), format!("5:{d1};6:{d2}").into_bytes()),
        ("pending_with_store".into(), {
            let mut v = format!("5:{d1};6:{d2}").into_bytes();
            v.extend_from_slice(&store);
            v
        }),
    ]
}

fn bearer_token() -> Seeds {
    use vault_proto::token::{jwks, Issuer};
    let key = SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
    let token = Issuer::new(&key, "idp")
        .and_then(|i| i.issue(b"alice", "vault", 990, 60))
        .expect("issue");
    let mut issued = 4000u64.to_be_bytes().to_vec();
    issued.extend_from_slice(&[0, 60, 0, 10, b'A']);
    issued.extend_from_slice(b"alice");
    vec![
        ("token".into(), sel(0, token.as_bytes())),
        ("issued".into(), sel(1, &issued)),
        (
            "public_key".into(),
            sel(
                2,
                hex::encode(key.verifying_key().to_encoded_point(true).as_bytes()),
            ),
        ),
        ("signing_key".into(), sel(2, hex::encode([7u8; 32]))),
        ("jwks".into(), sel(3, jwks(&[*key.verifying_key()]))),
    ]
}

const FLEET: &str = include_str!("../../deploy/local-fleet/fleet.toml");

fn fleet_file() -> Seeds {
    let two_groups = format!(
        "{}\ngroup = 2\n\n[shard_map]\nversion = 4\nrange = [{{ first = 0, last = 99, group = 2 }}, {{ first = 100, last = 65535, group = 1 }}]\n",
        FLEET.trim_end()
    );
    vec![
        ("local_fleet.toml".into(), FLEET.as_bytes().to_vec()),
        ("two_groups.toml".into(), two_groups.into_bytes()),
        (
            "minimal.toml".into(),
            b"[fleet]\nname = \"x\"\n[[region]]\nname = \"r\"\n[[node]]\nid = 1\nregion = \"r\"\naddr = \"a:1\"\n".to_vec(),
        ),
    ]
}

fn faults_file() -> Seeds {
    let all = Faults {
        isolated_nodes: BTreeSet::from([2, 3]),
        isolated_regions: BTreeSet::from(["ap-south".to_owned()]),
        extra_delay_ms: 25,
        drop_percent: 10,
    };
    vec![
        ("all.json".into(), json(&all)),
        ("default.json".into(), json(&Faults::default())),
        ("partial.json".into(), br#"{"drop_percent": 50}"#.to_vec()),
        ("blank.json".into(), b"  \n".to_vec()),
    ]
}

fn backup_file() -> Seeds {
    let key = vault_client::backup::BackupKey(Zeroizing::new([0x55; 32]));
    let mut file = Vec::new();
    vault_client::backup::encrypt(&key, &b"golden backup\n"[..], &mut file).expect("encrypt");
    let mut arbitrary = vec![0, 7, 64, 255];
    arbitrary.extend_from_slice(&file);
    vec![
        ("file".into(), sel(0, &arbitrary)),
        ("header_only".into(), sel(0, &arbitrary[..4 + 64])),
        (
            "valid_flip".into(),
            sel(1, b"\x10\x01\x00\x00\x99\x05\x00plaintext of a few chunks"),
        ),
        (
            "valid_truncate".into(),
            sel(1, b"\x03\x02\x01\x00\x50\x00\x07more plaintext here"),
        ),
        (
            "valid_append".into(),
            sel(1, b"\x07\x03\x02\x00\x00\x01\x01x"),
        ),
        (
            "valid_empty".into(),
            sel(1, b"\x07\x04\x01\x00\x00\x01\x01"),
        ),
        (
            "hex_key".into(),
            sel(
                2,
                "5555-5555 5555 5555 5555 5555 5555 5555 5555 5555 5555 5555 5555 5555 5555 5555",
            ),
        ),
    ]
}

fn state_machine() -> Seeds {
    let (one, two) = maps();
    let mut bump = one.clone();
    bump.version = 3;
    let f = fixture();
    let sealed = f
        .stored
        .record
        .as_ref()
        .expect("registered")
        .as_bytes()
        .to_vec();
    let mut low_id = [0u8; 32];
    low_id[1] = 5;
    let put = |id: [u8; 32], expect: Option<u64>, seq: u64| Command::Put {
        id,
        expect,
        seq,
        sealed: sealed.clone(),
    };
    let handover = vec![
        put(low_id, None, 1),
        put(f.id.0, None, 2),
        Command::Freeze { map: two.clone() },
        put(low_id, Some(1), 3),
        Command::AdoptMap { map: two.clone() },
    ];
    let concurrent = vec![
        Command::Freeze { map: two.clone() },
        Command::AdoptMap { map: bump },
        Command::AdoptMap { map: two },
    ];
    vec![
        ("snapshot".into(), sel(0, snapshot_data())),
        ("commands".into(), sel(1, json(&commands()))),
        ("handover".into(), sel(1, json(&handover))),
        ("adopt_while_frozen".into(), sel(1, json(&concurrent))),
    ]
}
