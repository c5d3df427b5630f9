//! The gRPC front end: validates input, serializes work per record, moves
//! sealed bytes between the store and the secure core, and maps outcomes to
//! answers. It never sees a key, a password or a stored secret.
//!
//! Ordering kept here (invariant 1): a recovery start commits the charged
//! record (flushed and covered by the token watermark) *before* it asks the
//! core for the KE2, so a KE2 never leaves the process for an uncounted
//! guess.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tonic::{Request, Response, Status};
use vault_proto::suite::{
    DEFAULT_MAX_GUESSES, MAX_ACCOUNT_ID_LEN, MAX_GUESSES_LIMIT, MAX_SECRET_LEN, SUITE_NAME,
};
use vault_proto::vault::v1 as pb;
use vault_proto::vault::v1::vault_server::Vault;

use crate::audit::{AuditLog, Event};
use crate::auth::Authorizer;
use crate::backend::{Backend, Hop};
use crate::core::record::Stored;
use crate::core::{Charge, Client, CoreError, Finish, Purpose, SecureCore, StatusView};
use crate::limits::{Limits, RecoveryLimits, Throttled};
use crate::partition::{Partition, PartitionSession};
use crate::shard::GroupId;
use crate::store::Write;
use crate::types::{LoginId, RecordId};

/// Largest gRPC message accepted. The biggest legitimate request (a
/// registration upload with a 128-byte secret and a 256-byte account id) is
/// under 1 KiB.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Longest OPAQUE message field accepted before parsing (the real ones are
/// 96–320 bytes for P-256).
const MAX_OPAQUE_MESSAGE: usize = 1024;

/// Per-record locks, striped so memory stays bounded whatever the number of
/// records. Two operations on one record never interleave.
const STRIPES: usize = 1024;

/// Metadata entry marking a request that a node forwarded, with its hop
/// ("group": to another group; "leader": to the group's leader).
pub const FORWARDED: &str = "x-vault-forwarded";

/// Metadata entry of a forwarded request naming the address of the client
/// that sent it to the first node, so the serving node limits that client
/// (and not the forwarding node). Only honoured with [`FORWARDED`], which
/// only nodes may send (the peer listener's gate takes nothing but a node's
/// certificate for the client API).
pub const CLIENT_ADDR: &str = "x-vault-client-addr";

/// Interceptor of the client listener: drops a forwarding mark and a
/// claimed client address. Only the peer listener honours them.
pub fn from_client(mut request: Request<()>) -> Result<Request<()>, Status> {
    request.metadata_mut().remove(FORWARDED);
    request.metadata_mut().remove(CLIENT_ADDR);
    Ok(request)
}

/// The address of the client behind `request`: the one a forwarding node
/// named, or else the connection's (with the PROXY protocol, the address the
/// load balancer named), reduced to its rate-limit bucket.
fn client_of<T>(request: &Request<T>) -> Client {
    let named = request
        .metadata()
        .get(FORWARDED)
        .and(request.metadata().get(CLIENT_ADDR))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<IpAddr>().ok());
    Client(
        named
            .or_else(|| request.remote_addr().map(|a| a.ip()))
            .map(crate::limits::bucket),
    )
}

/// Length of a login id on the wire: the group serving the login (u64
/// big-endian), then the secure core's 16-byte login id. The group lets any
/// node route a RecoverFinish, which names no account.
pub const WIRE_LOGIN_LEN: usize = 24;

/// Hands the request to the node [`Backend::route`] names, if any, and
/// returns its answer unchanged.
macro_rules! route {
    ($self:ident, $request:ident, $group:expr, $method:ident) => {
        let hop = Hop::from_mark(
            $request
                .metadata()
                .get(FORWARDED)
                .and_then(|v| v.to_str().ok()),
        );
        if let Some((mut next, hop)) = $self.inner.backend.route(hop, $group).await? {
            return next.$method(forwarded(&$request, hop)).await;
        }
    };
}

/// A copy of `request` for the next node: the message, the owner's bearer
/// token, and the forwarding mark (nothing else of the original metadata).
fn forwarded<T: Clone>(request: &Request<T>, hop: Hop) -> Request<T> {
    let mut r = Request::new(request.get_ref().clone());
    for key in ["authorization", crate::telemetry::REQUEST_ID] {
        if let Some(value) = request.metadata().get(key) {
            r.metadata_mut().insert(key, value.clone());
        }
    }
    r.metadata_mut().insert(
        FORWARDED,
        tonic::metadata::MetadataValue::from_static(hop.mark()),
    );
    if let Client(Some(addr)) = client_of(request) {
        if let Ok(value) = addr.to_string().parse() {
            r.metadata_mut().insert(CLIENT_ADDR, value);
        }
    }
    r
}

fn wire_login(group: GroupId, login: &LoginId) -> Vec<u8> {
    let mut v = group.to_be_bytes().to_vec();
    v.extend_from_slice(&login.0);
    v
}

fn parse_wire_login(bytes: &[u8]) -> Result<(GroupId, LoginId), Status> {
    let bad = || Status::invalid_argument(format!("login_id must be {WIRE_LOGIN_LEN} bytes"));
    if bytes.len() != WIRE_LOGIN_LEN {
        return Err(bad());
    }
    let (group, login) = bytes.split_at(8);
    let group = GroupId::from_be_bytes(group.try_into().map_err(|_| bad())?);
    Ok((group, LoginId::from_bytes(login).ok_or_else(bad)?))
}

#[derive(Debug)]
struct Inner {
    core: SecureCore,
    partition: Arc<Partition>,
    backend: Backend,
    auth: Authorizer,
    stripes: Vec<Arc<Mutex<()>>>,
    limits: RecoveryLimits,
    audit: Option<Arc<AuditLog>>,
}

/// The client API service.
#[derive(Debug, Clone)]
pub struct VaultService {
    inner: Arc<Inner>,
}

fn core_status(e: CoreError) -> Status {
    match e {
        CoreError::InvalidMessage(_) | CoreError::InvalidArgument(_) => {
            Status::invalid_argument(e.to_string())
        }
        CoreError::UnknownLogin | CoreError::RecordChanged => {
            Status::failed_precondition(e.to_string())
        }
        CoreError::Busy => Status::resource_exhausted(e.to_string()),
        CoreError::Tampered | CoreError::Stale => Status::data_loss(e.to_string()),
        CoreError::Token(t) => {
            tracing::error!(error = %t, "HSM operation failed");
            Status::internal("HSM operation failed")
        }
    }
}

fn check_account(account_id: &[u8]) -> Result<(), Status> {
    if account_id.is_empty() || account_id.len() > MAX_ACCOUNT_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "account_id must be 1..={MAX_ACCOUNT_ID_LEN} bytes"
        )));
    }
    Ok(())
}

fn check_opaque(name: &str, msg: &[u8]) -> Result<(), Status> {
    if msg.is_empty() || msg.len() > MAX_OPAQUE_MESSAGE {
        return Err(Status::invalid_argument(format!(
            "{name} is missing or too long"
        )));
    }
    Ok(())
}

impl VaultService {
    pub fn new(
        partition: Arc<Partition>,
        backend: Backend,
        auth: Authorizer,
    ) -> Result<Self, CoreError> {
        let core = SecureCore::new(partition.ake_public_key())?;
        Ok(VaultService {
            inner: Arc::new(Inner {
                core,
                partition,
                backend,
                auth,
                stripes: (0..STRIPES).map(|_| Arc::new(Mutex::new(()))).collect(),
                limits: RecoveryLimits::new(Limits::default()),
                audit: None,
            }),
        })
    }

    /// Rate limits on recovery starts (the defaults otherwise). Call before
    /// the service is cloned.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.limits = RecoveryLimits::new(limits);
        }
        self
    }

    /// Records security events in `audit`. Call before the service is
    /// cloned.
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.audit = Some(audit);
        }
        self
    }

    fn audit(&self, event: Event) {
        let m = crate::telemetry::metrics();
        match &event {
            Event::Registered { .. } => m.registrations.inc(),
            Event::GuessCharged { .. } => m.guesses_charged.inc(),
            Event::WrongPassword { .. } => m.wrong_passwords.inc(),
            Event::Recovered { .. } => m.recoveries.inc(),
            Event::Locked { .. } => m.lockouts.inc(),
            Event::Deleted { .. } => m.deletions.inc(),
            _ => 0,
        };
        if let Some(log) = &self.inner.audit {
            log.record(event);
        }
    }

    pub fn server_public_key(&self) -> [u8; 33] {
        self.inner.core.server_public_key()
    }

    /// Runs `f` with a token session, on the calling worker thread.
    ///
    /// Each call is a few token operations (tens to a few hundred µs of
    /// CPU). Handing them to a blocking thread cost more than the work: two
    /// thread switches per call, several calls per recovery. The runtime has
    /// a worker per core, so other requests keep running meanwhile.
    fn with_token<T, F>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(&SecureCore, &PartitionSession) -> Result<T, CoreError>,
    {
        let session = self
            .inner
            .partition
            .session()
            .map_err(CoreError::Token)
            .map_err(core_status)?;
        f(&self.inner.core, &session).map_err(core_status)
    }

    /// The lock serializing the operations on record `id` (and on the
    /// records sharing its stripe), from read to commit.
    async fn lock_stripe(&self, id: &RecordId) -> OwnedMutexGuard<()> {
        let i = usize::from(u16::from_be_bytes([id.0[0], id.0[1]])) % STRIPES;
        self.inner.stripes[i].clone().lock_owned().await
    }

    fn record_id(&self, account_id: &[u8]) -> Result<RecordId, Status> {
        self.with_token(|core, t| core.record_id(t, account_id))
    }

    /// The record, read for a change committed as a compare-and-set
    /// ([`Backend::read_for_update`]).
    fn stored(&self, id: &RecordId) -> Result<Stored, Status> {
        self.inner.backend.read_for_update(id)
    }

    fn reserve(&self, stored: &Stored) -> crate::types::Seq {
        self.inner.backend.reserve(stored)
    }

    async fn commit(
        &self,
        seq: crate::types::Seq,
        write: Write,
        expect: Option<crate::types::Seq>,
    ) -> Result<(), Status> {
        self.inner.backend.commit(seq, write, expect).await
    }

    /// Commits the second write of a recovery (the reset after a verified
    /// KE3, or the lockout after the last wrong one) without holding up the
    /// answer: losing it only ever leaves the record with fewer guesses
    /// than it would have had, never more, because the guess was charged
    /// and committed before the KE2 was released, and a write that arrives
    /// late applies only to the very record it was computed from (a
    /// compare-and-set on its sequence number). The stripe stays locked
    /// until the write is settled, so the next operation on the record on
    /// this node (a recovery, a Status) sees it.
    fn commit_behind(
        &self,
        guard: OwnedMutexGuard<()>,
        seq: crate::types::Seq,
        write: Write,
        expect: Option<crate::types::Seq>,
    ) {
        let service = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(status) = service.commit(seq, write, expect).await {
                crate::telemetry::metrics().second_writes_lost.inc();
                tracing::warn!(
                    code = ?status.code(),
                    "a recovery's second write (reset or lockout) did not commit: the record \
                     keeps the guesses it was charged"
                );
            }
        });
    }

    /// The record of an account and the group holding it.
    async fn locate(&self, account_id: &[u8]) -> Result<(RecordId, GroupId), Status> {
        check_account(account_id)?;
        let id = self.record_id(account_id)?;
        Ok((id, self.inner.backend.group_of(&id).await?))
    }

    /// Shared path of RecoverFinish and Delete.
    async fn finish(
        &self,
        login: LoginId,
        ke3: Vec<u8>,
        purpose: Purpose,
        expect: Option<RecordId>,
    ) -> Result<Finish, Status> {
        if ke3.len() > MAX_OPAQUE_MESSAGE {
            return Err(Status::invalid_argument("ke3 is too long"));
        }
        let id = self
            .inner
            .core
            .pending_record(&login, Instant::now())
            .ok_or_else(|| core_status(CoreError::UnknownLogin))?;
        if expect.is_some_and(|e| e != id) {
            return Err(Status::failed_precondition(
                "this login belongs to another account",
            ));
        }
        let guard = self.lock_stripe(&id).await;
        let stored = self.stored(&id)?;
        let seq = self.reserve(&stored);
        let expect = stored.index;
        let outcome = self.with_token(move |core, t| {
            core.finish(t, &login, &ke3, &stored, purpose, seq, Instant::now())
        })?;
        match &outcome {
            Finish::Recovered { write, .. }
            | Finish::Lock { write }
            | Finish::Destroy { write } => {
                self.commit_behind(guard, seq, Write::Put(id, write.clone()), expect)
            }
            Finish::Delete => self.commit(seq, Write::Delete(id), expect).await?,
            Finish::WrongPassword { .. } | Finish::Locked => {
                // No write backs these answers: the view they come from must
                // be current (a deposed leader, or a new one that has not
                // applied everything committed, would answer from a stale
                // record), as for a locked RecoverStart.
                self.inner.backend.confirm().await?;
                if self.stored(&id)?.index != expect {
                    return Err(Status::aborted(
                        "the record changed while this request ran; start the recovery again",
                    ));
                }
            }
        }
        tracing::info!(record = %id, outcome = finish_name(&outcome), "login finished");
        let record = Event::record(&id);
        match &outcome {
            Finish::Recovered { .. } => self.audit(Event::Recovered { record }),
            Finish::Delete => self.audit(Event::Deleted { record }),
            Finish::Lock { .. } | Finish::Destroy { .. } => self.audit(Event::Locked { record }),
            Finish::WrongPassword { guesses_remaining } => self.audit(Event::WrongPassword {
                record,
                guesses_remaining: *guesses_remaining,
            }),
            Finish::Locked => {}
        }
        Ok(outcome)
    }
}

/// RESOURCE_EXHAUSTED with a retry hint: in the message, and in seconds in
/// the `retry-after` metadata entry.
fn throttled(t: Throttled) -> Status {
    let secs = t.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    tracing::debug!(scope = t.scope, secs, "recovery start throttled");
    crate::telemetry::metrics().throttled.inc();
    let mut status = Status::resource_exhausted(format!(
        "too many recovery attempts for this {}; retry in {secs} s",
        t.scope
    ));
    status
        .metadata_mut()
        .insert("retry-after", tonic::metadata::MetadataValue::from(secs));
    status
}

fn finish_name(f: &Finish) -> &'static str {
    match f {
        Finish::Recovered { .. } => "recovered",
        Finish::Delete => "deleted",
        Finish::WrongPassword { .. } => "wrong_password",
        Finish::Lock { .. } => "locked_now",
        Finish::Destroy { .. } => "destroyed_now",
        Finish::Locked => "locked",
    }
}

fn locked() -> pb::Locked {
    pb::Locked {}
}

#[tonic::async_trait]
impl Vault for VaultService {
    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        let roles = self.inner.backend.roles().await;
        let (group_id, shard_map_version) = self.inner.backend.shard();
        Ok(Response::new(pb::GetInfoResponse {
            group_id,
            shard_map_version,
            voters: roles.voters,
            node_id: roles.node_id,
            leader_id: roles.leader_id,
            applied_index: roles.applied_index,
            snapshot_index: roles.snapshot_index,
            cipher_suite: SUITE_NAME.to_owned(),
            server_public_key: self.server_public_key().to_vec(),
            max_secret_len: MAX_SECRET_LEN as u32,
            max_guesses_limit: u32::from(MAX_GUESSES_LIMIT),
            default_max_guesses: u32::from(DEFAULT_MAX_GUESSES),
            max_account_id_len: MAX_ACCOUNT_ID_LEN as u32,
        }))
    }

    async fn register_start(
        &self,
        request: Request<pb::RegisterStartRequest>,
    ) -> Result<Response<pb::RegisterStartResponse>, Status> {
        let (id, group) = self.locate(&request.get_ref().account_id).await?;
        route!(self, request, group, register_start);
        let (metadata, _, req) = request.into_parts();
        self.inner.auth.check(&metadata, &req.account_id)?;
        check_opaque("registration_request", &req.registration_request)?;
        let message = req.registration_request;
        let (response, generation) =
            self.with_token(move |core, t| core.registration_start(t, &id, &message))?;
        Ok(Response::new(pb::RegisterStartResponse {
            registration_response: response,
            registration_id: generation.to_vec(),
        }))
    }

    async fn register_finish(
        &self,
        request: Request<pb::RegisterFinishRequest>,
    ) -> Result<Response<pb::RegisterFinishResponse>, Status> {
        let (id, group) = self.locate(&request.get_ref().account_id).await?;
        route!(self, request, group, register_finish);
        let (metadata, _, req) = request.into_parts();
        self.inner.auth.check(&metadata, &req.account_id)?;
        check_opaque("registration_upload", &req.registration_upload)?;
        let _guard = self.lock_stripe(&id).await;
        let stored = self.stored(&id)?;
        let seq = self.reserve(&stored);
        let (upload, secret, max) = (req.registration_upload, req.secret, req.max_guesses);
        let generation = req.registration_id;
        let (sealed, max_guesses) = self.with_token(move |core, t| {
            core.registration_finish(t, &id, &generation, &upload, &secret, max, seq)
        })?;
        self.commit(seq, Write::Put(id, sealed), stored.index)
            .await?;
        tracing::info!(record = %id, max_guesses, "registered");
        self.audit(Event::Registered {
            record: Event::record(&id),
            max_guesses,
        });
        Ok(Response::new(pb::RegisterFinishResponse {
            max_guesses: u32::from(max_guesses),
        }))
    }

    async fn recover_start(
        &self,
        request: Request<pb::RecoverStartRequest>,
    ) -> Result<Response<pb::RecoverStartResponse>, Status> {
        let client = client_of(&request);
        let entry = request.metadata().get(FORWARDED).is_none();
        if entry {
            // Straight from a client (the client listener drops the mark):
            // the node it reached limits its address...
            self.inner.limits.address(client.0).map_err(throttled)?;
        }
        let (id, group) = self.locate(&request.get_ref().account_id).await?;
        route!(self, request, group, recover_start);
        let req = request.into_inner();
        check_opaque("ke1", &req.ke1)?;
        // ...and so does the node serving the record, whichever node it
        // came through, so N entry nodes do not give N times the budget.
        // Before anything is read or charged, so a refused start costs no
        // guess.
        if !entry {
            self.inner.limits.address(client.0).map_err(throttled)?;
        }
        self.inner.limits.account(&id.0).map_err(throttled)?;
        let _guard = self.lock_stripe(&id).await;
        let stored = self.stored(&id)?;
        let seq = self.reserve(&stored);
        let expect = stored.index;
        let ke1 = req.ke1;
        let charge = self.with_token(move |core, t| {
            core.charge_guess(t, (&id, client), &stored, &ke1, seq, Instant::now())
        })?;
        let outcome = match charge {
            Charge::Charged { write, ticket } => {
                // Invariant 1: durable before the KE2 exists.
                self.commit(seq, Write::Put(id, write.clone()), expect)
                    .await?;
                let challenge = self
                    .with_token(move |core, t| core.evaluate(t, ticket, &write, Instant::now()))?;
                tracing::info!(record = %id, remaining = challenge.guesses_remaining, "guess charged");
                self.audit(Event::GuessCharged {
                    record: Event::record(&id),
                    guesses_remaining: challenge.guesses_remaining,
                });
                pb::recover_start_response::Outcome::Challenge(pb::Challenge {
                    login_id: wire_login(group, &challenge.login_id),
                    ke2: challenge.ke2,
                })
            }
            Charge::Lock { write } => {
                self.commit(seq, Write::Put(id, write), expect).await?;
                tracing::info!(record = %id, "guess limit reached: record locked");
                self.audit(Event::Locked {
                    record: Event::record(&id),
                });
                pb::recover_start_response::Outcome::Locked(locked())
            }
            Charge::Locked => {
                // No write backs this answer: make sure the lock is current.
                // The record was read before this node confirmed that it
                // leads and has applied everything committed; a new leader
                // may have read it before applying a registration that
                // replaced the lock. So read it again after confirming.
                self.inner.backend.confirm().await?;
                if self.stored(&id)?.index != expect {
                    return Err(Status::aborted(
                        "the record changed while this request ran; retry",
                    ));
                }
                pb::recover_start_response::Outcome::Locked(locked())
            }
        };
        Ok(Response::new(pb::RecoverStartResponse {
            outcome: Some(outcome),
        }))
    }

    async fn recover_finish(
        &self,
        request: Request<pb::RecoverFinishRequest>,
    ) -> Result<Response<pb::RecoverFinishResponse>, Status> {
        use pb::recover_finish_response::Outcome;
        let (group, login) = parse_wire_login(&request.get_ref().login_id)?;
        route!(self, request, group, recover_finish);
        let req = request.into_inner();
        let outcome = match self.finish(login, req.ke3, Purpose::Recover, None).await? {
            Finish::Recovered { release, .. } => {
                let (nonce, sealed) = release.split_at(12);
                Outcome::Recovered(pb::Recovered {
                    nonce: nonce.to_vec(),
                    sealed_secret: sealed.to_vec(),
                })
            }
            Finish::WrongPassword { .. } | Finish::Destroy { .. } => {
                Outcome::WrongPassword(pb::WrongPassword {})
            }
            Finish::Lock { .. } | Finish::Locked => Outcome::Locked(locked()),
            Finish::Delete => return Err(Status::internal("unexpected deletion")),
        };
        Ok(Response::new(pb::RecoverFinishResponse {
            outcome: Some(outcome),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        use pb::delete_response::Outcome;
        let (id, group) = self.locate(&request.get_ref().account_id).await?;
        route!(self, request, group, delete);
        let (metadata, _, req) = request.into_parts();
        self.inner.auth.check(&metadata, &req.account_id)?;
        if req.ke3.is_empty() {
            return Err(Status::invalid_argument(
                "deletion needs a KE3 proving the password",
            ));
        }
        let (login_group, login) = parse_wire_login(&req.login_id)?;
        if login_group != group {
            return Err(Status::failed_precondition(
                "this login belongs to another account",
            ));
        }
        let outcome = match self
            .finish(login, req.ke3, Purpose::Delete, Some(id))
            .await?
        {
            Finish::Delete => Outcome::Deleted(pb::Deleted {}),
            Finish::WrongPassword { .. } | Finish::Destroy { .. } => {
                Outcome::WrongPassword(pb::WrongPassword {})
            }
            Finish::Lock { .. } | Finish::Locked => Outcome::Locked(locked()),
            Finish::Recovered { .. } => return Err(Status::internal("unexpected recovery")),
        };
        Ok(Response::new(pb::DeleteResponse {
            outcome: Some(outcome),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        use pb::status_response::State;
        let (id, group) = self.locate(&request.get_ref().account_id).await?;
        route!(self, request, group, status);
        let (metadata, _, req) = request.into_parts();
        self.inner.auth.check(&metadata, &req.account_id)?;
        // After a reset or lockout still committing on this node: the
        // record as it is once that write is settled.
        let _guard = self.lock_stripe(&id).await;
        let stored = self.inner.backend.read(&id).await?;
        let view = self.with_token(move |core, t| core.status(t, &id, &stored))?;
        let (state, guesses_remaining, max_guesses) = match view {
            StatusView::NotRegistered => (State::NotRegistered, 0, 0),
            StatusView::Registered { remaining, max } => {
                (State::Registered, u32::from(remaining), u32::from(max))
            }
            StatusView::Locked { max } => (State::Locked, 0, u32::from(max)),
        };
        Ok(Response::new(pb::StatusResponse {
            state: state as i32,
            guesses_remaining,
            max_guesses,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_listener_drops_a_forwarding_mark() {
        let mut request = Request::new(());
        request.metadata_mut().insert(
            FORWARDED,
            tonic::metadata::MetadataValue::from_static("leader"),
        );
        let request = from_client(request).expect("passes on");
        assert!(request.metadata().get(FORWARDED).is_none());
    }
}
