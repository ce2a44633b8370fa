//! The sweep: bindings whose Voucher vanished without its finalizer (removed
//! by hand) are released as their recorded deletion policy says.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::{Resource, ResourceExt};

use crate::api::Voucher;
use crate::controller::Context;
use crate::controller::runtime::api_for;
use crate::domain::{Actor, AuditKind, Code, Facts, Owner, Severity};
use crate::store::sync::Released;

/// Releases the bindings whose Voucher vanished without its finalizer,
/// applying the deletion policy recorded in each, with its audit record and
/// an Event on the vanished object. `cache` must be ready: an empty cache
/// would make every binding look vanished, which is why each is confirmed
/// with the API server first.
pub(super) async fn sweep(ctx: &Context, cache: &reflector::Store<Voucher>) {
    // A Voucher API that is not served (the CRD being removed, a version
    // dropped) answers 404 for every Voucher: that is no evidence that
    // any of them vanished, so the sweep waits for a list that works.
    let api: Api<Voucher> = api_for(&ctx.client, ctx.settings.namespace.as_deref());
    if let Err(error) = api.list_metadata(&ListParams::default().limit(1)).await {
        tracing::warn!(%error, "the Voucher API does not answer a list; no sweep this time");
        return;
    }
    let bindings = match ctx.store.bindings(ctx.settings.namespace.as_deref()).await {
        Ok(bindings) => bindings,
        Err(error) => {
            tracing::warn!(error = %crate::telemetry::describe(&error), "cannot sweep the bindings");
            return;
        }
    };
    for (code, binding) in bindings {
        let holder = &binding.owner;
        let key = ObjectRef::new(&holder.name).within(&holder.namespace);
        if cache
            .get(&key)
            .is_some_and(|v| v.uid().as_deref() == Some(holder.uid.as_str()))
            || !is_gone(ctx, holder).await
        {
            continue;
        }
        let Ok(code) = Code::parse(&code) else {
            continue;
        };
        release(ctx, &code, holder).await;
    }
}

/// Releases one vanished Voucher's binding, and says so on the vanished object.
async fn release(ctx: &Context, code: &Code, holder: &Owner) {
    let kind = match ctx.store.release_vanished(code, holder).await {
        Ok(Released::Revoked(_)) => AuditKind::Revoked,
        Ok(Released::Orphaned(_)) => AuditKind::Orphaned,
        Ok(Released::NotOwner) => return,
        Err(error) => {
            tracing::warn!(error = %crate::telemetry::describe(&error), "cannot release a vanished Voucher's binding");
            return;
        }
    };
    tracing::warn!(code = %code, holder = %holder, %kind, "released the binding of a Voucher that vanished without its finalizer");
    ctx.count_audit(kind);
    let regarding = ObjectReference {
        api_version: Some(Voucher::api_version(&()).into_owned()),
        kind: Some(Voucher::kind(&()).into_owned()),
        namespace: Some(holder.namespace.clone()),
        name: Some(holder.name.clone()),
        uid: Some(holder.uid.clone()),
        ..ObjectReference::default()
    };
    let actor = Actor::from(holder);
    if let Some(mut event) = kind.wording(&Facts::new(code.as_str(), &actor)).event {
        event.severity = Severity::Warning;
        event.note = format!(
            "{}; the Voucher was deleted without its finalizer, so its recorded deletion policy was applied by the sweep",
            event.note
        );
        ctx.publish_on(&regarding, event).await;
    }
}

/// Whether the resource a binding names is gone (absent, or re-created
/// under a new uid). Unknown (e.g. not allowed to look) counts as present.
pub(super) async fn is_gone(ctx: &Context, holder: &Owner) -> bool {
    let api: Api<Voucher> = Api::namespaced(ctx.client.clone(), &holder.namespace);
    match api.get_opt(&holder.name).await {
        Ok(None) => true,
        Ok(Some(found)) => found.uid().as_deref() != Some(holder.uid.as_str()),
        Err(_) => false,
    }
}
