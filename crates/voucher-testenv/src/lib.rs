//! Development and test only — never part of the production binary or image:
//! the real Kubernetes control plane (etcd + kube-apiserver built from their
//! upstream modules), nats-server built from its upstream module, Flux's
//! source-controller and kustomize-controller with a Git server, and
//! Postgres from the machine's packages, on loopback, under one supervisor. Shared by `voucher-dev local`
//! and the integration tests.

#![forbid(unsafe_code)]

pub mod built;
pub mod control_plane;
pub mod flux;
pub mod prometheus;
pub mod services;
pub mod supervisor;
