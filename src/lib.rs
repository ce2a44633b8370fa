//! voucher-operator: billing vouchers as a Kubernetes custom resource.
//!
//! The domain is plain Rust; every other module is an adapter around it.

pub mod api;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod local;
pub mod store;
pub mod telemetry;
pub mod validation;
