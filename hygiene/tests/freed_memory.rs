//! The client leaves no copy of a backup key's digits or of a bearer token
//! in memory it frees (item 6 of the doors issue): each secret is checked
//! for in every block freed while the code under test runs.

use vault_client::BackupKey;
use vault_client_hygiene::Watch;
use zeroize::Zeroizing;

#[global_allocator]
static WATCH: Watch = Watch::new();

/// A key whose digits are easy to find and appear nowhere else.
fn key() -> BackupKey {
    let mut k = Zeroizing::new([0u8; 32]);
    for (i, b) in k.iter_mut().enumerate() {
        *b = 0xa0 + u8::try_from(i % 16).unwrap_or(0);
    }
    BackupKey(k)
}

#[test]
fn parsing_a_written_down_key_leaves_no_copy_of_its_digits() {
    let key = key();
    let written = key.to_grouped_hex();
    assert_eq!(written.len(), 67);
    // The first group of digits, as it sits in both the input and any copy.
    let needle = Zeroizing::new(written.as_bytes()[..16].to_vec());
    WATCH.arm(&needle);
    let parsed = BackupKey::from_hex(&written).expect("parses");
    assert_eq!(*parsed.0, *key.0);
    drop(parsed);
    let hits = WATCH.disarm();
    assert_eq!(hits, 0, "freed blocks still held the key's digits");
}

#[test]
fn writing_a_key_down_leaves_no_copy_of_its_digits() {
    let key = key();
    let needle = Zeroizing::new(key.to_hex().as_bytes()[..16].to_vec());
    WATCH.arm(&needle);
    let written = key.to_grouped_hex();
    assert!(written.starts_with(std::str::from_utf8(&needle).unwrap_or("")));
    drop(written);
    let hits = WATCH.disarm();
    assert_eq!(hits, 0, "freed blocks still held the key's digits");
}
