//! Golden values for every label and wire format this project defines. A
//! failure here means a format changed: existing records, released secrets,
//! wrapped keys or tokens would no longer interoperate.

use vault_proto::suite::{seal_with, RELEASE_AAD, RELEASE_INFO, SUITE_NAME, WRAP_AAD, WRAP_INFO};
use vault_proto::token::{issue, Claims};

#[test]
fn labels_are_pinned() {
    assert_eq!(SUITE_NAME, "OPAQUE-P256-SHA256-3DH-ARGON2ID-v1");
    assert_eq!(RELEASE_INFO, b"hsm-vault/v1/release");
    assert_eq!(RELEASE_AAD, b"hsm-vault/v1/release");
    assert_eq!(WRAP_INFO, b"hsm-vault/v1/backup-key-wrap");
    assert_eq!(WRAP_AAD, b"hsm-vault/v1/backup-key");
}

#[test]
fn release_and_wrap_encodings_are_pinned() {
    let ikm = [0x11u8; 32];
    let nonce = [0x22u8; 12];
    let release = seal_with(&ikm, RELEASE_INFO, RELEASE_AAD, nonce, b"secret");
    assert_eq!(hex(&release), GOLDEN_RELEASE);
    let wrap = seal_with(&ikm, WRAP_INFO, WRAP_AAD, nonce, &[0x33u8; 32]);
    assert_eq!(hex(&wrap), GOLDEN_WRAP);
}

#[test]
fn token_encoding_is_pinned() {
    // ECDSA with RFC 6979 nonces is deterministic, so the token is too.
    let key = p256::ecdsa::SigningKey::from_slice(&[0x44u8; 32]).expect("scalar");
    let claims = Claims {
        account_id: b"alice".to_vec(),
        expires_at: 1_700_000_000,
    };
    assert_eq!(issue(&key, &claims).expect("issue"), GOLDEN_TOKEN);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const GOLDEN_RELEASE: &str = "222222222222222222222222dd2809e22de9cffe255f799dad02bfcb9ccafab49fe9";
const GOLDEN_WRAP: &str = "2222222222222222222222226c0afd05b7fe10d63ca35fc78dd985d8a358e37f44ab80c1f13bebdef8b455a3e285aa9c691349324381001a0b57b256";
const GOLDEN_TOKEN: &str = "hvt1.AQAAAABlU_EAAAVhbGljZQ.dRtf2NVLNTCNB6iUFQj7TkPMfnARRSagBUNqSmiFBenneurZo7H6YH9hxKmvjpi3iynUciy8QxeyBmGQuMcmpw";
