//! The voucher domain: plain Rust, no Kubernetes, SQL, NATS or HTTP, so every
//! rule here is unit-tested in microseconds and shared by all adapters. The
//! crate's dependencies keep it so: nothing of kube, sqlx, axum, tokio or
//! async-nats.

#![forbid(unsafe_code)]

pub mod allotment;
pub mod audit;
pub mod campaign;
pub mod checkout;
pub mod claims;
pub mod code;
pub mod discount;
pub mod owner;
pub mod ownership;
pub mod voucher;

pub use audit::{Actor, AuditData, AuditKind, EventWording, Facts, OrderUse, Severity, Wording};
pub use code::{Code, CodeError};
pub use discount::{Billing, Categories, Currency, Discount, DiscountError, Off};
pub use owner::Owner;
pub use ownership::{Applied, Claim, DeletionPolicy, Issuers, Request, Unrequested};
pub use voucher::{CodeRecord, Phase, Redeemability, TermError, TermField, Terms};
