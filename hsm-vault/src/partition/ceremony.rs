//! The key-cloning ceremony: copying the domain keys from a member's token
//! into a new node's token without a plaintext copy ever existing outside a
//! token, the way HSM vendors clone keys inside a security world.
//!
//! ```text
//! target (new token)                         source (member's token)
//! Enrollment::begin: ephemeral P-256 pair
//!   (session objects)  ── transport public key ──▶
//!                                             SO login: ephemeral pair (public session
//!                                             objects), ECDH → AES-256 wrapping key with
//!                                             CKA_TRUSTED (only the SO may set it);
//!                                             user login: C_WrapKey each domain key
//!                                             (CKM_AES_KEY_WRAP_PAD); destroy the session keys
//!                      ◀── ClonePackage ────  (source transport public key, wrapped keys,
//!                                              AKE public key)
//! Enrollment::complete: ECDH → the same AES key (unwrap only),
//!   C_UnwrapKey each key as a sensitive token object with the same label
//!   and protections (CKA_WRAP_WITH_TRUSTED), create the AKE public key.
//! ```
//!
//! The domain keys are `CKA_WRAP_WITH_TRUSTED`, so they leave the source only
//! under a key the security officer marked trusted. SoftHSM lets the SO use
//! public objects only, so the source's transport pair is made public; and a
//! logout invalidates handles to private objects, so the source re-finds its
//! domain keys by label afterwards. While the source's user is logged out
//! (a few milliseconds), its other token operations fail: drain the source
//! node first.
//!
//! Not done here: authenticating the two transport public keys to each
//! other. Whoever relays them (the fleet manager) must, or a host in the
//! middle could substitute its own key; on real HSMs the vendor's cloning
//! certificates play that part.

use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use super::{
    create_ake_public, find_one, labels, load_domain_keys, op_err, protected_secret, read_ec_point,
    Module, Partition, PartitionError, P256_OID_DER,
};

/// What kind of key a wrapped blob holds (it decides the unwrap template).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyKind {
    GenericSecret,
    Aes,
    EcPrivate,
}

/// One domain key, wrapped under the ceremony's transport key.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    pub label: String,
    pub kind: KeyKind,
    pub wrapped: Vec<u8>,
}

/// What the source hands the target. Nothing in it is secret to anyone
/// without the target token's ephemeral private key.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ClonePackage {
    /// The source's ephemeral transport public key (SEC1).
    pub source_transport: Vec<u8>,
    pub keys: Vec<WrappedKey>,
    /// The AKE public key (SEC1), recreated as a public object on the target.
    pub ake_public: Vec<u8>,
}

/// The domain keys a ceremony copies.
const CLONED: [(&str, KeyKind); 4] = [
    (labels::OPRF_SEED, KeyKind::GenericSecret),
    (labels::RECORD_ID, KeyKind::GenericSecret),
    (labels::SEAL, KeyKind::Aes),
    (labels::AKE_PRIVATE, KeyKind::EcPrivate),
];

fn der_octets(point: &[u8]) -> Result<Vec<u8>, PartitionError> {
    let len =
        u8::try_from(point.len())
            .ok()
            .filter(|l| *l < 0x80)
            .ok_or(PartitionError::Operation {
                op: "ceremony",
                detail: "transport public key has the wrong length".into(),
            })?;
    let mut der = vec![0x04, len];
    der.extend_from_slice(point);
    Ok(der)
}

/// Makes an ephemeral P-256 pair as session objects; `public_objects` makes
/// both readable by the SO (who cannot use private objects).
fn ephemeral_pair(
    session: &Session,
    public_objects: bool,
) -> Result<(ObjectHandle, ObjectHandle, Vec<u8>), PartitionError> {
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::Private(false),
                Attribute::EcParams(P256_OID_DER.to_vec()),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(!public_objects),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(true),
            ],
        )
        .map_err(op_err("generate transport key pair"))?;
    let point = read_ec_point(session, public)?;
    Ok((public, private, point))
}

/// Derives the AES-256 transport key from our ephemeral private key and the
/// peer's public key.
fn transport_key(
    session: &Session,
    private: ObjectHandle,
    peer: &[u8],
    role: &[Attribute],
) -> Result<ObjectHandle, PartitionError> {
    derive_transport_key(session, private, peer, role)?.map_err(op_err("derive transport key"))
}

/// [`transport_key`], with the token's own refusal kept apart (the outer
/// error is a malformed peer key).
fn derive_transport_key(
    session: &Session,
    private: ObjectHandle,
    peer: &[u8],
    role: &[Attribute],
) -> Result<Result<ObjectHandle, CkError>, PartitionError> {
    let der = der_octets(peer)?;
    let mut template = vec![
        Attribute::Token(false),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ];
    template.extend_from_slice(role);
    Ok(session.derive_key(
        &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), &der)),
        private,
        &template,
    ))
}

impl Partition {
    /// The source side: wraps every domain key for the target whose
    /// ephemeral transport public key is `target_transport`. Needs the
    /// token's SO PIN (to mark the transport key trusted) and user PIN (to
    /// log the user back in).
    pub fn export_for_clone(
        self: &Arc<Self>,
        so_pin: &str,
        user_pin: &str,
        target_transport: &[u8],
    ) -> Result<ClonePackage, PartitionError> {
        let session = self
            .module
            .ctx
            .open_rw_session(self.slot)
            .map_err(op_err("open session"))?;
        session.logout().map_err(op_err("log out user"))?;
        let relogin = |s: &Session| {
            let _ = s.logout();
            s.login(UserType::User, Some(&AuthPin::new(user_pin.into())))
                .map_err(|e| PartitionError::Login(e.to_string()))
        };
        let trusted = (|| {
            session
                .login(UserType::So, Some(&AuthPin::new(so_pin.into())))
                .map_err(|e| PartitionError::Login(format!("security officer: {e}")))?;
            let (public, private, point) = ephemeral_pair(&session, true)?;
            let key = match derive_transport_key(
                &session,
                private,
                target_transport,
                &[
                    Attribute::Private(false),
                    Attribute::Trusted(true),
                    Attribute::Wrap(true),
                ],
            )? {
                Ok(key) => Ok(key),
                // kryoptic (1.5) lets nobody set CKA_TRUSTED, not even the
                // SO: keys that may leave only under a trusted key cannot
                // leave it at all.
                Err(CkError::Pkcs11(
                    rv @ (RvError::AttributeTypeInvalid
                    | RvError::ActionProhibited
                    | RvError::AttributeReadOnly),
                    _,
                )) => Err(PartitionError::CloningUnsupported(format!(
                    "the security officer cannot mark the transport key trusted \
                     (CKA_TRUSTED refused: {rv})"
                ))),
                Err(e) => Err(op_err("derive transport key")(e)),
            };
            let key = match key {
                Ok(k) => k,
                Err(e) => {
                    let _ = session.destroy_object(private);
                    let _ = session.destroy_object(public);
                    return Err(e);
                }
            };
            session
                .destroy_object(private)
                .map_err(op_err("destroy transport key"))?;
            session
                .destroy_object(public)
                .map_err(op_err("destroy transport key"))?;
            Ok::<_, PartitionError>((key, point))
        })();
        // Whatever happened, the user is logged back in and the domain key
        // handles (invalidated by the logout) are found again by label.
        relogin(&session)?;
        let (keys, _) = load_domain_keys(&session)?;
        self.reload_keys(keys)?;
        let (key, source_transport) = trusted?;

        let wrapped = (|| {
            let mut out = Vec::with_capacity(CLONED.len());
            for (label, kind) in CLONED {
                let class = match kind {
                    KeyKind::EcPrivate => ObjectClass::PRIVATE_KEY,
                    _ => ObjectClass::SECRET_KEY,
                };
                let handle =
                    find_one(&session, class, label)?.ok_or(PartitionError::MissingKey(label))?;
                let blob = session
                    .wrap_key(&Mechanism::AesKeyWrapPad, key, handle)
                    .map_err(op_err("wrap domain key"))?;
                out.push(WrappedKey {
                    label: label.to_owned(),
                    kind,
                    wrapped: blob,
                });
            }
            Ok::<_, PartitionError>(out)
        })();
        let destroyed = session.destroy_object(key);
        let keys = wrapped?;
        destroyed.map_err(op_err("destroy transport key"))?;
        Ok(ClonePackage {
            source_transport,
            keys,
            ake_public: self.ake_public.clone(),
        })
    }
}

/// The target side of a ceremony, on a token that has no domain keys yet.
pub struct Enrollment {
    session: Session,
    private: ObjectHandle,
    public: ObjectHandle,
    transport: Vec<u8>,
    _module: Arc<Module>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment").finish_non_exhaustive()
    }
}

impl Enrollment {
    /// Starts enrolling the token labelled `label`. Refuses a token that
    /// already holds domain keys (it belongs to a domain already).
    pub fn begin(module: &Arc<Module>, label: &str, pin: &str) -> Result<Self, PartitionError> {
        let (_, session) = module.user_session(label, pin)?;
        for (key, kind) in CLONED {
            let class = match kind {
                KeyKind::EcPrivate => ObjectClass::PRIVATE_KEY,
                _ => ObjectClass::SECRET_KEY,
            };
            if find_one(&session, class, key)?.is_some() {
                return Err(PartitionError::Operation {
                    op: "enroll",
                    detail: format!("the token already holds {key}: it belongs to a domain"),
                });
            }
        }
        let (public, private, transport) = ephemeral_pair(&session, false)?;
        Ok(Enrollment {
            session,
            private,
            public,
            transport,
            _module: Arc::clone(module),
        })
    }

    /// This token's ephemeral transport public key (SEC1), for the source.
    pub fn transport_public_key(&self) -> &[u8] {
        &self.transport
    }

    /// The transport key's fingerprint ([`transport_fingerprint`]), for the
    /// operator to confirm on the source side.
    pub fn transport_fingerprint(&self) -> String {
        transport_fingerprint(&self.transport)
    }

    /// Unwraps the package's keys into the token. On success the token can
    /// be opened with [`super::KeySetup::RequireExisting`].
    pub fn complete(self, package: &ClonePackage) -> Result<(), PartitionError> {
        let s = &self.session;
        let key = transport_key(
            s,
            self.private,
            &package.source_transport,
            &[Attribute::Private(true), Attribute::Unwrap(true)],
        )?;
        let mut created = Vec::new();
        let result = (|| {
            for (label, kind) in CLONED {
                let w = package
                    .keys
                    .iter()
                    .find(|w| w.label == label && w.kind == kind)
                    .ok_or(PartitionError::MissingKey(label))?;
                let mut template = protected_secret(label);
                match kind {
                    KeyKind::GenericSecret => template.extend([
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::Sign(true),
                        Attribute::Verify(true),
                    ]),
                    KeyKind::Aes => template.extend([
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                    ]),
                    KeyKind::EcPrivate => template.extend([
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::KeyType(KeyType::EC),
                        Attribute::Derive(true),
                    ]),
                }
                let h = s
                    .unwrap_key(&Mechanism::AesKeyWrapPad, key, &w.wrapped, &template)
                    .map_err(op_err("unwrap domain key"))?;
                created.push(h);
                if kind == KeyKind::EcPrivate {
                    check_key_pair(s, h, &package.ake_public)?;
                }
            }
            let public = create_ake_public(s, &package.ake_public)?;
            created.push(public);
            Ok::<_, PartitionError>(())
        })();
        if result.is_err() {
            // Leave no half-enrolled token behind.
            for h in created {
                let _ = s.destroy_object(h);
            }
        }
        let _ = s.destroy_object(key);
        let _ = s.destroy_object(self.private);
        let _ = s.destroy_object(self.public);
        result
    }
}

/// Checks that `private` (in the token) is the private key of `public`: the
/// token's ECDH with a random point r·G must equal r·public. Only a holder
/// of the domain's AKE private key can make a package that passes, so a
/// package carried by hand (`fleet enroll-token`) cannot give the token a
/// key domain other than the one whose public key the caller checked.
fn check_key_pair(s: &Session, private: ObjectHandle, public: &[u8]) -> Result<(), PartitionError> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let public =
        p256::PublicKey::from_sec1_bytes(public).map_err(|_| PartitionError::Operation {
            op: "enroll",
            detail: "the package's AKE public key is not a P-256 point".into(),
        })?;
    let r = p256::NonZeroScalar::random(&mut rand::rngs::OsRng);
    let probe = p256::PublicKey::from_secret_scalar(&r);
    let got = super::ecdh_share(s, private, probe.to_encoded_point(false).as_bytes())?;
    let expected = (public.to_projective() * *r)
        .to_affine()
        .to_encoded_point(false);
    if expected.x().map(|x| x.as_slice()) != Some(got.as_slice()) {
        return Err(PartitionError::Operation {
            op: "enroll",
            detail: "the package's AKE private key does not belong to its AKE public key".into(),
        });
    }
    Ok(())
}

/// The fingerprint of a transport public key (SEC1 bytes): the first 16
/// bytes of its SHA-256, as eight groups of four hex digits. Whoever can
/// swap the enrollment request between the two machines would receive the
/// domain keys, so the operator reads this on the new node's machine and
/// gives it to the source side, which wraps for nothing else.
pub fn transport_fingerprint(public: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(public);
    digest[..16]
        .chunks(2)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join("-")
}

/// Whether `said` (as an operator typed it: any case, with or without the
/// dashes and spaces) is the fingerprint of `public`.
pub fn fingerprint_matches(public: &[u8], said: &str) -> bool {
    let normal = |s: &str| -> String {
        s.chars()
            .filter(|c| !matches!(c, '-' | ' ' | ':'))
            .flat_map(char::to_lowercase)
            .collect()
    };
    let said = normal(said);
    !said.is_empty() && said == normal(&transport_fingerprint(public))
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_pinned_and_matches_only_its_key() {
        let key = [2u8; 33];
        let fp = transport_fingerprint(&key);
        assert_eq!(fp.len(), 39);
        assert_eq!(fp.split('-').count(), 8);
        // Pinned: SHA-256 of 33 bytes of 0x02, first 16 bytes.
        assert_eq!(fp, "7f2f-54ff-9445-9f3a-c4d1-9d32-19ce-6ef0");
        assert!(fingerprint_matches(&key, &fp));
        assert!(fingerprint_matches(
            &key,
            &fp.to_uppercase().replace('-', " ")
        ));
        assert!(!fingerprint_matches(&[3u8; 33], &fp));
        assert!(!fingerprint_matches(&key, ""));
        assert!(!fingerprint_matches(&key, &fp[..20]));
    }
}
