//! Shared pieces of the fuzz targets:
//!
//! - [`SoftToken`]: the secure core's [`Token`] trait over RustCrypto with
//!   fixed keys, so the core's parsing and policy code (OPAQUE messages,
//!   sealed records) runs without a PKCS#11 token. It computes what SoftHSM
//!   computes (HMAC-SHA256, the ECDH x-coordinate, AES-256-GCM).
//! - [`fixture`]: a core with one registered record, and logins against it.
//! - Round-trip helpers for prost, the replication's binary encoding and
//!   serde_json.
//!
//! Every helper asserts: a panic here is a finding.

pub mod seeds;

use std::sync::OnceLock;
use std::time::Instant;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use hsm_vault::core::record::Stored;
use hsm_vault::core::{Charge, Client, SecureCore, Token};
use hsm_vault::partition::{MacKey, PartitionError};
use hsm_vault::types::{LoginId, RecordId, Seq};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use p256::elliptic_curve::point::AffineCoordinates;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;
use vault_proto::suite::{benchmark_ksf, Suite};
use zeroize::Zeroizing;

/// The service's bound on an OPAQUE message field (`MAX_OPAQUE_MESSAGE`,
/// private to `hsm-vault/src/service.rs`).
pub const MAX_OPAQUE_MESSAGE: usize = 1024;
/// The wire login id: group (u64 BE) || core login id (`WIRE_LOGIN_LEN`).
pub const WIRE_LOGIN_LEN: usize = hsm_vault::service::WIRE_LOGIN_LEN;

/// A software token with fixed keys.
#[derive(Clone)]
pub struct SoftToken {
    oprf_seed: [u8; 32],
    record_key: [u8; 32],
    ake: p256::SecretKey,
    seal: Aes256Gcm,
}

impl std::fmt::Debug for SoftToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftToken")
    }
}

impl Default for SoftToken {
    fn default() -> Self {
        SoftToken {
            oprf_seed: [0x11; 32],
            record_key: [0x22; 32],
            ake: p256::SecretKey::from_slice(&[0x33; 32]).expect("a valid P-256 scalar"),
            seal: Aes256Gcm::new_from_slice(&[0x44; 32]).expect("an AES-256 key"),
        }
    }
}

impl SoftToken {
    /// The AKE public key, SEC1 compressed (what the partition reads from
    /// the token's public key object).
    pub fn ake_public(&self) -> Vec<u8> {
        self.ake
            .public_key()
            .to_encoded_point(true)
            .as_bytes()
            .to_vec()
    }
}

impl Token for SoftToken {
    fn hmac(&self, key: MacKey, data: &[u8]) -> Result<[u8; 32], PartitionError> {
        let key = match key {
            MacKey::OprfSeed => &self.oprf_seed,
            MacKey::RecordId => &self.record_key,
        };
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
        mac.update(data);
        Ok(mac.finalize().into_bytes().into())
    }

    fn ecdh_x(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
        let peer =
            p256::PublicKey::from_sec1_bytes(peer).map_err(|_| PartitionError::Operation {
                op: "ECDH derive",
                detail: "peer key is not a P-256 point".into(),
            })?;
        let shared = (peer.to_projective() * *self.ake.to_nonzero_scalar()).to_affine();
        Ok(Zeroizing::new(shared.x().to_vec()))
    }

    fn seal(&self, iv: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, PartitionError> {
        self.seal
            .encrypt(
                Nonce::from_slice(iv),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| PartitionError::Operation {
                op: "seal",
                detail: "AES-GCM".into(),
            })
    }

    fn unseal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, PartitionError> {
        self.seal
            .decrypt(Nonce::from_slice(iv), Payload { msg: sealed, aad })
            .map(Zeroizing::new)
            .map_err(|_| PartitionError::Integrity)
    }
}

/// A replica's token in software: the [`SoftToken`]'s keys and an
/// in-memory map for the state a token keeps (shared by clones).
#[derive(Clone, Debug, Default)]
pub struct SoftKeeper {
    state: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>,
}

impl hsm_vault::replication::ReplicaToken for SoftKeeper {
    type Session = SoftToken;
    fn session(&self) -> Result<SoftToken, PartitionError> {
        Ok(SoftToken::default())
    }
    fn app_state(&self, app: &str) -> Result<Vec<u8>, PartitionError> {
        let state = self.state.lock().map_err(|_| PartitionError::Operation {
            op: "state",
            detail: "poisoned".into(),
        })?;
        Ok(state.get(app).cloned().unwrap_or_default())
    }
    fn set_app_state(&self, app: &str, bytes: &[u8]) -> Result<(), PartitionError> {
        let mut state = self.state.lock().map_err(|_| PartitionError::Operation {
            op: "state",
            detail: "poisoned".into(),
        })?;
        state.insert(app.to_owned(), bytes.to_vec());
        Ok(())
    }
}

/// The registered account's password and stored secret.
pub const PASSWORD: &[u8] = b"correct horse battery staple";
pub const SECRET: &[u8] = b"a backup key wrapped under the export key";
pub const ACCOUNT: &[u8] = b"alice@example.org";

/// A secure core over a [`SoftToken`] with one registered record.
pub struct Fixture {
    pub token: SoftToken,
    pub core: SecureCore,
    /// The record id of [`ACCOUNT`].
    pub id: RecordId,
    /// Its registered record, sealed at sequence number 1.
    pub stored: Stored,
    pub ksf: argon2::Argon2<'static>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fixture")
    }
}

/// A login started against the fixture's record: the core holds it pending.
pub struct Login {
    pub login_id: LoginId,
    pub client: ClientLogin<Suite>,
    pub ke1: Vec<u8>,
    pub ke2: Vec<u8>,
    /// The record carrying this login's charge (sequence number 2).
    pub stored: Stored,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Login")
    }
}

/// The shared fixture, made once per process.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

impl Fixture {
    fn new() -> Self {
        let token = SoftToken::default();
        let core = SecureCore::new(&token.ake_public()).expect("core");
        let ksf = benchmark_ksf();
        let id = core.record_id(&token, ACCOUNT).expect("record id");
        let mut rng = StdRng::seed_from_u64(1);
        let start = ClientRegistration::<Suite>::start(&mut rng, PASSWORD).expect("start");
        let (response, generation) = core
            .registration_start(&token, &id, &start.message.serialize())
            .expect("registration start");
        let finish = start
            .state
            .finish(
                &mut rng,
                PASSWORD,
                RegistrationResponse::deserialize(&response).expect("response"),
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
            )
            .expect("client finish");
        let (sealed, _) = core
            .registration_finish(
                &token,
                &id,
                &generation,
                &finish.message.serialize(),
                SECRET,
                0,
                Seq(1),
            )
            .expect("registration finish");
        Fixture {
            token,
            core,
            id,
            stored: Stored {
                record: Some(sealed),
                index: Some(Seq(1)),
            },
            ksf,
        }
    }

    /// Starts a login with the right password: charges a guess on the
    /// registered record and evaluates. The caller must finish it (the core
    /// keeps at most 10,000 pending logins).
    pub fn start_login(&self, seed: u64) -> Login {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = ClientLogin::<Suite>::start(&mut rng, PASSWORD).expect("login start");
        let ke1 = start.message.serialize();
        let now = Instant::now();
        let Charge::Charged { write, ticket } = self
            .core
            .charge_guess(
                &self.token,
                (&self.id, Client::default()),
                &self.stored,
                &ke1,
                Seq(2),
                now,
            )
            .expect("charge")
        else {
            panic!("a fresh record is charged");
        };
        let challenge = self
            .core
            .evaluate(&self.token, ticket, &write, now)
            .expect("evaluate");
        assert_eq!(challenge.guesses_remaining, 9);
        Login {
            login_id: challenge.login_id,
            client: start.state,
            ke1: ke1.to_vec(),
            ke2: challenge.ke2,
            stored: Stored {
                record: Some(write),
                index: Some(Seq(2)),
            },
        }
    }

    /// The client's KE3 and session key for `login`.
    pub fn client_finish(&self, login: &Login, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let finished = login
            .client
            .clone()
            .finish(
                &mut rng,
                PASSWORD,
                CredentialResponse::deserialize(&login.ke2).expect("KE2"),
                ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&self.ksf)),
            )
            .expect("the right password finishes");
        (
            finished.message.serialize().to_vec(),
            finished.session_key.to_vec(),
        )
    }
}

/// Decodes `bytes` as `M`; if that works, checks that encoding and decoding
/// again gives the same message and the same bytes.
pub fn prost_round_trip<M: prost::Message + Default + PartialEq>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let encoded = m.encode_to_vec();
    assert_eq!(encoded.len(), m.encoded_len(), "encoded_len disagrees");
    let again = M::decode(&encoded[..]).expect("a re-encoded message decodes");
    assert!(again == m, "prost round trip changed the message");
    assert_eq!(
        again.encode_to_vec(),
        encoded,
        "prost encoding is not stable"
    );
    Some(m)
}

/// Decodes `bytes` as `T` in the replication's binary encoding
/// (`hsm_vault::replication::codec`); if that works, checks that the value
/// encodes, decodes again to the same value's encoding, and that encoding
/// is stable.
pub fn wire_round_trip<T: hsm_vault::replication::codec::Wire>(bytes: &[u8]) -> Option<T> {
    use hsm_vault::replication::codec::{decode, encode};
    let v: T = decode(bytes).ok()?;
    let once = encode(&v);
    let again: T =
        decode(&once).unwrap_or_else(|e| panic!("a re-encoded value does not decode: {e}"));
    assert_eq!(
        encode(&again),
        once,
        "the binary round trip changed the value"
    );
    Some(v)
}

/// Decodes `bytes` as JSON `T`; if that works, checks that the value
/// encodes, decodes again, and encodes to the same bytes.
pub fn json_round_trip<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(bytes).ok()?;
    let once = serde_json::to_vec(&v).expect("a decoded value encodes");
    let again: T = serde_json::from_slice(&once).unwrap_or_else(|e| {
        panic!(
            "a re-encoded value does not decode: {e}: {}",
            String::from_utf8_lossy(&once)
        )
    });
    let twice = serde_json::to_vec(&again).expect("encodes");
    assert_eq!(
        String::from_utf8_lossy(&once),
        String::from_utf8_lossy(&twice),
        "JSON round trip changed the value"
    );
    Some(v)
}

/// Splits off a selector byte.
pub fn select(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(s, rest)| (*s, rest))
}
