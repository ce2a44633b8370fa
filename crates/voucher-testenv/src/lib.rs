//! Development and test only — never part of the production binary or image:
//! the real Kubernetes control plane (etcd + kube-apiserver built from their
//! upstream modules) and Postgres and nats-server from the machine's
//! packages, on loopback. Shared by `voucher-dev local` and the integration
//! tests, which supervise the processes each their way.

#![forbid(unsafe_code)]

pub mod control_plane;
pub mod services;
