//! Golden values for every label and wire format this project defines. A
//! failure here means a format changed: existing records, released secrets,
//! wrapped keys or tokens would no longer interoperate.

use vault_proto::suite::{seal_with, RELEASE_AAD, RELEASE_INFO, SUITE_NAME, WRAP_AAD, WRAP_INFO};
use vault_proto::token::{jwks, key_id, Issuer, Verifier};

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
    // ES256 signatures are randomized: the header and the claims are pinned,
    // and a token this code made once still verifies.
    let key = p256::ecdsa::SigningKey::from_slice(&[0x44u8; 32]).expect("scalar");
    assert_eq!(key_id(key.verifying_key()), GOLDEN_KID);
    assert_eq!(jwks(&[*key.verifying_key()]), GOLDEN_JWKS);
    let token = Issuer::new(&key, "idp")
        .expect("issuer")
        .issue(b"alice", "vault", 1_700_000_000, 300)
        .expect("issue");
    let signed_part = token.rsplit_once('.').expect("three parts").0;
    assert_eq!(signed_part, GOLDEN_SIGNED_PART);
    let v = Verifier::from_jwks(GOLDEN_JWKS, "vault", "idp", 3600).expect("jwks");
    v.verify(&token, b"alice", 1_700_000_100).expect("verifies");
    v.verify(GOLDEN_TOKEN, b"alice", 1_700_000_100)
        .expect("a token made by this code before still verifies");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const GOLDEN_RELEASE: &str = "222222222222222222222222dd2809e22de9cffe255f799dad02bfcb9ccafab49fe9";
const GOLDEN_WRAP: &str = "2222222222222222222222226c0afd05b7fe10d63ca35fc78dd985d8a358e37f44ab80c1f13bebdef8b455a3e285aa9c691349324381001a0b57b256";
const GOLDEN_KID: &str = "634ffad2253d580a";
const GOLDEN_JWKS: &str = r#"{"keys":[{"alg":"ES256","crv":"P-256","kid":"634ffad2253d580a","kty":"EC","use":"sig","x":"WzaJDay9fJqWu3Sh7iiz0tdbcuCaIO8lz45v2KnwNQ0","y":"DhS-2NRoKjTYNTi9_1uW6JpmZuwNtXRdAvoSEAct91o"}]}"#;
const GOLDEN_SIGNED_PART: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6IjYzNGZmYWQyMjUzZDU4MGEifQ.eyJzdWIiOiJhbGljZSIsImF1ZCI6InZhdWx0IiwiaXNzIjoiaWRwIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjE3MDAwMDAzMDB9";
const GOLDEN_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiIsImtpZCI6IjYzNGZmYWQyMjUzZDU4MGEifQ.eyJzdWIiOiJhbGljZSIsImF1ZCI6InZhdWx0IiwiaXNzIjoiaWRwIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjE3MDAwMDAzMDB9.aqJZh9hxS6nAwIBcKH2qBulPCMIYVLQewk08Vqh65bmsZ3Z96fd4_3JlUzpvOHz24MCR2Adoy0ugTsLLDzqW2w";
