//! The partition and the secure core against a real SoftHSM2 token, in
//! process. Each test runs in its own process (nextest) with its own token.

use std::time::Instant;

use hsm_vault::core::record::Stored;
use hsm_vault::core::{Charge, Client, Finish, Purpose, SecureCore};
use hsm_vault::partition::Partition;
use hsm_vault::types::Seq;
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, RegistrationResponse,
};
use rand::rngs::OsRng;
use softhsm_test_harness::{module_path, TestToken};
use vault_proto::suite::{open_with, Suite, RELEASE_AAD, RELEASE_INFO};

fn open_token(label: &str) -> (TestToken, std::sync::Arc<Partition>) {
    let token = TestToken::new(label).expect("token");
    token.use_in_this_process().expect("token env");
    let p = Partition::open(&module_path(), label, token.pin()).expect("open partition");
    (token, p)
}

#[test]
fn invariant6_domain_keys_are_sensitive_and_not_plaintext_extractable() {
    let (_token, p) = open_token("keys");
    let session = p.session().expect("session");
    let keys = session.key_protection().expect("key protection");
    assert_eq!(keys.len(), 4);
    for k in keys {
        assert!(k.sensitive, "{} must be CKA_SENSITIVE", k.label);
        assert!(
            k.wrap_with_trusted,
            "{} must need a trusted wrapping key",
            k.label
        );
        assert!(
            !k.value_readable,
            "{} CKA_VALUE must not be readable",
            k.label
        );
        assert!(
            !k.wraps_under_untrusted_key,
            "{} must not wrap under an untrusted key",
            k.label
        );
        assert!(k.local, "{} was generated in the token", k.label);
    }
}

#[test]
fn domain_keys_survive_a_restart() {
    let token = TestToken::new("restart").expect("token");
    token.use_in_this_process().expect("env");
    let first = Partition::open(&module_path(), "restart", token.pin()).expect("open");
    let pk = first.ake_public_key().to_vec();
    drop(first);
    let second = Partition::open(&module_path(), "restart", token.pin()).expect("reopen");
    assert_eq!(second.ake_public_key(), &pk[..]);
}

#[test]
fn wrong_pin_and_unknown_label_are_refused() {
    let token = TestToken::new("pins").expect("token");
    token.use_in_this_process().expect("env");
    let err = Partition::open(&module_path(), "pins", "not-the-pin").expect_err("wrong pin");
    assert!(err.to_string().contains("login"), "{err}");
    let err = Partition::open(&module_path(), "absent", token.pin()).expect_err("no such token");
    assert!(err.to_string().contains("absent"), "{err}");
}

/// The whole OPAQUE flow through the core, with the AKE key and OPRF seed in
/// the token: proves the ECDH parity recovery gives the client the same
/// session key.
#[test]
fn invariant4_core_register_then_recover_releases_the_secret_and_resets() {
    let (_token, p) = open_token("core");
    let t = p.session().expect("session");
    let core = SecureCore::new(p.ake_public_key()).expect("core");
    let id = core.record_id(&t, b"alice").expect("record id");
    assert_eq!(
        id,
        core.record_id(&t, b"alice").expect("again"),
        "record ids are stable"
    );
    assert_ne!(id, core.record_id(&t, b"bob").expect("bob"));

    let password = b"correct horse";
    let ksf = vault_proto::suite::client_ksf();
    let start = ClientRegistration::<Suite>::start(&mut OsRng, password).expect("client start");
    let (response, generation) = core
        .registration_start(&t, &id, &start.message.serialize())
        .expect("server start");
    let finish = start
        .state
        .finish(
            &mut OsRng,
            password,
            RegistrationResponse::deserialize(&response).expect("response"),
            ClientRegistrationFinishParameters::new(Default::default(), Some(&ksf)),
        )
        .expect("client finish");
    assert_eq!(
        &finish.server_s_pk.serialize()[..],
        &core.server_public_key()[..]
    );
    let (sealed, max) = core
        .registration_finish(
            &t,
            &id,
            &generation,
            &finish.message.serialize(),
            b"the secret",
            0,
            Seq(1),
        )
        .expect("register");
    assert_eq!(max, 10);

    let mut current = Stored {
        record: Some(sealed),
        index: Some(Seq(1)),
    };
    for round in 0..2u64 {
        let login = ClientLogin::<Suite>::start(&mut OsRng, password).expect("login start");
        let now = Instant::now();
        let seq = Seq(2 + 2 * round);
        let Charge::Charged { write, ticket } = core
            .charge_guess(
                &t,
                (&id, Client::default()),
                &current,
                &login.message.serialize(),
                seq,
                now,
            )
            .expect("charge")
        else {
            panic!("expected a charge");
        };
        let challenge = core.evaluate(&t, ticket, &write, now).expect("evaluate");
        assert_eq!(challenge.guesses_remaining, 9);
        let client = login
            .state
            .finish(
                &mut OsRng,
                password,
                CredentialResponse::deserialize(&challenge.ke2).expect("ke2"),
                ClientLoginFinishParameters::new(None, Default::default(), Some(&ksf)),
            )
            .expect("client login finish");
        let out = core
            .finish(
                &t,
                &challenge.login_id,
                &client.message.serialize(),
                &Stored {
                    record: Some(write),
                    index: Some(seq),
                },
                Purpose::Recover,
                Seq(seq.0 + 1),
                now,
            )
            .expect("finish");
        let Finish::Recovered {
            write: reset,
            release,
        } = out
        else {
            panic!("expected recovery, got {out:?}");
        };
        let secret =
            open_with(&client.session_key, RELEASE_INFO, RELEASE_AAD, &release).expect("open");
        assert_eq!(&secret[..], b"the secret");
        let (_, record) = core.inspect(&t, &id, &reset).expect("inspect");
        assert_eq!(record.guesses_remaining(), 10);
        current = Stored {
            record: Some(reset),
            index: Some(Seq(seq.0 + 1)),
        };
    }
}

/// Records of every kind seal to one size (a locked or phantom record cannot
/// be told from a live one on disk), and a sealed record is bound to its id
/// and its sequence number.
#[test]
fn invariant7_sealed_records_are_one_size_and_bound_to_id_and_seq() {
    use hsm_vault::core::record::{self, Record, RecordBody, SEALED_LEN};
    use hsm_vault::types::RecordId;
    let (_token, p) = open_token("records");
    let t = p.session().expect("session");
    assert_eq!(SEALED_LEN, 314, "the record format changed");
    let id = RecordId([1; 32]);
    let bodies = [
        RecordBody::Registered {
            password_file: [9; record::PASSWORD_FILE_LEN],
            secret: vec![7; 128],
        },
        RecordBody::Registered {
            password_file: [9; record::PASSWORD_FILE_LEN],
            secret: vec![7; 1],
        },
        RecordBody::Locked,
        RecordBody::Phantom,
    ];
    for body in bodies {
        let r = Record {
            body,
            max_guesses: 10,
            guesses_used: 3,
            generation: [5; 16],
        };
        let sealed = record::seal(&t, &id, Seq(42), &r, [3; 12]).expect("seal");
        assert_eq!(sealed.as_bytes().len(), SEALED_LEN);
        let (seq, back) = record::unseal(&t, &id, &sealed).expect("unseal");
        assert_eq!((seq, &back), (Seq(42), &r));
        assert!(
            record::unseal(&t, &RecordId([2; 32]), &sealed).is_err(),
            "moved to another id"
        );
        let mut bytes = sealed.as_bytes().to_vec();
        bytes[7] ^= 1; // claims another sequence number
        let forged = record::SealedRecord::from_stored(bytes);
        assert!(
            record::unseal(&t, &id, &forged).is_err(),
            "sequence number is authenticated"
        );
    }
}

/// A pending login expires: after the deadline its KE3 is refused as out of
/// order, and the guess it was charged stays charged.
#[test]
fn invariant2_pending_logins_expire_and_keep_their_charge() {
    use hsm_vault::core::pending::LOGIN_DEADLINE;
    use hsm_vault::core::CoreError;
    let (_token, p) = open_token("expiry");
    let t = p.session().expect("session");
    let core = SecureCore::new(p.ake_public_key()).expect("core");
    let id = core.record_id(&t, b"zoe").expect("id");
    let login = ClientLogin::<Suite>::start(&mut OsRng, b"pw").expect("start");
    let now = Instant::now();
    let Charge::Charged { write, ticket } = core
        .charge_guess(
            &t,
            (&id, Client::default()),
            &Stored::default(),
            &login.message.serialize(),
            Seq(1),
            now,
        )
        .expect("charge")
    else {
        panic!("expected a charge");
    };
    let challenge = core.evaluate(&t, ticket, &write, now).expect("evaluate");
    let later = now + LOGIN_DEADLINE + std::time::Duration::from_secs(1);
    assert!(core.pending_record(&challenge.login_id, later).is_none());
    let err = core
        .finish(
            &t,
            &challenge.login_id,
            &[],
            &Stored {
                record: Some(write.clone()),
                index: Some(Seq(1)),
            },
            Purpose::Recover,
            Seq(2),
            later,
        )
        .expect_err("expired");
    assert!(matches!(err, CoreError::UnknownLogin), "{err}");
    let (_, record) = core.inspect(&t, &id, &write).expect("inspect");
    assert_eq!(record.guesses_used, 1, "the charge outlives the login");
}

/// The real token, counting the MACs asked of it.
struct CountingToken<'a> {
    token: &'a hsm_vault::partition::PartitionSession,
    macs: std::cell::Cell<usize>,
}

impl hsm_vault::core::Token for CountingToken<'_> {
    fn hmac(
        &self,
        key: hsm_vault::partition::MacKey,
        data: &[u8],
    ) -> Result<[u8; 32], hsm_vault::partition::PartitionError> {
        self.macs.set(self.macs.get() + 1);
        hsm_vault::core::Token::hmac(self.token, key, data)
    }
    fn ecdh_x(
        &self,
        peer: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, hsm_vault::partition::PartitionError> {
        hsm_vault::core::Token::ecdh_x(self.token, peer)
    }
    fn seal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, hsm_vault::partition::PartitionError> {
        hsm_vault::core::Token::seal(self.token, iv, aad, plaintext)
    }
    fn unseal(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, hsm_vault::partition::PartitionError> {
        hsm_vault::core::Token::unseal(self.token, iv, aad, sealed)
    }
}

#[test]
fn a_digest_kept_through_the_mac_memo_is_the_tokens_own_and_saves_the_second_mac() {
    use hsm_vault::core::index;
    use hsm_vault::core::memo::{MacMemo, Toggle};
    use hsm_vault::types::RecordId;

    let (_token, p) = open_token("memo");
    let session = p.session().expect("session");
    let counting = CountingToken {
        token: &session,
        macs: std::cell::Cell::new(0),
    };
    let entry = |i: u8| (RecordId([i; 32]), Seq(u64::from(i) + 1));
    let mut memo = MacMemo::new(3);
    let (mut plain, mut kept) = ([0u8; 32], [0u8; 32]);
    for i in 0..5 {
        let (id, seq) = entry(i);
        index::toggle(&session, &mut plain, &id, seq).expect("toggle");
        index::toggle_memo(&counting, &mut kept, (&id, seq), &mut memo, Toggle::In)
            .expect("toggle in");
    }
    assert_eq!(kept, plain, "the memo changes no digest");
    assert_ne!(kept, [0u8; 32]);
    assert_eq!(memo.len(), 3, "the memo holds at most its capacity");
    assert_eq!(
        counting.macs.get(),
        5,
        "every value toggled in was MAC'd once"
    );

    // The three newest come back from the memo, the two oldest from the token.
    for i in (0..5).rev() {
        let (id, seq) = entry(i);
        index::toggle_memo(&counting, &mut kept, (&id, seq), &mut memo, Toggle::Out)
            .expect("toggle out");
    }
    assert_eq!(kept, [0u8; 32], "out after in leaves the empty digest");
    assert_eq!(counting.macs.get(), 5 + 2);
    assert!(memo.is_empty(), "what was toggled out is forgotten");
}
