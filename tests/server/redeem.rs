//! Redemption: every answer from its own cause, idempotency, exactly min(N, cap)
//! grants under contention, group commit, and the locked re-checks raced.

use super::*;

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
        json!({"code": "LIVE-10", "credit_omr": 10, "balance_omr": 10, "currency": "OMR"})
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

/// Keys answered before the outcome was recorded (status and rendered body): a retry with such a
/// key still gets that answer, and redeems nothing.
#[tokio::test]
async fn a_key_answered_by_an_earlier_version_replays_its_recorded_answer() {
    let s = start().await;
    s.seed(SEED).await;
    s.seed(
        "INSERT INTO voucher_idempotency_keys (subject, key, request_hash, status, response) VALUES \
         ('erin', 'old-1', sha256(convert_to(E'LIVE-10\\nt1', 'UTF8')), 200, \
          '{\"code\": \"LIVE-10\", \"credit_omr\": 10, \"balance_omr\": 10}'), \
         ('erin', 'old-2', sha256(convert_to(E'OFF-10\\nt1', 'UTF8')), 410, \
          '{\"error\": \"this voucher code is not active\"}')",
    )
    .await;
    let erin = token("erin", None, 300);
    let body = json!({"code": "LIVE-10", "tenant_id": "t1"});
    assert_eq!(
        s.redeem(Some(&erin), body, Some("old-1")).await,
        (
            StatusCode::OK,
            json!({"code": "LIVE-10", "credit_omr": 10, "balance_omr": 10})
        )
    );
    assert_eq!(s.counts("LIVE-10").await, (0, 0, 0), "nothing redeemed");
    let body = json!({"code": "OFF-10", "tenant_id": "t1"});
    assert_eq!(
        s.redeem(Some(&erin), body, Some("old-2")).await,
        (
            StatusCode::GONE,
            json!({"error": "this voucher code is not active"})
        )
    );
    let (status, error) = s
        .redeem(Some(&erin), json!({"code": "LIVE-10"}), Some("old-1"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
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
    redeem_racing_from(code, None, edit).await
}

/// [`redeem_racing`] of a code that grants `discount` (instead of a credit of 4) as first read.
async fn redeem_racing_from(
    code: &str,
    discount: Option<Value>,
    edit: &str,
) -> (Arc<Server>, StatusCode, Value) {
    let s = Arc::new(start().await);
    let credit = if discount.is_some() { 0 } else { 4 };
    sqlx::query("INSERT INTO promo_codes (code, credit_omr, discount) VALUES ($1, $2, $3)")
        .bind(code)
        .bind(credit)
        .bind(discount)
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
async fn a_code_deleted_while_a_redemption_waits_for_its_lock_is_not_redeemed() {
    // Deleted as the billing service deletes (and the operator tombstones): a deleted code
    // answers exactly like one that never existed.
    let (s, status, body) = redeem_racing(
        "RACE-DELETED",
        "UPDATE promo_codes SET deleted_at = now(), active = false WHERE code = 'RACE-DELETED'",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(s.counts("RACE-DELETED").await, (0, 0, 0), "nothing written");
}

#[tokio::test]
async fn a_code_whose_window_closed_while_a_redemption_waits_for_its_lock_is_not_redeemed() {
    let (s, status, body) = redeem_racing(
        "RACE-EXPIRED",
        "UPDATE promo_codes SET expires_at = now() - interval '1 minute' \
         WHERE code = 'RACE-EXPIRED'",
    )
    .await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("expired at"), "{body}");
    assert_eq!(s.counts("RACE-EXPIRED").await, (0, 0, 0), "nothing written");
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

#[tokio::test]
async fn a_discount_changed_while_a_redemption_waits_for_its_lock_is_the_one_granted() {
    let (s, status, body) = redeem_racing_from(
        "RACE-DISCOUNT",
        Some(json!({"percent_off": 20})),
        "UPDATE promo_codes SET discount = '{\"percent_off\": 30}' WHERE code = 'RACE-DISCOUNT'",
    )
    .await;
    // Read at 20 percent, counted at 30: it tries again and grants what the row says now.
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["discount"]["percent_off"], 30, "{body}");
    assert_eq!(
        s.counts("RACE-DISCOUNT").await,
        (1, 1, 0),
        "no credit granted"
    );
    let percent: i32 = s
        .scalar("SELECT percent_off FROM voucher_discount_grants WHERE code = 'RACE-DISCOUNT'")
        .await;
    assert_eq!(percent, 30);
}
