//! Cross-Sovereign vouchers (DESIGN §11, docs/federation.md): one global cap
//! shared out among Sovereigns by the hub's allotment service, on NATS
//! JetStream. The rules are `voucher_core::allotment`'s (checked by
//! `crates/voucher-model`); this module is the I/O around them.

pub mod allotment;
pub mod audit;
pub mod bucket;
pub mod claimer;
pub mod claims;
pub mod hub;
pub mod service;
pub mod sovereign;

use std::time::Duration;

/// The global namespace, unless told otherwise: where the vendor's `scope:
/// Global` Vouchers are applied (at the hub) and their copies (on a Sovereign).
pub const DEFAULT_GLOBAL_NAMESPACE: &str = "catalyst-global";

/// A Sovereign joined to the vendor's hub: how its controller reads the hub's
/// definitions (terms only — a share is raised only by the hub's reply, never
/// from a read) and how its leader asks for allotments, both services of the
/// hub on `client` (its NATS account's imports).
#[derive(Clone, Debug)]
pub struct Joined {
    pub client: async_nats::Client,
    pub refill: sovereign::Refill,
    /// One allotment round for every global code this often.
    pub every: Duration,
}
