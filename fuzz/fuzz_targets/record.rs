//! Sealed records (`hsm-vault/src/core/record.rs`), from disk or from a Raft
//! entry:
//!
//! 0. the plaintext layout decoder (what an unseal hands back): whatever it
//!    accepts re-encodes to a canonical layout that decodes to the same
//!    record, with the header and the fields it reads unchanged;
//! 1. the sealed framing over arbitrary stored bytes: the header's sequence
//!    number, then unseal and the index check through a software token
//!    (only the token's own seals open; everything else is `Tampered`);
//! 2. a record decoded from the input, sealed, then opened again, moved to
//!    another id, given another index entry, and bit-flipped.
//!
//! Input: a selector byte, then the mode's bytes.

#![no_main]

use hsm_vault::core::record::{
    self, RecordBody, RecordError, SealedRecord, Stored, PLAINTEXT_LEN, SEALED_LEN,
};
use hsm_vault::types::{RecordId, Seq};
use libfuzzer_sys::fuzz_target;
use vault_fuzz::{fixture, select};
use vault_proto::suite::MAX_SECRET_LEN;

fuzz_target!(init: vault_fuzz::seeds::init("record"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 3 {
        0 => plaintext(bytes),
        1 => sealed(bytes),
        _ => seal_and_open(bytes),
    }
});

fn plaintext(p: &[u8]) {
    let Some(r) = record::decode(p) else {
        return;
    };
    assert_eq!(p.len(), PLAINTEXT_LEN);
    let encoded = record::encode(&r);
    assert_eq!(encoded.len(), PLAINTEXT_LEN);
    assert_eq!(record::decode(&encoded).as_ref(), Some(&r));
    // Format, kind, limit, used and generation are kept as read.
    assert_eq!(encoded[..20], p[..20]);
    if let RecordBody::Registered {
        password_file,
        secret,
    } = &r.body
    {
        assert!(!secret.is_empty() && secret.len() <= MAX_SECRET_LEN);
        assert_eq!(&p[21..21 + secret.len()], &secret[..]);
        assert_eq!(&p[21 + MAX_SECRET_LEN..], &password_file[..]);
        // Canonical form: the bytes past the secret are zeros.
        let mut canonical = p.to_vec();
        canonical[21 + secret.len()..21 + MAX_SECRET_LEN].fill(0);
        assert_eq!(&encoded[..], &canonical[..]);
    } else {
        // Locked and phantom records carry nothing past the header.
        assert!(encoded[20..].iter().all(|b| *b == 0));
    }
}

fn sealed(bytes: &[u8]) {
    let f = fixture();
    let sealed = SealedRecord::from_stored(bytes.to_vec());
    assert_eq!(sealed.as_bytes(), bytes);
    let seq = sealed.seq();
    match bytes.get(..8) {
        Some(h) => assert_eq!(
            seq,
            Some(Seq(u64::from_be_bytes(h.try_into().expect("8 bytes"))))
        ),
        None => assert_eq!(seq, None),
    }
    match record::unseal(&f.token, &f.id, &sealed) {
        Ok((s, _)) => {
            // Only a seal of the token's own (from the seed corpus) opens.
            assert_eq!(bytes.len(), SEALED_LEN);
            assert_eq!(Some(s), seq);
        }
        Err(RecordError::Tampered) => {}
        Err(e) => panic!("unseal: {e}"),
    }
    // The index check, with the index entry the header claims and another.
    for index in [seq, seq.map(|Seq(s)| Seq(s.wrapping_add(1))), None] {
        let stored = Stored {
            record: Some(sealed.clone()),
            index,
        };
        match record::current(&f.token, &f.id, &stored) {
            Ok(Some(_)) => assert_eq!(index, seq),
            Ok(None) => panic!("a stored record read as absent"),
            Err(RecordError::Tampered | RecordError::Stale) => {}
            Err(e) => panic!("current: {e}"),
        }
    }
}

fn seal_and_open(bytes: &[u8]) {
    let f = fixture();
    // Seq, flip position, then a plaintext layout (padded to size).
    let Some((head, rest)) = bytes.split_at_checked(10) else {
        return;
    };
    let seq = Seq(u64::from_be_bytes(head[..8].try_into().expect("8 bytes")));
    let flip = usize::from(u16::from_be_bytes([head[8], head[9]]));
    let mut p = rest.to_vec();
    p.resize(PLAINTEXT_LEN, 0);
    let Some(r) = record::decode(&p) else {
        return;
    };
    let sealed = record::seal(&f.token, &f.id, seq, &r, [9; 12]).expect("seal");
    assert_eq!(sealed.as_bytes().len(), SEALED_LEN);
    assert_eq!(sealed.seq(), Some(seq));
    let (s, back) = record::unseal(&f.token, &f.id, &sealed).expect("its own seal opens");
    assert_eq!((s, &back), (seq, &r));
    let stored = Stored {
        record: Some(sealed.clone()),
        index: Some(seq),
    };
    assert_eq!(
        record::current(&f.token, &f.id, &stored).expect("current"),
        Some(r)
    );
    // Moved to another id.
    let other = RecordId([0xee; 32]);
    assert!(matches!(
        record::unseal(&f.token, &other, &sealed),
        Err(RecordError::Tampered)
    ));
    // Named by another index entry: stale.
    let stale = Stored {
        record: Some(sealed.clone()),
        index: Some(Seq(seq.0.wrapping_add(1))),
    };
    assert!(matches!(
        record::current(&f.token, &f.id, &stale),
        Err(RecordError::Stale)
    ));
    // Any flipped bit: tampered.
    let mut b = sealed.as_bytes().to_vec();
    let i = flip % (b.len() * 8);
    b[i / 8] ^= 1 << (i % 8);
    assert!(matches!(
        record::unseal(&f.token, &f.id, &SealedRecord::from_stored(b)),
        Err(RecordError::Tampered)
    ));
}
