//! Deterministic simulation of a replica group.
//!
//! The real vault service (`VaultService`: validation, per-record locks,
//! the secure core, the token through PKCS#11), the real consensus engine
//! (openraft with the vault's sled log and state machine, the vote and
//! watermarks in a real SoftHSM token) run on one thread, on tokio's paused
//! clock, over a simulated network ([`net`]). A seed drives everything that
//! varies: message delays, losses, duplicates, the fault schedule (crashes,
//! restarts, partitions, a minority's disk rolled back or lost) and the
//! clients' operations. The [`model`] checks every answer a client gets.
//!
//! A run is a pure function of its seed: the trace digest it prints is the
//! same every time, so a failing seed replays exactly.

pub mod broken;
mod client;
pub mod model;
pub mod net;
mod world;

pub use world::{run_seed, BrokenKind, Figures, Fixture, Options, Outcome};
