//! Provisioning-time key import (`partition::import`), on either PKCS#11
//! implementation: the path for tokens that cannot clone keys.

use hsm_vault::core::SecureCore;
use hsm_vault::partition::import::DomainKeyMaterial;
use hsm_vault::partition::{KeyOrigin, KeySetup, MacKey, Module, Partition};
use softhsm_test_harness::{module_path, TestToken};

/// Imported domain keys are the same keys in every token they went to, and
/// once there are protected as generated ones are: sensitive, no readable
/// value, no wrapping under an untrusted key. The token reports them as not
/// generated here (`CKA_LOCAL` false), which `key_protection` passes on;
/// generated keys still report local.
#[test]
fn invariant6_imported_domain_keys_stay_in_the_token_and_report_as_imported() {
    let token = TestToken::new("first").expect("token");
    let (second_pin, _) = token.add_token("second").expect("second token");
    let (generated_pin, _) = token.add_token("generated").expect("third token");
    token.use_in_this_process().expect("env");
    let module = Module::load(&module_path()).expect("module");

    let material = DomainKeyMaterial::generate();
    assert!(!format!("{material:?}").is_empty());
    Partition::import_domain_keys(&module, "first", token.pin(), &material).expect("import");
    Partition::import_domain_keys(&module, "second", &second_pin, &material).expect("import");
    // A token that belongs to a domain is not overwritten.
    let again = Partition::import_domain_keys(&module, "second", &second_pin, &material)
        .expect_err("second import");
    assert!(again.to_string().contains("already holds"), "{again}");

    let open = |label: &str, pin: &str| {
        Partition::open_in(&module, label, pin, KeySetup::RequireExisting).expect("open")
    };
    let (a, b) = (open("first", token.pin()), open("second", &second_pin));
    assert_eq!(a.ake_public_key(), material.ake_public_key());
    assert_eq!(b.ake_public_key(), material.ake_public_key());
    drop(material);

    // The same keys in both tokens.
    let (s, t) = (a.session().expect("s"), b.session().expect("t"));
    for key in [MacKey::OprfSeed, MacKey::RecordId] {
        assert_eq!(
            s.hmac(key, b"probe").expect("mac"),
            t.hmac(key, b"probe").expect("mac")
        );
    }
    let sealed = s.seal(&[3; 12], b"aad", b"plaintext").expect("seal");
    assert_eq!(
        &t.unseal(&[3; 12], b"aad", &sealed).expect("unseal")[..],
        b"plaintext"
    );
    let core = SecureCore::new(a.ake_public_key()).expect("core");
    let peer = core.server_public_key();
    assert_eq!(
        &s.ecdh_x(&peer).expect("ecdh")[..],
        &t.ecdh_x(&peer).expect("ecdh")[..]
    );

    for session in [&s, &t] {
        let keys = session.key_protection().expect("protection");
        assert_eq!(keys.len(), 4);
        for k in keys {
            assert!(k.sensitive && k.wrap_with_trusted, "{k:?}");
            assert!(!k.value_readable, "{k:?}");
            assert!(!k.wraps_under_untrusted_key, "{k:?}");
            assert!(!k.local && !k.always_sensitive, "{k:?}");
            assert_eq!(k.origin(), KeyOrigin::ClonedOrImported, "{k:?}");
        }
    }

    // Keys generated in a token still report so.
    let generated = Partition::open_in(
        &module,
        "generated",
        &generated_pin,
        KeySetup::GenerateIfMissing,
    )
    .expect("generate");
    for k in generated
        .session()
        .expect("session")
        .key_protection()
        .expect("protection")
    {
        assert!(k.local && k.always_sensitive, "{k:?}");
        assert_eq!(k.origin(), KeyOrigin::GeneratedHere, "{k:?}");
    }
}
