//! An HSM-backed backup key vault node.
//!
//! The trust boundary shows in the module tree:
//! - [`partition`] owns every PKCS#11 call; nothing else imports `cryptoki`.
//! - [`core`] is the sans-IO secure core (OPAQUE, sealing, attempt policy).
//!   It holds secrets in memory only while it works on them.
//! - [`store`], [`service`] and [`auth`] are the host shell: they carry
//!   sealed bytes and never see a key, a password or a stored secret.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod backend;
pub mod core;
pub mod geo;
pub mod limits;
pub mod partition;
pub mod proxy;
pub mod replication;
pub mod service;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod types;
