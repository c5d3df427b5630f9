//! The key-cloning ceremony between two real tokens (SoftHSM2 or kryoptic), in one
//! process (one PKCS#11 context, tokens found by label).

use std::sync::Arc;

use hsm_vault::core::SecureCore;
use hsm_vault::partition::ceremony::Enrollment;
use hsm_vault::partition::{KeySetup, MacKey, Module, Partition, PartitionError};
use softhsm_test_harness::{module_path, TestToken};

struct Pair {
    source_token: TestToken,
    target_pin: String,
    module: Arc<Module>,
    source: Arc<Partition>,
}

fn pair() -> Pair {
    let source_token = TestToken::new("source").expect("source token");
    let (target_pin, _) = source_token.add_token("target").expect("target token");
    source_token.use_in_this_process().expect("env");
    let module = Module::load(&module_path()).expect("module");
    let source = Partition::open_in(
        &module,
        "source",
        source_token.pin(),
        KeySetup::GenerateIfMissing,
    )
    .expect("source partition");
    Pair {
        source_token,
        target_pin,
        module,
        source,
    }
}

/// A package must carry an AKE private key that belongs to its AKE public
/// key (the one clients pin): a package whose public key was swapped, as a
/// hand-carried package could be, is refused, and the token is left without
/// any domain key (a new enrollment can start; the genuine package works).
#[test]
fn package_whose_ake_private_key_does_not_match_its_public_key_is_refused() {
    let p = pair();
    let export = |transport: &[u8]| {
        p.source
            .export_for_clone(p.source_token.so_pin(), p.source_token.pin(), transport)
            .expect("export")
    };
    let enrollment = Enrollment::begin(&p.module, "target", &p.target_pin).expect("begin");
    let mut package = export(enrollment.transport_public_key());
    let stranger = p256::SecretKey::random(&mut rand::rngs::OsRng);
    package.ake_public = stranger.public_key().to_sec1_bytes().to_vec();
    let err = enrollment
        .complete(&package)
        .expect_err("a mismatched key pair");
    assert!(
        err.to_string()
            .contains("does not belong to its AKE public key"),
        "{err}"
    );
    assert!(matches!(
        Partition::open_in(
            &p.module,
            "target",
            &p.target_pin,
            KeySetup::RequireExisting
        ),
        Err(PartitionError::MissingKey(_))
    ));

    let enrollment = Enrollment::begin(&p.module, "target", &p.target_pin)
        .expect("the refused package left no domain key behind");
    let genuine = export(enrollment.transport_public_key());
    enrollment.complete(&genuine).expect("the genuine package");
    let target = Partition::open_in(
        &p.module,
        "target",
        &p.target_pin,
        KeySetup::RequireExisting,
    )
    .expect("enrolled");
    assert_eq!(target.ake_public_key(), p.source.ake_public_key());
}

#[test]
fn cloned_token_holds_the_same_domain_keys_still_protected() {
    let p = pair();
    let enrollment = Enrollment::begin(&p.module, "target", &p.target_pin).expect("begin");
    let package = p
        .source
        .export_for_clone(
            p.source_token.so_pin(),
            p.source_token.pin(),
            enrollment.transport_public_key(),
        )
        .expect("export");
    assert_eq!(package.keys.len(), 4);
    enrollment.complete(&package).expect("complete");

    let target = Partition::open_in(
        &p.module,
        "target",
        &p.target_pin,
        KeySetup::RequireExisting,
    )
    .expect("the enrolled token opens with its cloned keys");
    assert_eq!(target.ake_public_key(), p.source.ake_public_key());

    // The same keys: equal MACs, and what one seals the other unseals.
    let (s, t) = (p.source.session().expect("s"), target.session().expect("t"));
    for key in [MacKey::OprfSeed, MacKey::RecordId] {
        assert_eq!(
            s.hmac(key, b"probe").expect("mac"),
            t.hmac(key, b"probe").expect("mac")
        );
    }
    let sealed = s.seal(&[7; 12], b"aad", b"plaintext").expect("seal");
    assert_eq!(
        &t.unseal(&[7; 12], b"aad", &sealed).expect("unseal")[..],
        b"plaintext"
    );
    // The AKE private key agrees: the same ECDH share from both tokens.
    let core = SecureCore::new(p.source.ake_public_key()).expect("core");
    let peer = core.server_public_key();
    assert_eq!(
        &s.ecdh_x(&peer).expect("ecdh")[..],
        &t.ecdh_x(&peer).expect("ecdh")[..]
    );

    // Still sensitive and wrappable only under a trusted key on the target.
    for k in t.key_protection().expect("protection") {
        assert!(k.sensitive && k.wrap_with_trusted, "{k:?}");
        assert!(!k.value_readable && !k.wraps_under_untrusted_key, "{k:?}");
    }
    // The source still serves after the ceremony's logout/login.
    assert_eq!(s.hmac(MacKey::RecordId, b"x").expect("mac").len(), 32);
    drop(s);
    assert!(p
        .source
        .session()
        .expect("s")
        .hmac(MacKey::OprfSeed, b"y")
        .is_ok());
}

#[test]
fn token_without_the_ceremony_cannot_serve_or_decrypt() {
    let p = pair();
    let err = Partition::open_in(
        &p.module,
        "target",
        &p.target_pin,
        KeySetup::RequireExisting,
    )
    .expect_err("no domain keys");
    assert!(err.to_string().contains("missing"), "{err}");

    // A package made for another transport key does not unwrap here.
    let elsewhere = Enrollment::begin(&p.module, "target", &p.target_pin).expect("begin");
    let package = p
        .source
        .export_for_clone(
            p.source_token.so_pin(),
            p.source_token.pin(),
            elsewhere.transport_public_key(),
        )
        .expect("export");
    drop(elsewhere);
    let ours = Enrollment::begin(&p.module, "target", &p.target_pin).expect("begin again");
    assert!(ours.complete(&package).is_err(), "wrapped for someone else");
    assert!(
        Partition::open_in(
            &p.module,
            "target",
            &p.target_pin,
            KeySetup::RequireExisting
        )
        .is_err(),
        "a failed ceremony leaves no keys behind"
    );
}

#[test]
fn ceremony_needs_the_security_officer_and_refuses_enrolled_tokens() {
    let p = pair();
    let enrollment = Enrollment::begin(&p.module, "target", &p.target_pin).expect("begin");
    let err = p
        .source
        .export_for_clone(
            "wrong-so-pin",
            p.source_token.pin(),
            enrollment.transport_public_key(),
        )
        .expect_err("SO PIN required");
    assert!(err.to_string().contains("security officer"), "{err}");
    // The source user is logged back in and keeps working.
    assert!(p
        .source
        .session()
        .expect("s")
        .hmac(MacKey::RecordId, b"z")
        .is_ok());
    // An enrolled token (the source) refuses to be enrolled again.
    assert!(Enrollment::begin(&p.module, "source", p.source_token.pin()).is_err());
}

/// Where the security officer cannot mark a key trusted (kryoptic 1.5 never
/// lets `CKA_TRUSTED` be set), the domain keys, which may leave a token only
/// under a trusted key, cannot leave it at all: the ceremony is refused with
/// a clear error, the source keeps serving, and nothing reaches the target.
/// Where it can (SoftHSM), the same steps clone the keys.
#[test]
fn invariant6_cloning_needs_a_key_the_security_officer_marked_trusted() {
    let p = pair();
    let enrollment = Enrollment::begin(&p.module, "target", &p.target_pin).expect("begin");
    let exported = p.source.export_for_clone(
        p.source_token.so_pin(),
        p.source_token.pin(),
        enrollment.transport_public_key(),
    );
    match softhsm_test_harness::provider() {
        softhsm_test_harness::Provider::SoftHsm => {
            assert_eq!(exported.expect("SoftHSM clones").keys.len(), 4);
        }
        softhsm_test_harness::Provider::Kryoptic => {
            let err = exported.expect_err("kryoptic cannot mark the transport key trusted");
            assert!(
                matches!(err, PartitionError::CloningUnsupported(_)),
                "{err}"
            );
            // The source is logged back in and still serves.
            let s = p.source.session().expect("session");
            s.hmac(MacKey::RecordId, b"still serving").expect("hmac");
            for k in s.key_protection().expect("protection") {
                assert!(k.sensitive && k.wrap_with_trusted, "{k:?}");
                assert!(!k.value_readable && !k.wraps_under_untrusted_key, "{k:?}");
            }
            drop(enrollment);
            let err = Partition::open_in(
                &p.module,
                "target",
                &p.target_pin,
                KeySetup::RequireExisting,
            )
            .expect_err("the target holds no domain key");
            assert!(matches!(err, PartitionError::MissingKey(_)), "{err}");
        }
    }
}
