//! voucher-operator: billing vouchers as a Kubernetes custom resource.
//!
//! The domain is plain Rust; every other module is an adapter around it.

pub mod api;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod local;
pub mod relay;
pub mod server;
pub mod store;
pub mod telemetry;

/// Selects ring as the process's TLS crypto provider (kube and the JWKS
/// client both use rustls); safe to call more than once.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
