//! Cross-Sovereign vouchers (DESIGN §11, docs/federation.md): one global cap
//! shared out among Sovereigns by the hub's allotment service, on NATS
//! JetStream. The rules are `voucher_core::allotment`'s (checked by
//! `crates/voucher-model`); this module is the I/O around them.

pub mod allotment;
pub mod sovereign;
