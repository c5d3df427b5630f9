//! KE1 and KE3 through the secure core, against a live login on a registered
//! record (software token): the checks that hold whatever the bytes are.
//!
//! - a KE3 that is not the client's own never recovers the secret or
//!   deletes the record, and leaves the guess charged;
//! - the client's KE3 (edited or not, at fuzzer-chosen positions) recovers
//!   exactly when it is unchanged, and the released secret opens under the
//!   client's session key;
//! - any KE1 the core accepts is charged before it is evaluated;
//! - the attempt policy over any record state: locked stays locked, the limit
//!   locks, otherwise one guess is charged.
//!
//! Input: a selector byte, then the mode's bytes.

#![no_main]

use std::time::Instant;

use hsm_vault::core::record::{self, Record, RecordBody, Stored, PASSWORD_FILE_LEN};
use hsm_vault::core::{Charge, Client, CoreError, Finish, Purpose, StatusView, APPARENT_LIMIT};
use hsm_vault::types::{LoginId, Seq};
use libfuzzer_sys::fuzz_target;
use opaque_ke::ClientLogin;
use rand::rngs::StdRng;
use rand::SeedableRng;
use vault_fuzz::{fixture, select, Fixture, PASSWORD, SECRET};
use vault_proto::suite::{open_with, Suite, RELEASE_AAD, RELEASE_INFO};

fuzz_target!(init: vault_fuzz::seeds::init("opaque_login"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    let f = fixture();
    match which % 5 {
        0 => foreign_ke3(f, bytes, Purpose::Recover),
        1 => foreign_ke3(f, bytes, Purpose::Delete),
        2 => edited_ke3(f, bytes),
        3 => any_ke1(f, bytes),
        _ => policy(f, bytes),
    }
});

/// Consumes a login the core still holds (a malformed KE3 leaves it
/// pending, as the service does: the client may retry).
fn give_up(f: &Fixture, login: &LoginId, stored: &Stored) -> Finish {
    f.core
        .finish(
            &f.token,
            login,
            &[],
            stored,
            Purpose::Recover,
            Seq(3),
            Instant::now(),
        )
        .expect("giving up a pending login")
}

fn foreign_ke3(f: &Fixture, ke3: &[u8], purpose: Purpose) {
    let login = f.start_login(7);
    let outcome = f.core.finish(
        &f.token,
        &login.login_id,
        ke3,
        &login.stored,
        purpose,
        Seq(3),
        Instant::now(),
    );
    match outcome {
        Ok(Finish::WrongPassword { guesses_remaining }) => assert_eq!(guesses_remaining, 9),
        Err(CoreError::InvalidMessage(_)) => {
            assert!(matches!(
                give_up(f, &login.login_id, &login.stored),
                Finish::WrongPassword {
                    guesses_remaining: 9
                }
            ));
        }
        other => panic!("a KE3 not made by the client: {other:?}"),
    }
    // Single use: the login is gone either way.
    assert!(f
        .core
        .pending_record(&login.login_id, Instant::now())
        .is_none());
}

fn edited_ke3(f: &Fixture, edits: &[u8]) {
    let login = f.start_login(11);
    let (genuine, session_key) = f.client_finish(&login, 12);
    let mut ke3 = genuine.clone();
    // Edits: (position, xor) pairs, then an optional truncation/extension.
    let mut pairs = edits.chunks_exact(2);
    for pair in pairs.by_ref() {
        let i = usize::from(pair[0]) % (ke3.len() + 1);
        if i == ke3.len() {
            ke3.push(pair[1]);
        } else {
            ke3[i] ^= pair[1];
        }
    }
    if let [cut] = pairs.remainder() {
        ke3.truncate(usize::from(*cut));
    }
    let outcome = f.core.finish(
        &f.token,
        &login.login_id,
        &ke3,
        &login.stored,
        Purpose::Recover,
        Seq(3),
        Instant::now(),
    );
    // opaque-ke reads the 32-byte MAC and ignores what follows it.
    let same = ke3.len() >= genuine.len() && ke3[..genuine.len()] == genuine[..];
    match outcome {
        Ok(Finish::Recovered { write, release }) => {
            assert!(same, "an edited KE3 recovered the secret");
            let secret = open_with(&session_key, RELEASE_INFO, RELEASE_AAD, &release)
                .expect("the release opens under the client's session key");
            assert_eq!(&secret[..], SECRET);
            // The counter is reset in the record to write.
            let stored = Stored {
                record: Some(write),
                index: Some(Seq(3)),
            };
            assert_eq!(
                f.core.status(&f.token, &f.id, &stored).expect("status"),
                StatusView::Registered {
                    remaining: 10,
                    max: 10
                }
            );
        }
        Ok(Finish::WrongPassword { guesses_remaining }) => {
            assert!(!same, "the client's own KE3 was refused");
            assert_eq!(guesses_remaining, 9);
        }
        Err(CoreError::InvalidMessage(_)) => {
            assert!(!same);
            give_up(f, &login.login_id, &login.stored);
        }
        other => panic!("an edited KE3: {other:?}"),
    }
}

fn any_ke1(f: &Fixture, ke1: &[u8]) {
    let now = Instant::now();
    let charge = match f.core.charge_guess(
        &f.token,
        (&f.id, Client::default()),
        &f.stored,
        ke1,
        Seq(2),
        now,
    ) {
        Ok(c) => c,
        Err(CoreError::InvalidMessage(_)) => return,
        Err(e) => panic!("charge: {e}"),
    };
    let Charge::Charged { write, ticket } = charge else {
        panic!("a fresh record is charged");
    };
    let charged = Stored {
        record: Some(write.clone()),
        index: Some(Seq(2)),
    };
    // The charge is in the record to write, before any evaluation.
    assert_eq!(
        f.core.status(&f.token, &f.id, &charged).expect("status"),
        StatusView::Registered {
            remaining: 9,
            max: 10
        }
    );
    match f.core.evaluate(&f.token, ticket, &write, now) {
        Ok(challenge) => {
            assert_eq!(challenge.guesses_remaining, 9);
            assert!(matches!(
                give_up(f, &challenge.login_id, &charged),
                Finish::WrongPassword {
                    guesses_remaining: 9
                }
            ));
        }
        Err(CoreError::InvalidMessage(_)) => {}
        Err(e) => panic!("evaluate: {e}"),
    }
}

/// A record in any state (from the input), then a valid KE1.
fn policy(f: &Fixture, bytes: &[u8]) {
    let [kind, max, used, ..] = *bytes else {
        return;
    };
    // Only states the core itself writes: a limit of 1..=10 and at most
    // that many guesses used.
    let max = max % 10 + 1;
    let used = used % (max + 1);
    let body = match kind % 3 {
        0 => RecordBody::Registered {
            password_file: [0; PASSWORD_FILE_LEN],
            secret: SECRET.to_vec(),
        },
        1 => RecordBody::Locked,
        _ => RecordBody::Phantom,
    };
    let locked = matches!(body, RecordBody::Locked);
    let state = Record {
        body,
        max_guesses: max,
        guesses_used: used,
        generation: [5; 16],
    };
    let sealed = record::seal(&f.token, &f.id, Seq(4), &state, [6; 12]).expect("seal");
    let stored = Stored {
        record: Some(sealed),
        index: Some(Seq(4)),
    };
    let mut rng = StdRng::seed_from_u64(3);
    let start = ClientLogin::<Suite>::start(&mut rng, PASSWORD).expect("login start");
    let ke1 = start.message.serialize();
    let charge = f
        .core
        .charge_guess(
            &f.token,
            (&f.id, Client::default()),
            &stored,
            &ke1,
            Seq(5),
            Instant::now(),
        )
        .expect("charge");
    // Every record answers as if its limit were the apparent one; a
    // registered record past its own limit is destroyed and counts on.
    let exhausted = used >= APPARENT_LIMIT;
    match charge {
        Charge::Locked => assert!(locked && exhausted),
        Charge::Lock { write } => {
            assert!(!locked && exhausted);
            let (_, after) = f
                .core
                .inspect(&f.token, &f.id, &write)
                .expect("the lock unseals");
            assert!(matches!(after.body, RecordBody::Locked));
            assert_eq!(after.guesses_used, used);
        }
        Charge::Charged { write, ticket } => {
            assert!(!exhausted);
            let (seq, after) = f
                .core
                .inspect(&f.token, &f.id, &write)
                .expect("the charge unseals");
            assert_eq!(seq, Seq(5));
            assert_eq!(after.guesses_used, used + 1);
            let registered = kind % 3 == 0;
            assert_eq!(
                matches!(after.body, RecordBody::Locked),
                locked || (registered && used >= max)
            );
            drop(ticket);
        }
    }
}
