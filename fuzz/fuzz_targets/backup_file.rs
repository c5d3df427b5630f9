//! Backup files (`vault-client/src/backup.rs`): the header and chunk reader
//! of `vault backup restore`.
//!
//! 0. arbitrary bytes as a file, read in fuzzer-chosen pieces: refused
//!    (bad header, truncated, corrupt) or, for a seed made with the key,
//!    restored; never more output than input, memory bounded by the
//!    header's chunk size (at most 1 MiB);
//! 1. a valid file for a plaintext and a chunk size from the input, written
//!    from the format's definition (and one by `encrypt`), restores to the
//!    plaintext; after one edit (flip, truncate, append) it is refused;
//! 2. the backup key's hex form, as typed by a user.
//!
//! Input: a selector byte, then the mode's bytes.

#![no_main]

use std::io::{self, Read};

use aes_gcm::aead::stream::EncryptorBE32;
use aes_gcm::aead::{KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use hkdf::Hkdf;
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use vault_client::backup::{decrypt, encrypt, BackupError, BackupKey, HEADER_LEN};
use vault_fuzz::select;
use zeroize::Zeroizing;

fn key() -> BackupKey {
    BackupKey(Zeroizing::new([0x55; 32]))
}

/// A reader that hands out the file in pieces of fuzzer-chosen sizes, and
/// is interrupted now and then (the reader must retry).
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
    interrupted: bool,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self
            .sizes
            .get(self.turn % self.sizes.len().max(1))
            .copied()
            .unwrap_or(255);
        self.turn += 1;
        // A zero is an interruption, never twice in a row.
        if size == 0 && !self.interrupted {
            self.interrupted = true;
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        self.interrupted = false;
        let n = usize::from(size.max(1)).min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(init: vault_fuzz::seeds::init("backup_file"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 3 {
        0 => arbitrary_file(bytes),
        1 => valid_file(bytes),
        _ => {
            let text = String::from_utf8_lossy(bytes);
            if let Some(k) = BackupKey::from_hex(&text) {
                let again = BackupKey::from_hex(&k.to_hex()).expect("its own hex parses");
                assert_eq!(*again.0, *k.0);
            }
        }
    }
});

fn arbitrary_file(bytes: &[u8]) {
    // A few read sizes, then the file.
    let (sizes, file) = bytes.split_at(bytes.len().min(4));
    let mut out = Vec::new();
    let reader = Pieces {
        data: file,
        sizes,
        turn: 0,
        interrupted: false,
    };
    match decrypt(&key(), reader, &mut out) {
        Ok(n) => {
            assert_eq!(n, out.len() as u64);
            assert!(out.len() + HEADER_LEN + 16 <= file.len());
        }
        Err(BackupError::BadHeader | BackupError::Truncated | BackupError::Corrupt) => {}
        Err(BackupError::Io(e)) => panic!("in-memory reads do not fail: {e}"),
    }
}

/// A backup file by the format's definition in `backup.rs`.
fn write_file(
    key: &[u8; 32],
    chunk: usize,
    salt: &[u8; 32],
    prefix: &[u8; 7],
    pt: &[u8],
) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(b"HSMVBAK1");
    header[8..12].copy_from_slice(&u32::try_from(chunk).expect("small").to_be_bytes());
    header[12..44].copy_from_slice(salt);
    header[44..51].copy_from_slice(prefix);
    let mut file_key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), key)
        .expand(b"hsm-vault/v1/backup-file", &mut file_key)
        .expect("32 bytes");
    let cipher = Aes256Gcm::new_from_slice(&file_key).expect("AES-256 key");
    let mut enc = EncryptorBE32::from_aead(cipher, prefix.into());
    let mut out = header.to_vec();
    let mut chunks: Vec<&[u8]> = pt.chunks(chunk).collect();
    let last = chunks.pop().unwrap_or(&[]);
    for c in chunks {
        let ct = enc
            .encrypt_next(Payload {
                msg: c,
                aad: &header,
            })
            .expect("encrypt");
        out.extend_from_slice(&ct);
    }
    let ct = enc
        .encrypt_last(Payload {
            msg: last,
            aad: &header,
        })
        .expect("encrypt");
    out.extend_from_slice(&ct);
    out
}

fn valid_file(bytes: &[u8]) {
    // chunk size (1), salt and nonce prefix byte (1), edit kind (1), edit
    // position (2), read sizes (2), then the plaintext.
    let Some((head, pt)) = bytes.split_at_checked(7) else {
        return;
    };
    let chunk = usize::from(head[0] % 64) + 1;
    let k = key();
    let file = write_file(&k.0, chunk, &[head[1]; 32], &[head[1] ^ 0x5a; 7], pt);
    let restore = |file: &[u8]| {
        let mut out = Vec::new();
        let r = decrypt(
            &k,
            Pieces {
                data: file,
                sizes: &head[5..7],
                turn: 0,
                interrupted: false,
            },
            &mut out,
        );
        r.map(|n| {
            assert_eq!(n, out.len() as u64);
            out
        })
    };
    assert_eq!(restore(&file).expect("a valid file restores"), pt);
    // The library's own writer (64 KiB chunks) agrees.
    let mut own = Vec::new();
    assert_eq!(encrypt(&k, pt, &mut own).expect("encrypt"), pt.len() as u64);
    assert_eq!(restore(&own).expect("its own file restores"), pt);
    // One edit: refused.
    let pos = usize::from(u16::from_be_bytes([head[3], head[4]]));
    let mut edited = file.clone();
    match head[2] % 3 {
        0 => {
            let i = pos % (edited.len() * 8);
            edited[i / 8] ^= 1 << (i % 8);
        }
        1 => edited.truncate(pos % edited.len()),
        _ => edited.push(head[1]),
    }
    assert!(
        restore(&edited).is_err(),
        "an edited backup file restored ({} bytes of {})",
        edited.len(),
        file.len()
    );
}
