//! The server role (axum): the public redeem-preview, the checkout
//! redemption, the admin compatibility endpoints, probes, metrics and the
//! OpenAPI document. Handlers are thin: the decisions are the domain's, the
//! transactions the store's.

mod admin;
pub mod auth;
mod body;
mod checkout;
mod codes;
mod connections;
mod error;
mod group;
mod limits;
mod public;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::store::Store;
use auth::Verifier;
use error::HttpError;
use limits::{LimitSettings, Limits};

/// How the server behaves. Its `Default` is what the flags default to
/// (`voucher-operator server --help`).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerSettings {
    /// The Sovereign's currency (answers name it) and charge categories.
    pub billing: crate::domain::Billing,
    /// Requests per minute per client on the public and checkout endpoints.
    pub rate_limit_per_minute: u32,
    /// Requests a client may send at once before the rate applies.
    pub rate_limit_burst: u32,
    /// Requests per minute per token subject on redeem and the admin endpoints.
    pub rate_limit_per_subject: u32,
    /// Failed authentications per minute per client before it is refused.
    pub auth_failures_per_minute: u32,
    /// Unknown codes per minute under one prefix, from anyone, before the
    /// prefix is refused (429) until its budget refills.
    pub guesses_per_minute: u32,
    /// Peers whose `X-Forwarded-For` is believed (ingress, load balancer).
    pub trusted_proxies: Vec<IpNet>,
    /// Namespace of the Vouchers that the admin endpoints create and delete.
    pub admin_namespace: String,
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// An `Idempotency-Key` and its answer are kept this long, then pruned.
    pub idempotency_retention: Duration,
    /// A client must send a request's headers within this time.
    pub header_read_timeout: Duration,
    /// A connection that carries nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Connections of one client address (trusted proxies exempt).
    pub max_connections_per_client: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            billing: crate::domain::Billing::default(),
            rate_limit_per_minute: 60,
            rate_limit_burst: 20,
            rate_limit_per_subject: 30,
            auth_failures_per_minute: 10,
            guesses_per_minute: 120,
            trusted_proxies: Vec::new(),
            admin_namespace: "default".into(),
            body_limit: 16 * 1024,
            request_timeout: Duration::from_secs(10),
            idempotency_retention: Duration::from_secs(24 * 3600),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_client: 64,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SourceLabel {
    /// `memory` or `database`.
    pub source: &'static str,
}

pub(crate) struct ServerMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub(crate) latency: Family<RouteLabel, Histogram>,
    pub redemptions: Family<OutcomeLabel, Counter>,
    /// Clients and subjects the rate limiters remember.
    pub(crate) rate_limit_keys: Gauge,
    /// Previews by where their code was found.
    pub preview_lookups: Family<SourceLabel, Counter>,
    /// Codes the preview remembers (existing and unknown).
    pub(crate) preview_cache_entries: Gauge,
    /// Redemptions of a hot code committed together.
    pub groups: group::GroupMetrics,
    /// Unknown codes asked for on the preview and redeem.
    pub(crate) unknown_codes: Counter,
    /// Times a prefix's budget of unknown codes was spent (guessing).
    pub(crate) guessing_blocked: Counter,
}

impl ServerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            redemptions: Family::default(),
            rate_limit_keys: Gauge::default(),
            preview_lookups: Family::default(),
            preview_cache_entries: Gauge::default(),
            groups: Default::default(),
            unknown_codes: Counter::default(),
            guessing_blocked: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("voucher_operator_http");
        r.register(
            "requests",
            "HTTP requests by route and status",
            metrics.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency by route",
            metrics.latency.clone(),
        );
        r.register(
            "redemptions",
            "Redemption requests by outcome",
            metrics.redemptions.clone(),
        );
        r.register(
            "rate_limit_keys",
            "Clients and subjects the rate limiters remember",
            metrics.rate_limit_keys.clone(),
        );
        r.register(
            "preview_lookups",
            "Redeem-previews by where the code was found (memory or database)",
            metrics.preview_lookups.clone(),
        );
        r.register(
            "preview_cache_entries",
            "Codes the redeem-preview remembers, existing and unknown",
            metrics.preview_cache_entries.clone(),
        );
        r.register(
            "unknown_codes",
            "Codes asked for on the preview and redeem that do not exist (or are not launched)",
            metrics.unknown_codes.clone(),
        );
        r.register(
            "guessing_blocked",
            "Times a code prefix spent its budget of unknown codes and was refused for a while",
            metrics.guessing_blocked.clone(),
        );
        r.register(
            "redemption_groups",
            "Groups of concurrent redemptions of one code committed in one transaction",
            metrics.groups.groups.clone(),
        );
        r.register(
            "grouped_redemptions",
            "Redemption requests committed in a group",
            metrics.groups.grouped.clone(),
        );
        r.register(
            "redemption_groups_one_by_one",
            "Groups undone and redeemed one by one (the cap within reach, or a failure)",
            metrics.groups.one_by_one.clone(),
        );
        metrics
    }
}

/// What every handler shares.
pub struct AppState {
    pub store: Store,
    pub verifier: Verifier,
    pub kube: Option<kube::Client>,
    pub settings: ServerSettings,
    pub(crate) metrics: ServerMetrics,
    pub registry: Registry,
    limits: Limits,
    /// The preview's codes, from memory.
    codes: Arc<codes::Codes>,
    /// Redemptions, grouped per code while one is under way.
    redeemer: Arc<group::GroupCommit>,
    /// Once-per-customer-anywhere redemptions (`perCustomer: Global`), when
    /// this Sovereign's server is joined to the vendor's hub.
    claimer: Option<crate::federation::claimer::Claimer>,
}

impl AppState {
    pub fn new(
        store: Store,
        verifier: Verifier,
        kube: Option<kube::Client>,
        settings: ServerSettings,
        registry: Registry,
    ) -> Arc<Self> {
        Self::joined(store, verifier, kube, settings, registry, None)
    }

    /// [`AppState::new`] of a Sovereign's server joined to the vendor's hub:
    /// it redeems once-per-customer-anywhere codes holding the hub's claim.
    pub fn joined(
        store: Store,
        verifier: Verifier,
        kube: Option<kube::Client>,
        settings: ServerSettings,
        mut registry: Registry,
        claimer: Option<crate::federation::claimer::Claimer>,
    ) -> Arc<Self> {
        let metrics = ServerMetrics::register(&mut registry);
        let limits = Limits::new(LimitSettings {
            per_minute: settings.rate_limit_per_minute,
            burst: settings.rate_limit_burst,
            per_subject_per_minute: settings.rate_limit_per_subject,
            auth_failures_per_minute: settings.auth_failures_per_minute,
            guesses_per_minute: settings.guesses_per_minute,
        });
        let redeemer = group::GroupCommit::new(store.clone(), metrics.groups.clone());
        Arc::new(Self {
            redeemer,
            store,
            verifier,
            kube,
            limits,
            settings,
            metrics,
            registry,
            codes: Arc::default(),
            claimer,
        })
    }

    /// Redeems a once-per-customer-anywhere code holding the hub's claim for
    /// the customer; fails closed (503) while the hub is out of reach or this
    /// server is joined to none.
    pub(crate) async fn redeem_claimed(
        &self,
        redemption: crate::store::redeem::Redemption,
    ) -> Result<crate::store::redeem::Answer, HttpError> {
        use crate::federation::claimer::{Claimed, Error};
        let Some(claimer) = &self.claimer else {
            return Err(claims_unavailable(
                "this server is joined to no hub (--sovereign, --claim-key-file)",
            ));
        };
        let failed = |error: Error| match error {
            Error::Store(error) => HttpError::from(error),
            Error::Unreachable(error) => claims_unavailable(&error.to_string()),
        };
        let holding = match claimer.claim(&self.store, redemption).await {
            Ok(Claimed::Answered(answer)) => return Ok(answer),
            Ok(Claimed::Holding(holding)) => holding,
            Err(error) => return Err(failed(error)),
        };
        // Redeemed with the other holding redemptions of the code, in one group.
        let answer = self.redeemer.redeem(holding.clone()).await;
        claimer
            .settle(&self.store, &holding, &answer)
            .await
            .map_err(failed)?;
        Ok(answer?)
    }

    /// The client's address: the socket peer, or the nearest address in
    /// `X-Forwarded-For` that is not a trusted proxy when the peer is one.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        limits::forwarded_client(peer, &entries, &self.settings.trusted_proxies)
    }

    /// Refuses a code whose prefix spent its budget of unknown codes: before
    /// the lookup, so that the refusal says nothing of the code itself.
    pub(crate) fn check_guessing(&self, code: &crate::domain::Code) -> Result<(), HttpError> {
        self.limits.guesses_blocked(code.as_str()).map_err(too_many)
    }

    /// Counts an unknown code asked for against its prefix's budget.
    pub(crate) fn unknown_code(&self, code: &crate::domain::Code) {
        self.metrics.unknown_codes.inc();
        if self.limits.guessed(code.as_str()) {
            self.metrics.guessing_blocked.inc();
            tracing::warn!(
                prefix = limits::guess_prefix(code.as_str()),
                "unknown codes under one prefix came faster than its budget: refused for a while \
                 (someone may be guessing a campaign's codes)"
            );
        }
    }

    /// Counts a request of `client` against its budget.
    pub(crate) fn check_rate(&self, client: IpAddr) -> Result<(), HttpError> {
        self.limits.client(client).map_err(too_many)
    }

    /// The principal of a request's bearer token, within the budgets: the
    /// client's for failed authentications, then the subject's.
    pub(crate) async fn authenticate(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
    ) -> Result<auth::Principal, HttpError> {
        self.limits.auth_blocked(client).map_err(too_many)?;
        let principal = match self.verifier.verify(headers).await {
            Ok(principal) => principal,
            // Keys that cannot be had are not the client's failure.
            Err(error @ auth::AuthError::Unavailable) => return Err(error.into()),
            Err(error) => {
                self.limits.auth_failed(client);
                return Err(error.into());
            }
        };
        self.limits.subject(&principal.subject).map_err(too_many)?;
        Ok(principal)
    }
}

/// A 429 for a spent budget, saying which and when to come back.
fn too_many(wait: limits::Wait) -> HttpError {
    let message = match wait.what {
        limits::Budget::Client => "too many requests from this client; slow down",
        limits::Budget::Subject => "too many requests for this account; slow down",
        limits::Budget::AuthFailures => {
            "too many failed authentications from this client; try again later"
        }
        limits::Budget::Guesses => {
            "too many unknown codes were tried that start like this one; try again later"
        }
    };
    HttpError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: message.into(),
        retry_after: Some(wait.retry_after.as_secs().max(1)),
        cause: None,
    }
}

/// Declares the `bearer` security scheme the redeem and admin paths use.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    modifiers(&BearerScheme),
    info(title = "voucher-operator", description = "Billing vouchers: public preview, checkout redemption, admin compatibility"),
    paths(public::preview, public::redeem, checkout::quote, checkout::commit, checkout::reverse, admin::reverse_redemption, admin::issue, admin::list, admin::revoke, admin::campaign_codes,
          admin::suspend, admin::resume, admin::suspend_campaign, admin::resume_campaign),
    components(schemas(
        public::PreviewRequest, public::PreviewResponse, public::RedeemRequest, public::RedeemResponse,
        checkout::QuoteRequest, checkout::CommitRequest, checkout::ReverseRequest, checkout::QuoteAnswer,
        admin::IssueRequest, admin::PromoCode, admin::ReverseRedemptionRequest, admin::RevokeAnswer, admin::SuspensionAnswer,
        error::ErrorBody
    ))
)]
pub(crate) struct ApiDoc;

/// What customers reach: preview, redemption, and liveness (which costs
/// nothing; readiness queries the database, so it is not public).
fn public_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/billing/vouchers/redeem-preview", post(public::preview))
        .route("/billing/vouchers/redeem", post(public::redeem))
        .route(
            "/billing/vouchers/checkout/quote",
            post(checkout::quote).layer(DefaultBodyLimit::max(checkout::CHECKOUT_BODY_LIMIT)),
        )
        .route("/healthz", get(|| async { "ok" }))
}

/// What only the platform reaches: the admin endpoints, readiness, the API
/// document — and the metrics, unless they have a port of their own.
fn admin_routes(metrics_here: bool) -> Router<Arc<AppState>> {
    let routes = Router::new()
        .route("/readyz", get(readyz))
        // Commit and reverse on the admin port only: a customer never commits lines it priced.
        .route(
            "/billing/vouchers/checkout/commit",
            post(checkout::commit).layer(DefaultBodyLimit::max(checkout::CHECKOUT_BODY_LIMIT)),
        )
        .route(
            "/billing/vouchers/checkout/orders/{order_id}/reverse",
            post(checkout::reverse),
        )
        .route(
            "/billing/vouchers/redemptions/reverse",
            post(admin::reverse_redemption),
        )
        .route("/billing/vouchers/issue", post(admin::issue))
        .route("/billing/vouchers/list", get(admin::list))
        .route("/billing/vouchers/revoke/{code}", delete(admin::revoke))
        .route(
            "/billing/vouchers/campaigns/{namespace}/{name}/codes",
            get(admin::campaign_codes),
        )
        .route(
            "/billing/vouchers/suspend/{code}",
            post(admin::suspend).delete(admin::resume),
        )
        .route(
            "/billing/vouchers/suspend/campaigns/{namespace}/{name}",
            post(admin::suspend_campaign).delete(admin::resume_campaign),
        )
        .route(
            "/openapi.json",
            get(|| async { axum::Json(ApiDoc::openapi()) }),
        );
    match metrics_here {
        true => routes.route("/metrics", get(metrics)),
        false => routes,
    }
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// Everything on one port (development, `run`, tests).
    All,
    Public,
    /// The admin endpoints, with the metrics or without them.
    Admin {
        metrics: bool,
    },
    /// The metrics alone (and liveness), for the scraper.
    Metrics,
}

pub(crate) fn router(state: Arc<AppState>, endpoints: Endpoints) -> Router {
    let healthz = || get(|| async { "ok" });
    let routes = match endpoints {
        Endpoints::All => public_routes().merge(admin_routes(true)),
        Endpoints::Public => public_routes(),
        // The probes too: a flood of the public port must not fail them.
        Endpoints::Admin { metrics } => admin_routes(metrics).route("/healthz", healthz()),
        Endpoints::Metrics => Router::new()
            .route("/metrics", get(self::metrics))
            .route("/healthz", healthz()),
    };
    routes
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.settings.body_limit))
        .with_state(state)
}

/// Counts and times every request by route, and answers 503 (JSON) for one
/// that outlives the request timeout.
async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response =
        match tokio::time::timeout(state.settings.request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => HttpError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the request took too long; please try again".into(),
                retry_after: Some(1),
                cause: None,
            }
            .into_response(),
        };
    state
        .metrics
        .latency
        .get_or_create(&RouteLabel {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Ready while the billing database answers with the schema this server's
/// queries need: a server started before the migration (the chart's server
/// pods do not migrate) waits here rather than failing requests.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.store.missing_migrations().await {
        Ok(missing) if missing.is_empty() => (StatusCode::OK, "ready").into_response(),
        Ok(missing) => HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the billing database lacks {} migration(s) this server needs (first: {}): \
                 waiting for `voucher-operator migrate`",
                missing.len(),
                missing[0]
            ),
        )
        .into_response(),
        Err(_) => HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the billing database is unreachable",
        )
        .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    crate::telemetry::metrics_response(&state.registry)
}

/// The server role as one process runs it: how it behaves, whose tokens it
/// trusts, and where it listens.
pub struct Config {
    pub settings: ServerSettings,
    pub auth: auth::AuthSettings,
    /// Every endpoint, or, with `admin`, only what customers need.
    pub listen: SocketAddr,
    /// The admin endpoints (and the metrics, without `metrics`).
    pub admin: Option<SocketAddr>,
    /// The metrics alone; only with `admin`.
    pub metrics: Option<SocketAddr>,
    /// Joined to the vendor's hub: once-per-customer-anywhere redemptions.
    pub claimer: Option<crate::federation::claimer::Claimer>,
}

/// A once-per-customer-anywhere code cannot be redeemed now (`cause`, for
/// the log): it fails closed rather than risk a second redemption elsewhere.
pub(crate) fn claims_unavailable(cause: &str) -> HttpError {
    HttpError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "this voucher is once per customer on any of the vendor's platforms, and the \
                  vendor's hub that keeps that promise cannot be reached now; please try again \
                  shortly"
            .into(),
        retry_after: Some(2),
        cause: Some(cause.to_owned()),
    }
}

/// The server role, built and bound: one way for the binary and the local
/// stack alike, as the controller's [`crate::controller::Role`].
pub struct Role {
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    extra: Extra,
}

impl Role {
    /// The role's parts: the token verifier (an unsafe setting stops the
    /// start), its state with its metrics in `registry` (served at
    /// /metrics), and its addresses bound (a taken one stops the start, not
    /// the first request). Without `kube` the admin issue and revoke answer
    /// 503.
    pub async fn new(
        store: Store,
        kube: Option<kube::Client>,
        config: Config,
        registry: Registry,
    ) -> anyhow::Result<Self> {
        let verifier = Verifier::new(config.auth)?;
        let state = AppState::joined(
            store,
            verifier,
            kube,
            config.settings,
            registry,
            config.claimer,
        );
        let listener = bind(config.listen, "the HTTP API").await?;
        let admin = match config.admin {
            Some(address) => Some(bind(address, "the admin endpoints").await?),
            None => None,
        };
        let metrics = match config.metrics {
            Some(address) => Some(bind(address, "the metrics").await?),
            None => None,
        };
        Ok(Self {
            state,
            listener,
            extra: Extra { admin, metrics },
        })
    }

    /// Serves until `stop`, then finishes the requests in flight.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        serve(self.listener, self.extra, self.state, stop).await
    }
}

/// A listener on `address` for `what`, said in the log.
async fn bind(address: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {address} for {what}: {e}"))?;
    tracing::info!(%address, "{what} listening");
    Ok(listener)
}

/// The listeners beside the public one.
#[derive(Default)]
pub struct Extra {
    /// The admin endpoints (and the metrics, without a listener of their own).
    pub admin: Option<tokio::net::TcpListener>,
    /// The metrics alone; only with `admin`.
    pub metrics: Option<tokio::net::TcpListener>,
}

/// Serves until `stop` is cancelled, then finishes the requests in flight:
/// everything on `listener`, or, with an `admin` listener, the admin
/// endpoints there (and the metrics, unless they have a listener of their
/// own) and only what customers need on `listener`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    extra: Extra,
    state: Arc<AppState>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Extra { admin, metrics } = extra;
    let limiter_state = state.clone();
    let cleanup_stop = stop.clone();
    tokio::spawn(async move {
        // Forget clients whose budgets refilled, so the limiters' memory
        // follows the clients of the last seconds only.
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = cleanup_stop.cancelled() => return,
                _ = tick.tick() => {
                    limiter_state.limits.retain_recent();
                    let keys = i64::try_from(limiter_state.limits.tracked()).unwrap_or(i64::MAX);
                    limiter_state.metrics.rate_limit_keys.set(keys);
                    let entries = i64::try_from(limiter_state.codes.entries()).unwrap_or(i64::MAX);
                    limiter_state.metrics.preview_cache_entries.set(entries);
                }
            }
        }
    });
    tokio::spawn(prune_idempotency_keys(state.clone(), stop.clone()));
    if let Some(claimer) = state.claimer.clone() {
        // Every replica recovers: each intent moves under its row lock.
        let every = (claimer.recover_after / 4).max(Duration::from_millis(200));
        tokio::spawn(claimer.run(state.store.clone(), every, stop.clone()));
    }
    tokio::spawn(
        state
            .codes
            .clone()
            .follow(state.store.clone(), stop.clone()),
    );
    let Some(admin) = admin else {
        let all = router(state.clone(), Endpoints::All);
        return connections::serve(listener, all, &state.settings, stop).await;
    };
    let public = router(state.clone(), Endpoints::Public);
    let admin_router = router(
        state.clone(),
        Endpoints::Admin {
            metrics: metrics.is_none(),
        },
    );
    let scrape = async {
        let Some(metrics) = metrics else {
            return Ok(());
        };
        let scraped = router(state.clone(), Endpoints::Metrics);
        connections::serve(metrics, scraped, &state.settings, stop.clone()).await
    };
    let (served, admin_served, scraped) = tokio::join!(
        connections::serve(listener, public, &state.settings, stop.clone()),
        connections::serve(admin, admin_router, &state.settings, stop.clone()),
        scrape,
    );
    served.and(admin_served).and(scraped)
}

/// Deletes `Idempotency-Key` answers older than the retention, a few times
/// per retention period (at least every 10 minutes).
async fn prune_idempotency_keys(state: Arc<AppState>, stop: CancellationToken) {
    let retention = state.settings.idempotency_retention;
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match state.store.prune_idempotency_keys(retention).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned old Idempotency-Keys"),
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::describe(&error), "cannot prune Idempotency-Keys")
            }
        }
    }
}

/// The peer address of a request (axum's connect info).
pub(crate) type Peer = ConnectInfo<SocketAddr>;
