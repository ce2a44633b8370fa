//! The checkout lifecycle (DESIGN §10): quote an order (the customer, or the
//! billing service for a customer), commit it once (the billing service or
//! an administrator, admin port only), reverse it whole.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Principal;
use super::body::JsonBody;
use super::error::{ErrorBody, HttpError};
use super::{AppState, Peer};
use crate::domain::checkout::{Line, MAX_ID_LEN, MAX_LINE_AMOUNT, MAX_LINES, Quote};
use crate::domain::{Actor, Currency};
use crate::store::checkout::{Committed, GrantRef, Order, Reversed};

/// The largest body of a checkout request: 200 lines with ids of 128 characters fit.
pub(crate) const CHECKOUT_BODY_LIMIT: usize = 64 * 1024;

/// Longest reason of a reversal.
const MAX_REASON: usize = 512;

/// A line of an order, as the checkout sends it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LineBody {
    /// Unique within the order, 1 to 128 characters.
    pub id: String,
    /// A charge category of --charge-categories.
    pub category: String,
    /// Minor units of the currency, 0 to 10^12, before tax.
    pub amount: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuoteRequest {
    /// The customer (customers.user_id): required from the billing service, absent (or the
    /// token's own subject) from a customer.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Optional: the order id the commit will name, so the same body can be quoted then
    /// committed. Checked like the commit's, otherwise unused.
    #[serde(default)]
    pub order_id: Option<String>,
    pub lines: Vec<LineBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommitRequest {
    pub user_id: Option<String>,
    /// The billing service's order id, 1 to 128 characters: one commit per customer and order.
    pub order_id: Option<String>,
    pub lines: Vec<LineBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReverseRequest {
    pub user_id: Option<String>,
    /// Why (refunded, cancelled): kept in the audit record's answer.
    #[serde(default)]
    pub reason: String,
}

/// A priced line.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QuotedLine {
    pub id: String,
    pub category: String,
    pub amount: i64,
    /// Minor units taken off this line.
    pub discount: i64,
    /// The code whose grant took it off; null when none did.
    pub code: Option<String>,
    pub grant_id: Option<uuid::Uuid>,
}

/// An order priced: the same for a quote and its commit when nothing changed in between.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QuoteAnswer {
    pub currency: String,
    pub lines: Vec<QuotedLine>,
    /// The lines' amounts, before the discount.
    pub total: i64,
    /// The discount of all lines together.
    pub discount: i64,
}

/// How a priced order is answered: a quote, a commit, and its repeats.
fn render(quote: &Quote<GrantRef>, currency: &Currency) -> serde_json::Value {
    let answer = QuoteAnswer {
        currency: currency.as_str().to_owned(),
        lines: quote
            .lines
            .iter()
            .map(|p| QuotedLine {
                id: p.line.id.clone(),
                category: p.line.category.clone(),
                amount: p.line.amount,
                discount: p.discount,
                code: p.grant.as_ref().map(|(_, code)| code.clone()),
                grant_id: p.grant.as_ref().map(|(id, _)| *id),
            })
            .collect(),
        total: quote.total,
        discount: quote.discount,
    };
    serde_json::to_value(answer).expect("an answer serialises")
}

/// An id of the request: present, 1 to 128 characters, no control character.
fn id_of(field: &str, value: Option<&str>) -> Result<String, HttpError> {
    let value = value.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(HttpError::bad_request(format!(
            "the field \"{field}\" is required"
        )));
    }
    if value.chars().count() > MAX_ID_LEN || value.chars().any(char::is_control) {
        return Err(HttpError::bad_request(format!(
            "\"{field}\" must be 1 to {MAX_ID_LEN} characters without control characters"
        )));
    }
    Ok(value.to_owned())
}

/// The order's lines, each checked: at most 200, unique ids, a configured
/// category, an amount in range.
fn lines_of(state: &AppState, lines: Vec<LineBody>) -> Result<Vec<Line>, HttpError> {
    if lines.len() > MAX_LINES {
        return Err(HttpError::bad_request(format!(
            "an order has at most {MAX_LINES} lines; this one has {}",
            lines.len()
        )));
    }
    let categories = &state.settings.billing.categories;
    let mut checked: Vec<Line> = Vec::with_capacity(lines.len());
    for (i, line) in lines.into_iter().enumerate() {
        let id = id_of(&format!("lines[{i}].id"), Some(&line.id))?;
        if checked.iter().any(|l| l.id == id) {
            return Err(HttpError::bad_request(format!(
                "lines[{i}].id \"{id}\" appears twice: line ids are unique within an order"
            )));
        }
        if !categories.contains(&line.category) {
            return Err(HttpError::bad_request(format!(
                "lines[{i}].category \"{}\" is not a charge category of this Sovereign ({})",
                line.category,
                categories.joined()
            )));
        }
        if !(0..=MAX_LINE_AMOUNT).contains(&line.amount) {
            return Err(HttpError::bad_request(format!(
                "lines[{i}].amount is {}; an amount is minor units from 0 to {MAX_LINE_AMOUNT}",
                line.amount
            )));
        }
        checked.push(Line {
            id,
            category: line.category,
            amount: line.amount,
        });
    }
    Ok(checked)
}

/// The caller, within the client's and the subject's budgets.
async fn caller(state: &AppState, peer: Peer, headers: &HeaderMap) -> Result<Principal, HttpError> {
    let client = state.client_ip(peer.0.ip(), headers);
    state.check_rate(client)?;
    state.authenticate(client, headers).await
}

/// The billing service or an administrator: who may commit and reverse.
fn checkout_service(principal: &Principal) -> Result<(), HttpError> {
    if principal.is_billing_service() || principal.is_admin() {
        return Ok(());
    }
    Err(HttpError::new(
        StatusCode::FORBIDDEN,
        "committing or reversing an order needs the role billing-service (or an administrator's): \
         a customer never commits lines it priced itself",
    ))
}

/// Quote an order
#[utoipa::path(
    post,
    path = "/billing/vouchers/checkout/quote",
    request_body = QuoteRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The order priced with the customer's discount grants; nothing written", body = QuoteAnswer),
        (status = 400, description = "A malformed order, naming the field", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 403, description = "A customer quoting for another customer", body = ErrorBody),
    )
)]
pub async fn quote(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    JsonBody(request): JsonBody<QuoteRequest>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let principal = caller(&state, peer, &headers).await?;
    let user_id = if principal.is_billing_service() || principal.is_admin() {
        id_of("user_id", request.user_id.as_deref())?
    } else {
        match request.user_id.as_deref() {
            Some(other) if other != principal.subject => {
                return Err(HttpError::new(
                    StatusCode::FORBIDDEN,
                    "a customer quotes its own orders: leave out user_id",
                ));
            }
            _ => principal.subject.clone(),
        }
    };
    if request.order_id.is_some() {
        id_of("order_id", request.order_id.as_deref())?;
    }
    let lines = lines_of(&state, request.lines)?;
    let quote = state.store.quote(&user_id, &lines, Utc::now()).await?;
    Ok(Json(render(&quote, &state.settings.billing.currency)))
}

/// Commit an order once
#[utoipa::path(
    post,
    path = "/billing/vouchers/checkout/commit",
    request_body = CommitRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Recorded once for the customer and order id (a repeat with the same body answers the same)", body = QuoteAnswer),
        (status = 400, description = "A malformed order, naming the field", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 403, description = "Not the billing service nor an administrator", body = ErrorBody),
        (status = 409, description = "The order was committed before with another body", body = ErrorBody),
    )
)]
pub async fn commit(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CommitRequest>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let principal = caller(&state, peer, &headers).await?;
    checkout_service(&principal)?;
    let user_id = id_of("user_id", request.user_id.as_deref())?;
    let order_id = id_of("order_id", request.order_id.as_deref())?;
    let lines = lines_of(&state, request.lines)?;
    let actor = Actor::Subject {
        subject: principal.subject.clone(),
    };
    let order = Order {
        user_id: &user_id,
        order_id: &order_id,
        lines: &lines,
        actor: &actor,
        currency: &state.settings.billing.currency,
        now: Utc::now(),
    };
    match state.store.commit(&order).await? {
        Committed::Answered(priced) => Ok(Json(render(&priced.quote, &priced.currency))),
        Committed::Differs => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "order {order_id} of {user_id} was committed before with other lines; \
                 an order is committed once (reverse it, then commit it under a new order id)"
            ),
        )),
    }
}

/// Reverse a committed order
#[utoipa::path(
    post,
    path = "/billing/vouchers/checkout/orders/{order_id}/reverse",
    request_body = ReverseRequest,
    params(("order_id" = String, Path, description = "The order committed")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Reversed: its discount given back, once-grants usable again (a repeat answers the same)"),
        (status = 400, description = "A missing user_id or an over-long reason", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 403, description = "Not the billing service nor an administrator", body = ErrorBody),
        (status = 404, description = "No such order of this customer", body = ErrorBody),
    )
)]
pub async fn reverse(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    JsonBody(request): JsonBody<ReverseRequest>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let principal = caller(&state, peer, &headers).await?;
    checkout_service(&principal)?;
    let user_id = id_of("user_id", request.user_id.as_deref())?;
    let order_id = id_of("order_id", Some(&order_id))?;
    if request.reason.chars().count() > MAX_REASON || request.reason.chars().any(char::is_control) {
        return Err(HttpError::bad_request(format!(
            "\"reason\" must be at most {MAX_REASON} characters without control characters"
        )));
    }
    let actor = Actor::Subject {
        subject: principal.subject.clone(),
    };
    let currency = &state.settings.billing.currency;
    match state
        .store
        .reverse_order((&user_id, &order_id), &request.reason, &actor, currency)
        .await?
    {
        Reversed::Answered(answer) => Ok(Json(answer)),
        Reversed::NotFound => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            format!("no committed order {order_id} of {user_id}"),
        )),
    }
}
