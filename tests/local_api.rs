//! The local Kubernetes API endpoint driven by kube-rs, the client the
//! operator itself uses: CRUD, generation, resourceVersion conflicts, the
//! status subresource, server-side apply, finalizers, list pages and watch
//! (bookmarks, 410 Gone), and validation errors in the API server's shape.

mod support;

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::Status;
use serde_json::json;
use voucher_operator::api::{Voucher, VoucherSpec, VoucherStatus};
use voucher_operator::domain::Phase;
use voucher_operator::local::apiserver::LocalApiConfig;

fn voucher(name: &str, credit: i32) -> Voucher {
    let spec: VoucherSpec = serde_json::from_value(json!({"creditOMR": credit})).unwrap();
    Voucher::new(name, spec)
}

fn api_error(error: kube::Error) -> Status {
    match error {
        kube::Error::Api(response) => *response,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn create_get_update_bump_generation_and_detect_conflicts() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let vouchers: Api<Voucher> = Api::namespaced(client, "default");

    let created = vouchers
        .create(&PostParams::default(), &voucher("launch", 5))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert!(created.spec.active, "schema defaults are applied");

    let mut edited = created.clone();
    edited.spec.credit_omr = 7;
    let replaced = vouchers
        .replace("launch", &PostParams::default(), &edited)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));

    // The first copy is stale now.
    let error = api_error(
        vouchers
            .replace("launch", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!((error.code, error.reason.as_str()), (409, "Conflict"));

    let again = api_error(
        vouchers
            .create(&PostParams::default(), &voucher("launch", 5))
            .await
            .unwrap_err(),
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));

    let missing = api_error(vouchers.get("nope").await.unwrap_err());
    assert_eq!(missing.code, 404);

    let elsewhere: Api<Voucher> =
        Api::namespaced(vouchers.clone().into_client(), "no-such-namespace");
    let error = api_error(
        elsewhere
            .create(&PostParams::default(), &voucher("x-y-z", 1))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        error.code, 404,
        "creating in a missing namespace fails like a cluster does"
    );
}

#[tokio::test]
async fn status_is_a_separate_subresource_written_by_server_side_apply() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let vouchers: Api<Voucher> = Api::namespaced(client, "default");
    vouchers
        .create(&PostParams::default(), &voucher("launch", 5))
        .await
        .unwrap();

    let status = json!({
        "apiVersion": "catalyst.openova.io/v1alpha1",
        "kind": "Voucher",
        "status": {"phase": "Active", "timesRedeemed": 3, "observedGeneration": 1}
    });
    let params = PatchParams::apply("voucher-operator");
    let patched = vouchers
        .patch_status("launch", &params, &Patch::Apply(&status))
        .await
        .unwrap();
    let written = patched.status.unwrap();
    assert_eq!(
        (written.phase, written.times_redeemed),
        (Some(Phase::Active), Some(3))
    );
    assert_eq!(
        patched.metadata.generation,
        Some(1),
        "status writes do not bump generation"
    );

    // Status sent to the main resource is ignored; spec sent to status is too.
    let mut with_status = vouchers.get("launch").await.unwrap();
    with_status.status = Some(VoucherStatus {
        times_redeemed: Some(99),
        ..Default::default()
    });
    with_status.spec.credit_omr = 6;
    let replaced = vouchers
        .replace("launch", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert_eq!(replaced.status.unwrap().times_redeemed, Some(3));
    assert_eq!(replaced.spec.credit_omr, 6);
}

#[tokio::test]
async fn server_side_apply_tracks_owners_and_reports_conflicts() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let vouchers: Api<Voucher> = Api::namespaced(client, "default");
    let config = |credit: i32| {
        json!({"apiVersion": "catalyst.openova.io/v1alpha1", "kind": "Voucher",
               "metadata": {"name": "applied"}, "spec": {"creditOMR": credit, "description": "a"}})
    };
    let created = vouchers
        .patch(
            "applied",
            &PatchParams::apply("alice"),
            &Patch::Apply(&config(5)),
        )
        .await
        .unwrap();
    assert_eq!(created.spec.credit_omr, 5);
    let managers: Vec<_> = created
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| m.manager)
        .collect();
    assert_eq!(managers, [Some("alice".to_owned())]);

    let error = api_error(
        vouchers
            .patch(
                "applied",
                &PatchParams::apply("bob"),
                &Patch::Apply(&config(6)),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 409);
    assert!(
        error.message.contains("conflict with \"alice\""),
        "{}",
        error.message
    );
    let forced = vouchers
        .patch(
            "applied",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(&config(6)),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.credit_omr, 6);
}

#[tokio::test]
async fn invalid_objects_get_the_api_servers_422() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let vouchers: Api<Voucher> = Api::namespaced(client, "default");
    let error = api_error(
        vouchers
            .create(&PostParams::default(), &voucher("broken", 0))
            .await
            .unwrap_err(),
    );
    assert_eq!((error.code, error.reason.as_str()), (422, "Invalid"));
    assert!(
        error.message.contains("spec.creditOMR"),
        "{}",
        error.message
    );

    // Transition rules see the stored object.
    let mut v = voucher("coded", 5);
    v.spec.code = Some("CODED-1".into());
    let mut stored = vouchers.create(&PostParams::default(), &v).await.unwrap();
    stored.spec.code = Some("CODED-2".into());
    let error = api_error(
        vouchers
            .replace("coded", &PostParams::default(), &stored)
            .await
            .unwrap_err(),
    );
    assert!(
        error.message.contains("spec.code is immutable"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let vouchers: Api<Voucher> = Api::namespaced(client, "default");
    let mut v = voucher("held", 5);
    v.metadata.finalizers = Some(vec!["catalyst.openova.io/voucher".into()]);
    vouchers.create(&PostParams::default(), &v).await.unwrap();

    vouchers
        .delete("held", &DeleteParams::default())
        .await
        .unwrap();
    let marked = vouchers.get("held").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());

    let add = json!({"metadata": {"finalizers": ["catalyst.openova.io/voucher", "other"]}});
    let error = api_error(
        vouchers
            .patch("held", &PatchParams::default(), &Patch::Merge(&add))
            .await
            .unwrap_err(),
    );
    assert_eq!(error.code, 422, "no new finalizers while deleting");

    let clear = json!({"metadata": {"finalizers": null}});
    vouchers
        .patch("held", &PatchParams::default(), &Patch::Merge(&clear))
        .await
        .unwrap();
    assert_eq!(api_error(vouchers.get("held").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn lists_page_and_filter_by_label() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let vouchers: Api<Voucher> = Api::namespaced(client.clone(), "default");
    for i in 0..7 {
        let mut v = voucher(&format!("code-{i:02}"), 5);
        v.metadata.labels = Some(
            [(
                "tier".to_owned(),
                if i % 2 == 0 { "gold" } else { "silver" }.to_owned(),
            )]
            .into(),
        );
        vouchers.create(&PostParams::default(), &v).await.unwrap();
    }
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(3);
    loop {
        let page = vouchers.list(&params).await.unwrap();
        names.extend(page.items.iter().map(|v| v.metadata.name.clone().unwrap()));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(names.len(), 7);
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "pages continue in order: {names:?}"
    );

    let gold = vouchers
        .list(&ListParams::default().labels("tier=gold"))
        .await
        .unwrap();
    assert_eq!(gold.items.len(), 4);
    let all: Api<Voucher> = Api::all(client);
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        7
    );
}

#[tokio::test]
async fn watch_streams_changes_bookmarks_and_gone() {
    let config = LocalApiConfig {
        watch_log_capacity: 3,
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let (_, client) = support::local_api(config).await;
    let vouchers: Api<Voucher> = Api::namespaced(client, "default");
    let start = vouchers
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    let mut stream = vouchers
        .watch(&WatchParams::default().timeout(10), &start)
        .await
        .unwrap()
        .boxed();
    vouchers
        .create(&PostParams::default(), &voucher("watched", 5))
        .await
        .unwrap();
    let mut saw_added = false;
    let mut saw_bookmark = false;
    while !(saw_added && saw_bookmark) {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(WatchEvent::Added(v)) => saw_added = v.metadata.name.as_deref() == Some("watched"),
            Some(WatchEvent::Bookmark(_)) => saw_bookmark = true,
            other => panic!("unexpected {other:?}"),
        }
    }

    // Push the start version out of the (tiny) change log: resuming from it is 410 Gone.
    for i in 0..5 {
        vouchers
            .create(&PostParams::default(), &voucher(&format!("filler-{i}"), 1))
            .await
            .unwrap();
    }
    let mut stale = vouchers
        .watch(&WatchParams::default(), &start)
        .await
        .unwrap()
        .boxed();
    match stale.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn a_state_file_keeps_objects_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = || LocalApiConfig {
        state_file: Some(dir.path().join("state.json")),
        ..Default::default()
    };
    let (_, first) = support::local_api(config()).await;
    let created = Api::<Voucher>::namespaced(first, "default")
        .create(&PostParams::default(), &voucher("kept", 5))
        .await
        .unwrap();

    let (_, second) = support::local_api(config()).await;
    let vouchers: Api<Voucher> = Api::namespaced(second, "default");
    let kept = vouchers.get("kept").await.unwrap();
    assert_eq!(kept.metadata.uid, created.metadata.uid);
    assert_eq!(
        kept.metadata.resource_version,
        created.metadata.resource_version
    );
    // Versions go on from where they were, so clients' resourceVersions stay ordered.
    let next = vouchers
        .create(&PostParams::default(), &voucher("after-restart", 5))
        .await
        .unwrap();
    let rv = |v: &Voucher| {
        v.metadata
            .resource_version
            .clone()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(rv(&next) > rv(&kept));
}

#[tokio::test]
async fn core_events_are_read_only_and_say_where_to_write() {
    let (_, client) = support::local_api(LocalApiConfig::default()).await;
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
    let event = serde_json::from_value(json!({
        "metadata": {"name": "x"},
        "involvedObject": {"kind": "Voucher", "name": "launch"},
    }))
    .unwrap();
    let refused = api_error(
        events
            .create(&PostParams::default(), &event)
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code, 405);
    assert!(
        refused.message.contains("events.k8s.io/v1"),
        "{}",
        refused.message
    );
    assert!(
        events.list(&ListParams::default()).await.is_ok(),
        "reads still work"
    );
}
