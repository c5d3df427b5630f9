//! Provisioning-time key import, for tokens that cannot clone keys.
//!
//! The cloning ceremony ([`super::ceremony`]) copies the domain keys from
//! token to token without a plaintext copy ever existing outside a token. It
//! needs a key the security officer marks `CKA_TRUSTED`, and some tokens
//! cannot mark one (kryoptic 1.5: `CKA_TRUSTED` is refused even to the SO).
//! On those, the only way to give several tokens the same domain keys is
//! this path: the provisioner generates the key material in its own memory
//! ([`DomainKeyMaterial::generate`]) and creates the keys in each token with
//! `C_CreateObject` ([`Partition::import_domain_keys`]).
//!
//! **The trade-off.** While provisioning runs, the domain keys exist in
//! plaintext in the provisioner's process, outside any token: whoever
//! controls that host at that moment can keep a copy, and with it recover
//! nothing less than every record of the domain (given the stored bytes).
//! The material is zeroized on drop and never written anywhere, which limits
//! but does not remove that exposure. This path is therefore for test
//! fleets and local provisioning on tokens that cannot clone; production
//! HSMs generate the keys inside the first token and use the ceremony (or
//! the vendor's own cloning). Nothing calls it on its own: the test harness
//! and `fleet up` choose it, explicitly, only for a provider that cannot
//! clone, and say so.
//!
//! Once imported, the keys are protected as generated ones are: the same
//! labels, key types, usages and protections (`CKA_SENSITIVE`, extractable
//! only under a trusted key, `CKA_WRAP_WITH_TRUSTED`), so no plaintext
//! leaves the token afterwards. The token itself tells them apart: an
//! imported key has `CKA_LOCAL` and `CKA_ALWAYS_SENSITIVE` false (as a key
//! cloned by the ceremony, which is unwrapped rather than generated, has
//! too), and [`super::PartitionSession::key_protection`] reports it.

use std::fmt;
use std::sync::Arc;

use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand::RngCore;
use zeroize::Zeroizing;

use super::{
    create_ake_public, find_one, labels, op_err, protected_secret, Module, Partition,
    PartitionError, P256_OID_DER, SECRET_LEN,
};

/// Length in bytes of the AES-256 record-sealing key.
const SEAL_KEY_LEN: usize = 32;

/// The domain keys, in the provisioner's memory. Zeroized on drop; its
/// `Debug` prints no secret.
pub struct DomainKeyMaterial {
    oprf_seed: Zeroizing<[u8; SECRET_LEN as usize]>,
    record_id: Zeroizing<[u8; SECRET_LEN as usize]>,
    seal: Zeroizing<[u8; SEAL_KEY_LEN]>,
    /// The AKE private scalar (P-256, big-endian).
    ake_scalar: Zeroizing<[u8; 32]>,
    /// The AKE public key, SEC1 uncompressed.
    ake_public: Vec<u8>,
}

impl fmt::Debug for DomainKeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainKeyMaterial")
            .field("ake_public", &hex_prefix(&self.ake_public))
            .finish_non_exhaustive()
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl DomainKeyMaterial {
    /// Fresh domain keys from the operating system's random generator.
    pub fn generate() -> Self {
        let mut rng = rand::rngs::OsRng;
        let mut oprf_seed = Zeroizing::new([0u8; SECRET_LEN as usize]);
        let mut record_id = Zeroizing::new([0u8; SECRET_LEN as usize]);
        let mut seal = Zeroizing::new([0u8; SEAL_KEY_LEN]);
        rng.fill_bytes(&mut oprf_seed[..]);
        rng.fill_bytes(&mut record_id[..]);
        rng.fill_bytes(&mut seal[..]);
        // `SecretKey` zeroizes itself on drop.
        let ake = p256::SecretKey::random(&mut rng);
        let mut ake_scalar = Zeroizing::new([0u8; 32]);
        ake_scalar.copy_from_slice(&ake.to_bytes());
        let ake_public = ake.public_key().to_encoded_point(false).as_bytes().to_vec();
        DomainKeyMaterial {
            oprf_seed,
            record_id,
            seal,
            ake_scalar,
            ake_public,
        }
    }

    /// The AKE public key (SEC1 uncompressed): what a node opened on a token
    /// holding these keys reports.
    pub fn ake_public_key(&self) -> &[u8] {
        &self.ake_public
    }
}

impl Partition {
    /// Creates the domain keys of `material` in the token labelled `label`
    /// (an explicit provisioning step; see the module documentation for
    /// what it costs). Refuses a token that already holds any domain key,
    /// and leaves none behind if a step fails. Afterwards the token opens
    /// with [`super::KeySetup::RequireExisting`].
    pub fn import_domain_keys(
        module: &Arc<Module>,
        label: &str,
        pin: &str,
        material: &DomainKeyMaterial,
    ) -> Result<(), PartitionError> {
        let (_, session) = module.user_session(label, pin)?;
        for (key, class) in [
            (labels::OPRF_SEED, ObjectClass::SECRET_KEY),
            (labels::RECORD_ID, ObjectClass::SECRET_KEY),
            (labels::SEAL, ObjectClass::SECRET_KEY),
            (labels::AKE_PRIVATE, ObjectClass::PRIVATE_KEY),
            (labels::AKE_PUBLIC, ObjectClass::PUBLIC_KEY),
        ] {
            if find_one(&session, class, key)?.is_some() {
                return Err(PartitionError::Operation {
                    op: "import domain keys",
                    detail: format!("the token already holds {key}: it belongs to a domain"),
                });
            }
        }
        let mut created = Vec::new();
        let result = create_all(&session, material, &mut created);
        if result.is_err() {
            // Leave no half-provisioned token behind.
            for h in created {
                let _ = session.destroy_object(h);
            }
        }
        result
    }
}

fn create_all(
    s: &Session,
    m: &DomainKeyMaterial,
    created: &mut Vec<ObjectHandle>,
) -> Result<(), PartitionError> {
    // The templates are those of generation (`generic_secret`, `aes_key`,
    // `ake_key_pair`), with the value given instead of `CKA_VALUE_LEN`.
    // `Zeroizing` buffers: cryptoki copies the attribute values it is given.
    let secret = |label: &str, value: &[u8], kind: KeyType, usage: [Attribute; 2]| {
        let mut template = protected_secret(label);
        template.extend([
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(kind),
            Attribute::Value(value.to_vec()),
        ]);
        template.extend(usage);
        let h = s.create_object(&template);
        zeroize_values(&mut template);
        h
    };
    for (label, value) in [
        (labels::OPRF_SEED, &m.oprf_seed[..]),
        (labels::RECORD_ID, &m.record_id[..]),
    ] {
        let h = secret(
            label,
            value,
            KeyType::GENERIC_SECRET,
            [Attribute::Sign(true), Attribute::Verify(true)],
        )
        .map_err(op_err("import generic secret"))?;
        created.push(h);
    }
    let h = secret(
        labels::SEAL,
        &m.seal[..],
        KeyType::AES,
        [Attribute::Encrypt(true), Attribute::Decrypt(true)],
    )
    .map_err(op_err("import AES key"))?;
    created.push(h);

    let mut private = protected_secret(labels::AKE_PRIVATE);
    private.extend([
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_OID_DER.to_vec()),
        Attribute::Value(m.ake_scalar.to_vec()),
        Attribute::Derive(true),
    ]);
    let h = s.create_object(&private);
    zeroize_values(&mut private);
    created.push(h.map_err(op_err("import AKE private key"))?);

    // The public key object the node reads the AKE public key from, as
    // generation makes it (token, public). `CKA_EC_POINT` in the DER form
    // of PKCS#11 up to 3.0, which both SoftHSM and kryoptic accept.
    let h = create_ake_public(s, &m.ake_public)?;
    created.push(h);
    Ok(())
}

/// Wipes the key values left in a template once the token has them.
fn zeroize_values(template: &mut [Attribute]) {
    use zeroize::Zeroize;
    for a in template {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}
