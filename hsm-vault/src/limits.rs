//! Rate limits on recovery starts, per account (record id) and per client
//! address: token buckets, refused with RESOURCE_EXHAUSTED and a retry hint.
//!
//! They come before anything is read or charged, so a refused start costs
//! no guess. The attempt limit (invariant 2) does not depend on them: they
//! slow down guessing across many accounts and load from one address. They
//! do not stop someone who knows an account id from spending its guesses
//! (the per-account burst is above the guess limit, so a real user's
//! retries are never throttled first). Each node keeps its own buckets (in memory): the account
//! buckets live on the node serving the record (its group's leader), the
//! address buckets on the node the client connected to.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Largest number of buckets one limiter keeps. Beyond it, full buckets
/// (which say nothing) are dropped first, then the longest idle ones.
const MAX_BUCKETS: usize = 100_000;

/// One limit: up to `burst` starts at once, refilled at `per_minute`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub per_minute: u32,
}

impl Rate {
    fn refill_every(&self) -> Duration {
        Duration::from_secs_f64(60.0 / f64::from(self.per_minute.max(1)))
    }
}

/// The limits of a node; `None`: not limited.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub per_account: Option<Rate>,
    pub per_address: Option<Rate>,
}

impl Default for Limits {
    /// Generous for people, tight for scripts: an account may start 20
    /// recoveries at once and 10 a minute after that (it has at most 10
    /// guesses anyway); one address (many users behind one NAT) 2,000 at
    /// once and 1,200 a minute.
    fn default() -> Self {
        Limits {
            per_account: Some(Rate {
                burst: 20,
                per_minute: 10,
            }),
            per_address: Some(Rate {
                burst: 2_000,
                per_minute: 1_200,
            }),
        }
    }
}

impl Limits {
    pub fn none() -> Self {
        Limits {
            per_account: None,
            per_address: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(rate: Rate) -> Self {
        Limiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let refilled = now.saturating_duration_since(b.at).as_secs_f64()
            / self.rate.refill_every().as_secs_f64();
        (b.tokens + refilled).min(f64::from(self.rate.burst))
    }

    /// Takes one start for `key`, or says how long until one is available.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            self.shrink(&mut buckets, now);
        }
        let full = f64::from(self.rate.burst);
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: full,
            at: now,
        });
        let level = self.level(bucket, now);
        if level >= 1.0 {
            *bucket = Bucket {
                tokens: level - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket {
                tokens: level,
                at: now,
            };
            Err(self.rate.refill_every().mul_f64(1.0 - level))
        }
    }

    fn shrink(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let full = f64::from(self.rate.burst);
        buckets.retain(|_, b| self.level(b, now) < full);
        if buckets.len() >= MAX_BUCKETS {
            let mut idle: Vec<(Instant, K)> =
                buckets.iter().map(|(k, b)| (b.at, k.clone())).collect();
            idle.sort_by_key(|(at, _)| *at);
            for (_, k) in idle.into_iter().take(MAX_BUCKETS / 10) {
                buckets.remove(&k);
            }
        }
    }
}

/// The bucket a client address counts against: an IPv4 address itself
/// (also when written as an IPv4-mapped IPv6 address), an IPv6 address by
/// its /64, the smallest prefix a site is given, so one host cannot spread
/// its starts over the 2^64 addresses it is free to use.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The two limiters of a node.
#[derive(Debug)]
pub struct RecoveryLimits {
    account: Option<Limiter<[u8; 32]>>,
    address: Option<Limiter<IpAddr>>,
}

/// Which limit refused, and when to retry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throttled {
    pub scope: &'static str,
    pub retry_after: Duration,
}

impl RecoveryLimits {
    pub fn new(limits: Limits) -> Self {
        RecoveryLimits {
            account: limits.per_account.map(Limiter::new),
            address: limits.per_address.map(Limiter::new),
        }
    }

    /// Takes one start from the bucket of `ip` (see [`bucket`]).
    pub fn address(&self, ip: Option<IpAddr>) -> Result<(), Throttled> {
        match (&self.address, ip) {
            (Some(l), Some(ip)) => {
                l.take(&bucket(ip), Instant::now())
                    .map_err(|retry_after| Throttled {
                        scope: "address",
                        retry_after,
                    })
            }
            _ => Ok(()),
        }
    }

    pub fn account(&self, record: &[u8; 32]) -> Result<(), Throttled> {
        match &self.account {
            Some(l) => l
                .take(record, Instant::now())
                .map_err(|retry_after| Throttled {
                    scope: "account",
                    retry_after,
                }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_bucketed_by_their_64_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        assert_eq!(
            bucket(ip("2001:db8:1:2:aaaa::1")),
            bucket(ip("2001:db8:1:2:ffff:1:2:3"))
        );
        assert_ne!(bucket(ip("2001:db8:1:2::1")), bucket(ip("2001:db8:1:3::1")));
        assert_eq!(bucket(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(bucket(ip("192.0.2.7")), bucket(ip("192.0.2.8")));
        // One limit for a whole /64.
        let limits = RecoveryLimits::new(Limits {
            per_account: None,
            per_address: Some(Rate {
                burst: 1,
                per_minute: 1,
            }),
        });
        limits.address(Some(ip("2001:db8::1"))).expect("first");
        limits
            .address(Some(ip("2001:db8::2")))
            .expect_err("the same /64");
        limits
            .address(Some(ip("2001:db8:0:1::1")))
            .expect("another /64");
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_hint_then_refilled() {
        let l = Limiter::new(Rate {
            burst: 3,
            per_minute: 60,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take(&1u8, t0).expect("within the burst");
        }
        let wait = l.take(&1u8, t0).expect_err("burst spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another key has its own bucket.
        l.take(&2u8, t0).expect("another key");
        // One second later one start is back.
        l.take(&1u8, t0 + Duration::from_secs(1)).expect("refilled");
        l.take(&1u8, t0 + Duration::from_secs(1))
            .expect_err("only one came back");
    }
}
