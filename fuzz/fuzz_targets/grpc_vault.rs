//! The client API (`vault.v1`): prost decoding of every message, a
//! re-encoding round trip, then for requests the path the service takes with
//! the decoded fields — its size checks (`service.rs` keeps them private, so
//! they are restated here with its constants) and the secure core's own
//! parsing and policy over a software token.
//!
//! Input: a selector byte, then the encoded message.

#![no_main]

use std::time::Instant;

use hsm_vault::core::record::{Stored, SEALED_LEN};
use hsm_vault::core::{Charge, Client, CoreError, Finish, Purpose, StatusView};
use hsm_vault::types::{LoginId, RecordId, Seq};
use libfuzzer_sys::fuzz_target;
use opaque_ke::{CredentialResponse, RegistrationResponse};
use vault_fuzz::{fixture, prost_round_trip, select, MAX_OPAQUE_MESSAGE, WIRE_LOGIN_LEN};
use vault_proto::suite::{
    Suite, DEFAULT_MAX_GUESSES, MAX_ACCOUNT_ID_LEN, MAX_GUESSES_LIMIT, MAX_SECRET_LEN,
};
use vault_proto::vault::v1 as pb;

fuzz_target!(init: vault_fuzz::seeds::init("grpc_vault"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 20 {
        0 => {
            if let Some(m) = prost_round_trip::<pb::RegisterStartRequest>(bytes) {
                register_start(&m);
            }
        }
        1 => {
            if let Some(m) = prost_round_trip::<pb::RegisterFinishRequest>(bytes) {
                register_finish(&m);
            }
        }
        2 => {
            if let Some(m) = prost_round_trip::<pb::RecoverStartRequest>(bytes) {
                recover_start(&m);
            }
        }
        3 => {
            if let Some(m) = prost_round_trip::<pb::RecoverFinishRequest>(bytes) {
                finish_unknown(&m.login_id, &m.ke3, Purpose::Recover);
            }
        }
        4 => {
            if let Some(m) = prost_round_trip::<pb::DeleteRequest>(bytes) {
                if account_ok(&m.account_id) && !m.ke3.is_empty() {
                    finish_unknown(&m.login_id, &m.ke3, Purpose::Delete);
                }
            }
        }
        5 => {
            if let Some(m) = prost_round_trip::<pb::StatusRequest>(bytes) {
                status(&m);
            }
        }
        6 => {
            prost_round_trip::<pb::GetInfoRequest>(bytes);
        }
        // Answers, as the client decodes them.
        7 => {
            prost_round_trip::<pb::GetInfoResponse>(bytes);
        }
        8 => {
            if let Some(m) = prost_round_trip::<pb::RegisterStartResponse>(bytes) {
                let _ = RegistrationResponse::<Suite>::deserialize(&m.registration_response);
            }
        }
        9 => {
            prost_round_trip::<pb::RegisterFinishResponse>(bytes);
        }
        10 => {
            if let Some(pb::RecoverStartResponse {
                outcome: Some(pb::recover_start_response::Outcome::Challenge(c)),
            }) = prost_round_trip::<pb::RecoverStartResponse>(bytes)
            {
                let _ = CredentialResponse::<Suite>::deserialize(&c.ke2);
            }
        }
        11 => {
            prost_round_trip::<pb::RecoverFinishResponse>(bytes);
        }
        12 => {
            prost_round_trip::<pb::DeleteResponse>(bytes);
        }
        13 => {
            prost_round_trip::<pb::StatusResponse>(bytes);
        }
        14 => {
            prost_round_trip::<pb::Challenge>(bytes);
        }
        15 => {
            prost_round_trip::<pb::Recovered>(bytes);
        }
        16 => {
            prost_round_trip::<pb::WrongPassword>(bytes);
        }
        17 => {
            prost_round_trip::<pb::Locked>(bytes);
        }
        18 => {
            prost_round_trip::<pb::Deleted>(bytes);
        }
        _ => {
            // Any message type must refuse or accept without panicking.
            let _ = prost_round_trip::<pb::RegisterFinishRequest>(bytes);
            let _ = prost_round_trip::<pb::GetInfoResponse>(bytes);
        }
    }
});

/// `service.rs::check_account`.
fn account_ok(account: &[u8]) -> bool {
    !account.is_empty() && account.len() <= MAX_ACCOUNT_ID_LEN
}

/// `service.rs::check_opaque`.
fn opaque_ok(msg: &[u8]) -> bool {
    !msg.is_empty() && msg.len() <= MAX_OPAQUE_MESSAGE
}

/// `service.rs::parse_wire_login`.
fn wire_login(bytes: &[u8]) -> Option<(u64, LoginId)> {
    if bytes.len() != WIRE_LOGIN_LEN {
        return None;
    }
    let (group, login) = bytes.split_at(8);
    Some((
        u64::from_be_bytes(group.try_into().ok()?),
        LoginId::from_bytes(login)?,
    ))
}

fn record_of(account: &[u8]) -> (RecordId, Stored) {
    let f = fixture();
    let id = f.core.record_id(&f.token, account).expect("record id");
    // The fixture's account is registered; every other one is not.
    let stored = if id == f.id {
        f.stored.clone()
    } else {
        Stored::default()
    };
    (id, stored)
}

fn register_start(m: &pb::RegisterStartRequest) {
    if !account_ok(&m.account_id) || !opaque_ok(&m.registration_request) {
        return;
    }
    let f = fixture();
    let (id, _) = record_of(&m.account_id);
    match f
        .core
        .registration_start(&f.token, &id, &m.registration_request)
    {
        Ok((response, _generation)) => {
            assert!(RegistrationResponse::<Suite>::deserialize(&response).is_ok());
        }
        Err(CoreError::InvalidMessage(_)) => {}
        Err(e) => panic!("registration start: {e}"),
    }
}

fn register_finish(m: &pb::RegisterFinishRequest) {
    if !account_ok(&m.account_id) || !opaque_ok(&m.registration_upload) {
        return;
    }
    let f = fixture();
    let (id, _) = record_of(&m.account_id);
    match f.core.registration_finish(
        &f.token,
        &id,
        &m.registration_id,
        &m.registration_upload,
        &m.secret,
        m.max_guesses,
        Seq(7),
    ) {
        Ok((sealed, max)) => {
            assert!(!m.secret.is_empty() && m.secret.len() <= MAX_SECRET_LEN);
            let expected = match m.max_guesses {
                0 => DEFAULT_MAX_GUESSES,
                n => u8::try_from(n).expect("accepted limits fit a byte"),
            };
            assert_eq!(max, expected);
            assert!((1..=MAX_GUESSES_LIMIT).contains(&max));
            assert_eq!(sealed.as_bytes().len(), SEALED_LEN);
            let stored = Stored {
                record: Some(sealed),
                index: Some(Seq(7)),
            };
            assert_eq!(
                f.core.status(&f.token, &id, &stored).expect("status"),
                StatusView::Registered {
                    remaining: max,
                    max
                }
            );
        }
        Err(CoreError::InvalidMessage(_) | CoreError::InvalidArgument(_)) => {}
        Err(e) => panic!("registration finish: {e}"),
    }
}

fn recover_start(m: &pb::RecoverStartRequest) {
    if !account_ok(&m.account_id) || !opaque_ok(&m.ke1) {
        return;
    }
    let f = fixture();
    let (id, stored) = record_of(&m.account_id);
    let now = Instant::now();
    let charge = match f.core.charge_guess(
        &f.token,
        (&id, Client::default()),
        &stored,
        &m.ke1,
        Seq(2),
        now,
    ) {
        Ok(c) => c,
        Err(CoreError::InvalidMessage(_)) => return,
        Err(e) => panic!("charge: {e}"),
    };
    let Charge::Charged { write, ticket } = charge else {
        panic!("a fresh or unknown record is charged, not locked");
    };
    let challenge = match f.core.evaluate(&f.token, ticket, &write, now) {
        Ok(c) => c,
        // A KE1 the deserializer took but the key exchange refuses.
        Err(CoreError::InvalidMessage(_)) => return,
        Err(e) => panic!("evaluate: {e}"),
    };
    assert_eq!(challenge.guesses_remaining, DEFAULT_MAX_GUESSES - 1);
    assert!(CredentialResponse::<Suite>::deserialize(&challenge.ke2).is_ok());
    // Give up on the login (an empty KE3), as a client whose password did
    // not open the envelope does; the guess stays charged.
    let charged = Stored {
        record: Some(write),
        index: Some(Seq(2)),
    };
    match f.core.finish(
        &f.token,
        &challenge.login_id,
        &[],
        &charged,
        Purpose::Recover,
        Seq(3),
        now,
    ) {
        Ok(Finish::WrongPassword { guesses_remaining }) => {
            assert_eq!(guesses_remaining, DEFAULT_MAX_GUESSES - 1)
        }
        other => panic!("giving up a login: {other:?}"),
    }
}

fn finish_unknown(login_id: &[u8], ke3: &[u8], purpose: Purpose) {
    let Some((_group, login)) = wire_login(login_id) else {
        return;
    };
    if ke3.len() > MAX_OPAQUE_MESSAGE {
        return;
    }
    let f = fixture();
    assert!(f.core.pending_record(&login, Instant::now()).is_none());
    // No such login: the KE3 is parsed, then the login is not found.
    match f.core.finish(
        &f.token,
        &login,
        ke3,
        &f.stored,
        purpose,
        Seq(9),
        Instant::now(),
    ) {
        Err(CoreError::InvalidMessage(_) | CoreError::UnknownLogin) => {}
        other => panic!("finish of an unknown login: {other:?}"),
    }
}

fn status(m: &pb::StatusRequest) {
    if !account_ok(&m.account_id) {
        return;
    }
    let f = fixture();
    let (id, stored) = record_of(&m.account_id);
    let view = f.core.status(&f.token, &id, &stored).expect("status");
    if id == f.id {
        assert_eq!(
            view,
            StatusView::Registered {
                remaining: DEFAULT_MAX_GUESSES,
                max: DEFAULT_MAX_GUESSES
            }
        );
    } else {
        assert_eq!(view, StatusView::NotRegistered);
    }
}
