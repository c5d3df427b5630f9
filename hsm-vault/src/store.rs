//! Durable storage of sealed records in sled, with group commit, anchored in
//! the token so that the host cannot roll it back.
//!
//! Layout (one sled tree, keys of distinct lengths):
//!
//! ```text
//! record id (32 B)        → sealed record
//! "i" || record id (33 B) → sequence number of the current record (u64be)
//! "head" (4 B)            → highest committed sequence number (u64be)
//! ```
//!
//! Invariants:
//! - The store only ever holds sealed bytes and sequence numbers.
//! - [`Store::commit`] returns only after the write is flushed *and* the
//!   token's anchor covers it (`core::index`). Callers release a KE2 or
//!   acknowledge a write only after that (invariants 1 and 8).
//! - Every write carries a fresh sequence number reserved with
//!   [`Store::reserve`]; the sealed record is bound to it, and the index
//!   entry written in the same atomic batch names it.
//! - On open, the index must match the token's digest; a store rolled back
//!   or with its index altered is refused (fail closed).
//!
//! Concurrent commits are grouped: one batch, one flush and one pair of
//! anchor steps serve every write that arrived while the previous flush
//! ran (under load, one batch's committed step and the next one's pending
//! step share a label update). Writes to one record never share a batch:
//! the service holds the record's lock until its commit returns.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::core::index::{self, Anchor, AnchorState, OpenCheck};
use crate::core::memo::{MacMemo, Toggle};
use crate::core::record::{SealedRecord, Stored};
use crate::partition::{Partition, PartitionError};
use crate::types::{RecordId, Seq};

/// Key of the head entry. Record keys are 32 bytes, so it cannot collide.
const HEAD_KEY: &[u8] = b"head";
/// Prefix of index keys (33 bytes with the record id).
const INDEX_PREFIX: u8 = b'i';

/// Writes grouped into one flush at most. Bounds the batch (and the latency
/// of its first member) while amortizing the ~0.1–0.4 ms flush.
const MAX_BATCH: usize = 256;

/// Commits waiting for the writer. Beyond this, callers wait for room
/// (backpressure) instead of growing memory.
const COMMIT_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "record store is corrupt (its checksums fail): refusing to serve from it; \
         restore the node's data from its replicas ({0})"
    )]
    Corrupt(String),
    #[error("storage error: {0}")]
    Sled(sled::Error),
    #[error(
        "storage was rolled back: it ends at sequence {store}, but the token has seen {token}; \
         refusing to serve stale state"
    )]
    RolledBack { store: u64, token: u64 },
    #[error(
        "storage index does not match the digest kept in the token: records were added, \
         removed or rolled back behind the vault's back; refusing to serve"
    )]
    Altered,
    #[error("storage entry is malformed: {0}")]
    Malformed(&'static str),
    #[error("token anchor: {0}")]
    Token(#[from] PartitionError),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("the commit writer has stopped")]
    WriterGone,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            e => StoreError::Sled(e),
        }
    }
}

/// Named crash points for fault tests: the node aborts (as with `kill -9`)
/// at the chosen step of a group commit. Read once from `HSM_VAULT_CRASH_POINT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the token records the pending anchor, before the batch is
    /// applied.
    AfterAnchorPending,
    /// After the batch is flushed, before the token marks it committed.
    AfterFlush,
}

impl CrashPoint {
    fn from_env() -> Option<Self> {
        match std::env::var("HSM_VAULT_CRASH_POINT").ok()?.as_str() {
            "after-anchor-pending" => Some(CrashPoint::AfterAnchorPending),
            "after-flush" => Some(CrashPoint::AfterFlush),
            _ => None,
        }
    }

    fn reached(crash: Option<CrashPoint>, here: CrashPoint) {
        if crash == Some(here) {
            tracing::warn!(?here, "crash point reached: aborting");
            std::process::abort();
        }
    }
}

/// A change to make durable.
#[derive(Debug)]
pub enum Write {
    Put(RecordId, SealedRecord),
    Delete(RecordId),
}

impl Write {
    fn id(&self) -> &RecordId {
        match self {
            Write::Put(id, _) | Write::Delete(id) => id,
        }
    }
}

struct CommitRequest {
    seq: Seq,
    write: Write,
    done: oneshot::Sender<Result<(), String>>,
}

/// The vault's record store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    next_seq: Arc<AtomicU64>,
    tx: mpsc::Sender<CommitRequest>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn index_key(id: &RecordId) -> [u8; 33] {
    let mut k = [INDEX_PREFIX; 33];
    k[1..].copy_from_slice(&id.0);
    k
}

fn read_u64(v: &[u8], what: &'static str) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(
        v.try_into().map_err(|_| StoreError::Malformed(what))?,
    ))
}

fn read_index(db: &sled::Db, id: &RecordId) -> Result<Option<Seq>, StoreError> {
    db.get(index_key(id))?
        .map(|v| read_u64(&v, "index entry").map(Seq))
        .transpose()
}

/// The store's own anchor: its head and the digest of its index.
fn store_anchor(db: &sled::Db, partition: &Arc<Partition>) -> Result<Anchor, StoreError> {
    let head = match db.get(HEAD_KEY)? {
        None => 0,
        Some(v) => read_u64(&v, "head")?,
    };
    let session = partition.session()?;
    let mut digest = [0u8; 32];
    for entry in db.scan_prefix([INDEX_PREFIX]) {
        let (k, v) = entry?;
        if k.len() != 33 {
            continue;
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&k[1..]);
        let seq = Seq(read_u64(&v, "index entry")?);
        index::toggle(&session, &mut digest, &RecordId(id), seq)?;
    }
    Ok(Anchor {
        seq: Seq(head),
        digest,
    })
}

fn token_state(partition: &Arc<Partition>) -> Result<AnchorState, StoreError> {
    let bytes = partition.session()?.anchor_state()?;
    AnchorState::decode(&bytes).ok_or(StoreError::Malformed("token anchor"))
}

fn set_token_state(partition: &Arc<Partition>, state: &AnchorState) -> Result<(), StoreError> {
    Ok(partition.session()?.set_anchor_state(&state.encode())?)
}

impl Store {
    /// Opens the store and checks it against the token's anchor. Must be
    /// called inside a tokio runtime (it starts the commit writer).
    pub fn open(dir: &Path, partition: Arc<Partition>) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open()?;
        let store = store_anchor(&db, &partition)?;
        let state = token_state(&partition)?;
        let anchor = match index::check_open(&state, store) {
            OpenCheck::Current => store,
            OpenCheck::RollForward(a) => {
                tracing::warn!(seq = a.seq.0, "completing a commit interrupted by a crash");
                set_token_state(
                    &partition,
                    &AnchorState {
                        committed: a,
                        pending: None,
                    },
                )?;
                a
            }
            OpenCheck::DropPending => {
                set_token_state(
                    &partition,
                    &AnchorState {
                        committed: store,
                        pending: None,
                    },
                )?;
                store
            }
            OpenCheck::RolledBack { store, token } => {
                return Err(StoreError::RolledBack {
                    store: store.0,
                    token: token.0,
                })
            }
            OpenCheck::Altered => return Err(StoreError::Altered),
        };
        let (tx, rx) = mpsc::channel(COMMIT_QUEUE);
        tokio::spawn(writer(
            db.clone(),
            partition,
            anchor,
            CrashPoint::from_env(),
            rx,
        ));
        Ok(Store {
            db,
            next_seq: Arc::new(AtomicU64::new(anchor.seq.0 + 1)),
            tx,
        })
    }

    /// Reserves the sequence number of the next write to a record.
    pub fn reserve(&self) -> Seq {
        Seq(self.next_seq.fetch_add(1, Ordering::SeqCst))
    }

    pub fn get(&self, id: &RecordId) -> Result<Stored, StoreError> {
        Ok(Stored {
            record: self
                .db
                .get(id.0)?
                .map(|v| SealedRecord::from_stored(v.to_vec())),
            index: read_index(&self.db, id)?,
        })
    }

    /// Makes `write` durable (flushed, and covered by the token anchor).
    pub async fn commit(&self, seq: Seq, write: Write) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(CommitRequest { seq, write, done })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Commit(e)),
            Err(_) => Err(StoreError::WriterGone),
        }
    }
}

/// The group-commit writer. Each batch takes two anchor steps in the token
/// (pending before it is applied, committed after its flush), but under load
/// the committed mark of one batch and the pending mark of the next are one
/// label update: `{committed: N, pending: N+1}`. A batch's writers are
/// answered only once the token marks it committed, so a store restored to
/// an earlier state is still refused at open, and a label update (a token
/// file rewrite on SoftHSM) is saved per batch.
async fn writer(
    db: sled::Db,
    partition: Arc<Partition>,
    mut anchor: Anchor,
    crash: Option<CrashPoint>,
    mut rx: mpsc::Receiver<CommitRequest>,
) {
    // A batch applied and flushed, waiting for its committed mark.
    let mut flushed: Option<(Vec<CommitRequest>, Anchor)> = None;
    let mut memo = MacMemo::new(MacMemo::CAPACITY);
    loop {
        let mut next_reqs = Vec::with_capacity(MAX_BATCH);
        if flushed.is_none() {
            match rx.recv().await {
                Some(first) => next_reqs.push(first),
                None => return,
            }
        }
        drain(&mut rx, &mut next_reqs);
        let committed = flushed.as_ref().map_or(anchor, |(_, a)| *a);
        let result = if next_reqs.is_empty() {
            // Nothing else queued: mark the flushed batch committed alone.
            set_token_state(
                &partition,
                &AnchorState {
                    committed,
                    pending: None,
                },
            )
            .map(|()| None)
        } else {
            begin_batch(&db, &partition, &mut memo, committed, &next_reqs).map(Some)
        };
        let result = match result {
            Ok(None) => Ok(None),
            Ok(Some((batch, next))) => {
                // The flushed batch is covered by the token: answer it.
                answer(flushed.take().map(|(r, _)| r), &Ok(()));
                anchor = committed;
                finish_batch(&db, crash, batch).await.map(|()| Some(next))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(next)) => flushed = Some((next_reqs, next)),
            Ok(None) => {
                answer(flushed.take().map(|(r, _)| r), &Ok(()));
                anchor = committed;
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "commit failed; the store stops accepting writes"
                );
                let reply = Err(e.to_string());
                answer(flushed.take().map(|(r, _)| r), &reply);
                answer(Some(next_reqs), &reply);
                // The batch may be applied in memory but not durable, or
                // durable but not anchored: fail closed. Every later commit
                // gets `WriterGone` until the node restarts and re-checks
                // its store against the token.
                return;
            }
        }
    }
}

fn drain(rx: &mut mpsc::Receiver<CommitRequest>, reqs: &mut Vec<CommitRequest>) {
    while reqs.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(r) => reqs.push(r),
            Err(_) => break,
        }
    }
}

fn answer(reqs: Option<Vec<CommitRequest>>, reply: &Result<(), String>) {
    for req in reqs.into_iter().flatten() {
        let _ = req.done.send(reply.clone());
    }
}

/// First half of a group commit: the batch, the anchor it leads to, and the
/// token's mark `{committed, pending: next}`. The token work runs on the
/// writer task itself (a few HMACs and one label update), cheaper than two
/// thread switches to a blocking thread.
fn begin_batch(
    db: &sled::Db,
    partition: &Arc<Partition>,
    memo: &mut MacMemo,
    committed: Anchor,
    reqs: &[CommitRequest],
) -> Result<(sled::Batch, Anchor), StoreError> {
    let mut batch = sled::Batch::default();
    let mut next = committed;
    let session = partition.session()?;
    for req in reqs {
        let id = *req.write.id();
        if let Some(old) = read_index(db, &id)? {
            index::toggle_memo(&session, &mut next.digest, (&id, old), memo, Toggle::Out)?;
        }
        match &req.write {
            Write::Put(id, sealed) => {
                index::toggle_memo(&session, &mut next.digest, (id, req.seq), memo, Toggle::In)?;
                batch.insert(&id.0[..], sealed.as_bytes());
                batch.insert(&index_key(id)[..], &req.seq.0.to_be_bytes()[..]);
            }
            Write::Delete(id) => {
                batch.remove(&id.0[..]);
                batch.remove(&index_key(id)[..]);
            }
        }
        next.seq = next.seq.max(req.seq);
    }
    drop(session);
    batch.insert(HEAD_KEY, &next.seq.0.to_be_bytes()[..]);
    set_token_state(
        partition,
        &AnchorState {
            committed,
            pending: Some(next),
        },
    )?;
    Ok((batch, next))
}

/// Second half: apply the batch atomically and flush it.
async fn finish_batch(
    db: &sled::Db,
    crash: Option<CrashPoint>,
    batch: sled::Batch,
) -> Result<(), StoreError> {
    CrashPoint::reached(crash, CrashPoint::AfterAnchorPending);
    db.apply_batch(batch)?;
    let started = std::time::Instant::now();
    db.flush_async().await?;
    crate::telemetry::metrics().flushed("records", started);
    CrashPoint::reached(crash, CrashPoint::AfterFlush);
    Ok(())
}
