//! The backup file format: streaming, chunked AES-256-GCM.
//!
//! ```text
//! file   = header || chunk* || last_chunk
//! header = "HSMVBAK1" || chunk_size:u32be || salt:[32] || nonce_prefix:[7]
//!          || zeros:[13]                                      (64 bytes)
//! chunk  = AES-256-GCM(file_key, nonce, aad = header, plaintext[chunk_size])
//! nonce  = nonce_prefix || counter:u32be || last:u8          (STREAM, BE32)
//! file_key = HKDF-SHA256(salt, backup_key, "hsm-vault/v1/backup-file")
//! ```
//!
//! Each chunk is bound to its position (the counter) and to the end of the
//! stream (the last flag, set only on the final chunk, which may be short or
//! empty), and every chunk authenticates the header. Reordered, dropped,
//! truncated or altered data fails to decrypt. Memory is bounded by one
//! chunk whatever the file size.

use std::io::{self, Read, Write};

use aes_gcm::aead::stream::{DecryptorBE32, EncryptorBE32};
use aes_gcm::aead::{KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"HSMVBAK1";
pub const HEADER_LEN: usize = 64;
/// Plaintext bytes per chunk: 64 KiB keeps memory small and the 16-byte tag
/// overhead under 0.03%.
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Largest chunk size a reader accepts from a header (bounds its memory).
const MAX_CHUNK_SIZE: usize = 1024 * 1024;
const TAG_LEN: usize = 16;
const FILE_KEY_INFO: &[u8] = b"hsm-vault/v1/backup-file";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a vault backup file (bad header)")]
    BadHeader,
    #[error("backup file is truncated")]
    Truncated,
    #[error("backup file failed authentication: it was altered, truncated, or the key is wrong")]
    Corrupt,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The 256-bit key a backup is encrypted with.
#[derive(Clone)]
pub struct BackupKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

impl BackupKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(k.as_mut());
        BackupKey(k)
    }

    /// The key as 64 lowercase hex digits, for the user to write down.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }

    /// Parses 64 hex digits; spaces and dashes between groups are allowed.
    /// No copy of the digits is left behind: they go into one buffer,
    /// allocated once (a growing one would free copies without wiping
    /// them) and wiped when dropped.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut digits = Zeroizing::new(String::with_capacity(text.len()));
        for c in text.chars().filter(|c| !c.is_whitespace() && *c != '-') {
            if digits.len() == 64 {
                return None;
            }
            digits.push(c);
        }
        if digits.len() != 64 {
            return None;
        }
        let mut k = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(digits.as_bytes(), k.as_mut()).ok()?;
        Some(BackupKey(k))
    }

    /// The key as 64 hex digits in four groups of 16, for the user to write
    /// down; built in one buffer that is wiped when dropped.
    pub fn to_grouped_hex(&self) -> Zeroizing<String> {
        let hex = self.to_hex();
        let mut out = Zeroizing::new(String::with_capacity(hex.len() + 3));
        for (i, c) in hex.chars().enumerate() {
            if i > 0 && i % 16 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        out
    }

    fn file_cipher(&self, salt: &[u8]) -> Aes256Gcm {
        let mut okm = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(salt), self.0.as_ref())
            .expand(FILE_KEY_INFO, okm.as_mut())
            .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
        Aes256Gcm::new_from_slice(okm.as_ref())
            .unwrap_or_else(|_| unreachable!("32 bytes is an AES-256 key"))
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Encrypts `input` into `output`; returns the plaintext length.
pub fn encrypt(
    key: &BackupKey,
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, BackupError> {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&(CHUNK_SIZE as u32).to_be_bytes());
    OsRng.fill_bytes(&mut header[12..51]);
    output.write_all(&header)?;
    let cipher = key.file_cipher(&header[12..44]);
    let mut enc = EncryptorBE32::from_aead(cipher, header[44..51].into());
    let mut buf = Zeroizing::new(vec![0u8; CHUNK_SIZE]);
    let mut next = Zeroizing::new(vec![0u8; CHUNK_SIZE]);
    let mut len = fill(&mut input, &mut buf)?;
    let mut total = 0u64;
    loop {
        total += len as u64;
        // Look ahead so the final chunk, even a full one, carries the flag.
        let ahead = if len == CHUNK_SIZE {
            fill(&mut input, &mut next)?
        } else {
            0
        };
        let payload = Payload {
            msg: &buf[..len],
            aad: &header,
        };
        if ahead == 0 {
            let ct = enc
                .encrypt_last(payload)
                .map_err(|_| BackupError::Corrupt)?;
            output.write_all(&ct)?;
            break;
        }
        let ct = enc
            .encrypt_next(payload)
            .map_err(|_| BackupError::Corrupt)?;
        output.write_all(&ct)?;
        std::mem::swap(&mut buf, &mut next);
        len = ahead;
    }
    output.flush()?;
    Ok(total)
}

/// Decrypts `input` into `output`. On error, what was written so far must be
/// discarded by the caller (the CLI writes to a temporary file and renames
/// it only on success).
pub fn decrypt(
    key: &BackupKey,
    mut input: impl Read,
    mut output: impl Write,
) -> Result<u64, BackupError> {
    let mut header = [0u8; HEADER_LEN];
    if fill(&mut input, &mut header)? != HEADER_LEN || &header[..8] != MAGIC {
        return Err(BackupError::BadHeader);
    }
    let chunk_size = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE || header[51..].iter().any(|b| *b != 0) {
        return Err(BackupError::BadHeader);
    }
    let cipher = key.file_cipher(&header[12..44]);
    let mut dec = DecryptorBE32::from_aead(cipher, header[44..51].into());
    let block = chunk_size + TAG_LEN;
    let mut buf = vec![0u8; block];
    let mut next = vec![0u8; block];
    let mut len = fill(&mut input, &mut buf)?;
    if len < TAG_LEN {
        return Err(BackupError::Truncated);
    }
    let mut total = 0u64;
    loop {
        let ahead = if len == block {
            fill(&mut input, &mut next)?
        } else {
            0
        };
        let payload = Payload {
            msg: &buf[..len],
            aad: &header,
        };
        if ahead == 0 {
            let pt = Zeroizing::new(
                dec.decrypt_last(payload)
                    .map_err(|_| BackupError::Corrupt)?,
            );
            output.write_all(&pt)?;
            total += pt.len() as u64;
            break;
        }
        let pt = Zeroizing::new(
            dec.decrypt_next(payload)
                .map_err(|_| BackupError::Corrupt)?,
        );
        output.write_all(&pt)?;
        total += pt.len() as u64;
        std::mem::swap(&mut buf, &mut next);
        len = ahead;
    }
    output.flush()?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(len: usize) {
        let key = BackupKey::generate();
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut file = Vec::new();
        assert_eq!(
            encrypt(&key, &data[..], &mut file).expect("encrypt"),
            len as u64
        );
        let mut out = Vec::new();
        decrypt(&key, &file[..], &mut out).expect("decrypt");
        assert_eq!(out, data);
    }

    #[test]
    fn round_trips_at_chunk_edges() {
        for len in [
            0,
            1,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE,
        ] {
            round_trip(len);
        }
    }

    #[test]
    fn truncation_at_a_chunk_boundary_is_refused() {
        let key = BackupKey::generate();
        let data = vec![7u8; 3 * CHUNK_SIZE + 10];
        let mut file = Vec::new();
        encrypt(&key, &data[..], &mut file).expect("encrypt");
        let cut = HEADER_LEN + 2 * (CHUNK_SIZE + TAG_LEN);
        let err = decrypt(&key, &file[..cut], io::sink()).expect_err("truncated");
        assert!(matches!(err, BackupError::Corrupt), "{err}");
        let err = decrypt(&key, &file[..HEADER_LEN], io::sink()).expect_err("header only");
        assert!(matches!(err, BackupError::Truncated), "{err}");
    }

    #[test]
    fn reordered_chunks_and_flipped_bits_are_refused() {
        let key = BackupKey::generate();
        let data = vec![1u8; 2 * CHUNK_SIZE + 5];
        let mut file = Vec::new();
        encrypt(&key, &data[..], &mut file).expect("encrypt");
        let b = CHUNK_SIZE + TAG_LEN;
        let mut swapped = file.clone();
        let (first, second) = (
            HEADER_LEN..HEADER_LEN + b,
            HEADER_LEN + b..HEADER_LEN + 2 * b,
        );
        let tmp = swapped[first.clone()].to_vec();
        swapped.copy_within(second, HEADER_LEN);
        swapped[HEADER_LEN + b..HEADER_LEN + 2 * b].copy_from_slice(&tmp);
        assert!(decrypt(&key, &swapped[..], io::sink()).is_err());
        for i in [20, HEADER_LEN + 3, file.len() - 1] {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert!(decrypt(&key, &bad[..], io::sink()).is_err(), "flip at {i}");
        }
        let other = BackupKey::generate();
        assert!(matches!(
            decrypt(&other, &file[..], io::sink()),
            Err(BackupError::Corrupt)
        ));
    }

    #[test]
    fn hex_keys_parse_with_separators_and_refuse_bad_input() {
        let key = BackupKey::generate();
        let hex = key.to_hex();
        let grouped: String = hex
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect::<Vec<_>>()
            .join("-");
        assert_eq!(BackupKey::from_hex(&grouped).expect("parse").0, key.0);
        assert!(BackupKey::from_hex(&hex[..63]).is_none());
        assert!(BackupKey::from_hex(&"zz".repeat(32)).is_none());
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// A backup made by this format's first version, with key 0x55.. and
    /// plaintext "golden backup\n". If this stops decrypting, old backups
    /// would stop restoring.
    const GOLDEN: &str = "48534d5642414b3100010000e1ebb2048f230007c44d3452e170b01d025c97c3d9e940a0398ca05284ecea34d91788761ae5a200000000000000000000000000ff3ac145f4f59fd42986377b46460e449b29175f72286d3aba4c5c57b08b";

    #[test]
    fn golden_backup_still_decrypts() {
        let key = BackupKey(Zeroizing::new([0x55; 32]));
        let mut out = Vec::new();
        let file = hex::decode(GOLDEN).expect("hex");
        decrypt(&key, &file[..], &mut out).expect("golden file decrypts");
        assert_eq!(out, b"golden backup\n");
    }
}
