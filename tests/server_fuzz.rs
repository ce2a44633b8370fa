//! Property test: arbitrary JSON bodies and header values sent to every
//! endpoint never get a 5xx and never crash the server.

mod support;

use proptest::prelude::*;
use serde_json::Value;
use voucher_operator::server::ServerSettings;
use voucher_operator::server::auth::AuthSettings;
use voucher_operator::store::Store;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("LIVE-10"),
            Just(" live-10 "),
            Just(""),
            Just("GONE-10")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("code".to_owned()),
                    Just("tenant_id".to_owned()),
                    Just("credit_omr".to_owned()),
                    "[a-z_]{1,8}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,60}",
        Just("Bearer ".to_owned()),
        "Bearer [A-Za-z0-9._-]{0,80}",
        Just("Bearer eyJhbGciOiJub25lIn0.e30.".to_owned()),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    endpoint: usize,
    body: Option<Value>,
    raw_body: Option<Vec<u8>>,
    authorization: Option<String>,
    idempotency_key: Option<String>,
    forwarded_for: Option<String>,
    content_type: Option<String>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0usize..5,
        prop::option::of(json_value()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        prop::option::of(header_value()),
        prop::option::of(header_value()),
        prop::option::of(header_value()),
        prop::option::of(header_value()),
    )
        .prop_map(
            |(
                endpoint,
                body,
                raw_body,
                authorization,
                idempotency_key,
                forwarded_for,
                content_type,
            )| Case {
                endpoint,
                body,
                raw_body,
                authorization,
                idempotency_key,
                forwarded_for,
                content_type,
            },
        )
}

#[test]
fn arbitrary_requests_never_get_a_server_error() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (base, _stop) = runtime.block_on(async {
        let url = support::fresh_database("fuzz").await;
        let store = Store::from_pool(support::pool(&url).await);
        store.migrate().await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO promo_codes (code, credit_omr) VALUES ('LIVE-10', 10); \
             INSERT INTO promo_codes (code, credit_omr, deleted_at) VALUES ('GONE-10', 10, now())",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let settings = ServerSettings {
            trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
            body_limit: 2048,
            ..support::server_settings()
        };
        let auth = AuthSettings {
            hs256_secret: Some("fuzz-shared-secret-of-at-least-32-bytes".into()),
            ..Default::default()
        };
        support::serve_http(store, settings, auth, None).await
    });
    let http = reqwest::Client::new();
    let config = ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(case in case())| {
        let status = runtime.block_on(async {
            let (method, path) = [
                (reqwest::Method::POST, "/billing/vouchers/redeem-preview"),
                (reqwest::Method::POST, "/billing/vouchers/redeem"),
                (reqwest::Method::POST, "/billing/vouchers/issue"),
                (reqwest::Method::GET, "/billing/vouchers/list"),
                (reqwest::Method::DELETE, "/billing/vouchers/revoke/LIVE-10"),
            ][case.endpoint].clone();
            let mut request = http.request(method, format!("{base}{path}"));
            if let Some(body) = &case.raw_body {
                request = request.body(body.clone());
            } else if let Some(body) = &case.body {
                request = request.body(body.to_string());
            }
            for (name, value) in [
                ("authorization", &case.authorization),
                ("idempotency-key", &case.idempotency_key),
                ("x-forwarded-for", &case.forwarded_for),
                ("content-type", &case.content_type),
            ] {
                if let Some(value) = value {
                    request = request.header(name, value);
                }
            }
            let response = request.send().await.expect("the server answers");
            let status = response.status();
            let body = response.bytes().await.unwrap();
            if status.as_u16() >= 400 {
                let parsed: Value = serde_json::from_slice(&body).expect("errors are JSON");
                assert!(parsed["error"].is_string(), "{parsed}");
            }
            status
        });
        prop_assert!(status.as_u16() < 500, "{status} for {case:?}");
    });
}
