//! The simulated clients: real OPAQUE client messages sent to a node's
//! service in process, and what they saw told to the oracle.

use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, RegistrationResponse,
};
use rand::rngs::OsRng;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Status};
use vault_proto::suite::{benchmark_ksf, open_with, Suite, RELEASE_AAD, RELEASE_INFO};
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_server::Vault;

use crate::model::{Answer, Op, Seen};
use crate::world::Target;

/// What one client does to one account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Register { secret: u32, max: u8 },
    RecoverRight,
    RecoverWrong,
    Delete,
    Status,
}

pub fn password(account: usize) -> Vec<u8> {
    format!("correct horse {account}").into_bytes()
}

pub fn secret_bytes(account: usize, secret: u32) -> Vec<u8> {
    format!("sim-secret:{account}:{secret}").into_bytes()
}

fn secret_number(account: usize, bytes: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix(&format!("sim-secret:{account}:"))?;
    rest.parse().ok()
}

/// The request as a node's own leader-bound hop sees it: it is served here
/// or refused, never forwarded (the sim has no sockets).
fn request<T>(message: T, bearer: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        hsm_vault::service::FORWARDED,
        MetadataValue::from_static(hsm_vault::backend::Hop::Leader.mark()),
    );
    if let Some(b) = bearer {
        if let Ok(v) = format!("Bearer {b}").parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

/// How an error answer counts for the oracle.
fn seen_error(status: &Status) -> Result<Seen, String> {
    match status.code() {
        // Refused before any write: a stale login, a compare-and-set that
        // lost, a rate limit.
        Code::FailedPrecondition | Code::Aborted | Code::ResourceExhausted => Ok(Seen::NotApplied),
        // The write may or may not have happened.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Ok(Seen::Unknown),
        // Nothing in the simulation tampers with records or sends bad
        // input: these are failures of the vault.
        _ => Err(format!(
            "unexpected status {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// One observation for the oracle: the operation and what was seen.
pub type Observation = (Op, Seen);

/// Runs `action` on `account` through `target`; returns what the oracle
/// must check, in order.
pub async fn act(
    target: &Target,
    account: usize,
    action: Action,
    bearer: &str,
    broken: bool,
) -> Result<Vec<Observation>, String> {
    let id = format!("account-{account}").into_bytes();
    match action {
        Action::Register { secret, max } => register(target, &id, account, secret, max, bearer)
            .await
            .map(|seen| vec![(Op::Register { secret, max }, seen)]),
        Action::Status => Ok(vec![(Op::Status, status(target, &id, bearer).await?)]),
        Action::RecoverRight | Action::RecoverWrong | Action::Delete => {
            let wrong = b"not the password".to_vec();
            let pw = if action == Action::RecoverWrong {
                wrong
            } else {
                password(account)
            };
            login(target, &id, account, &pw, action, bearer, broken).await
        }
    }
}

/// The owner's view of the record (Status, with the owner's token): the
/// only answer that counts guesses left.
async fn status(target: &Target, id: &[u8], bearer: &str) -> Result<Seen, String> {
    let answer = target
        .call(|s| {
            let id = id.to_vec();
            async move {
                s.status(request(pb::StatusRequest { account_id: id }, Some(bearer)))
                    .await
            }
        })
        .await;
    Ok(match answer {
        Ok(r) => {
            let r = r.into_inner();
            let remaining = u8::try_from(r.guesses_remaining).unwrap_or(u8::MAX);
            let max = u8::try_from(r.max_guesses).unwrap_or(u8::MAX);
            Seen::Answer(match pb::status_response::State::try_from(r.state) {
                Ok(pb::status_response::State::Registered) => Answer::Active { remaining, max },
                Ok(pb::status_response::State::Locked) => Answer::LockedStatus { max },
                _ => Answer::NotRegistered,
            })
        }
        Err(e) => seen_error(&e)?,
    })
}

async fn register(
    target: &Target,
    id: &[u8],
    account: usize,
    secret: u32,
    max: u8,
    bearer: &str,
) -> Result<Seen, String> {
    let pw = password(account);
    let start = ClientRegistration::<Suite>::start(&mut OsRng, &pw)
        .map_err(|e| format!("registration start: {e}"))?;
    let message = start.message.serialize().to_vec();
    let answer = target
        .call(|s| {
            let (id, message) = (id.to_vec(), message.clone());
            async move {
                s.register_start(request(
                    pb::RegisterStartRequest {
                        account_id: id,
                        registration_request: message,
                    },
                    Some(bearer),
                ))
                .await
            }
        })
        .await;
    let answer = match answer {
        Ok(a) => a.into_inner(),
        // RegisterStart writes nothing: any failure leaves the record as it
        // was.
        Err(e) => {
            seen_error(&e)?;
            return Ok(Seen::NotApplied);
        }
    };
    let response = RegistrationResponse::<Suite>::deserialize(&answer.registration_response)
        .map_err(|e| format!("registration response: {e}"))?;
    let ksf = benchmark_ksf();
    let finish = start
        .state
        .finish(
            &mut OsRng,
            &pw,
            response,
            ClientRegistrationFinishParameters::new(Default::default(), Some(&ksf)),
        )
        .map_err(|e| format!("registration finish: {e}"))?;
    let upload = finish.message.serialize().to_vec();
    let done = target
        .call(|s| {
            let (id, upload) = (id.to_vec(), upload.clone());
            let registration_id = answer.registration_id.clone();
            async move {
                s.register_finish(request(
                    pb::RegisterFinishRequest {
                        account_id: id,
                        registration_upload: upload,
                        secret: secret_bytes(account, secret),
                        max_guesses: u32::from(max),
                        registration_id,
                    },
                    Some(bearer),
                ))
                .await
            }
        })
        .await;
    match done {
        Ok(_) => Ok(Seen::Answer(Answer::Registered)),
        Err(e) => seen_error(&e),
    }
}

/// KE1 → KE2, then the finish the action calls for.
async fn login(
    target: &Target,
    id: &[u8],
    account: usize,
    pw: &[u8],
    action: Action,
    bearer: &str,
    broken: bool,
) -> Result<Vec<Observation>, String> {
    use pb::recover_start_response::Outcome;
    let start =
        ClientLogin::<Suite>::start(&mut OsRng, pw).map_err(|e| format!("login start: {e}"))?;
    let ke1 = start.message.serialize().to_vec();
    let answer = match (broken, target.broken()) {
        (true, Some(b)) if action != Action::Delete => {
            target
                .call_raw(|| {
                    let (b, id, ke1) = (b.clone(), id.to_vec(), ke1.clone());
                    async move { b.recover_start(&id, &ke1).await }
                })
                .await
        }
        _ => {
            target
                .call(|s| {
                    let (id, ke1) = (id.to_vec(), ke1.clone());
                    async move {
                        s.recover_start(request(
                            pb::RecoverStartRequest {
                                account_id: id,
                                ke1,
                            },
                            None,
                        ))
                        .await
                        .map(|r| r.into_inner())
                    }
                })
                .await
        }
    };
    let challenge = match answer {
        Ok(r) => match r.outcome {
            Some(Outcome::Challenge(c)) => c,
            Some(Outcome::Locked(_)) => {
                return Ok(vec![(Op::Charge, Seen::Answer(Answer::Locked))])
            }
            None => return Err("an empty recovery answer".into()),
        },
        Err(e) => return Ok(vec![(Op::Charge, seen_error(&e)?)]),
    };
    let mut seen = vec![
        (Op::Charge, Seen::Answer(Answer::Challenge)),
        // The challenge says nothing of the count: the owner asks.
        (Op::Status, status(target, id, bearer).await?),
    ];
    let ke2 = CredentialResponse::<Suite>::deserialize(&challenge.ke2)
        .map_err(|e| format!("KE2 does not parse: {e}"))?;
    let ksf = benchmark_ksf();
    let finished = start.state.finish(
        &mut OsRng,
        pw,
        ke2,
        ClientLoginFinishParameters::new(None, Default::default(), Some(&ksf)),
    );
    let (ke3, session_key) = match finished {
        Ok(f) => (f.message.serialize().to_vec(), Some(f.session_key.to_vec())),
        Err(_) => (Vec::new(), None),
    };
    if action == Action::Delete && session_key.is_some() {
        let answer = target
            .call(|s| {
                let (id, ke3) = (id.to_vec(), ke3.clone());
                let login_id = challenge.login_id.clone();
                async move {
                    s.delete(request(
                        pb::DeleteRequest {
                            account_id: id,
                            login_id,
                            ke3,
                        },
                        Some(bearer),
                    ))
                    .await
                }
            })
            .await;
        use pb::delete_response::Outcome as D;
        let answer = match answer {
            Ok(r) => match r.into_inner().outcome {
                Some(D::Deleted(_)) => Seen::Answer(Answer::Deleted),
                Some(D::Locked(_)) => Seen::Answer(Answer::Locked),
                Some(D::WrongPassword(_)) => {
                    return Err("a valid KE3 was answered `wrong password`".into())
                }
                None => return Err("an empty deletion answer".into()),
            },
            Err(e) => seen_error(&e)?,
        };
        seen.push((Op::Delete, answer));
        return Ok(seen);
    }
    let op = if session_key.is_some() {
        Op::FinishRight
    } else {
        Op::FinishWrong
    };
    let answer = match (broken, target.broken()) {
        (true, Some(b)) => {
            target
                .call_raw(|| {
                    let (b, login_id, ke3) = (b.clone(), challenge.login_id.clone(), ke3.clone());
                    async move { b.recover_finish(&login_id, &ke3).await }
                })
                .await
        }
        _ => {
            target
                .call(|s| {
                    let (login_id, ke3) = (challenge.login_id.clone(), ke3.clone());
                    async move {
                        s.recover_finish(request(pb::RecoverFinishRequest { login_id, ke3 }, None))
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await
        }
    };
    use pb::recover_finish_response::Outcome as F;
    let answer = match answer {
        Ok(r) => match r.outcome {
            Some(F::Recovered(r)) => {
                let key = session_key.ok_or("a secret released for a wrong password")?;
                let mut sealed = r.nonce;
                sealed.extend_from_slice(&r.sealed_secret);
                let plain = open_with(&key, RELEASE_INFO, RELEASE_AAD, &sealed)
                    .map_err(|_| "the released secret does not authenticate".to_string())?;
                let secret = secret_number(account, &plain)
                    .ok_or("the released secret is not one this account registered")?;
                Seen::Answer(Answer::Recovered { secret })
            }
            Some(F::WrongPassword(_)) => Seen::Answer(Answer::WrongPassword),
            Some(F::Locked(_)) => Seen::Answer(Answer::Locked),
            None => return Err("an empty finish answer".into()),
        },
        Err(e) => seen_error(&e)?,
    };
    seen.push((op, answer));
    Ok(seen)
}
