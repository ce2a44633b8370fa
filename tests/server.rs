//! The HTTP API against a real Postgres: every answer the README documents,
//! each from its own cause, bearer tokens (HS256 and RS256 through a JWKS), idempotent
//! redemption, and exactly min(N, cap) grants under contention.

mod support;

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

#[tokio::test]
async fn preview_answers_each_case_with_its_status() {
    let s = start().await;
    s.seed(SEED).await;

    for variant in ["LIVE-10", "  live-10 ", "\tLive-10\n"] {
        let (status, body) = s.preview(&json!({"code": variant}).to_string()).await;
        assert_eq!(status, StatusCode::OK, "{variant:?}");
        assert_eq!(
            body,
            json!({"code": "LIVE-10", "credit_omr": 10, "description": "ten rial", "active": true, "accepting_redemptions": true})
        );
    }
    for code in ["OFF-10", "FULL-10", "SOON-10", "PAST-10"] {
        let (status, body) = s.preview(&json!({"code": code}).to_string()).await;
        assert_eq!(status, StatusCode::GONE, "{code}");
        assert_eq!(body["accepting_redemptions"], false);
        assert_eq!(body["code"], code);
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "accepting_redemptions",
                "active",
                "code",
                "credit_omr",
                "description"
            ],
            "never counters"
        );
    }
    let (unknown_status, unknown) = s.preview(r#"{"code": "NOPE-10"}"#).await;
    let (gone_status, gone) = s.preview(r#"{"code": "gone-10"}"#).await;
    assert_eq!(
        (unknown_status, gone_status),
        (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND)
    );
    assert_eq!(
        unknown, gone,
        "a tombstone looks exactly like an unknown code"
    );

    for (body, why) in [
        ("{not json", "not valid JSON"),
        ("{}", "\"code\" is required"),
        (r#"{"code": "   "}"#, "blank"),
        (r#"{"code": 42}"#, "not valid JSON for this endpoint"),
        (r#"{"code": "a b c"}"#, "only letters"),
        ("", "empty"),
    ] {
        let (status, error) = s.preview(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(
            error["error"].as_str().unwrap().contains(why),
            "{body:?}: {error}"
        );
    }
    let huge = json!({"code": "LIVE-10", "padding": "x".repeat(10_000)}).to_string();
    let (status, error) = s.preview(&huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error["error"].is_string());
}

/// Waits (at most 1 s) until the preview of `code` answers `status`.
async fn preview_follows(s: &Server, code: &str, status: StatusCode) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let (seen, body) = s.preview(&json!({"code": code}).to_string()).await;
        if seen == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{code}: still {seen} {body} after 1 s, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `preview_lookups` counter of `source` (memory or database), from /metrics.
async fn preview_lookups(s: &Server, source: &str) -> u64 {
    metric(
        s,
        &format!("voucher_operator_http_preview_lookups_total{{source=\"{source}\"}}"),
    )
    .await
}

#[tokio::test]
async fn the_preview_answers_from_memory_and_follows_out_of_band_changes_within_a_second() {
    let s = start().await;
    s.seed(SEED).await;
    // Once the server hears the database's notifications, a code read once is answered from
    // memory, and so is a code known not to exist.
    preview_follows(&s, "LIVE-10", StatusCode::OK).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while preview_lookups(&s, "memory").await == 0 {
        assert!(std::time::Instant::now() < deadline, "never from memory");
        s.preview(r#"{"code": "LIVE-10"}"#).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.preview(r#"{"code": "LATER-10"}"#).await;
    let from_database = preview_lookups(&s, "database").await;
    for code in ["LIVE-10", "LATER-10", "LIVE-10", "LATER-10"] {
        s.preview(&json!({"code": code}).to_string()).await;
    }
    assert_eq!(
        preview_lookups(&s, "database").await,
        from_database,
        "repeated previews, known or unknown, stay off the database"
    );

    // Changed out of band, as the billing service's admin page does: each followed within 1 s.
    s.seed("UPDATE promo_codes SET credit_omr = 12, description = 'twelve' WHERE code = 'LIVE-10'")
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let (_, body) = s.preview(r#"{"code": "LIVE-10"}"#).await;
        if body["credit_omr"] == 12 {
            assert_eq!(body["description"], "twelve");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the credit change was not followed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.seed("UPDATE promo_codes SET active = false WHERE code = 'LIVE-10'")
        .await;
    preview_follows(&s, "LIVE-10", StatusCode::GONE).await;
    s.seed("UPDATE promo_codes SET active = true, deleted_at = now() WHERE code = 'LIVE-10'")
        .await;
    preview_follows(&s, "LIVE-10", StatusCode::NOT_FOUND).await;
    // A code created after it was previewed as unknown.
    s.seed("INSERT INTO promo_codes (code, credit_omr) VALUES ('LATER-10', 3)")
        .await;
    let body = preview_follows(&s, "LATER-10", StatusCode::OK).await;
    assert_eq!(body["credit_omr"], 3);
    // The last redemption under the cap closes it for the preview too.
    s.seed("INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('ONE-10', 1, 1)")
        .await;
    preview_follows(&s, "ONE-10", StatusCode::OK).await;
    s.assert_redeems(
        Some(&token("frank", None, 300)),
        json!({"code": "ONE-10", "tenant_id": "t"}),
    )
    .await;
    preview_follows(&s, "ONE-10", StatusCode::GONE).await;
}

#[tokio::test]
async fn preview_is_rate_limited_per_client() {
    let mut limited = settings();
    limited.rate_limit_per_minute = 60;
    limited.rate_limit_burst = 3;
    let s = start_with(limited, auth(), None).await;
    s.seed(SEED).await;
    for _ in 0..3 {
        assert_eq!(s.preview(r#"{"code": "LIVE-10"}"#).await.0, StatusCode::OK);
    }
    let response = s
        .http
        .post(format!("{}/billing/vouchers/redeem-preview", s.base))
        .header("x-forwarded-for", "203.0.113.9")
        .json(&json!({"code": "LIVE-10"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "X-Forwarded-For from an untrusted peer is ignored"
    );
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many requests")
    );
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client() {
    let mut behind_proxy = settings();
    behind_proxy.rate_limit_per_minute = 60;
    behind_proxy.rate_limit_burst = 1;
    behind_proxy.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let s = start_with(behind_proxy, auth(), None).await;
    s.seed(SEED).await;
    let from = |client: &'static str| {
        s.http
            .post(format!("{}/billing/vouchers/redeem-preview", s.base))
            .header("x-forwarded-for", format!("{client}, 127.0.0.5"))
            .json(&json!({"code": "LIVE-10"}))
            .send()
    };
    assert_eq!(from("198.51.100.1").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        from("198.51.100.2").await.unwrap().status(),
        StatusCode::OK,
        "another client has its own budget"
    );
    assert_eq!(
        from("198.51.100.1").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // An entry with a port is the same client, not a reason to trust the one to its left.
    assert_eq!(
        from("203.0.113.66, 198.51.100.1:4711")
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // IPv6 clients are counted by their /64.
    assert_eq!(
        from("2001:db8:5:5::1").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        from("[2001:db8:5:5::2]:4711").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS,
        "another address of the same /64"
    );
}

#[tokio::test]
async fn each_subject_and_each_failing_client_has_a_budget() {
    let s = start_tuned(ServerSettings {
        rate_limit_per_subject: 2,
        auth_failures_per_minute: 2,
        ..settings()
    })
    .await;
    s.seed(SEED).await;
    // Per subject: the third redemption attempt of alice's token waits; bob's does not.
    let alice = token("alice", None, 300);
    for _ in 0..2 {
        s.redeem(
            Some(&alice),
            json!({"code": "LIVE-10", "tenant_id": "t1"}),
            None,
        )
        .await;
    }
    let (status, body) = s
        .redeem(Some(&alice), json!({"code": "LIVE-10"}), None)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body["error"].as_str().unwrap().contains("for this account"));
    let bob = token("bob", Some("superadmin"), 300);
    assert_eq!(
        s.redeem(
            Some(&bob),
            json!({"code": "LIVE-10", "tenant_id": "t1"}),
            None
        )
        .await
        .0,
        StatusCode::OK
    );
    // The admin endpoints count too.
    let list = || {
        s.http
            .get(format!("{}/billing/vouchers/list", s.base))
            .bearer_auth(&bob)
            .send()
    };
    assert_eq!(list().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        list().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // Failed authentications: beyond the budget, the client is refused even a valid token.
    for _ in 0..3 {
        assert_eq!(
            s.redeem(Some("not-a-jwt"), json!({"code": "LIVE-10"}), None)
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
    }
    let carol = token("carol", None, 300);
    s.assert_refused(
        Some(&carol),
        json!({"code": "LIVE-10", "tenant_id": "t1"}),
        StatusCode::TOO_MANY_REQUESTS,
        "failed authentications",
    )
    .await;
}

#[tokio::test]
async fn redeem_answers_each_case_with_its_status() {
    let s = start().await;
    s.seed(SEED).await;
    let alice = token("alice", None, 300);

    let (status, body) = s
        .redeem(
            Some(&alice),
            json!({"code": " live-10", "tenant_id": "t1"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"code": "LIVE-10", "credit_omr": 10, "balance_omr": 10})
    );
    let (status, body) = s
        .redeem(Some(&alice), json!({"code": "LIVE-10"}), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("already redeemed"));
    // A retry without an Idempotency-Key (the first answer was lost) can still reconcile.
    assert_eq!(
        (&body["code"], &body["credit_omr"]),
        (&json!("LIVE-10"), &json!(10))
    );
    let redeemed_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(body["redeemed_at"].clone()).expect("when it was granted");
    assert!(chrono::Utc::now() - redeemed_at < chrono::Duration::minutes(1));

    assert_eq!(
        s.redeem(Some(&alice), json!({"code": "NOPE-10"}), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.redeem(Some(&alice), json!({"code": "GONE-10"}), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    for code in ["OFF-10", "FULL-10", "SOON-10", "PAST-10"] {
        let (status, body) = s.redeem(Some(&alice), json!({"code": code}), None).await;
        assert_eq!(status, StatusCode::GONE, "{code}: {body}");
    }
    let (status, body) = s
        .redeem(
            Some(&token("bob", None, 300)),
            json!({"code": "LIVE-10"}),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a new customer needs a tenant: {body}"
    );
    assert_eq!(
        s.redeem(Some(&alice), json!({"nope": 1}), None).await.0,
        StatusCode::BAD_REQUEST
    );

    // Nothing of the refused attempts was written.
    assert_eq!(s.counts("LIVE-10").await, (1, 1, 1));
    assert_eq!(s.counts("FULL-10").await, (1, 0, 0));
    let audits: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM voucher_audit_outbox ORDER BY seq")
            .fetch_all(&s.pool)
            .await
            .unwrap();
    assert_eq!(audits, ["redeemed"]);
}

#[tokio::test]
async fn a_repeat_is_answered_as_a_repeat_whatever_the_code_says_now() {
    let s = start().await;
    s.seed(
        "INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES \
         ('ONCE-1', 7, 1), ('TWICE-2', 8, 2), ('LATER-OFF', 9, 0)",
    )
    .await;
    let (alice, bob) = (token("alice", None, 300), token("bob", None, 300));
    for (who, code) in [
        (&alice, "ONCE-1"),
        (&alice, "TWICE-2"),
        (&bob, "TWICE-2"),
        (&alice, "LATER-OFF"),
    ] {
        let (status, body) = s
            .redeem(Some(who), json!({"code": code, "tenant_id": "t1"}), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{code}: {body}");
    }
    s.seed("UPDATE promo_codes SET active = false WHERE code = 'LATER-OFF'")
        .await;
    // Used up by alice herself, used up by others, switched off since: to alice, each is her
    // own redemption — 409 with the grant, never "fully redeemed" — with a key or without.
    for (code, credit, key) in [
        ("ONCE-1", 7, None),
        ("TWICE-2", 8, None),
        ("LATER-OFF", 9, None),
        ("ONCE-1", 7, Some("retry-once-1")),
    ] {
        let (status, body) = s.redeem(Some(&alice), json!({"code": code}), key).await;
        assert_eq!(status, StatusCode::CONFLICT, "{code}: {body}");
        assert_eq!(
            (&body["code"], &body["credit_omr"]),
            (&json!(code), &json!(credit))
        );
        assert!(body["redeemed_at"].is_string(), "{body}");
    }
    // Anyone else still hears why the code cannot be redeemed.
    let carol = token("carol", None, 300);
    let (status, body) = s
        .redeem(
            Some(&carol),
            json!({"code": "ONCE-1", "tenant_id": "t1"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(s.counts("ONCE-1").await, (1, 1, 1));
}

#[tokio::test]
async fn tokens_are_checked_strictly() {
    let s = start().await;
    s.seed(SEED).await;
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    let unauthorized = |status: StatusCode| assert_eq!(status, StatusCode::UNAUTHORIZED);

    unauthorized(s.redeem(None, body.clone(), None).await.0);
    // Each refusal says why in words, never the library's names for it.
    let says = |answer: (StatusCode, Value), why: &str| {
        unauthorized(answer.0);
        let error = answer.1["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(why), "{error:?} does not say {why:?}");
        for internal in ["ExpiredSignature", "Base64", "InvalidToken", "Json("] {
            assert!(!error.contains(internal), "{error}");
        }
    };
    says(
        s.redeem(Some("not-a-jwt"), body.clone(), None).await,
        "not a JWT",
    );
    says(
        s.redeem(Some("a.b.c"), body.clone(), None).await,
        "not a JWT",
    );
    says(
        s.redeem(Some(&token("alice", None, -600)), body.clone(), None)
            .await,
        "the token has expired",
    );
    let wrong_secret = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() + 300}),
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap();
    says(
        s.redeem(Some(&wrong_secret), body.clone(), None).await,
        "signature does not match",
    );

    // alg none: a header that asks for no signature at all.
    use base64_url as b64;
    let unsigned = format!(
        "{}.{}.",
        b64::encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64::encode(
            &json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() + 300}).to_string()
        )
    );
    unauthorized(s.redeem(Some(&unsigned), body.clone(), None).await.0);

    // RS256 is not accepted when no JWKS is configured.
    let rs = encode(
        &Header::new(Algorithm::RS256),
        &json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() + 300}),
        &EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt-rs256.key.pem")).unwrap(),
    )
    .unwrap();
    let (status, error) = s.redeem(Some(&rs), body.clone(), None).await;
    unauthorized(status);
    assert!(error["error"].as_str().unwrap().contains("not accepted"));

    let response = s
        .http
        .post(format!("{}/billing/vouchers/redeem", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(s.counts("LIVE-10").await, (0, 0, 0));
}

#[tokio::test]
async fn control_characters_and_odd_tenants_are_a_400_before_any_query() {
    let s = start().await;
    s.seed(SEED).await;
    let now = chrono::Utc::now().timestamp();
    let nul_subject = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "alice\u{0}", "exp": now + 300}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    s.assert_refused(
        Some(&nul_subject),
        json!({"code": "LIVE-10", "tenant_id": "t1"}),
        StatusCode::BAD_REQUEST,
        "control character",
    )
    .await;

    let alice = token("alice", None, 300);
    let long = "t".repeat(65);
    for tenant in ["t\u{0}1", long.as_str(), "acme corp", "-acme", "ac/me"] {
        let (status, body) = s
            .redeem(
                Some(&alice),
                json!({"code": "LIVE-10", "tenant_id": tenant}),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{tenant:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("tenant_id must be")
        );
    }
    assert_eq!(s.counts("LIVE-10").await, (0, 0, 0), "nothing written");
    s.assert_redeems(
        Some(&alice),
        json!({"code": "LIVE-10", "tenant_id": "acme-1.eu_west"}),
    )
    .await;
}

#[tokio::test]
async fn a_tenant_claim_in_the_token_wins_over_the_body() {
    let s = start_with(
        settings(),
        AuthSettings {
            tenant_claim: Some("tenant_id".into()),
            ..auth()
        },
        None,
    )
    .await;
    s.seed(SEED).await;
    let claimed = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "bob", "tenant_id": "from-token", "exp": chrono::Utc::now().timestamp() + 300}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    s.assert_redeems(
        Some(&claimed),
        json!({"code": "LIVE-10", "tenant_id": "from-body"}),
    )
    .await;
    let tenant: String = s
        .scalar("SELECT tenant_id FROM customers WHERE user_id = 'bob'")
        .await;
    assert_eq!(tenant, "from-token");
}

#[tokio::test]
async fn idempotency_keys_are_pruned_after_their_retention() {
    let s = start_tuned(ServerSettings {
        idempotency_retention: Duration::from_secs(1),
        ..settings()
    })
    .await;
    s.seed(SEED).await;
    let alice = token("alice", None, 300);
    let (status, _) = s
        .redeem(
            Some(&alice),
            json!({"code": "LIVE-10", "tenant_id": "t1"}),
            Some("order-1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let keys = || async {
        s.scalar::<i64>("SELECT count(*) FROM voucher_idempotency_keys")
            .await
    };
    assert_eq!(keys().await, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while keys().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the key was never pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads from `stream` until the server closes it; whether it did within `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn address(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_owned()
}

/// A raw connection to the server that has sent `bytes`.
async fn sent(s: &Server, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address(s)).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = start_tuned(ServerSettings {
        header_read_timeout: Duration::from_secs(1),
        ..settings()
    })
    .await;
    let mut slow = sent(
        &s,
        b"POST /billing/vouchers/redeem-preview HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    // A header byte every 300 ms: the connection moves, but its headers never end.
    let trickle = async {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow.write_all(b"X").await.is_err() {
                return;
            }
        }
    };
    trickle.await;
    assert!(
        closed_within(&mut slow, Duration::from_secs(1)).await,
        "the trickling client still holds its connection"
    );
    // Others are served meanwhile.
    assert_eq!(
        s.preview(r#"{"code": "NOPE-1"}"#).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let s = start_tuned(ServerSettings {
        idle_timeout: Duration::from_secs(1),
        ..settings()
    })
    .await;
    let mut idle = sent(&s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The answer arrives, then nothing more: closed after the idle timeout.
    let started = std::time::Instant::now();
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let s = start_tuned(ServerSettings {
        max_connections: 2,
        ..settings()
    })
    .await;
    let held: Vec<_> =
        futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(address(&s))))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(address(&s)).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "over the cap"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        s.preview(r#"{"code": "NOPE-1"}"#).await.0,
        StatusCode::NOT_FOUND,
        "room again"
    );
}

/// A server on a database of its own, on a public and an admin address (and a metrics one):
/// their base URLs, serving until the value is dropped.
struct Split {
    public: String,
    admin: String,
    metrics: Option<String>,
    _stop: tokio_util::sync::DropGuard,
}

async fn serve_split(prefix: &str, with_metrics: bool) -> Split {
    use voucher_operator::server::{self, AppState, auth::Verifier};
    let url = support::fresh_database(prefix).await;
    let store = Store::from_pool(support::pool(&url).await);
    store.migrate().await.unwrap();
    voucher_operator::install_tls_provider();
    let state = AppState::new(
        store,
        Verifier::new(auth()).unwrap(),
        None,
        settings(),
        Default::default(),
    );
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let base = |l: &tokio::net::TcpListener| format!("http://{}", l.local_addr().unwrap());
    let (public, admin) = (bind().await.unwrap(), bind().await.unwrap());
    let metrics = match with_metrics {
        true => Some(bind().await.unwrap()),
        false => None,
    };
    let urls = (base(&public), base(&admin), metrics.as_ref().map(base));
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let extra = server::Extra {
        admin: Some(admin),
        metrics,
    };
    tokio::spawn(server::serve(public, extra, state, stop));
    Split {
        public: urls.0,
        admin: urls.1,
        metrics: urls.2,
        _stop: guard,
    }
}

#[tokio::test]
async fn with_an_admin_address_the_public_port_serves_only_customers() {
    let split = serve_split("split", false).await;
    let (public_base, admin_base) = (split.public.clone(), split.admin.clone());
    let http = reqwest::Client::new();
    let root = token("root", Some("superadmin"), 300);
    let get = |base: &str, path: &str| http.get(format!("{base}{path}")).bearer_auth(&root).send();
    // Readiness queries the database (and names the missing migrations): not public either.
    for path in [
        "/metrics",
        "/openapi.json",
        "/billing/vouchers/list",
        "/readyz",
    ] {
        assert_eq!(
            get(&public_base, path).await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
        assert_eq!(
            get(&admin_base, path).await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
    }
    let preview = |base: &str| {
        http.post(format!("{base}/billing/vouchers/redeem-preview"))
            .json(&json!({"code": "NOPE-1"}))
            .send()
    };
    assert_eq!(
        preview(&public_base).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let body: Value = preview(&admin_base).await.unwrap().json().await.unwrap();
    assert_eq!(
        body["error"], "no such endpoint",
        "the admin port has no public endpoints"
    );
    assert_eq!(
        get(&public_base, "/healthz").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        get(&admin_base, "/healthz").await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn one_client_cannot_take_every_connection_but_a_trusted_proxy_may() {
    for (trusted, third_served) in [
        (vec![], false),
        (vec!["127.0.0.0/8".parse().unwrap()], true),
    ] {
        let s = start_tuned(ServerSettings {
            max_connections_per_client: 2,
            trusted_proxies: trusted,
            ..settings()
        })
        .await;
        let held: Vec<_> =
            futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(address(&s))))
                .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut third = sent(
            &s,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let mut answer = Vec::new();
        use tokio::io::AsyncReadExt;
        // Served or refused, the server ends the third connection itself (an answer and close,
        // or a close at once): a connection left hanging is neither, and fails here.
        let ended =
            tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer)).await;
        assert!(
            ended.is_ok(),
            "the third connection was neither served nor closed (trusted: {third_served})"
        );
        let served = String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200");
        assert_eq!(served, third_served, "{}", String::from_utf8_lossy(&answer));
        drop(held);
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_roles_may_be_a_list() {
    let s = start().await;
    s.seed(SEED).await;
    let now = chrono::Utc::now().timestamp();
    let signed = |claims: Value| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let list = |authorization: String| {
        s.http
            .get(format!("{}/billing/vouchers/list", s.base))
            .header("authorization", authorization)
            .send()
    };
    let admins = signed(json!({"sub": "ops", "exp": now + 300, "role": ["viewer", "superadmin"]}));
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let response = list(format!("{scheme} {admins}")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{scheme}");
    }
    let viewers = signed(json!({"sub": "ops", "exp": now + 300, "role": ["viewer"]}));
    assert_eq!(
        list(format!("Bearer {viewers}")).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        list(format!("Basic {admins}")).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
}

/// A base64url encoder for hand-made tokens.
mod base64_url {
    pub fn encode(input: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = input.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

/// A JWKS endpoint that counts its fetches and serves `keys` (a 500 while it is `None`), with
/// `Cache-Control: max-age=1`.
struct JwksServer {
    url: String,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    keys: Arc<std::sync::Mutex<Option<Value>>>,
}

async fn jwks_server(keys: Option<Value>) -> JwksServer {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fetches = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(std::sync::Mutex::new(keys));
    let (count, keys) = (fetches.clone(), served.clone());
    let app = axum::Router::new().route(
        "/certs",
        axum::routing::get(move || {
            count.fetch_add(1, Ordering::SeqCst);
            let keys = keys.lock().unwrap().clone();
            async move {
                use axum::response::IntoResponse;
                match keys {
                    Some(keys) => {
                        ([("cache-control", "public, max-age=1")], axum::Json(keys)).into_response()
                    }
                    None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/certs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    JwksServer {
        url,
        fetches,
        keys: served,
    }
}

fn rs256_token(kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = json!({"sub": "kc-user", "iss": "https://kc.example/realms/r", "aud": "billing",
                        "exp": chrono::Utc::now().timestamp() + 300});
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt-rs256.key.pem")).unwrap();
    encode(&header, &claims, &key).unwrap()
}

async fn jwks_client(jwks: &JwksServer) -> Server {
    let auth = AuthSettings {
        jwks_url: Some(jwks.url.clone()),
        issuer: Some("https://kc.example/realms/r".into()),
        audience: Some("billing".into()),
        ..auth()
    };
    let s = start_with(settings(), auth, None).await;
    s.seed(SEED).await;
    s
}

#[tokio::test]
async fn an_unreachable_jwks_is_fetched_once_and_not_hammered() {
    use std::sync::atomic::Ordering;
    let jwks = jwks_server(None).await;
    let s = jwks_client(&jwks).await;
    let token = rs256_token("test-rs256");
    let attempts = (0..50).map(|_| {
        s.redeem(
            Some(&token),
            json!({"code": "LIVE-10", "tenant_id": "t1"}),
            None,
        )
    });
    for (status, body) in futures::future::join_all(attempts).await {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let message = body["error"].as_str().unwrap();
        assert!(message.contains("cannot be fetched right now"), "{message}");
        assert!(
            !message.contains(&jwks.url) && !message.contains("127.0.0.1"),
            "{message}"
        );
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "one fetch for 50 requests"
    );
    // The identity provider is back, but the next try waits its retry interval.
    *jwks.keys.lock().unwrap() =
        Some(serde_json::from_str(include_str!("fixtures/jwks.json")).unwrap());
    assert_eq!(
        s.redeem(Some(&token), json!({"code": "LIVE-10"}), None)
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_last_good_keys_count_while_the_identity_provider_is_down() {
    use std::sync::atomic::Ordering;
    let jwks = jwks_server(Some(
        serde_json::from_str(include_str!("fixtures/jwks.json")).unwrap(),
    ))
    .await;
    let s = jwks_client(&jwks).await;
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    s.assert_redeems(Some(&rs256_token("test-rs256")), body)
        .await;
    // The keys expire while the identity provider is down: they keep counting.
    *jwks.keys.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let bob = rs256_token("test-rs256");
    let (status, answer) = s.redeem(Some(&bob), json!({"code": "OFF-10"}), None).await;
    assert_eq!(
        status,
        StatusCode::GONE,
        "checked with the last good key: {answer}"
    );
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        2,
        "a refresh was tried"
    );
}

#[tokio::test]
async fn jwks_keys_expire_and_only_signing_keys_count() {
    use std::sync::atomic::Ordering;
    let mut set: Value = serde_json::from_str(include_str!("fixtures/jwks.json")).unwrap();
    // The same key again, marked for encryption: never a signing key.
    let mut encryption = set["keys"][0].clone();
    encryption["kid"] = json!("enc-key");
    encryption["use"] = json!("enc");
    set["keys"].as_array_mut().unwrap().push(encryption);
    let jwks = jwks_server(Some(set)).await;
    let s = jwks_client(&jwks).await;
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    let (status, answer) = s
        .redeem(Some(&rs256_token("test-rs256")), body.clone(), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        s.redeem(Some(&rs256_token("enc-key")), body.clone(), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // The key is removed from the set; after its max-age it is no longer accepted.
    *jwks.keys.lock().unwrap() = Some(json!({"keys": []}));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, answer) = s.redeem(Some(&rs256_token("test-rs256")), body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        2,
        "fetched again at expiry"
    );
}

#[tokio::test]
async fn rs256_tokens_are_verified_through_the_jwks_and_cannot_confuse_algorithms() {
    let jwks: Value = serde_json::from_str(include_str!("fixtures/jwks.json")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr: SocketAddr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/certs",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let settings_auth = AuthSettings {
        jwks_url: Some(format!("http://{jwks_addr}/certs")),
        issuer: Some("https://keycloak.example/realms/catalyst".into()),
        audience: Some("billing".into()),
        ..auth()
    };
    let s = start_with(settings(), settings_auth, None).await;
    s.seed(SEED).await;
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt-rs256.key.pem")).unwrap();
    let claims_for = |iss: &str, aud: &str| {
        json!({"sub": "kc-user", "email": "kc@example.om", "iss": iss, "aud": aud, "exp": chrono::Utc::now().timestamp() + 300,
                                    "realm_access": {"roles": ["sovereign-admin"]}})
    };
    let claims = |iss: &str| claims_for(iss, "billing");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-rs256".into());
    let good = encode(
        &header,
        &claims("https://keycloak.example/realms/catalyst"),
        &key,
    )
    .unwrap();
    s.assert_redeems(Some(&good), json!({"code": "LIVE-10", "tenant_id": "t1"}))
        .await;

    // A token of the realm, but issued for another service.
    let other_audience = encode(
        &header,
        &claims_for(
            "https://keycloak.example/realms/catalyst",
            "some-other-service",
        ),
        &key,
    )
    .unwrap();
    assert_eq!(
        s.redeem(Some(&other_audience), json!({"code": "LIVE-10"}), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let wrong_issuer = encode(&header, &claims("https://evil.example"), &key).unwrap();
    assert_eq!(
        s.redeem(Some(&wrong_issuer), json!({"code": "LIVE-10"}), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let mut unknown_kid = header.clone();
    unknown_kid.kid = Some("rotated-away".into());
    let unknown = encode(
        &unknown_kid,
        &claims("https://keycloak.example/realms/catalyst"),
        &key,
    )
    .unwrap();
    assert_eq!(
        s.redeem(Some(&unknown), json!({"code": "LIVE-10"}), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // Algorithm confusion: HS256 "signed" with the RSA public key as the secret.
    let public_pem = include_bytes!("fixtures/jwt-rs256.pub.pem");
    let mut confused = Header::new(Algorithm::HS256);
    confused.kid = Some("test-rs256".into());
    let forged = encode(
        &confused,
        &claims("https://keycloak.example/realms/catalyst"),
        &EncodingKey::from_secret(public_pem),
    )
    .unwrap();
    assert_eq!(
        s.redeem(Some(&forged), json!({"code": "LIVE-10"}), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    // Keycloak's realm roles make an administrator.
    let list = s
        .http
        .get(format!("{}/billing/vouchers/list", s.base))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_idempotency_key_redeems_once_and_replays_the_answer() {
    let s = start().await;
    s.seed(SEED).await;
    let carol = token("carol", None, 300);
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    let first = s.redeem(Some(&carol), body.clone(), Some("order-1")).await;
    let retry = s.redeem(Some(&carol), body.clone(), Some("order-1")).await;
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(first, retry, "a retry returns the first answer");
    assert_eq!(s.counts("LIVE-10").await, (1, 1, 1));

    let (status, error) = s
        .redeem(
            Some(&carol),
            json!({"code": "FULL-10", "tenant_id": "t1"}),
            Some("order-1"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");

    // Concurrent retries of one key: one redemption.
    let dave = token("dave", None, 300);
    let tries: Vec<_> = (0..10)
        .map(|_| s.redeem(Some(&dave), body.clone(), Some("order-2")))
        .collect();
    let answers = futures::future::join_all(tries).await;
    assert!(
        answers
            .iter()
            .all(|a| a == &answers[0] && a.0 == StatusCode::OK),
        "{answers:?}"
    );
    assert_eq!(s.counts("LIVE-10").await, (2, 2, 2));
}

#[tokio::test]
async fn a_capped_code_is_never_over_redeemed() {
    let s = Arc::new(start().await);
    for round in 0..20 {
        let code = format!("CAP50-{round:02}");
        s.seed(&format!(
            "INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('{code}', 5, 50)"
        ))
        .await;
        let requests: Vec<_> = (0..200)
            .map(|i| {
                let s = s.clone();
                let code = code.clone();
                tokio::spawn(async move {
                    let t = token(&format!("customer-{round}-{i}"), None, 300);
                    s.redeem(Some(&t), json!({"code": code, "tenant_id": "t"}), None)
                        .await
                        .0
                })
            })
            .collect();
        let mut ok = 0;
        let mut gone = 0;
        for request in requests {
            match request.await.unwrap() {
                StatusCode::OK => ok += 1,
                StatusCode::GONE => gone += 1,
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!((ok, gone), (50, 150), "round {round}");
        assert_eq!(s.counts(&code).await, (50, 50, 50), "round {round}");
        let exhausted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM voucher_audit_outbox WHERE code = $1 AND kind = 'exhausted'",
        )
        .bind(&code)
        .fetch_one(&s.pool)
        .await
        .unwrap();
        assert_eq!(exhausted, 1);
        // One audit record a grant, each with the counter its redemption made.
        let mut counted: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT (payload->'before'->>'times_redeemed')::bigint, \
                    (payload->'after'->>'times_redeemed')::bigint \
             FROM voucher_audit_outbox WHERE code = $1 AND kind = 'redeemed'",
        )
        .bind(&code)
        .fetch_all(&s.pool)
        .await
        .unwrap();
        counted.sort();
        assert_eq!(counted, (0..50).map(|n| (n, n + 1)).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn one_customer_racing_itself_gets_one_grant() {
    let s = Arc::new(start().await);
    s.seed(SEED).await;
    let erin = token("erin", None, 300);
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            let erin = erin.clone();
            tokio::spawn(async move {
                s.redeem(
                    Some(&erin),
                    json!({"code": "LIVE-10", "tenant_id": "t"}),
                    None,
                )
                .await
                .0
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1);
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT)
    );
    assert_eq!(s.counts("LIVE-10").await, (1, 1, 1));
}

#[tokio::test]
async fn admin_endpoints_need_an_admin_and_the_kubernetes_api() {
    let s = start().await;
    s.seed(SEED).await;
    let admin = token("root", Some("superadmin"), 300);
    let user = token("alice", None, 300);
    let list = |t: String| {
        s.http
            .get(format!("{}/billing/vouchers/list", s.base))
            .bearer_auth(t)
            .send()
    };

    assert_eq!(
        list(user.clone()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let response = list(admin.clone()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let codes: Vec<Value> = response.json().await.unwrap();
    let names: Vec<&str> = codes.iter().map(|c| c["code"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["FULL-10", "LIVE-10", "OFF-10", "PAST-10", "SOON-10"],
        "live codes only"
    );

    let issue = s
        .issue(&admin, &json!({"code": "NEW-1", "credit_omr": 5}))
        .await;
    assert_eq!(issue.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = issue.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("Kubernetes API"));
}

#[tokio::test]
async fn issue_and_revoke_act_on_voucher_resources() {
    use kube::ResourceExt;
    use kube::api::Api;
    use voucher_operator::api::Voucher;

    let (client, ns) = support::cluster::setup("admin").await;
    let s = start_with(
        ServerSettings {
            admin_namespace: ns.clone(),
            ..settings()
        },
        auth(),
        Some(client.clone()),
    )
    .await;
    let admin = token("root", Some("sovereign-admin"), 300);
    let issue = s.issue(&admin, &json!({"code": "spring_sale", "credit_omr": 15, "description": "spring", "max_redemptions": 100})).await;
    assert_eq!(issue.status(), StatusCode::OK);
    let body: Value = issue.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["credit_omr"].as_i64()),
        (Some("SPRING_SALE"), Some(15))
    );
    let applied = body["voucher"].as_str().unwrap_or_default().to_owned();
    // Terms outside the voucher rules are refused before anything is written.
    for (body, says) in [
        (json!({"code": "FREE-0", "credit_omr": 0}), "at least 1 OMR"),
        (
            json!({"code": "CAP-1", "credit_omr": 5, "max_redemptions": -1}),
            "redemption cap is -1",
        ),
    ] {
        let refused = s.issue(&admin, &body).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = refused.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(says), "{error}");
    }

    let vouchers: Api<Voucher> = Api::namespaced(client, &ns);
    let created = vouchers.list(&Default::default()).await.unwrap().items;
    assert_eq!(
        applied,
        format!("{ns}/{}", created[0].name_any()),
        "issue names the Voucher it applied"
    );
    assert_eq!(created.len(), 1);
    let voucher = &created[0];
    assert_eq!(voucher.spec.code.as_deref(), Some("SPRING_SALE"));
    assert_eq!(
        voucher
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("voucher-operator-admin")
    );
    assert_eq!(
        (voucher.spec.credit_omr, voucher.spec.max_redemptions),
        (15, 100)
    );
    let managers: Vec<_> = voucher
        .metadata
        .managed_fields
        .clone()
        .unwrap()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(managers, ["voucher-operator-admin"]);

    // Revoke deletes the resource bound to the code (the controller binds it; here by hand).
    let name = voucher.metadata.name.clone().unwrap();
    s.seed(&format!(
        "INSERT INTO promo_codes (code, credit_omr) VALUES ('SPRING_SALE', 15); \
         INSERT INTO voucher_bindings (code, namespace, name, uid) VALUES ('SPRING_SALE', '{ns}', '{name}', '{}')",
        voucher.metadata.uid.clone().unwrap()
    ))
    .await;
    let revoke = |code: &'static str| {
        s.http
            .delete(format!("{}/billing/vouchers/revoke/{code}", s.base))
            .bearer_auth(&admin)
            .send()
    };
    assert_eq!(
        revoke("spring_sale").await.unwrap().status(),
        StatusCode::OK
    );
    assert!(vouchers.get_opt(&name).await.unwrap().is_none());
    assert_eq!(
        revoke("NEVER-1").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

/// A server whose admin endpoints write to a namespace of their own.
async fn admin_server(prefix: &str) -> (Server, kube::Client, String) {
    let (client, ns) = support::cluster::setup(prefix).await;
    let s = start_with(
        ServerSettings {
            admin_namespace: ns.clone(),
            ..settings()
        },
        auth(),
        Some(client.clone()),
    )
    .await;
    (s, client, ns)
}

/// A Voucher as the controller would have bound it: the resource, its row and its binding.
async fn bound_voucher(
    s: &Server,
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: Value,
    labels: Value,
) -> voucher_operator::api::Voucher {
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), ns);
    let voucher = serde_json::from_value(json!({
        "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
        "metadata": {"name": name, "labels": labels}, "spec": spec,
    }))
    .unwrap();
    let voucher = vouchers
        .create(&Default::default(), &voucher)
        .await
        .unwrap();
    let code = voucher.code().unwrap();
    s.seed(&format!(
        "INSERT INTO promo_codes (code, credit_omr) VALUES ('{code}', {}); \
         INSERT INTO voucher_bindings (code, namespace, name, uid, deletion_policy) \
         VALUES ('{code}', '{ns}', '{name}', '{}', '{}')",
        voucher.spec.credit_omr,
        voucher.metadata.uid.clone().unwrap(),
        voucher.spec.deletion_policy.as_str(),
    ))
    .await;
    voucher
}

async fn revoke(s: &Server, code: &str) -> (StatusCode, Value) {
    let admin = token("root", Some("sovereign-admin"), 300);
    let response = s
        .http
        .delete(format!("{}/billing/vouchers/revoke/{code}", s.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test]
async fn revoke_soft_deletes_an_orphan_policy_voucher() {
    let (s, client, ns) = admin_server("revoke").await;
    let voucher = bound_voucher(
        &s,
        &client,
        &ns,
        "keep-me",
        json!({"creditOMR": 50, "deletionPolicy": "Orphan"}),
        json!({}),
    )
    .await;
    let (status, body) = revoke(&s, "keep-me").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The row is revoked although the Voucher said Orphan, in one transaction with its audit.
    let (active, deleted, bound): (bool, bool, i64) = sqlx::query_as(
        "SELECT active, deleted_at IS NOT NULL, \
         (SELECT count(*) FROM voucher_bindings WHERE code = 'KEEP-ME') \
         FROM promo_codes WHERE code = 'KEEP-ME'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!((active, deleted, bound), (false, true, 0));
    let (kind, actor): (String, Value) = sqlx::query_as(
        "SELECT kind, payload->'actor' FROM voucher_audit_outbox WHERE code = 'KEEP-ME'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!(kind, "revoked");
    assert_eq!(actor, json!({"type": "subject", "subject": "root"}));
    let vouchers: kube::Api<voucher_operator::api::Voucher> = kube::Api::namespaced(client, &ns);
    assert!(
        vouchers
            .get_opt(&voucher.metadata.name.unwrap())
            .await
            .unwrap()
            .is_none()
    );
    // Nothing redeems it any more.
    assert_eq!(
        s.preview(r#"{"code": "KEEP-ME"}"#).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        revoke(&s, "KEEP-ME").await.0,
        StatusCode::NOT_FOUND,
        "already revoked"
    );
}

#[tokio::test]
async fn revoke_soft_deletes_a_legacy_code_that_no_voucher_owns() {
    let (s, _client, _ns) = admin_server("legacy").await;
    s.seed("INSERT INTO promo_codes (code, credit_omr) VALUES ('LEGACY-9', 9)")
        .await;
    let (status, body) = revoke(&s, " legacy-9 ").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"code": "LEGACY-9", "revoked": true}));
    let (deleted, kind): (bool, String) = sqlx::query_as(
        "SELECT p.deleted_at IS NOT NULL, a.kind FROM promo_codes p \
         JOIN voucher_audit_outbox a ON a.code = p.code WHERE p.code = 'LEGACY-9'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!((deleted, kind.as_str()), (true, "revoked"));
}

#[tokio::test]
async fn revoke_revokes_a_gitops_owned_voucher_and_keeps_the_resource() {
    let (s, client, ns) = admin_server("gitops").await;
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), &ns);
    // Every marker the GitOps tools set — and a label anyone who edits the Voucher could add,
    // which must not keep a leaked code alive: the row is revoked whatever it says.
    for (name, labels, annotations, tool) in [
        (
            "flux-ks",
            json!({"kustomize.toolkit.fluxcd.io/name": "vouchers",
                           "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}),
            json!({}),
            "Flux Kustomization",
        ),
        (
            "flux-hr",
            json!({"helm.toolkit.fluxcd.io/name": "vouchers"}),
            json!({}),
            "Flux HelmRelease",
        ),
        (
            "argo-label",
            json!({"argocd.argoproj.io/instance": "vouchers"}),
            json!({}),
            "Argo CD Application",
        ),
        (
            "argo-tracking",
            json!({}),
            json!({"argocd.argoproj.io/tracking-id": "vouchers:catalyst.openova.io/Voucher:x/y"}),
            "Argo CD Application",
        ),
        (
            "faked",
            json!({"kustomize.toolkit.fluxcd.io/name": "x"}),
            json!({}),
            "Flux Kustomization",
        ),
    ] {
        bound_voucher(&s, &client, &ns, name, json!({"creditOMR": 5}), labels).await;
        if annotations != json!({}) {
            vouchers
                .patch(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"metadata": {"annotations": annotations}})),
                )
                .await
                .unwrap();
        }
        let code = name.to_ascii_uppercase();
        let (status, body) = revoke(&s, &code).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        assert_eq!(body["revoked"], true, "{body}");
        assert_eq!(body["voucher"], format!("{ns}/{name}"), "{body}");
        assert_eq!(body["voucher_deleted"], false, "{body}");
        let note = body["note"].as_str().unwrap();
        assert!(
            note.contains(tool) && note.contains("phase Revoked"),
            "{name}: {note}"
        );
        let revoked: bool = sqlx::query_scalar(
            "SELECT deleted_at IS NOT NULL AND NOT active FROM promo_codes WHERE code = $1",
        )
        .bind(&code)
        .fetch_one(&s.pool)
        .await
        .unwrap();
        assert!(revoked, "{name}: the row is revoked");
        assert!(
            vouchers.get_opt(name).await.unwrap().is_some(),
            "{name}: the Voucher stays (Git would re-create it)"
        );
        assert_eq!(
            s.preview(&format!(r#"{{"code": "{code}"}}"#)).await.0,
            StatusCode::NOT_FOUND,
            "{name}"
        );
    }
}

#[tokio::test]
async fn issue_on_a_code_owned_elsewhere_is_a_conflict() {
    let (s, client, ns) = admin_server("elsewhere").await;
    let other = support::cluster::namespace(&client, "team").await;
    bound_voucher(
        &s,
        &client,
        &other,
        "theirs",
        json!({"creditOMR": 5}),
        json!({}),
    )
    .await;
    let admin = token("root", Some("sovereign-admin"), 300);
    let response = s
        .issue(&admin, &json!({"code": "THEIRS", "credit_omr": 500}))
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("{other}/theirs")),
        "{body}"
    );
    let mine: kube::Api<voucher_operator::api::Voucher> = kube::Api::namespaced(client, &ns);
    assert!(
        mine.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let credit: i32 = s
        .scalar("SELECT credit_omr FROM promo_codes WHERE code = 'THEIRS'")
        .await;
    assert_eq!(credit, 5);
}

#[tokio::test]
async fn probes_metrics_and_openapi() {
    let s = start().await;
    s.seed(SEED).await;
    let get = |path: &'static str| s.http.get(format!("{}{path}", s.base)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/readyz").await.unwrap().status(), StatusCode::OK);
    s.preview(r#"{"code": "LIVE-10"}"#).await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"voucher_operator_http_requests_total{route="/billing/vouchers/redeem-preview",status="200"} 1"#), "{metrics}");
    assert!(metrics.contains("voucher_operator_http_request_duration_seconds"));
    let doc: Value = get("/openapi.json").await.unwrap().json().await.unwrap();
    for path in [
        "/billing/vouchers/redeem-preview",
        "/billing/vouchers/redeem",
        "/billing/vouchers/issue",
        "/billing/vouchers/list",
        "/billing/vouchers/revoke/{code}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let missing = get("/nope").await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.json::<Value>().await.unwrap()["error"].is_string());
}

#[tokio::test]
async fn shutdown_finishes_the_redemptions_in_flight() {
    let s = start().await;
    s.seed("INSERT INTO promo_codes (code, credit_omr) VALUES ('LATE-1', 4)")
        .await;
    // Hold the code's row so the redemption waits inside its transaction.
    let mut blocker = s.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM promo_codes WHERE code = 'LATE-1' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (http, base) = (s.http.clone(), s.base.clone());
    let in_flight = tokio::spawn(async move {
        http.post(format!("{base}/billing/vouchers/redeem"))
            .bearer_auth(token("patient", None, 300))
            .json(&json!({"code": "LATE-1", "tenant_id": "t"}))
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    blocker.commit().await.unwrap();
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        StatusCode::OK,
        "the in-flight redemption was cut off"
    );
    let refused = s
        .http
        .post(format!("{}/billing/vouchers/redeem", s.base))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
}

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

#[tokio::test]
async fn concurrent_redemptions_of_one_code_commit_together_each_with_its_own_answer() {
    let s = Arc::new(start().await);
    // Customers whose balances all differ, so that an answer given to the wrong one shows.
    s.seed(
        "INSERT INTO promo_codes (code, credit_omr) VALUES ('GROUP-7', 7); \
         INSERT INTO customers (user_id, tenant_id, email) \
           SELECT 'g-' || i, 't', '' FROM generate_series(0, 63) i; \
         INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
           SELECT id, 100 * substr(user_id, 3)::int, 'seed' FROM customers WHERE user_id LIKE 'g-%'",
    )
    .await;
    let mut rounds = 0;
    while metric(&s, "voucher_operator_http_grouped_redemptions_total").await == 0 {
        rounds += 1;
        assert!(rounds <= 5, "no redemptions were ever grouped");
        s.seed(
            "DELETE FROM promo_redemptions; DELETE FROM credit_ledger WHERE reason <> 'seed'; \
                DELETE FROM voucher_idempotency_keys; UPDATE promo_codes SET times_redeemed = 0",
        )
        .await;
        let requests: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let t = token(&format!("g-{i}"), None, 300);
                    // Every other one with an Idempotency-Key.
                    let key = (i % 2 == 0).then(|| format!("key-{i}"));
                    let answer = s
                        .redeem(Some(&t), json!({"code": "GROUP-7"}), key.as_deref())
                        .await;
                    (i, key, answer)
                })
            })
            .collect();
        for request in requests {
            let (i, key, (status, body)) = request.await.unwrap();
            assert_eq!(status, StatusCode::OK, "g-{i}: {body}");
            assert_eq!(
                body["balance_omr"],
                100 * i + 7,
                "g-{i} got another's answer"
            );
            if let Some(key) = key {
                // Its key replays exactly this answer.
                let t = token(&format!("g-{i}"), None, 300);
                let replay = s
                    .redeem(Some(&t), json!({"code": "GROUP-7"}), Some(&key))
                    .await;
                assert_eq!(replay, (StatusCode::OK, body));
            }
        }
        assert_eq!(s.counts("GROUP-7").await, (64, 64, 64));
        let actors: std::collections::BTreeSet<String> = sqlx::query_scalar(
            "SELECT payload->'actor'->>'subject' FROM voucher_audit_outbox \
             WHERE code = 'GROUP-7' AND kind = 'redeemed'",
        )
        .fetch_all(&s.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        assert_eq!(actors, (0..64).map(|i| format!("g-{i}")).collect());
    }
}

#[tokio::test]
async fn a_group_with_a_failing_request_is_redeemed_one_by_one_and_fails_no_one_else() {
    let s = Arc::new(start().await);
    // The billing database refuses one customer (as a constraint or a trigger of its own would).
    s.seed(
        "INSERT INTO promo_codes (code, credit_omr) VALUES ('POISON-1', 1); \
         CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN \
           IF NEW.user_id LIKE 'poison-%' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; \
         END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON customers \
           FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .await;
    let mut granted = 0;
    for round in 0..10 {
        let requests: Vec<_> = (0..32)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    // The poisoned one in the middle of the crowd.
                    let who = if i == 16 {
                        format!("poison-{round}")
                    } else {
                        format!("p-{round}-{i}")
                    };
                    let t = token(&who, None, 300);
                    let answer = s
                        .redeem(
                            Some(&t),
                            json!({"code": "POISON-1", "tenant_id": "t"}),
                            None,
                        )
                        .await;
                    (who, answer)
                })
            })
            .collect();
        for request in requests {
            let (who, (status, body)) = request.await.unwrap();
            if who.starts_with("poison") {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{who}: {body}");
            } else {
                assert_eq!(status, StatusCode::OK, "{who}: {body}");
                granted += 1;
            }
        }
        if metric(
            &s,
            "voucher_operator_http_redemption_groups_one_by_one_total",
        )
        .await
            > 0
        {
            break;
        }
    }
    assert!(
        metric(
            &s,
            "voucher_operator_http_redemption_groups_one_by_one_total"
        )
        .await
            > 0,
        "the poisoned request never landed in a group"
    );
    assert_eq!(
        s.counts("POISON-1").await,
        (granted, granted as i64, granted as i64)
    );
}

#[tokio::test]
async fn two_servers_on_one_database_never_over_redeem_a_capped_code() {
    let s = Arc::new(start().await);
    // A second server process's worth: its own pool and group commit, the same database.
    let database = s.pool.connect_options().get_database().unwrap().to_owned();
    let url = support::postgres().url_for(&database);
    let other_store = Store::from_pool(support::pool(&url).await);
    let (other_base, other_stop) = support::serve_http(other_store, settings(), auth(), None).await;
    let _stop_other = scopeguard(other_stop);
    for round in 0..10 {
        let code = format!("TWO50-{round:02}");
        s.seed(&format!(
            "INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('{code}', 5, 50)"
        ))
        .await;
        let requests: Vec<_> = (0..200)
            .map(|i| {
                let (http, code) = (s.http.clone(), code.clone());
                let base = if i % 2 == 0 {
                    s.base.clone()
                } else {
                    other_base.clone()
                };
                tokio::spawn(async move {
                    let t = token(&format!("two-{round}-{i}"), None, 300);
                    http.post(format!("{base}/billing/vouchers/redeem"))
                        .bearer_auth(t)
                        .json(&json!({"code": code, "tenant_id": "t"}))
                        .send()
                        .await
                        .unwrap()
                        .status()
                })
            })
            .collect();
        let mut ok = 0;
        for request in requests {
            match request.await.unwrap() {
                StatusCode::OK => ok += 1,
                StatusCode::GONE => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(ok, 50, "round {round}");
        assert_eq!(s.counts(&code).await, (50, 50, 50), "round {round}");
        let audits: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM voucher_audit_outbox WHERE code = $1 AND kind = 'redeemed'",
        )
        .bind(&code)
        .fetch_one(&s.pool)
        .await
        .unwrap();
        assert_eq!(audits, 50, "round {round}");
    }
}

/// Cancels `token` when dropped.
fn scopeguard(token: CancellationToken) -> impl Drop {
    struct Guard(CancellationToken);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.cancel();
        }
    }
    Guard(token)
}

#[tokio::test]
async fn when_a_group_would_pass_the_cap_exactly_the_earliest_arrivals_are_granted() {
    let s = Arc::new(start().await);
    s.seed("INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('EARLY-4', 2, 4)")
        .await;
    // Hold the code's row lock, so that the first redemption waits in its count and the
    // next ones queue behind it in a known order.
    let mut holder = s.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM promo_codes WHERE code = 'EARLY-4' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let redeem = |who: String| {
        let s = s.clone();
        tokio::spawn(async move {
            let t = token(&who, None, 300);
            let (status, _) = s
                .redeem(Some(&t), json!({"code": "EARLY-4", "tenant_id": "t"}), None)
                .await;
            (who, status)
        })
    };
    let first = redeem("first".into());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = Vec::new();
    for i in 0..10 {
        queued.push(redeem(format!("queued-{i}")));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    holder.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().1, StatusCode::OK);
    let mut granted = Vec::new();
    for request in queued {
        let (who, status) = request.await.unwrap();
        match status {
            StatusCode::OK => granted.push(who),
            StatusCode::GONE => {}
            other => panic!("{who}: {other}"),
        }
    }
    assert_eq!(
        granted,
        ["queued-0", "queued-1", "queued-2"],
        "the earliest three"
    );
    assert_eq!(s.counts("EARLY-4").await, (4, 4, 4));
    assert!(
        metric(
            &s,
            "voucher_operator_http_redemption_groups_one_by_one_total"
        )
        .await
            >= 1
    );
}

#[tokio::test]
async fn guessing_one_prefix_from_anywhere_is_refused_for_a_while_and_alerted() {
    let s = start_tuned(ServerSettings {
        guesses_per_minute: 3,
        ..settings()
    })
    .await;
    s.seed(SEED).await;
    s.seed("INSERT INTO promo_codes (code, credit_omr) VALUES ('BILL-REAL1', 5)")
        .await;
    // Four unknown codes under BILL- (a guesser's many addresses share the prefix's budget).
    for guess in ["BILL-G1", "BILL-G2", "BILL-G3", "BILL-G4"] {
        assert_eq!(
            s.preview(&format!(r#"{{"code": "{guess}"}}"#)).await.0,
            StatusCode::NOT_FOUND
        );
    }
    // Now every BILL- code's preview waits, the real one's too: refused before it is looked up,
    // so the answer tells nothing of it.
    let (status, body) = s.preview(r#"{"code": "BILL-REAL1"}"#).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unknown codes"),
        "{body}"
    );
    // The checkout is not held up by whoever spent the budget: its redemption goes through.
    let (status, body) = s
        .redeem(
            Some(&token("alice", None, 300)),
            json!({"code": "BILL-REAL1", "tenant_id": "t1"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Other prefixes are not held up.
    assert_eq!(s.preview(r#"{"code": "LIVE-10"}"#).await.0, StatusCode::OK);
    assert_eq!(
        metric(&s, "voucher_operator_http_unknown_codes_total").await,
        4
    );
    assert_eq!(
        metric(&s, "voucher_operator_http_guessing_blocked_total").await,
        1
    );
    let rules = include_str!("../charts/voucher-operator/templates/prometheusrule.yaml");
    assert!(rules.contains("voucher_operator_http_guessing_blocked_total"));
    assert_eq!(s.counts("BILL-REAL1").await, (1, 1, 1));
}

#[tokio::test]
async fn admin_issue_of_a_revoked_code_revives_only_that_revocation() {
    let (s, client, ns) = admin_server("reissue").await;
    s.seed(
        "INSERT INTO promo_codes (code, credit_omr, active, deleted_at) \
         VALUES ('BACK-1', 5, false, now() - interval '1 hour')",
    )
    .await;
    let revoked_at: chrono::DateTime<chrono::Utc> = s
        .scalar("SELECT deleted_at FROM promo_codes WHERE code = 'BACK-1'")
        .await;
    let admin = token("root", Some("sovereign-admin"), 300);
    let response = s
        .issue(&admin, &json!({"code": "back-1", "credit_omr": 5}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let vouchers: kube::Api<voucher_operator::api::Voucher> = kube::Api::namespaced(client, &ns);
    let voucher = vouchers.get("back-1").await.unwrap();
    // Not a standing flag: the manifest names this revocation, so a later revoke stays.
    assert_eq!(voucher.spec.reissue.map(|r| r.revoked_at), Some(revoked_at));
    assert!(!voucher.spec.adopt);
}

#[tokio::test]
async fn with_a_metrics_address_scraping_reaches_no_admin_endpoint() {
    let split = serve_split("scrape", true).await;
    let (admin_base, metrics_base) = (split.admin.clone(), split.metrics.clone().unwrap());
    let http = reqwest::Client::new();
    let root = token("root", Some("superadmin"), 300);
    let get = |base: &str, path: &str| http.get(format!("{base}{path}")).bearer_auth(&root).send();
    let scraped = get(&metrics_base, "/metrics").await.unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(
        scraped
            .text()
            .await
            .unwrap()
            .contains("voucher_operator_http_unknown_codes_total")
    );
    assert_eq!(
        get(&metrics_base, "/healthz").await.unwrap().status(),
        StatusCode::OK
    );
    // Whoever may scrape reaches nothing else, even with an admin token.
    for path in ["/billing/vouchers/list", "/openapi.json", "/readyz"] {
        assert_eq!(
            get(&metrics_base, path).await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // And the metrics left the admin port.
    assert_eq!(
        get(&admin_base, "/metrics").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&admin_base, "/billing/vouchers/list")
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_administrator_suspends_a_code_or_a_campaign_and_lifts_it() {
    let s = start().await;
    s.seed(SEED).await;
    s.seed(
        "INSERT INTO voucher_campaigns (uid, namespace, name, generated) \
           VALUES ('camp-uid', 'billing', 'inserts', 1); \
         INSERT INTO promo_codes (code, credit_omr, max_redemptions) VALUES ('INS-AAAA', 5, 1); \
         INSERT INTO voucher_campaign_codes (code, campaign_uid, code_index) \
           VALUES ('INS-AAAA', 'camp-uid', 0)",
    )
    .await;
    let call = |method: reqwest::Method, path: &str, token: Option<String>| {
        let mut request = s.http.request(method, format!("{}{path}", s.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let admin = || Some(token("root", Some("sovereign-admin"), 300));
    let customer = || Some(token("alice", None, 300));
    // Only an administrator: a customer's token and no token are refused, nothing suspended.
    for path in [
        "/billing/vouchers/suspend/LIVE-10",
        "/billing/vouchers/suspend/campaigns/billing/inserts",
    ] {
        for method in [reqwest::Method::POST, reqwest::Method::DELETE] {
            assert_eq!(
                call(method.clone(), path, customer()).await.0,
                StatusCode::FORBIDDEN,
                "{path}"
            );
            assert_eq!(
                call(method, path, None).await.0,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
        }
    }
    assert_eq!(s.preview(r#"{"code": "LIVE-10"}"#).await.0, StatusCode::OK);

    let (status, body) = call(
        reqwest::Method::POST,
        "/billing/vouchers/suspend/live-10",
        admin(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"target": "LIVE-10", "suspended": true, "changed": true})
    );
    let again = call(
        reqwest::Method::POST,
        "/billing/vouchers/suspend/LIVE-10",
        admin(),
    )
    .await;
    assert_eq!(again.1["changed"], false, "a repeat changes nothing");
    let (status, body) = s.preview(r#"{"code": "LIVE-10"}"#).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["accepting_redemptions"], false);
    let (status, _) = s
        .redeem(
            customer().as_deref(),
            json!({"code": "LIVE-10", "tenant_id": "t1"}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(s.counts("LIVE-10").await, (0, 0, 0));
    // Audited once, with the administrator.
    let audited: Vec<(String, Value)> = sqlx::query_as(
        "SELECT kind, payload->'actor' FROM voucher_audit_outbox WHERE code = 'LIVE-10' ORDER BY seq",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(
        audited,
        [(
            "suspended".to_owned(),
            json!({"type": "subject", "subject": "root"})
        )]
    );
    let (status, body) = call(
        reqwest::Method::DELETE,
        "/billing/vouchers/suspend/LIVE-10",
        admin(),
    )
    .await;
    assert_eq!(
        (status, body["suspended"].clone()),
        (StatusCode::OK, json!(false))
    );
    assert_eq!(s.preview(r#"{"code": "LIVE-10"}"#).await.0, StatusCode::OK);

    // A campaign: every code at once, answered like an unknown code.
    assert_eq!(s.preview(r#"{"code": "INS-AAAA"}"#).await.0, StatusCode::OK);
    let (status, body) = call(
        reqwest::Method::POST,
        "/billing/vouchers/suspend/campaigns/billing/inserts",
        admin(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["target"], "billing/inserts");
    assert_eq!(
        s.preview(r#"{"code": "INS-AAAA"}"#).await.0,
        StatusCode::NOT_FOUND
    );
    call(
        reqwest::Method::DELETE,
        "/billing/vouchers/suspend/campaigns/billing/inserts",
        admin(),
    )
    .await;
    assert_eq!(s.preview(r#"{"code": "INS-AAAA"}"#).await.0, StatusCode::OK);
    // Unknown targets: 404.
    for path in [
        "/billing/vouchers/suspend/NOPE-1",
        "/billing/vouchers/suspend/campaigns/billing/nope",
    ] {
        assert_eq!(
            call(reqwest::Method::POST, path, admin()).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
}

#[tokio::test]
async fn every_admin_endpoint_refuses_a_customer_and_an_anonymous_caller() {
    let s = start().await;
    s.seed(SEED).await;
    s.seed(
        "INSERT INTO voucher_campaigns (uid, namespace, name, generated) \
           VALUES ('c-uid', 'billing', 'inserts', 0)",
    )
    .await;
    let customer = token("alice", None, 300);
    // Every admin route of the API document, with a body that would do something.
    let calls: [(reqwest::Method, &str, Value); 8] = [
        (
            reqwest::Method::POST,
            "/billing/vouchers/issue",
            json!({"code": "MINTED-1", "credit_omr": 500}),
        ),
        (reqwest::Method::GET, "/billing/vouchers/list", Value::Null),
        (
            reqwest::Method::DELETE,
            "/billing/vouchers/revoke/LIVE-10",
            Value::Null,
        ),
        (
            reqwest::Method::GET,
            "/billing/vouchers/campaigns/billing/inserts/codes",
            Value::Null,
        ),
        (
            reqwest::Method::POST,
            "/billing/vouchers/suspend/LIVE-10",
            Value::Null,
        ),
        (
            reqwest::Method::DELETE,
            "/billing/vouchers/suspend/LIVE-10",
            Value::Null,
        ),
        (
            reqwest::Method::POST,
            "/billing/vouchers/suspend/campaigns/billing/inserts",
            Value::Null,
        ),
        (
            reqwest::Method::DELETE,
            "/billing/vouchers/suspend/campaigns/billing/inserts",
            Value::Null,
        ),
    ];
    for (method, path, body) in &calls {
        for (who, bearer, refused) in [
            ("a customer", Some(&customer), StatusCode::FORBIDDEN),
            ("nobody", None, StatusCode::UNAUTHORIZED),
        ] {
            let mut request = s.http.request(method.clone(), format!("{}{path}", s.base));
            if let Some(bearer) = bearer {
                request = request.bearer_auth(bearer);
            }
            if !body.is_null() {
                request = request.json(body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), refused, "{who}: {method} {path}");
        }
    }
    // Nothing happened: no code minted, none revoked or suspended, nothing audited.
    let (minted, revoked, suspended, audited): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM promo_codes WHERE code = 'MINTED-1'), \
                (SELECT count(*) FROM promo_codes WHERE code = 'LIVE-10' AND deleted_at IS NOT NULL), \
                (SELECT count(*) FROM voucher_suspensions), \
                (SELECT count(*) FROM voucher_audit_outbox)",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!((minted, revoked, suspended, audited), (0, 0, 0, 0));
    // Every admin route of the API document is in the list above.
    let document: Value = s
        .http
        .get(format!("{}/openapi.json", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let customers = path.ends_with("/redeem-preview") || path.ends_with("/redeem");
            let listed = calls.iter().any(|(m, p, _)| {
                m.as_str().eq_ignore_ascii_case(method) && template_matches(path, p)
            });
            assert!(customers || listed, "{method} {path} is not tried");
        }
    }
}

/// Whether the concrete `path` is an instance of the OpenAPI `template` (`{name}` segments).
fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}')) || t == p)
}

#[tokio::test]
async fn with_an_admin_address_every_non_customer_route_of_the_document_is_absent_from_the_public_port()
 {
    let split = serve_split("enumerate", false).await;
    let (public_base, admin_base) = (split.public.clone(), split.admin.clone());
    let http = reqwest::Client::new();
    let root = token("root", Some("superadmin"), 300);
    let document: Value = http
        .get(format!("{admin_base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut tried = 0;
    for (template, item) in document["paths"].as_object().unwrap() {
        if template.ends_with("/redeem-preview") || template.ends_with("/redeem") {
            continue;
        }
        // Each `{name}` segment filled in with something that would exist.
        let path: String = template
            .split('/')
            .map(|segment| match segment {
                "{code}" => "LIVE-10",
                "{namespace}" => "billing",
                "{name}" => "inserts",
                other => other,
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = http
                .request(method.clone(), format!("{public_base}{path}"))
                .bearer_auth(&root)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::NOT_FOUND,
                "{method} {path} on the public port"
            );
            tried += 1;
        }
    }
    assert!(tried >= 8, "every admin route of the document: {tried}");
}

#[tokio::test]
async fn another_customer_reusing_an_idempotency_key_never_gets_the_first_ones_answer() {
    let s = start().await;
    s.seed(SEED).await;
    // Alice has credit already, so her answer's balance is hers alone.
    s.seed(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ('alice', 't1', ''); \
         INSERT INTO credit_ledger (customer_id, amount_omr, reason) \
           SELECT id, 5, 'topup' FROM customers WHERE user_id = 'alice'",
    )
    .await;
    let (alice, bob) = (token("alice", None, 300), token("bob", None, 300));
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    let (status, first) = s
        .redeem(Some(&alice), body.clone(), Some("order-4711"))
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["balance_omr"], 15);
    // Bob sends Alice's key with the same body: his own redemption, his own balance.
    let (status, second) = s.redeem(Some(&bob), body, Some("order-4711")).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(
        second["balance_omr"], 10,
        "bob's own grant, never alice's answer: {second}"
    );
    assert_eq!(
        s.counts("LIVE-10").await,
        (2, 2, 2),
        "two redemptions, one each"
    );
    let owners: Vec<String> = sqlx::query_scalar(
        "SELECT c.user_id FROM promo_redemptions r JOIN customers c ON c.id = r.customer_id \
         WHERE r.code = 'LIVE-10' ORDER BY c.user_id",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(owners, ["alice", "bob"]);
}

/// Waits until a statement of this database waits for a row lock (the redemption, past its
/// unlocked read, at its locked step).
async fn until_a_redemption_waits_for_the_lock(s: &Server) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&s.pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no redemption waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Races a redemption of `code` (credit 4) against an administrator's `edit` of its row: the
/// edit holds the row's lock, the redemption is seen waiting for it past its unlocked read, then
/// the edit commits. The redemption's answer.
async fn redeem_racing(code: &str, edit: &str) -> (Arc<Server>, StatusCode, Value) {
    let s = Arc::new(start().await);
    sqlx::query("INSERT INTO promo_codes (code, credit_omr) VALUES ($1, 4)")
        .bind(code)
        .execute(&s.pool)
        .await
        .unwrap();
    let mut holder = s.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM promo_codes WHERE code = $1 FOR UPDATE")
        .bind(code)
        .execute(&mut *holder)
        .await
        .unwrap();
    let redemption = {
        let (s, code) = (s.clone(), code.to_owned());
        tokio::spawn(async move {
            let t = token("racer", None, 300);
            s.redeem(Some(&t), json!({"code": code, "tenant_id": "t"}), None)
                .await
        })
    };
    until_a_redemption_waits_for_the_lock(&s).await;
    sqlx::query(sqlx::AssertSqlSafe(edit.to_owned()))
        .execute(&mut *holder)
        .await
        .unwrap();
    holder.commit().await.unwrap();
    let (status, body) = redemption.await.unwrap();
    (s, status, body)
}

#[tokio::test]
async fn a_code_switched_off_while_a_redemption_waits_for_its_lock_is_not_redeemed() {
    let (s, status, body) = redeem_racing(
        "RACE-OFF",
        "UPDATE promo_codes SET active = false WHERE code = 'RACE-OFF'",
    )
    .await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(s.counts("RACE-OFF").await, (0, 0, 0), "nothing written");
}

#[tokio::test]
async fn a_credit_changed_while_a_redemption_waits_for_its_lock_is_the_one_granted() {
    let (s, status, body) = redeem_racing(
        "RACE-CREDIT",
        "UPDATE promo_codes SET credit_omr = 9 WHERE code = 'RACE-CREDIT'",
    )
    .await;
    // The terms it read (4) are not the terms it counts under: it tries again and grants 9.
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["credit_omr"], 9, "{body}");
    assert_eq!(s.counts("RACE-CREDIT").await, (1, 1, 1));
    let granted: i32 = sqlx::query_scalar(
        "SELECT amount_omr FROM credit_ledger WHERE reason = 'promo:RACE-CREDIT'",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    assert_eq!(granted, 9);
}
