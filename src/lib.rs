//! voucher-operator: billing vouchers as a Kubernetes custom resource.
//!
//! The domain is plain Rust in its own crate (`voucher-core`); every module
//! here is an adapter around it. Development tools (`voucher-dev local`, the
//! test control plane in `voucher-testenv`) are other crates: nothing of them
//! is in this binary.

//!
//! The public surface is what the binaries (`voucher-operator`, `voucher-dev`)
//! and the integration tests use; everything else is `pub(crate)`:
//! - [`cli`]: the command line (`Cli`, `run`, logging);
//! - [`controller`]: `Config`, `Settings`, `Role`, `Context`, each kind's
//!   `reconcile`/`run` (`voucher`, `campaign`), `leader`, `metrics`;
//! - [`server`]: `ServerSettings`, `AppState`, `serve`, `auth` (`AuthSettings`,
//!   `Verifier`);
//! - [`store`]: `Store`, `DatabaseSettings`, and the statements the tests
//!   drive directly (`redeem`, `sync`, `campaigns`, `outbox`, `bindings`);
//! - [`relay`] and [`events`]: the audit stream written and read back;
//! - [`federation`]: cross-Sovereign vouchers (the hub's allotment service);
//! - [`api`] and [`domain`]: the resource types and the domain, re-exported.

#![forbid(unsafe_code)]

pub mod cli;
pub mod controller;
pub mod events;
pub mod federation;
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
