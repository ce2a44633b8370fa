//! The public preview: each answer from its own cause, from memory kept true by the
//! rows' notifications, and the guessing budget per prefix.

use super::*;

#[tokio::test]
async fn preview_answers_each_case_with_its_status() {
    let s = start().await;
    s.seed(SEED).await;

    for variant in ["LIVE-10", "  live-10 ", "\tLive-10\n"] {
        let (status, body) = s.preview(&json!({"code": variant}).to_string()).await;
        assert_eq!(status, StatusCode::OK, "{variant:?}");
        assert_eq!(
            body,
            json!({"code": "LIVE-10", "credit_omr": 10, "currency": "OMR", "description": "ten rial", "active": true, "accepting_redemptions": true})
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
                "currency",
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
    let rules = include_str!("../../charts/voucher-operator/rules/voucher-operator.yaml");
    assert!(rules.contains("voucher_operator_http_guessing_blocked_total"));
    assert_eq!(s.counts("BILL-REAL1").await, (1, 1, 1));
}
