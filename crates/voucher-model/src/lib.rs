//! Explicit-state model checks of the cross-Sovereign protocols
//! (docs/federation.md, DESIGN §11), searched breadth first, each state once:
//!
//! - [`allotment`]: one global cap shared out among Sovereigns — every
//!   interleaving of two or three Sovereigns and two allotment-service
//!   replicas, with lost, duplicated, reordered and delayed messages, replica
//!   crashes, Sovereign databases and the hub backed up and restored, a
//!   Voucher deleted and re-created, the cap lowered mid-grant, and other
//!   writers of a Sovereign's database. The promise: Σ redemptions ≤ Σ
//!   granted ≤ the (effective) cap, and "used up" (410) answered only when no
//!   Sovereign holds an unused unit.
//! - [`claims`]: once per customer on any Sovereign (`perCustomer: Global`) —
//!   intents, claims on the hub, recovery, and every message fault. The
//!   promise: one redemption per customer anywhere, and a customer who never
//!   redeemed is never locked out once the dust settles.
//!
//! Each rule of a protocol is a switch; the tests show that with every rule
//! the promise holds, and that with any one rule removed the search finds a
//! trace that breaks it (the shortest, printed with `--nocapture`).

#![forbid(unsafe_code)]

pub mod allotment;
pub mod claims;
mod search;

pub use search::Outcome;
