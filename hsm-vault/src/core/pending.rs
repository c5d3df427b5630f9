//! Logins between KE2 and KE3, kept in the core's memory.
//!
//! Each is single use, expires after [`LOGIN_DEADLINE`], and there are at
//! most [`MAX_PENDING_LOGINS`] at a time. A pending login's guess was already
//! charged, so dropping one (expiry, restart) never gives a guess back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opaque_ke::ServerLogin;
use rand::rngs::OsRng;
use rand::RngCore;
use vault_proto::suite::Suite;

use super::record::Generation;
use crate::types::{LoginId, RecordId};

/// How long a client has between KE2 and KE3. A human typed the password
/// before KE1; the client only needs a round trip and one Argon2 run.
pub const LOGIN_DEADLINE: Duration = Duration::from_secs(60);

/// Logins in flight at once. Each holds ~200 bytes of state; 10,000 of them
/// are ~2 MB, far above what one node's OPAQUE arithmetic can fill in a
/// minute on two cores.
pub const MAX_PENDING_LOGINS: usize = 10_000;

pub struct PendingLogin {
    pub id: RecordId,
    pub generation: Generation,
    pub phantom: bool,
    pub state: ServerLogin<Suite>,
}

impl std::fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLogin")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Expired logins are swept every this many inserts (and whenever the map is
/// full), so their state does not linger long past the deadline.
const SWEEP_EVERY: u32 = 256;

#[derive(Default)]
pub struct PendingLogins {
    inner: Mutex<HashMap<LoginId, (Instant, PendingLogin)>>,
    inserts: std::sync::atomic::AtomicU32,
}

impl PendingLogins {
    fn sweep(map: &mut HashMap<LoginId, (Instant, PendingLogin)>, now: Instant) {
        map.retain(|_, (deadline, _)| *deadline > now);
    }

    pub fn has_room(&self, now: Instant) -> bool {
        let Ok(mut map) = self.inner.lock() else {
            return false;
        };
        if map.len() >= MAX_PENDING_LOGINS {
            Self::sweep(&mut map, now);
        }
        map.len() < MAX_PENDING_LOGINS
    }

    pub fn insert(&self, login: PendingLogin, now: Instant) -> LoginId {
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let id = LoginId(id);
        let n = self
            .inserts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut map) = self.inner.lock() {
            if map.len() >= MAX_PENDING_LOGINS || n % SWEEP_EVERY == 0 {
                Self::sweep(&mut map, now);
            }
            map.insert(id, (now + LOGIN_DEADLINE, login));
        }
        id
    }

    pub fn record_of(&self, id: &LoginId, now: Instant) -> Option<RecordId> {
        let map = self.inner.lock().ok()?;
        map.get(id)
            .filter(|(deadline, _)| *deadline > now)
            .map(|(_, p)| p.id)
    }

    pub fn take(&self, id: &LoginId, now: Instant) -> Option<PendingLogin> {
        let mut map = self.inner.lock().ok()?;
        map.remove(id)
            .filter(|(deadline, _)| *deadline > now)
            .map(|(_, p)| p)
    }
}

impl std::fmt::Debug for PendingLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "PendingLogins({n})")
    }
}
