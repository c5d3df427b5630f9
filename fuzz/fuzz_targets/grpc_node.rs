//! The node and operator APIs (`vault.node.v1`): prost decoding of every
//! message with a re-encoding round trip, then what the receiving side does
//! with the decoded fields:
//!
//! - `RaftRequest` as `NodeService::raft` reads it (nonce length, then the
//!   payload by kind: `vault.raft.v1` requests, or the framed snapshot
//!   chunk); the MAC
//!   check needs the token and is not run;
//! - `RaftResponse` payloads as `PeerClient::send` decodes them;
//! - `OperatorRequest`: the signature and freshness check
//!   (`vault_proto::operator::verify`, fixed operator key), then the JSON
//!   body of each call as `OperatorService` decodes it;
//! - `OperatorReply` bodies as `fleet` decodes them.
//!
//! Input: a selector byte, then the encoded message.

#![no_main]

use hsm_vault::partition::ceremony::ClonePackage;
use hsm_vault::replication::inbox::{ChunkAnswer, SnapshotChunk};
use hsm_vault::replication::network::unframe_snapshot_chunk;
use hsm_vault::replication::operator::{
    AddLearner, ChangeMembership, ExportKeys, Handover, Maps, Reshard,
};
use hsm_vault::replication::TypeConfig;
use libfuzzer_sys::fuzz_target;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, StreamAppendResult, VoteRequest, VoteResponse,
};
use p256::ecdsa::SigningKey;
use vault_fuzz::{json_round_trip as rt, prost_round_trip, select, wire_round_trip as wire};
use vault_proto::operator::{self, OperatorError, FRESHNESS_SECS};
use vault_proto::vault::node::v1 as pb;

fuzz_target!(init: vault_fuzz::seeds::init("grpc_node"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 4 {
        0 => {
            if let Some(m) = prost_round_trip::<pb::RaftRequest>(bytes) {
                raft_request(&m);
            }
        }
        1 => {
            if let Some(m) = prost_round_trip::<pb::RaftResponse>(bytes) {
                // The client knows which kind it asked for.
                wire::<Result<AppendEntriesResponse<TypeConfig>, String>>(&m.payload);
                wire::<Result<StreamAppendResult<TypeConfig>, String>>(&m.payload);
                wire::<Result<VoteResponse<TypeConfig>, String>>(&m.payload);
                wire::<Result<ChunkAnswer, String>>(&m.payload);
            }
        }
        2 => {
            if let Some(m) = prost_round_trip::<pb::OperatorRequest>(bytes) {
                operator_request(&m);
            }
        }
        _ => {
            if let Some(m) = prost_round_trip::<pb::OperatorReply>(bytes) {
                rt::<Maps>(&m.body);
                rt::<Handover>(&m.body);
                rt::<ClonePackage>(&m.body);
                rt::<String>(&m.body);
            }
        }
    }
});

/// `NodeService::raft` after its MAC check.
fn raft_request(m: &pb::RaftRequest) {
    if m.nonce.len() != 16 {
        return;
    }
    match m.kind.as_str() {
        "append_entries" => {
            wire::<AppendEntriesRequest<TypeConfig>>(&m.payload);
        }
        "vote" => {
            wire::<VoteRequest<TypeConfig>>(&m.payload);
        }
        "install_snapshot" => {
            if let Some((head, data)) = unframe_snapshot_chunk(&m.payload) {
                if let Some(mut chunk) = wire::<SnapshotChunk>(head) {
                    chunk.data = data.to_vec();
                    assert_eq!(chunk.data.len() + head.len() + 4, m.payload.len());
                }
            }
        }
        _ => {}
    }
}

fn operator_request(m: &pb::OperatorRequest) {
    let key = SigningKey::from_slice(&[5u8; 32]).expect("a valid scalar");
    let now: u64 = 1_000_000;
    let me = operator::Target { node: 1, group: 1 };
    for kind in ["ExportKeys", "AddLearner", "ChangeMembership", "Reshard"] {
        match operator::verify(key.verifying_key(), kind, me, m, now) {
            Ok(()) => {
                assert!(now.abs_diff(m.issued_at) <= FRESHNESS_SECS);
                assert_eq!((m.target_node, m.target_group), (1, 1));
                assert_eq!(m.nonce.len(), operator::NONCE_LEN);
            }
            Err(OperatorError::Stale) => assert!(now.abs_diff(m.issued_at) > FRESHNESS_SECS),
            Err(OperatorError::WrongTarget { node, group }) => assert_ne!((node, group), (1, 1)),
            Err(OperatorError::BadSignature | OperatorError::BadNonce) => {}
        }
    }
    // The bodies, as each call decodes them once the signature verified.
    if let Some(b) = rt::<ExportKeys>(&m.body) {
        let _ = hex::decode(&b.transport);
    }
    rt::<AddLearner>(&m.body);
    rt::<ChangeMembership>(&m.body);
    match rt::<Reshard>(&m.body) {
        Some(Reshard::Import(h)) => {
            let _ = h.map.validate();
            let _ = hex::decode(&h.mac);
        }
        Some(Reshard::Freeze { map } | Reshard::Export { map } | Reshard::Adopt { map }) => {
            let _ = map.validate();
        }
        Some(Reshard::Show) | None => {}
    }
}
