//! Snapshots (`hsm-vault/src/replication/`):
//!
//! 0. the binary snapshot data decoder (`HVS3`: magic, token MAC, header
//!    length, protobuf header, then id/seq/length/sealed records), from a peer or from the
//!    state machine's tree: whatever parses is re-encoded by the format's
//!    definition and must parse to the same header and records, and the
//!    record bytes must be exactly the input's;
//! 1. the snapshot chunk framing of `install_snapshot` messages (protobuf head,
//!    length-prefixed, then the data): unframe, then frame again gives the
//!    input back, and the head decodes as the node decodes it.
//!
//! Input: a selector byte, then the bytes.

#![no_main]

use hsm_vault::replication::codec;
use hsm_vault::replication::inbox::SnapshotChunk;
use hsm_vault::replication::network::{frame_snapshot_chunk, unframe_snapshot_chunk};
use hsm_vault::replication::state_machine::{parse_snapshot, SnapshotRecord, SNAPSHOT_MAGIC};
use libfuzzer_sys::fuzz_target;
use vault_fuzz::select;

fuzz_target!(init: vault_fuzz::seeds::init("snapshot"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 2 {
        0 => snapshot_data(bytes),
        _ => chunk(bytes),
    }
});

fn encode(mac: &[u8; 32], header: &[u8], records: &[SnapshotRecord<'_>]) -> Vec<u8> {
    let mut out = SNAPSHOT_MAGIC.to_vec();
    out.extend_from_slice(mac);
    out.extend_from_slice(&u32::try_from(header.len()).expect("small").to_be_bytes());
    out.extend_from_slice(header);
    for (id, seq, sealed) in records {
        out.extend_from_slice(id);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(
            &u16::try_from(sealed.len())
                .expect("u16 length")
                .to_be_bytes(),
        );
        out.extend_from_slice(sealed);
    }
    out
}

fn snapshot_data(bytes: &[u8]) {
    let Ok(parsed) = parse_snapshot(bytes) else {
        return;
    };
    let records = &parsed.records;
    // Every record takes at least its 42-byte head: no amplification.
    assert!(records.len() * 42 <= bytes.len());
    // The records are encoded canonically: re-encoding them after the
    // MAC and header as read gives the input back.
    assert_eq!(encode(&parsed.mac, parsed.header_bytes, records), bytes);
    // The header as this node would write it.
    let header = codec::encode(&parsed.header);
    let again = encode(&parsed.mac, &header, records);
    let again = parse_snapshot(&again).expect("a re-encoded snapshot parses");
    assert_eq!(&again.records, records);
    assert_eq!(again.header, parsed.header);
    assert_eq!(codec::encode(&again.header), header);
}

fn chunk(bytes: &[u8]) {
    let Some((head, data)) = unframe_snapshot_chunk(bytes) else {
        assert!(
            bytes.len() < 4 || {
                let n = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
                n > bytes.len() - 4
            }
        );
        return;
    };
    assert_eq!(frame_snapshot_chunk(head, data), bytes);
    if let Ok(mut chunk) = codec::decode::<SnapshotChunk>(head) {
        chunk.data = data.to_vec();
        // A chunk at offset 0 of a whole snapshot is snapshot data.
        if chunk.offset == 0 && chunk.done {
            let _ = parse_snapshot(&chunk.data);
        }
    }
}
