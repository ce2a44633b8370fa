//! The public redeem-preview and the checkout redemption.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::body::JsonBody;
use super::codes::Lookup;
use super::error::{ErrorBody, HttpError};
use super::{AppState, OutcomeLabel, Peer};
use crate::domain::{Code, Currency, Discount, Redeemability};
use crate::store::discounts::DiscountGrant;
use crate::store::redeem::{Answer, Grant, Redeemed, Redemption};

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PreviewRequest {
    /// The code as the customer typed it; trimmed and upper-cased.
    pub code: Option<String>,
}

/// What the landing page may show about a code. Never its counters.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PreviewResponse {
    pub code: String,
    /// The credit a redemption grants, in whole OMR (absent for a discount code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credit_omr: Option<i32>,
    /// The discount a redemption grants (absent for a credit code).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discount: Option<DiscountTerms>,
    /// This platform's currency (ISO 4217): a credit's (in whole units) and a discount's
    /// amounts (in minor units).
    pub currency: String,
    pub description: String,
    pub active: bool,
    /// Whether a redemption would be accepted now.
    pub accepting_redemptions: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct RedeemRequest {
    pub code: Option<String>,
    /// The customer's tenant, needed when this subject has no customer yet.
    pub tenant_id: Option<String>,
}

/// A discount's terms (DESIGN §10): a share of each matching charge or an
/// amount off an order's matching charges, in the currency's minor units.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct DiscountTerms {
    /// Percent off each matching charge (1 to 100, rounded down to a minor unit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent_off: Option<i32>,
    /// Minor units off an order's matching charges together, once per order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_off: Option<i64>,
    /// Charge categories it applies to; empty: every charge.
    #[serde(default)]
    pub applies_to: Vec<String>,
    /// Calendar months it lasts from the redemption; absent: once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_months: Option<i32>,
}

impl From<&Discount> for DiscountTerms {
    fn from(discount: &Discount) -> Self {
        let (percent_off, amount_off) = discount.off.split();
        Self {
            percent_off,
            amount_off,
            applies_to: discount.applies_to.clone(),
            duration_months: discount.duration_months,
        }
    }
}

/// A customer's discount grant, as a redemption answers it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GrantedDiscount {
    #[serde(flatten)]
    pub terms: DiscountTerms,
    pub grant_id: uuid::Uuid,
    /// The redemption: the grant applies from then.
    pub starts_at: chrono::DateTime<Utc>,
    /// When it ends: durationMonths calendar months (UTC) after starts_at; for a once-grant the
    /// voucher's expiresAt, or null (it lives until used).
    pub ends_at: Option<chrono::DateTime<Utc>>,
}

impl From<&DiscountGrant> for GrantedDiscount {
    fn from(grant: &DiscountGrant) -> Self {
        Self {
            terms: (&grant.discount).into(),
            grant_id: grant.grant_id,
            starts_at: grant.starts_at,
            ends_at: grant.ends_at,
        }
    }
}

/// What a redemption granted: a credit, or a discount.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum RedeemResponse {
    Credit {
        code: String,
        /// The credit granted, in whole units of `currency`.
        credit_omr: i32,
        /// The customer's credit balance after this grant.
        balance_omr: i64,
        /// This platform's currency (ISO 4217).
        currency: String,
    },
    Discount {
        code: String,
        /// The currency of the discount's amounts (minor units).
        currency: String,
        discount: GrantedDiscount,
    },
}

/// The code of a request body: present, not blank, and of the code grammar.
fn code_of(input: Option<&str>) -> Result<Code, HttpError> {
    match input.map(str::trim) {
        None => Err(HttpError::bad_request("the field \"code\" is required")),
        Some("") => Err(HttpError::bad_request("the code is blank")),
        Some(code) => Code::parse(code).map_err(|e| HttpError::bad_request(e.to_string())),
    }
}

/// Preview a voucher code
#[utoipa::path(
    post,
    path = "/billing/vouchers/redeem-preview",
    request_body = PreviewRequest,
    responses(
        (status = 200, description = "The code can be redeemed", body = PreviewResponse),
        (status = 400, description = "Malformed body, missing or blank code", body = ErrorBody),
        (status = 404, description = "No such code", body = ErrorBody),
        (status = 410, description = "Exists, but inactive, fully redeemed or outside its window", body = PreviewResponse),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody),
        (status = 503, description = "A global (cross-Sovereign) code whose share on this platform is used up for now while units remain elsewhere; see Retry-After", body = PreviewResponse),
    )
)]
pub async fn preview(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    JsonBody(request): JsonBody<PreviewRequest>,
) -> Result<Response, HttpError> {
    state.check_rate(state.client_ip(peer.0.ip(), &headers))?;
    let code = code_of(request.code.as_deref())?;
    state.check_guessing(&code)?;
    let (record, source) = state.codes.find_live(&state.store, &code).await?;
    state
        .metrics
        .preview_lookups
        .get_or_create(&super::SourceLabel {
            source: match source {
                Lookup::Memory => "memory",
                Lookup::Database => "database",
            },
        })
        .inc();
    let verdict = Redeemability::of(record.as_deref(), Utc::now());
    let Some(record) = record.filter(|_| !verdict.is_hidden()) else {
        state.unknown_code(&code);
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            verdict.public_reason(),
        ));
    };
    let discount = record.terms.discount.as_ref();
    let body = PreviewResponse {
        code: record.code.clone(),
        credit_omr: discount.is_none().then_some(record.terms.credit_omr),
        discount: discount.map(DiscountTerms::from),
        currency: state.settings.billing.currency.as_str().to_owned(),
        description: record.terms.description.clone(),
        active: record.terms.active,
        accepting_redemptions: verdict.is_redeemable(),
    };
    let status = match verdict {
        Redeemability::Redeemable => StatusCode::OK,
        Redeemability::ShareUsedUp => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::GONE,
    };
    Ok(with_retry_after((status, Json(body)).into_response()))
}

/// How a redemption outcome is answered, first and when replayed for its
/// Idempotency-Key.
fn render(outcome: &Redeemed, currency: &Currency) -> (u16, serde_json::Value) {
    let error = |status: StatusCode, message: String| {
        (status.as_u16(), serde_json::json!({"error": message}))
    };
    match outcome {
        Redeemed::Granted { code, grant } => {
            let code = code.clone();
            let body = match grant {
                Grant::Credit {
                    credit_omr,
                    balance_omr,
                } => RedeemResponse::Credit {
                    code,
                    credit_omr: *credit_omr,
                    balance_omr: *balance_omr,
                    currency: currency.as_str().to_owned(),
                },
                Grant::Discount { currency, grant } => RedeemResponse::Discount {
                    code,
                    currency: currency.as_str().to_owned(),
                    discount: grant.into(),
                },
            };
            (
                200,
                serde_json::to_value(body).expect("a response serialises"),
            )
        }
        Redeemed::NotFound => error(
            StatusCode::NOT_FOUND,
            Redeemability::Unknown.public_reason(),
        ),
        // A global code's share here is used up: another Sovereign may give units back.
        Redeemed::Gone(verdict @ Redeemability::ShareUsedUp) => {
            error(StatusCode::SERVICE_UNAVAILABLE, verdict.public_reason())
        }
        Redeemed::Gone(verdict) => error(StatusCode::GONE, verdict.public_reason()),
        Redeemed::AlreadyRedeemed {
            code,
            credit_omr,
            discount,
            redeemed_at,
        } => {
            let mut body = serde_json::json!({
                "error": "you have already redeemed this voucher code",
                "code": code,
                "credit_omr": credit_omr,
                "redeemed_at": redeemed_at,
            });
            if let Some(grant) = discount {
                body["discount"] =
                    serde_json::to_value(GrantedDiscount::from(grant)).expect("a grant serialises");
                body.as_object_mut().map(|b| b.remove("credit_omr"));
            }
            (StatusCode::CONFLICT.as_u16(), body)
        }
        Redeemed::TenantRequired => error(
            StatusCode::BAD_REQUEST,
            "the field \"tenant_id\" is required for a customer's first redemption".into(),
        ),
        Redeemed::ClaimedElsewhere { code } => (
            StatusCode::CONFLICT.as_u16(),
            serde_json::json!({
                "error": "you have already redeemed this voucher code on another of the vendor's \
                          platforms: it is once per customer anywhere",
                "code": code,
            }),
        ),
    }
}

fn outcome_label(outcome: &Redeemed) -> &'static str {
    match outcome {
        Redeemed::Granted {
            grant: Grant::Credit { .. },
            ..
        } => "granted",
        Redeemed::Granted {
            grant: Grant::Discount { .. },
            ..
        } => "discount_granted",
        Redeemed::NotFound => "not_found",
        Redeemed::Gone(Redeemability::Capped { .. }) => "capped",
        Redeemed::Gone(Redeemability::Inactive) => "inactive",
        Redeemed::Gone(Redeemability::ShareUsedUp) => "share_used_up",
        Redeemed::Gone(_) => "outside_window",
        Redeemed::AlreadyRedeemed { .. } => "already_redeemed",
        Redeemed::TenantRequired => "tenant_required",
        Redeemed::ClaimedElsewhere { .. } => "claimed_elsewhere",
    }
}

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Longest tenant id accepted.
const MAX_TENANT: usize = 64;

/// A tenant id as the billing service's tenants are named.
fn valid_tenant(tenant: &str) -> bool {
    tenant.len() <= MAX_TENANT
        && tenant.starts_with(|c: char| c.is_ascii_alphanumeric())
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The `Idempotency-Key` of a redemption and the hash of the request as it
/// was understood (same code and tenant = same request), if a key was sent.
fn idempotency<'a>(
    headers: &'a HeaderMap,
    code: &Code,
    tenant: Option<&str>,
) -> Result<Option<(&'a str, Vec<u8>)>, HttpError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            HttpError::bad_request(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            ))
        })?;
    let hash = Sha256::digest(format!("{}\n{}", code, tenant.unwrap_or_default())).to_vec();
    Ok(Some((key, hash)))
}

/// Redeem a voucher code for the token's customer
#[utoipa::path(
    post,
    path = "/billing/vouchers/redeem",
    request_body = RedeemRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key and body returns the first answer and redeems once")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Granted: a credit (code, credit_omr, balance_omr), or a discount (code, currency, discount: terms, grant_id, starts_at, ends_at)", body = RedeemResponse),
        (status = 400, description = "Malformed body or code", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such code", body = ErrorBody),
        (status = 409, description = "This customer already redeemed the code; the body also carries the original grant: code, credit_omr or discount, redeemed_at", body = ErrorBody),
        (status = 410, description = "Inactive, fully redeemed or outside its window", body = ErrorBody),
        (status = 422, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody),
        (status = 503, description = "A global (cross-Sovereign) code whose share on this platform is used up for now while units remain elsewhere, or the database unavailable; see Retry-After", body = ErrorBody),
    )
)]
pub async fn redeem(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    JsonBody(request): JsonBody<RedeemRequest>,
) -> Result<Response, HttpError> {
    let client = state.client_ip(peer.0.ip(), &headers);
    state.check_rate(client)?;
    let principal = state.authenticate(client, &headers).await?;
    // Not held up by the guessing budget (anyone could spend it): the
    // checkout keeps redeeming while previews of a guessed prefix wait; its
    // unknown codes still count, and a token subject has its own limit.
    let code = code_of(request.code.as_deref())?;
    // Nothing a token or a body says reaches a query unchecked.
    for (what, text) in [("sub", &principal.subject), ("email", &principal.email)] {
        if text.chars().any(char::is_control) {
            return Err(HttpError::bad_request(format!(
                "the token's {what} contains a control character"
            )));
        }
    }
    let tenant = match principal.tenant.as_deref() {
        Some(from_token) => Some(from_token),
        None => request
            .tenant_id
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty()),
    };
    if let Some(tenant) = tenant
        && !valid_tenant(tenant)
    {
        return Err(HttpError::bad_request(format!(
            "tenant_id must be 1 to {MAX_TENANT} characters of letters, digits, '.', '_' and '-', \
             starting with a letter or digit"
        )));
    }
    let idempotency =
        idempotency(&headers, &code, tenant)?.map(|(key, hash)| (key.to_owned(), hash));
    let redemption = Redemption {
        code: code.clone(),
        subject: principal.subject.clone(),
        tenant: tenant.map(str::to_owned),
        email: principal.email.clone(),
        idempotency,
        now: Utc::now(),
        currency: state.settings.billing.currency.clone(),
        intent: None,
    };
    let currency = &state.settings.billing.currency;
    let answer = match state.redeemer.redeem(redemption.clone()).await? {
        Answer::ClaimNeeded => state.redeem_claimed(redemption).await?,
        answer => answer,
    };
    let (outcome, (status, body)) = match answer {
        Answer::Fresh(outcome) => {
            if outcome == Redeemed::NotFound {
                state.unknown_code(&code);
            }
            (outcome_label(&outcome), render(&outcome, currency))
        }
        Answer::Replayed(outcome) => ("replayed", render(&outcome, currency)),
        Answer::ReplayedAsRendered { status, body } => ("replayed", (status, body)),
        // A redemption holding its claim is decided (the store never asks twice).
        Answer::ClaimNeeded => return Err(super::claims_unavailable("the claim was not held")),
        Answer::KeyReused => {
            return Err(HttpError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was already used with a different request",
            ));
        }
    };
    state
        .metrics
        .redemptions
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok(with_retry_after((status, Json(body)).into_response()))
}

/// Seconds a client waits before asking again for a global code whose share
/// here is used up (a refill from the hub takes a round trip).
const SHARE_RETRY_AFTER: u32 = 2;

/// A 503 (a global code's share used up) tells when to ask again.
fn with_retry_after(mut response: axum::response::Response) -> axum::response::Response {
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(SHARE_RETRY_AFTER),
        );
    }
    response
}
