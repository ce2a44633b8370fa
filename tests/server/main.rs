//! The HTTP API against a real Postgres: every answer the README documents,
//! each from its own cause, bearer tokens (HS256 and RS256 through a JWKS), idempotent
//! redemption, and exactly min(N, cap) grants under contention. One module per family
//! of rules (preview, redeem, auth, connections, admin); the server they start and its
//! helpers are here.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod auth;
mod checkout;
mod connections;
mod discount;
mod preview;
mod redeem;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use voucher_operator::server::ServerSettings;
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::store::Store;

const SECRET: &str = "test-shared-secret-of-at-least-32-bytes";

struct Server {
    base: String,
    /// The database's URL (for the CLI).
    url: String,
    pool: PgPool,
    http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn settings() -> ServerSettings {
    support::server_settings()
}

fn auth() -> AuthSettings {
    AuthSettings {
        hs256_secret: Some(SECRET.into()),
        leeway: Duration::from_secs(5),
        ..Default::default()
    }
}

async fn start_with(
    settings: ServerSettings,
    auth: AuthSettings,
    kube: Option<kube::Client>,
) -> Server {
    support::init_tracing();
    let url = support::fresh_database("server").await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    let (base, stop) = support::serve_http(store, settings, auth, kube).await;
    Server {
        base,
        url,
        pool,
        http: reqwest::Client::new(),
        stop,
    }
}

/// A server with `settings`, the test tokens and no Kubernetes API.
async fn start_tuned(settings: ServerSettings) -> Server {
    start_with(settings, auth(), None).await
}

async fn start() -> Server {
    start_with(settings(), auth(), None).await
}

fn token(subject: &str, role: Option<&str>, expires_in: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({"sub": subject, "email": format!("{subject}@example.om"), "exp": now + expires_in, "iat": now});
    if let Some(role) = role {
        claims["role"] = json!(role);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

impl Server {
    /// A redemption that is granted.
    async fn assert_redeems(&self, token: Option<&str>, body: Value) {
        let (status, answer) = self.redeem(token, body, None).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }

    /// `POST /billing/vouchers/issue` with `token` and `body`.
    async fn issue(&self, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/billing/vouchers/issue", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// One value the test database answers `sql` with.
    async fn scalar<T>(&self, sql: &'static str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// A redemption refused with `status` and an error that says `says`.
    async fn assert_refused(
        &self,
        token: Option<&str>,
        body: Value,
        status: StatusCode,
        says: &str,
    ) {
        let (answered, answer) = self.redeem(token, body, None).await;
        assert_eq!(answered, status, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{error:?} does not say {says:?}");
    }

    async fn seed(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn preview(&self, body: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/billing/vouchers/redeem-preview", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn redeem(
        &self,
        token: Option<&str>,
        body: Value,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(format!("{}/billing/vouchers/redeem", self.base))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn counts(&self, code: &str) -> (i32, i64, i64) {
        sqlx::query_as(
            "SELECT (SELECT times_redeemed FROM promo_codes WHERE code = $1), \
                    (SELECT count(*) FROM promo_redemptions WHERE code = $1), \
                    (SELECT count(*) FROM credit_ledger WHERE reason = 'promo:' || $1)",
        )
        .bind(code)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

const SEED: &str = "
INSERT INTO promo_codes (code, credit_omr, description, active, max_redemptions, times_redeemed, valid_from, expires_at, deleted_at) VALUES
 ('LIVE-10', 10, 'ten rial', true, 0, 0, NULL, NULL, NULL),
 ('OFF-10', 10, 'paused', false, 0, 0, NULL, NULL, NULL),
 ('FULL-10', 10, 'full', true, 1, 1, NULL, NULL, NULL),
 ('SOON-10', 10, 'soon', true, 0, 0, now() + interval '1 day', NULL, NULL),
 ('PAST-10', 10, 'past', true, 0, 0, NULL, now() - interval '1 day', NULL),
 ('GONE-10', 10, 'deleted', false, 0, 3, NULL, NULL, now());
";

/// A counter of the server's /metrics (0 when not yet reported).
async fn metric(s: &Server, name: &str) -> u64 {
    let text = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Whether the concrete `path` is an instance of the OpenAPI `template` (`{name}` segments).
fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}')) || t == p)
}

/// Every route of the API document served at `base` but the customers' three (preview,
/// redeem, the checkout's quote): its method and path template.
async fn non_customer_routes(http: &reqwest::Client, base: &str) -> Vec<(reqwest::Method, String)> {
    let document: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut routes = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        let customers = ["/redeem-preview", "/redeem", "/checkout/quote"];
        if customers.iter().any(|route| path.ends_with(route)) {
            continue;
        }
        for method in item.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            routes.push((method, path.clone()));
        }
    }
    routes
}
