//! voucher-operator: billing vouchers as a Kubernetes custom resource.
//!
//! The domain is plain Rust in its own crate (`voucher-core`); every module
//! here is an adapter around it. Development tools (`voucher-dev local`, the
//! test control plane in `voucher-testenv`) are other crates: nothing of them
//! is in this binary.

#![forbid(unsafe_code)]

pub mod cli;
pub mod controller;
pub mod events;
pub mod relay;
pub mod server;
pub mod store;
pub mod telemetry;

/// The `Voucher` resource types and CRD, from their own crate (crates/voucher-api).
pub use voucher_api as api;
/// The domain, from its own crate (no I/O; see crates/voucher-core).
pub use voucher_core as domain;

/// Selects ring as the process's TLS crypto provider (kube and the JWKS
/// client both use rustls); safe to call more than once.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
