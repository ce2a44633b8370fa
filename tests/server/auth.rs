//! Bearer tokens: HS256 and RS256 through a JWKS, strict claims, and what a token or a
//! body may carry into a query.

use super::*;

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
        &EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-rs256.key.pem")).unwrap(),
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

/// The claims [`jwks_client`] accepts: its issuer and audience.
fn rs256_claims() -> Value {
    json!({"sub": "kc-user", "iss": "https://kc.example/realms/r", "aud": "billing",
           "exp": chrono::Utc::now().timestamp() + 300})
}

fn rs256_token(kid: &str) -> String {
    rs256_token_of(kid, &rs256_claims())
}

/// An RS256 token of `claims`, signed with the fixture key.
fn rs256_token_of(kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-rs256.key.pem")).unwrap();
    encode(&header, claims, &key).unwrap()
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
        Some(serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap());
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
        serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap(),
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
    let mut set: Value = serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap();
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
    let jwks: Value = serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap();
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
    let key = EncodingKey::from_rsa_pem(include_bytes!("../fixtures/jwt-rs256.key.pem")).unwrap();
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
    let public_pem = include_bytes!("../fixtures/jwt-rs256.pub.pem");
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
async fn a_configured_issuer_and_audience_are_required_claims_of_jwks_tokens_too() {
    let jwks = jwks_server(Some(
        serde_json::from_str(include_str!("../fixtures/jwks.json")).unwrap(),
    ))
    .await;
    let s = jwks_client(&jwks).await;
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    s.assert_redeems(Some(&rs256_token("test-rs256")), body.clone())
        .await;
    // The library compares iss and aud only when a token carries them: absent, refused.
    for missing in ["iss", "aud"] {
        let mut claims = rs256_claims();
        claims.as_object_mut().unwrap().remove(missing);
        let token = rs256_token_of("test-rs256", &claims);
        let (status, answer) = s.redeem(Some(&token), body.clone(), None).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "without {missing}: {answer}"
        );
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("the token has no {missing} claim")),
            "{answer}"
        );
    }
}
