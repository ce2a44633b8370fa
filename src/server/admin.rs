//! The admin page's endpoints, kept compatible while the resource becomes
//! the source of truth: issue and revoke act on Voucher resources (which the
//! controller then reconciles), list reads the live rows.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Principal;
use super::body::JsonBody;
use super::error::{ErrorBody, HttpError};
use super::{AppState, Peer};
use crate::api::{DeletionPolicy, Reissue, Voucher, VoucherSpec};
use crate::domain::{Code, CodeRecord};

/// The field manager of Vouchers written through the admin endpoints.
pub(crate) const ADMIN_FIELD_MANAGER: &str = "voucher-operator-admin";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct IssueRequest {
    pub code: String,
    pub credit_omr: i32,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub max_redemptions: i32,
    #[serde(default = "crate::api::default_active")]
    pub active: bool,
}

/// A promo code as the billing service's admin API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct PromoCode {
    pub code: String,
    /// 0 for a discount code (the billing service's column cannot be NULL).
    pub credit_omr: i32,
    /// The discount a discount code grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<super::public::DiscountTerms>,
    pub description: String,
    pub active: bool,
    pub max_redemptions: i32,
    pub times_redeemed: i32,
    pub created_at: Option<DateTime<Utc>>,
    /// The Voucher that issue applied, `namespace/name` (issue only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voucher: Option<String>,
}

impl From<CodeRecord> for PromoCode {
    fn from(r: CodeRecord) -> Self {
        Self {
            code: r.code,
            credit_omr: r.terms.credit_omr,
            discount: r.terms.discount.as_ref().map(Into::into),
            description: r.terms.description,
            active: r.terms.active,
            max_redemptions: r.terms.max_redemptions,
            times_redeemed: r.times_redeemed,
            created_at: Some(r.created_at),
            voucher: None,
        }
    }
}

/// An administrator's request, within the client's and the subject's budgets.
async fn admin(state: &AppState, peer: Peer, headers: &HeaderMap) -> Result<Principal, HttpError> {
    let client = state.client_ip(peer.0.ip(), headers);
    state.check_rate(client)?;
    let principal = state.authenticate(client, headers).await?;
    if !principal.is_admin() {
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "voucher administration needs the role superadmin or sovereign-admin",
        ));
    }
    Ok(principal)
}

fn vouchers(state: &AppState, namespace: &str) -> Result<Api<Voucher>, HttpError> {
    let client = state.kube.clone().ok_or_else(|| {
        HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "voucher administration needs the Kubernetes API, which this server cannot reach",
        )
    })?;
    Ok(Api::namespaced(client, namespace))
}

fn kube_error(error: kube::Error) -> HttpError {
    match error {
        kube::Error::Api(status) if status.code == 409 => HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "the Voucher is managed elsewhere (e.g. in Git); change it there: {}",
                status.message
            ),
        ),
        kube::Error::Api(status) if status.code == 422 => {
            HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, status.message)
        }
        kube::Error::Api(status) if status.code == 403 => HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the operator's service account may not change this Voucher (see the chart's RBAC)",
        ),
        other => {
            tracing::error!(error = %other, "Kubernetes API request failed");
            HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the Kubernetes API is unavailable; please try again shortly",
            )
        }
    }
}

/// The GitOps tool that manages `voucher`, from the labels and annotations
/// Flux and Argo CD set.
fn gitops_owner(voucher: &Voucher) -> Option<&'static str> {
    let marked = |keys: Option<&std::collections::BTreeMap<String, String>>, prefix: &str| {
        keys.is_some_and(|keys| keys.keys().any(|k| k.starts_with(prefix)))
    };
    let (labels, annotations) = (
        voucher.metadata.labels.as_ref(),
        voucher.metadata.annotations.as_ref(),
    );
    if marked(labels, "kustomize.toolkit.fluxcd.io/") {
        Some("a Flux Kustomization")
    } else if marked(labels, "helm.toolkit.fluxcd.io/") {
        Some("a Flux HelmRelease")
    } else if marked(labels, "argocd.argoproj.io/instance")
        || marked(annotations, "argocd.argoproj.io/tracking-id")
    {
        Some("an Argo CD Application")
    } else {
        None
    }
}

/// Issue (create or update) a code
#[utoipa::path(
    post,
    path = "/billing/vouchers/issue",
    request_body = IssueRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The Voucher resource was applied", body = PromoCode),
        (status = 400, description = "Invalid code or body", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 409, description = "The Voucher is managed elsewhere, or another Voucher or a campaign owns the code", body = ErrorBody),
        (status = 503, description = "The Kubernetes API is unreachable", body = ErrorBody),
    )
)]
pub async fn issue(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    JsonBody(request): JsonBody<IssueRequest>,
) -> Result<Json<PromoCode>, HttpError> {
    admin(&state, peer, &headers).await?;
    let code = Code::parse(&request.code).map_err(|e| HttpError::bad_request(e.to_string()))?;
    // An administrator issuing a code that exists (from the admin page, or
    // revoked) means to take it over, as the billing service's issue did: the
    // Voucher asks for exactly what this code needs now, and nothing more.
    let existing = state.store.find(&code).await?;
    let revoked_at = existing.as_ref().and_then(|r| r.deleted_at);
    let spec = VoucherSpec {
        code: Some(code.to_string()),
        credit_omr: Some(request.credit_omr),
        discount: None,
        description: request.description.clone(),
        active: request.active,
        max_redemptions: request.max_redemptions,
        valid_from: None,
        expires_at: None,
        deletion_policy: DeletionPolicy::default(),
        adopt: existing.is_some() && revoked_at.is_none(),
        // This revocation only: the manifest cannot undo a later one.
        reissue: revoked_at.map(|revoked_at| Reissue { revoked_at }),
        scope: crate::api::Scope::Sovereign,
        credit_by_currency: None,
        per_customer: crate::api::PerCustomer::Sovereign,
    };
    spec.terms()
        .validate()
        .map_err(|e| HttpError::bad_request(e.to_string()))?;
    let api = vouchers(&state, &state.settings.admin_namespace)?;
    let name = crate::api::resource_name(&code);
    // Issue never reports terms it did not apply: a code bound elsewhere is changed there.
    if let Some(owner) = state.store.owner_of(&code).await?
        && (owner.namespace != state.settings.admin_namespace || owner.name != name)
    {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("code {code} is owned by Voucher {owner}; change it there"),
        ));
    }
    if let Some(campaign) = state.store.campaign_of(&code).await? {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "code {code} was issued by VoucherCampaign {campaign}; change the campaign, or \
                 revoke this code alone with the admin revoke"
            ),
        ));
    }
    let mut voucher = Voucher::new(&name, spec);
    voucher.metadata.labels =
        Some([(MANAGED_BY.to_owned(), ADMIN_FIELD_MANAGER.to_owned())].into());
    api.patch(
        &name,
        &PatchParams::apply(ADMIN_FIELD_MANAGER),
        &Patch::Apply(&voucher),
    )
    .await
    .map_err(kube_error)?;
    let existing = existing.filter(|r| !r.is_tombstoned());
    Ok(Json(PromoCode {
        code: code.to_string(),
        credit_omr: request.credit_omr,
        discount: None,
        description: request.description,
        active: request.active,
        max_redemptions: request.max_redemptions,
        times_redeemed: existing.as_ref().map_or(0, |r| r.times_redeemed),
        created_at: existing.map(|r| r.created_at),
        voucher: Some(format!("{}/{name}", state.settings.admin_namespace)),
    }))
}

/// List the live codes
#[utoipa::path(
    get,
    path = "/billing/vouchers/list",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every live code", body = [PromoCode]),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Json<Vec<PromoCode>>, HttpError> {
    admin(&state, peer, &headers).await?;
    let rows = state.store.list_live().await?;
    Ok(Json(rows.into_iter().map(PromoCode::from).collect()))
}

/// Revoke a code: soft-delete its row (whatever the deletion policy or owner), then delete its Voucher unless GitOps owns it
#[utoipa::path(
    delete,
    path = "/billing/vouchers/revoke/{code}",
    params(("code" = String, Path, description = "The code; trimmed and upper-cased")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The code was revoked; its Voucher deleted, or kept (phase Revoked) when GitOps owns it", body = RevokeAnswer),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "No such code", body = ErrorBody),
        (status = 503, description = "The billing database is unreachable", body = ErrorBody),
    )
)]
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Result<Json<RevokeAnswer>, HttpError> {
    let principal = admin(&state, peer, &headers).await?;
    let code = Code::parse(&code).map_err(|e| HttpError::bad_request(e.to_string()))?;
    // The row first, whoever owns it: a leaked code stops now, whatever the
    // Kubernetes API or a label on the Voucher says. Its Voucher cannot bring
    // it back: only a reissue naming this very revocation could.
    let Some(revocation) = state.store.revoke(&code, &principal.subject).await? else {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no such code {code}"),
        ));
    };
    state.codes.invalidate(code.as_str());
    let mut answer = RevokeAnswer {
        code: code.to_string(),
        revoked: true,
        voucher: None,
        voucher_deleted: None,
        note: None,
    };
    if let Some(owner) = revocation.owner {
        answer.voucher = Some(owner.to_string());
        answer.voucher_deleted = Some(false);
        match delete_unless_gitops(&state, &owner).await {
            Ok(None) => answer.voucher_deleted = Some(true),
            Ok(Some(note)) => answer.note = Some(note),
            Err(error) => {
                tracing::warn!(voucher = %owner, error = %error.message,
                    "the code is revoked, but its Voucher could not be deleted");
                answer.note = Some(format!(
                    "the code is revoked; its Voucher {owner} was not deleted ({}), and shows \
                     phase Revoked until it is",
                    error.message
                ));
            }
        }
    }
    Ok(Json(answer))
}

/// What the admin revoke did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct RevokeAnswer {
    pub code: String,
    pub revoked: bool,
    /// The Voucher the code was bound to, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voucher: Option<String>,
    /// Whether that Voucher was deleted (not when GitOps owns it: Git would re-create it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voucher_deleted: Option<bool>,
    /// Why the Voucher was kept, and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Deletes the Voucher `owner` (this very one: a uid precondition) unless
/// GitOps manages it; `Some(why)` when it was kept. Whatever it says, the
/// code is already revoked: a kept Voucher shows phase Revoked.
async fn delete_unless_gitops(
    state: &AppState,
    owner: &crate::domain::Owner,
) -> Result<Option<String>, HttpError> {
    let api = vouchers(state, &owner.namespace)?;
    let found = api.get_opt(&owner.name).await.map_err(kube_error)?;
    let Some(voucher) = found.filter(|v| v.metadata.uid.as_deref() == Some(&owner.uid)) else {
        return Ok(None);
    };
    if let Some(gitops) = gitops_owner(&voucher) {
        return Ok(Some(format!(
            "the Voucher {owner} is managed by {gitops}, which would re-create it: it stays, with \
             phase Revoked; remove it from Git when the code should go for good"
        )));
    }
    let this_one = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some(owner.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&owner.name, &this_one).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(other) => Err(kube_error(other)),
    }
}

/// Which of a campaign's codes a download asks for: `?from=&limit=`.
fn code_range(
    query: &std::collections::HashMap<String, String>,
    generated: u32,
) -> Result<crate::domain::campaign::CodeRange, HttpError> {
    if let Some(unknown) = query
        .keys()
        .find(|k| !matches!(k.as_str(), "from" | "limit"))
    {
        return Err(HttpError::bad_request(format!(
            "unknown query parameter {unknown:?}: only from (the first code's index, from 0) and \
             limit (how many codes) are understood"
        )));
    }
    let number = |name: &str| -> Result<Option<u32>, HttpError> {
        query
            .get(name)
            .map(|v| {
                v.parse::<u32>().map_err(|_| {
                    HttpError::bad_request(format!(
                        "{name} must be a whole number from 0 to {}, not {v:?}",
                        u32::MAX
                    ))
                })
            })
            .transpose()
    };
    let from = number("from")?.unwrap_or(0);
    let limit = number("limit")?.unwrap_or(u32::MAX);
    if from > generated {
        return Err(HttpError::bad_request(format!(
            "from is {from}, but the campaign has {generated} code(s) so far (indices 0 to {})",
            generated.saturating_sub(1)
        )));
    }
    let to = from.saturating_add(limit).min(generated);
    Ok(crate::domain::campaign::CodeRange::new(from, to))
}

/// Download a campaign's codes, for the printer: CSV, one code a line in index order
#[utoipa::path(
    get,
    path = "/billing/vouchers/campaigns/{namespace}/{name}/codes",
    params(
        ("namespace" = String, Path, description = "The VoucherCampaign's namespace"),
        ("name" = String, Path, description = "The VoucherCampaign's name"),
        ("from" = Option<u32>, Query, description = "Index of the first code (default 0)"),
        ("limit" = Option<u32>, Query, description = "How many codes (default: all from `from`)"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`text/csv`: the header `code`, then one code a line", content_type = "text/csv"),
        (status = 400, description = "A bad from or limit", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "No such campaign in the billing database", body = ErrorBody),
    )
)]
pub async fn campaign_codes(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<axum::response::Response, HttpError> {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    let principal = admin(&state, peer, &headers).await?;
    let Some(found) = state.store.find_campaign(&namespace, &name).await? else {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no VoucherCampaign {namespace}/{name} has codes in the billing database \
                 (kubectl get vouchercampaigns -n {namespace} shows those that exist)"
            ),
        ));
    };
    let range = code_range(&query, found.generated)?;
    // Audited before a single code leaves: who, which campaign, how many.
    state
        .store
        .audit_campaign_download(&found.owner, &principal.subject, range)
        .await?;
    tracing::info!(campaign = %found.owner, subject = %principal.subject, from = range.from,
        count = range.count, "campaign codes downloaded");
    let campaign = found.owner.to_string();
    let lines = state
        .store
        .campaign_codes(&found.owner, range)
        .map(move |page| {
            page.map(|codes| {
                let mut text = String::with_capacity(codes.len() * 24);
                for (_, code) in codes {
                    text.push_str(&code);
                    text.push('\n');
                }
                axum::body::Bytes::from(text)
            })
            .inspect_err(|error| {
                tracing::error!(%campaign, error = %crate::telemetry::describe(error),
                "a campaign download broke off: the client got part of the codes");
            })
        });
    let header = futures::stream::once(async { Ok(axum::body::Bytes::from_static(b"code\n")) });
    let body = axum::body::Body::from_stream(header.chain(lines));
    let disposition = format!("attachment; filename=\"{namespace}-{name}-codes.csv\"");
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/csv; charset=utf-8".to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// What a suspension request did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct SuspensionAnswer {
    /// The code, or the campaign as `namespace/name`.
    pub target: String,
    /// Whether it is suspended now (by this endpoint or by its resource's annotation).
    pub suspended: bool,
    /// Whether this request changed anything (a repeat does not).
    pub changed: bool,
}

fn suspension_answer(
    target: String,
    done: crate::store::suspensions::Suspension,
) -> Json<SuspensionAnswer> {
    Json(SuspensionAnswer {
        target,
        suspended: done.suspended,
        changed: done.changed,
    })
}

/// Suspend a code: nobody redeems it, on any path, whatever its Voucher or Git says, until lifted
#[utoipa::path(
    post,
    path = "/billing/vouchers/suspend/{code}",
    params(("code" = String, Path, description = "The code; trimmed and upper-cased")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Suspended (a repeat changes nothing)", body = SuspensionAnswer),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "No such code", body = ErrorBody),
    )
)]
pub async fn suspend(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Result<Json<SuspensionAnswer>, HttpError> {
    suspend_code(&state, peer, &headers, &code, true).await
}

/// Lift this endpoint's suspension of a code (its Voucher's annotation, if set, still holds)
#[utoipa::path(
    delete,
    path = "/billing/vouchers/suspend/{code}",
    params(("code" = String, Path, description = "The code; trimmed and upper-cased")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Lifted; `suspended` says whether the annotation still holds it", body = SuspensionAnswer),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "No such code", body = ErrorBody),
    )
)]
pub(crate) async fn resume(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Result<Json<SuspensionAnswer>, HttpError> {
    suspend_code(&state, peer, &headers, &code, false).await
}

async fn suspend_code(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
    code: &str,
    on: bool,
) -> Result<Json<SuspensionAnswer>, HttpError> {
    let principal = admin(state, peer, headers).await?;
    let code = Code::parse(code).map_err(|e| HttpError::bad_request(e.to_string()))?;
    let Some(done) = state
        .store
        .suspend_code(&code, on, &principal.subject)
        .await?
    else {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no such code {code}"),
        ));
    };
    // This server's next preview shows the change, whenever the
    // notification that tells every server arrives.
    state.codes.invalidate(code.as_str());
    Ok(suspension_answer(code.to_string(), done))
}

/// Suspend a campaign: none of its codes is redeemed, on any path, until lifted
#[utoipa::path(
    post,
    path = "/billing/vouchers/suspend/campaigns/{namespace}/{name}",
    params(
        ("namespace" = String, Path, description = "The VoucherCampaign's namespace"),
        ("name" = String, Path, description = "The VoucherCampaign's name"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Suspended (a repeat changes nothing)", body = SuspensionAnswer),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "No such campaign in the billing database", body = ErrorBody),
    )
)]
pub async fn suspend_campaign(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<SuspensionAnswer>, HttpError> {
    switch_campaign(&state, peer, &headers, &namespace, &name, true).await
}

/// Lift this endpoint's suspension of a campaign
#[utoipa::path(
    delete,
    path = "/billing/vouchers/suspend/campaigns/{namespace}/{name}",
    params(
        ("namespace" = String, Path, description = "The VoucherCampaign's namespace"),
        ("name" = String, Path, description = "The VoucherCampaign's name"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Lifted; `suspended` says whether the annotation still holds it", body = SuspensionAnswer),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "No such campaign in the billing database", body = ErrorBody),
    )
)]
pub(crate) async fn resume_campaign(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<SuspensionAnswer>, HttpError> {
    switch_campaign(&state, peer, &headers, &namespace, &name, false).await
}

async fn switch_campaign(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
    namespace: &str,
    name: &str,
    on: bool,
) -> Result<Json<SuspensionAnswer>, HttpError> {
    let principal = admin(state, peer, headers).await?;
    let done = state
        .store
        .suspend_campaign(namespace, name, on, &principal.subject)
        .await?;
    let Some(done) = done else {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no VoucherCampaign {namespace}/{name} has codes in the billing database \
                 (kubectl get vouchercampaigns -n {namespace} shows those that exist)"
            ),
        ));
    };
    state.codes.empty();
    Ok(suspension_answer(format!("{namespace}/{name}"), done))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReverseRedemptionRequest {
    pub code: String,
    /// The customer (customers.user_id) whose redemption is reversed.
    pub user_id: String,
    /// Why: kept in the history and the audit record.
    #[serde(default)]
    pub reason: String,
}

/// Reverse a redemption: claw back its credit (or end its discount grant) and free its slot
#[utoipa::path(
    post,
    path = "/billing/vouchers/redemptions/reverse",
    request_body = ReverseRedemptionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Reversed: {code, user_id, reason, redeemed_at, reversed_at, credit_omr, grant_id}; the customer may redeem again"),
        (status = 400, description = "A malformed code, user_id or reason", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not an administrator", body = ErrorBody),
        (status = 404, description = "This customer holds no redemption of the code", body = ErrorBody),
        (status = 409, description = "The customer's balance no longer covers the credit; nothing reversed", body = ErrorBody),
    )
)]
pub async fn reverse_redemption(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    JsonBody(request): JsonBody<ReverseRedemptionRequest>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let principal = admin(&state, peer, &headers).await?;
    let code = Code::parse(&request.code).map_err(|e| HttpError::bad_request(e.to_string()))?;
    let user_id = request.user_id.trim();
    if user_id.is_empty() || user_id.chars().any(char::is_control) || user_id.len() > 255 {
        return Err(HttpError::bad_request(
            "\"user_id\" must be 1 to 255 characters without control characters",
        ));
    }
    if request.reason.chars().count() > 512 || request.reason.chars().any(char::is_control) {
        return Err(HttpError::bad_request(
            "\"reason\" must be at most 512 characters without control characters",
        ));
    }
    let actor = crate::domain::Actor::Subject {
        subject: principal.subject.clone(),
    };
    use crate::store::reversal::RedemptionReversal;
    match state
        .store
        .reverse_redemption(&code, user_id, &request.reason, &actor)
        .await?
    {
        RedemptionReversal::Reversed(answer) => {
            state.codes.invalidate(code.as_str());
            Ok(Json(answer))
        }
        RedemptionReversal::NotFound => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("{user_id} holds no redemption of code {code}"),
        )),
        RedemptionReversal::BalanceShort { balance, credit } => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "{user_id}'s balance ({balance} OMR) no longer covers the {credit} OMR credit of \
                 code {code}; nothing was reversed"
            ),
        )),
    }
}
