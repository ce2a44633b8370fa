//! A Voucher's place among global vouchers (DESIGN §11, docs/federation.md):
//! a `scope: Global` copy lives in the global namespace, and only such copies
//! do; it binds to the hub's definition of its code, whose terms its row
//! carries (the copy changes nothing: where it differs, it says so).

use voucher_core::allotment::Record;

use super::plan::VoucherFound;
use crate::api::{Scope, Voucher};
use crate::controller::Context;
use crate::domain::{Code, Owner};
use crate::federation::allotment;

/// Where a Voucher stands: one of this Sovereign's own (`None`), a global
/// voucher's copy with the hub's record of its code, or refused (what the
/// reconcile found instead).
pub(super) type Place = Result<Option<Box<Record>>, VoucherFound>;

/// Reads, for a `scope: Global` Voucher, the hub's record of `code`.
pub(super) async fn place(ctx: &Context, voucher: &Voucher, owner: &Owner, code: &Code) -> Place {
    let settings = &ctx.settings;
    let global = voucher.spec.scope == Scope::Global;
    if (owner.namespace == settings.global_namespace) != global {
        return Err(VoucherFound::OutOfPlace {
            global,
            global_namespace: settings.global_namespace.clone(),
        });
    }
    if !global {
        return Ok(None);
    }
    let joined = settings.joined.as_ref().ok_or(VoucherFound::NoHub)?;
    let (client, sovereign) = (&joined.client, &joined.refill.sovereign);
    let prefix = allotment::DEFINITION_PREFIX;
    let timeout = joined.refill.timeout;
    match allotment::definition(client, prefix, sovereign, code.as_str(), timeout).await {
        Ok(Some(record)) => Ok(Some(Box::new(record))),
        Ok(None) => Err(VoucherFound::NotAtHub),
        Err(error) => Err(VoucherFound::HubUnavailable(error.to_string())),
    }
}
