//! The admin endpoints: who may call them, issue and revoke on Voucher resources,
//! suspensions.

use super::*;

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
        (Some(15), 100)
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
        voucher.spec.credit_omr.unwrap(),
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

/// Revoke deletes the very Voucher the code is bound to (compared by uid), never another
/// one that took its name since: a Voucher re-created under the same name, bound to nothing
/// yet, stays.
#[tokio::test]
async fn revoke_deletes_only_the_bound_voucher_never_one_recreated_under_its_name() {
    let (s, client, ns) = admin_server("same-name").await;
    let vouchers: kube::Api<voucher_operator::api::Voucher> =
        kube::Api::namespaced(client.clone(), &ns);
    let first = bound_voucher(
        &s,
        &client,
        &ns,
        "spring",
        json!({"code": "SPRING-1", "creditOMR": 5}),
        json!({}),
    )
    .await;
    // Deleted without the controller (no finalizer here), and re-created under the same name
    // for another code: the binding still names the first one.
    vouchers
        .delete("spring", &Default::default())
        .await
        .unwrap();
    let second: voucher_operator::api::Voucher = serde_json::from_value(json!({
        "apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
        "metadata": {"name": "spring"}, "spec": {"code": "SPRING-2", "creditOMR": 5},
    }))
    .unwrap();
    let second = vouchers.create(&Default::default(), &second).await.unwrap();
    assert_ne!(second.metadata.uid, first.metadata.uid);

    let (status, body) = revoke(&s, "SPRING-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], true, "{body}");
    let kept = vouchers.get_opt("spring").await.unwrap();
    assert_eq!(
        kept.and_then(|v| v.metadata.uid),
        second.metadata.uid,
        "the Voucher that took the name stays: {body}"
    );
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
    let calls: [(reqwest::Method, &str, Value); 11] = [
        (
            reqwest::Method::POST,
            "/billing/vouchers/checkout/commit",
            json!({"user_id": "alice", "order_id": "O-1", "lines": [{"id": "1", "category": "install", "amount": 100}]}),
        ),
        (
            reqwest::Method::POST,
            "/billing/vouchers/checkout/orders/O-1/reverse",
            json!({"user_id": "alice", "reason": "refunded"}),
        ),
        (
            reqwest::Method::POST,
            "/billing/vouchers/redemptions/reverse",
            json!({"code": "LIVE-10", "user_id": "alice"}),
        ),
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
    // Nothing happened: no code minted, none revoked or suspended, no order, nothing audited.
    let orders: i64 = s
        .scalar("SELECT count(*) FROM voucher_checkout_orders")
        .await;
    assert_eq!(orders, 0);
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
    for (method, path) in non_customer_routes(&s.http, &s.base).await {
        let listed = calls
            .iter()
            .any(|(m, p, _)| *m == method && template_matches(&path, p));
        assert!(listed, "{method} {path} is not tried");
    }
}
