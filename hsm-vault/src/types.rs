//! Newtypes for the ids the vault passes around.

use std::fmt;

/// A record's id: HMAC-SHA256 of the account id under a token key, so the
/// host and its storage never see account ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(pub [u8; 32]);

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to correlate log lines.
        write!(f, "RecordId({})", hex::encode(&self.0[..6]))
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..6]))
    }
}

/// The store's commit sequence number. Every write gets a fresh, larger one;
/// sealed records and the token watermark are bound to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

/// Handle of a pending login, random and single use.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoginId(pub [u8; 16]);

impl fmt::Debug for LoginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoginId({})", hex::encode(&self.0[..4]))
    }
}

impl LoginId {
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(LoginId)
    }
}
