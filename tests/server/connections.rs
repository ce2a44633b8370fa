//! Rate limits, connection limits and the ports: what a client, a proxy or a scraper
//! may reach and how long it may hold a connection; probes, metrics and shutdown.

use super::*;

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
    // A header byte every 300 ms: the connection moves, but its headers never end. Cut by the
    // 1 s header timeout, it is refused a write within a few more bytes — long before the 15
    // bytes of a trickle that a longer timeout (or an idle one, which moving bytes reset) would
    // let finish.
    let mut cut = false;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if slow.write_all(b"X").await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "the trickling client was never cut off");
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
async fn with_an_admin_address_every_non_customer_route_of_the_document_is_absent_from_the_public_port()
 {
    let split = serve_split("enumerate", false).await;
    let (public_base, admin_base) = (split.public.clone(), split.admin.clone());
    let http = reqwest::Client::new();
    let root = token("root", Some("superadmin"), 300);
    let mut tried = 0;
    for (method, template) in non_customer_routes(&http, &admin_base).await {
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
    assert!(tried >= 8, "every admin route of the document: {tried}");
}
