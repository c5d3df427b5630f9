//! Logins between KE2 and KE3, kept in the core's memory.
//!
//! Each is single use, expires after [`LOGIN_DEADLINE`], and there are at
//! most [`MAX_PENDING_LOGINS`] at a time, of which one client address may
//! hold [`MAX_PENDING_PER_CLIENT`]: a few addresses cannot fill the table and
//! leave everyone else with RESOURCE_EXHAUSTED. A pending login's guess was
//! already charged, so dropping one (expiry, restart) never gives a guess
//! back.

use std::collections::HashMap;
use std::net::IpAddr;
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

/// Logins in flight at once from one client (its address, IPv6 by /64).
/// An honest client finishes a login within a round trip of its start, so
/// even a large NAT rarely holds more than a few dozen at a time; at 256,
/// filling the table takes 40 addresses.
pub const MAX_PENDING_PER_CLIENT: usize = 256;

/// Whom a login is for, as far as quotas go: the client's address bucket
/// (see `crate::limits::bucket`), or none when the transport gives no
/// address (then only the table's own bound applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Client(pub Option<IpAddr>);

pub struct PendingLogin {
    pub id: RecordId,
    pub client: Client,
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
struct Table {
    logins: HashMap<LoginId, (Instant, PendingLogin)>,
    /// Logins held per client address.
    held: HashMap<IpAddr, usize>,
}

impl Table {
    fn sweep(&mut self, now: Instant) {
        let expired: Vec<LoginId> = self
            .logins
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }

    fn remove(&mut self, id: &LoginId) -> Option<(Instant, PendingLogin)> {
        let removed = self.logins.remove(id)?;
        if let Client(Some(addr)) = removed.1.client {
            if let Some(n) = self.held.get_mut(&addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.held.remove(&addr);
                }
            }
        }
        Some(removed)
    }

    fn held_by(&self, client: Client) -> usize {
        client
            .0
            .map_or(0, |a| self.held.get(&a).copied().unwrap_or(0))
    }

    fn has_room(&mut self, client: Client, now: Instant) -> bool {
        if self.logins.len() >= MAX_PENDING_LOGINS || self.held_by(client) >= MAX_PENDING_PER_CLIENT
        {
            self.sweep(now);
        }
        self.logins.len() < MAX_PENDING_LOGINS && self.held_by(client) < MAX_PENDING_PER_CLIENT
    }
}

#[derive(Default)]
pub struct PendingLogins {
    inner: Mutex<Table>,
    inserts: std::sync::atomic::AtomicU32,
}

impl PendingLogins {
    /// Whether `client` may start one more login now.
    pub fn has_room(&self, client: Client, now: Instant) -> bool {
        self.inner
            .lock()
            .is_ok_and(|mut table| table.has_room(client, now))
    }

    pub fn insert(&self, login: PendingLogin, now: Instant) -> LoginId {
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let id = LoginId(id);
        let n = self
            .inserts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut table) = self.inner.lock() {
            if table.logins.len() >= MAX_PENDING_LOGINS || n % SWEEP_EVERY == 0 {
                table.sweep(now);
            }
            if let Client(Some(addr)) = login.client {
                *table.held.entry(addr).or_default() += 1;
            }
            table.logins.insert(id, (now + LOGIN_DEADLINE, login));
        }
        id
    }

    pub fn record_of(&self, id: &LoginId, now: Instant) -> Option<RecordId> {
        let table = self.inner.lock().ok()?;
        table
            .logins
            .get(id)
            .filter(|(deadline, _)| *deadline > now)
            .map(|(_, p)| p.id)
    }

    pub fn take(&self, id: &LoginId, now: Instant) -> Option<PendingLogin> {
        let mut table = self.inner.lock().ok()?;
        table
            .remove(id)
            .filter(|(deadline, _)| *deadline > now)
            .map(|(_, p)| p)
    }
}

impl std::fmt::Debug for PendingLogins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map(|t| t.logins.len()).unwrap_or(0);
        write!(f, "PendingLogins({n})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opaque_ke::{ClientLogin, ServerLoginParameters, ServerSetup};

    fn login(setup: &ServerSetup<Suite>, client: Client) -> PendingLogin {
        let ke1 = ClientLogin::<Suite>::start(&mut OsRng, b"a password")
            .expect("KE1")
            .message;
        let state = ServerLogin::start(
            &mut OsRng,
            setup,
            None,
            ke1,
            b"someone",
            ServerLoginParameters::default(),
        )
        .expect("KE2")
        .state;
        PendingLogin {
            id: RecordId([1; 32]),
            client,
            generation: [0; 16],
            phantom: true,
            state,
        }
    }

    #[test]
    fn a_client_holds_at_most_its_quota_and_gets_room_back_as_logins_end() {
        let setup = ServerSetup::<Suite>::new(&mut OsRng);
        let table = PendingLogins::default();
        let now = Instant::now();
        let hog = Client(Some("192.0.2.1".parse().expect("addr")));
        let other = Client(Some("192.0.2.2".parse().expect("addr")));
        let mut ids = Vec::new();
        for _ in 0..MAX_PENDING_PER_CLIENT {
            assert!(table.has_room(hog, now));
            ids.push(table.insert(login(&setup, hog), now));
        }
        assert!(!table.has_room(hog, now), "past the quota");
        assert!(table.has_room(other, now), "another client has room");
        // A finished login gives its slot back...
        assert!(table.take(&ids[0], now).is_some());
        assert!(table.has_room(hog, now));
        table.insert(login(&setup, hog), now);
        assert!(!table.has_room(hog, now));
        // ...and so do expired ones.
        assert!(table.has_room(hog, now + LOGIN_DEADLINE + Duration::from_secs(1)));
        // Without an address only the table's own bound applies.
        assert!(table.has_room(Client(None), now));
    }
}
