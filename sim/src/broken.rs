//! A deliberately broken recovery path, to show that the oracle catches a
//! vault that releases the KE2 before the guess it charges is durable. It
//! is the real service's recovery with one change: the charged record is
//! committed in the background, after the answer left.

use std::sync::Arc;
use std::time::Instant;

use hsm_vault::backend::Backend;
use hsm_vault::core::{Charge, Client, Finish, Purpose, SecureCore};
use hsm_vault::partition::Partition;
use hsm_vault::store::Write;
use hsm_vault::types::{LoginId, RecordId};
use tonic::Status;
use vault_proto::vault::v1 as pb;

#[allow(missing_debug_implementations)]
pub struct Broken {
    core: SecureCore,
    partition: Arc<Partition>,
    backend: Backend,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Broken {
    pub fn new(partition: Arc<Partition>, backend: Backend) -> Result<Self, Status> {
        Ok(Broken {
            core: SecureCore::new(partition.ake_public_key()).map_err(internal)?,
            partition,
            backend,
        })
    }

    fn record_id(&self, account: &[u8]) -> Result<RecordId, Status> {
        let session = self.partition.session().map_err(internal)?;
        self.core.record_id(&session, account).map_err(internal)
    }

    pub async fn recover_start(
        self: &Arc<Self>,
        account: &[u8],
        ke1: &[u8],
    ) -> Result<pb::RecoverStartResponse, Status> {
        use pb::recover_start_response::Outcome;
        if self
            .backend
            .route(hsm_vault::backend::Hop::Leader, 1)
            .await?
            .is_some()
        {
            return Err(Status::unavailable("not the leader"));
        }
        let id = self.record_id(account)?;
        let stored = self.backend.read_for_update(&id)?;
        let seq = self.backend.reserve(&stored);
        let expect = stored.index;
        let session = self.partition.session().map_err(internal)?;
        let charge = self
            .core
            .charge_guess(
                &session,
                (&id, Client::default()),
                &stored,
                ke1,
                seq,
                Instant::now(),
            )
            .map_err(internal)?;
        let outcome = match charge {
            Charge::Charged { write, ticket } => {
                // THE BUG: the KE2 is made and released before the charge
                // is committed; the commit runs on after the answer.
                let challenge = self
                    .core
                    .evaluate(&session, ticket, &write, Instant::now())
                    .map_err(internal)?;
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let _ = this
                        .backend
                        .commit(seq, Write::Put(id, write), expect)
                        .await;
                });
                let mut login_id = 1u64.to_be_bytes().to_vec();
                login_id.extend_from_slice(&challenge.login_id.0);
                Outcome::Challenge(pb::Challenge {
                    login_id,
                    ke2: challenge.ke2,
                })
            }
            Charge::Lock { write } => {
                self.backend
                    .commit(seq, Write::Put(id, write), expect)
                    .await?;
                Outcome::Locked(pb::Locked {})
            }
            Charge::Locked => Outcome::Locked(pb::Locked {}),
        };
        Ok(pb::RecoverStartResponse {
            outcome: Some(outcome),
        })
    }

    pub async fn recover_finish(
        &self,
        login_id: &[u8],
        ke3: &[u8],
    ) -> Result<pb::RecoverFinishResponse, Status> {
        use pb::recover_finish_response::Outcome;
        let login = login_id
            .get(8..)
            .and_then(LoginId::from_bytes)
            .ok_or_else(|| Status::invalid_argument("login id"))?;
        let id = self
            .core
            .pending_record(&login, Instant::now())
            .ok_or_else(|| Status::failed_precondition("unknown login"))?;
        let stored = self.backend.read_for_update(&id)?;
        let seq = self.backend.reserve(&stored);
        let expect = stored.index;
        let session = self.partition.session().map_err(internal)?;
        let finish = self
            .core
            .finish(
                &session,
                &login,
                ke3,
                &stored,
                Purpose::Recover,
                seq,
                Instant::now(),
            )
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let outcome = match finish {
            Finish::Recovered { write, release } => {
                self.backend
                    .commit(seq, Write::Put(id, write), expect)
                    .await?;
                let (nonce, sealed) = release.split_at(12);
                Outcome::Recovered(pb::Recovered {
                    nonce: nonce.to_vec(),
                    sealed_secret: sealed.to_vec(),
                })
            }
            Finish::Lock { write } => {
                self.backend
                    .commit(seq, Write::Put(id, write), expect)
                    .await?;
                Outcome::Locked(pb::Locked {})
            }
            Finish::Destroy { write } => {
                self.backend
                    .commit(seq, Write::Put(id, write), expect)
                    .await?;
                Outcome::WrongPassword(pb::WrongPassword {})
            }
            Finish::Locked => Outcome::Locked(pb::Locked {}),
            Finish::WrongPassword { .. } => Outcome::WrongPassword(pb::WrongPassword {}),
            Finish::Delete => return Err(Status::internal("unexpected deletion")),
        };
        Ok(pb::RecoverFinishResponse {
            outcome: Some(outcome),
        })
    }
}
