//! Development and test only — never part of the production binary or image:
//! the real Kubernetes control plane (etcd + kube-apiserver built from their
//! upstream modules) and Postgres and nats-server from the machine's
//! packages, on loopback, under one supervisor. Shared by `voucher-dev local`
//! and the integration tests.

#![forbid(unsafe_code)]

pub mod control_plane;
pub mod services;
pub mod supervisor;
