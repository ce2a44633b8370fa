//! The store's typed queries against a real Postgres: apply only when the row
//! differs, resurrect, soft delete, claim (create / adopt / keep / conflict),
//! and the outbox committing or rolling back with the change it describes.

mod support;

use chrono::{TimeZone, Utc};
use sqlx::PgPool;
use voucher_operator::domain::{
    AuditKind, Claim, Code, DeletionPolicy, Owner, Phase, Request, TermField, Terms, Unrequested,
};
use voucher_operator::store::bindings::Bound;
use voucher_operator::store::outbox::{self, NewAuditRecord};
use voucher_operator::store::{Store, StoreError, bindings, promo_codes};

async fn store() -> Store {
    let url = support::fresh_database("store").await;
    let store = Store::from_pool(support::pool(&url).await);
    store.migrate().await.expect("migrate");
    store
}

fn terms(credit: i32) -> Terms {
    Terms {
        credit_omr: credit,
        discount: None,
        description: "launch".into(),
        active: true,
        max_redemptions: 10,
        valid_from: None,
        expires_at: Some(Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()),
    }
}

fn owner(uid: &str) -> Owner {
    Owner {
        namespace: "sales".into(),
        name: format!("voucher-{uid}"),
        uid: uid.into(),
    }
}

fn code(s: &str) -> Code {
    Code::parse(s).unwrap()
}

async fn raw_row(pool: &PgPool, code: &str) -> (i32, i32, bool, Option<chrono::DateTime<Utc>>) {
    sqlx::query_as(
        "SELECT credit_omr, times_redeemed, active, deleted_at FROM promo_codes WHERE code = $1",
    )
    .bind(code)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn apply_creates_then_writes_only_what_differs() {
    let store = store().await;
    let mut conn = store.pool().acquire().await.unwrap();
    let launch = code("launch-50");

    let created = promo_codes::apply(&mut conn, &launch, &terms(50))
        .await
        .unwrap();
    assert!(created.created() && created.wrote());
    assert_eq!(created.changed, TermField::ALL.to_vec());
    assert_eq!(created.after.code, "LAUNCH-50");
    assert_eq!(created.after.times_redeemed, 0);

    // The same terms again: no write at all (xmin stays the same).
    let xmin = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT xmin::text FROM promo_codes WHERE code = 'LAUNCH-50'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let version = xmin(store.pool().clone()).await;
    let same = promo_codes::apply(&mut conn, &launch, &terms(50))
        .await
        .unwrap();
    assert!(!same.wrote() && same.changed.is_empty());
    assert_eq!(
        xmin(store.pool().clone()).await,
        version,
        "a no-op apply wrote the row"
    );

    let mut wanted = terms(75);
    wanted.active = false;
    let updated = promo_codes::apply(&mut conn, &launch, &wanted)
        .await
        .unwrap();
    assert_eq!(updated.changed, [TermField::CreditOmr, TermField::Active]);
    assert_eq!(updated.before.unwrap().terms.credit_omr, 50);
    assert_eq!(updated.after.terms, wanted);
    assert_eq!(raw_row(store.pool(), "LAUNCH-50").await.0, 75);
}

#[tokio::test]
async fn soft_delete_hides_the_code_and_apply_resurrects_it_with_its_counter() {
    let store = store().await;
    let pool = store.pool();
    let mut conn = pool.acquire().await.unwrap();
    let launch = code("LAUNCH-50");
    promo_codes::apply(&mut conn, &launch, &terms(50))
        .await
        .unwrap();
    sqlx::query("UPDATE promo_codes SET times_redeemed = 4 WHERE code = 'LAUNCH-50'")
        .execute(pool)
        .await
        .unwrap();

    let tomb = promo_codes::soft_delete(&mut conn, &launch)
        .await
        .unwrap()
        .unwrap();
    assert!(tomb.is_tombstoned() && !tomb.terms.active);
    assert_eq!(
        promo_codes::find_live(&mut conn, &launch).await.unwrap(),
        None
    );
    assert!(promo_codes::list_live(&mut conn).await.unwrap().is_empty());
    assert_eq!(
        promo_codes::soft_delete(&mut conn, &launch).await.unwrap(),
        None,
        "deleting a tombstone again is a no-op"
    );

    let back = promo_codes::apply(&mut conn, &launch, &terms(50))
        .await
        .unwrap();
    assert!(back.resurrected() && back.wrote() && !back.created());
    assert_eq!(
        back.after.times_redeemed, 4,
        "resurrection keeps times_redeemed"
    );
    assert_eq!(back.after.created_at, tomb.created_at);
    assert!(back.after.deleted_at.is_none() && back.after.terms.active);
    let live = promo_codes::find_live(&mut conn, &launch)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(live, back.after);
}

/// Adoption asked for (a reissue must name its tombstone: see below).
const ASK: Request = Request {
    adopt: true,
    reissue: None,
};

fn bound(generation: i64) -> Bound {
    Bound {
        generation,
        phase: Phase::Active,
        deletion_policy: DeletionPolicy::Revoke,
    }
}

#[tokio::test]
async fn claim_creates_adopts_keeps_and_detects_conflicts() {
    let store = store().await;
    let pool = store.pool();
    let (a, b) = (owner("a"), owner("b"));

    // A code nobody has: create.
    let mut tx = pool.begin().await.unwrap();
    let fresh = code("FRESH-1");
    assert_eq!(
        bindings::claim(&mut tx, &fresh, &a, ASK)
            .await
            .unwrap()
            .claim,
        Claim::Create
    );
    promo_codes::apply(&mut tx, &fresh, &terms(5))
        .await
        .unwrap();
    bindings::bind(&mut tx, &fresh, &a, bound(1)).await.unwrap();
    tx.commit().await.unwrap();

    // Ours: keep, with the generation last applied.
    let mut conn = pool.acquire().await.unwrap();
    let state = bindings::claim(&mut conn, &fresh, &a, ASK).await.unwrap();
    assert_eq!(state.claim, Claim::Keep);
    assert_eq!(state.binding.unwrap().generation, 1);
    bindings::bind(&mut conn, &fresh, &a, bound(2))
        .await
        .unwrap();
    assert_eq!(
        bindings::find(&mut conn, &fresh)
            .await
            .unwrap()
            .unwrap()
            .generation,
        2
    );

    // Someone else's: conflict, and binding it is refused.
    let state = bindings::claim(&mut conn, &fresh, &b, ASK).await.unwrap();
    assert_eq!(state.claim, Claim::Conflict { owner: a.clone() });
    assert!(matches!(
        bindings::bind(&mut conn, &fresh, &b, bound(1)).await,
        Err(StoreError::BindingTaken { .. })
    ));

    // A row the admin page wrote before the lift: adopt, counters kept.
    sqlx::query(
        "INSERT INTO promo_codes (code, credit_omr, times_redeemed, created_at) \
         VALUES ('LEGACY-9', 9, 3, '2025-01-01T00:00:00Z')",
    )
    .execute(pool)
    .await
    .unwrap();
    let legacy = code("legacy-9");
    let state = bindings::claim(&mut conn, &legacy, &b, Request::default())
        .await
        .unwrap();
    assert_eq!(state.claim, Claim::NotRequested(Unrequested::Adopt));
    let state = bindings::claim(&mut conn, &legacy, &b, ASK).await.unwrap();
    assert_eq!(state.claim, Claim::Adopt);
    let adopted = promo_codes::apply(&mut conn, &legacy, &terms(9))
        .await
        .unwrap();
    assert_eq!(adopted.after.times_redeemed, 3);
    assert_eq!(
        adopted.after.created_at,
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
    );

    // A tombstone: reissue, when asked for this very revocation; never by itself.
    let tomb = promo_codes::soft_delete(&mut conn, &legacy)
        .await
        .unwrap()
        .unwrap();
    let revoked_at = tomb.deleted_at.unwrap();
    let reissue = Request {
        adopt: false,
        reissue: Some(revoked_at),
    };
    assert_eq!(
        bindings::claim(&mut conn, &legacy, &b, reissue)
            .await
            .unwrap()
            .claim,
        Claim::Reissue
    );
    for other in [Request::default(), ASK] {
        assert_eq!(
            bindings::claim(&mut conn, &legacy, &b, other)
                .await
                .unwrap()
                .claim,
            Claim::NotRequested(Unrequested::Reissue { revoked_at })
        );
    }

    // Released bindings free the code for another resource.
    assert!(!bindings::release(&mut conn, &fresh, "b").await.unwrap());
    assert!(bindings::release(&mut conn, &fresh, "a").await.unwrap());
    assert_eq!(
        bindings::claim(&mut conn, &fresh, &b, ASK)
            .await
            .unwrap()
            .claim,
        Claim::Adopt
    );
}

#[tokio::test]
async fn concurrent_claims_of_one_new_code_bind_exactly_one_resource() {
    let store = store().await;
    let contested = code("CONTESTED");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = store.pool().clone();
        let contested = contested.clone();
        tasks.push(tokio::spawn(async move {
            let me = owner(&format!("uid-{i}"));
            let mut tx = pool.begin().await.unwrap();
            let state = bindings::claim(&mut tx, &contested, &me, ASK)
                .await
                .unwrap();
            if matches!(state.claim, Claim::Conflict { .. }) {
                return false;
            }
            promo_codes::apply(&mut tx, &contested, &terms(1))
                .await
                .unwrap();
            bindings::bind(&mut tx, &contested, &me, bound(1))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            true
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(
        winners, 1,
        "the per-code lock must let exactly one claim win"
    );
}

#[tokio::test]
async fn outbox_records_commit_and_roll_back_with_their_change() {
    let store = store().await;
    let pool = store.pool();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM voucher_audit_outbox")
            .fetch_one(pool)
            .await
            .unwrap()
    };

    let mut tx = pool.begin().await.unwrap();
    let applied = promo_codes::apply(&mut tx, &code("ROLLED-BACK"), &terms(5))
        .await
        .unwrap();
    let record = NewAuditRecord::new(
        "ROLLED-BACK",
        AuditKind::Created,
        serde_json::to_value(&applied.after).unwrap(),
    );
    outbox::append(&mut tx, &record).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count().await, 0);
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        promo_codes::find_live(&mut conn, &code("ROLLED-BACK"))
            .await
            .unwrap(),
        None
    );

    let mut tx = pool.begin().await.unwrap();
    let first = outbox::append(
        &mut tx,
        &NewAuditRecord::new("A-CODE", AuditKind::Created, serde_json::json!({})),
    )
    .await
    .unwrap();
    let second = outbox::append(&mut tx, &record).await.unwrap();
    tx.commit().await.unwrap();
    assert!(second > first, "outbox order is append order");
    assert_eq!(count().await, 2);
    let (kind, payload): (String, serde_json::Value) =
        sqlx::query_as("SELECT kind, payload FROM voucher_audit_outbox WHERE event_id = $1")
            .bind(record.event_id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(kind, "created");
    assert_eq!(payload["code"], "ROLLED-BACK");

    // An event id is written once: a retried append cannot double it.
    let mut conn = pool.acquire().await.unwrap();
    assert!(outbox::append(&mut conn, &record).await.is_err());
}

#[tokio::test]
async fn published_records_are_pruned_after_the_retention_and_others_never() {
    let store = store().await;
    let mut conn = store.pool().acquire().await.unwrap();
    for code in ["OLD-1", "NEW-1", "WAITING-1"] {
        outbox::append(
            &mut conn,
            &NewAuditRecord::new(code, AuditKind::Created, serde_json::json!({})),
        )
        .await
        .unwrap();
    }
    sqlx::query(
        "UPDATE voucher_audit_outbox SET published_at = CASE code \
           WHEN 'OLD-1' THEN now() - interval '8 days' WHEN 'NEW-1' THEN now() END \
         WHERE code IN ('OLD-1', 'NEW-1')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let pruned = outbox::prune(&mut conn, std::time::Duration::from_secs(7 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT code FROM voucher_audit_outbox ORDER BY seq")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(left, ["NEW-1", "WAITING-1"]);
    let (backlog, _) = outbox::backlog(&mut conn).await.unwrap();
    assert_eq!(backlog, 1);
}

/// A redemption in flight holds a key-share lock on its code's row (the foreign key of
/// promo_redemptions) until it commits; changing the code must not wait for it, or a busy
/// code could never be switched off while redemptions overlap.
#[tokio::test]
async fn changing_a_code_does_not_wait_for_redemptions_in_flight() {
    use voucher_operator::store::sync::Wanted;
    let store = store().await;
    let me = owner("busy");
    let busy = code("BUSY-1");
    let wanted = |generation, terms| Wanted {
        code: &busy,
        owner: &me,
        generation,
        terms,
        request: Request::default(),
        deletion_policy: DeletionPolicy::Revoke,
        suspended: false,
        now: Utc::now(),
        global: None,
    };
    let on = terms(5);
    store.sync_voucher(&wanted(1, &on)).await.unwrap();
    // A redemption's first writes, not yet committed.
    let mut in_flight = store.pool().begin().await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ('racer', 't', ''); \
         INSERT INTO promo_redemptions (customer_id, code) \
           SELECT id, 'BUSY-1' FROM customers WHERE user_id = 'racer'",
    )
    .execute(&mut *in_flight)
    .await
    .unwrap();
    // Switching the code off goes through meanwhile (it blocked until the commit before).
    let off = Terms {
        active: false,
        ..terms(5)
    };
    let changed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.sync_voucher(&wanted(2, &off)),
    )
    .await
    .expect("the change waited for the redemption in flight");
    changed.unwrap();
    in_flight.commit().await.unwrap();
    let active: bool = sqlx::query_scalar("SELECT active FROM promo_codes WHERE code = 'BUSY-1'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(!active);
}

#[tokio::test]
async fn a_former_leader_writes_no_codes_after_the_release_began() {
    use voucher_operator::domain::campaign::Generator;
    use voucher_operator::store::campaigns::{Batch, Chunk, Release, TermsPass};
    let store = store().await;
    let campaign = owner("campaign-uid");
    let generator = Generator::new(&[7; 32], "sales", "launch", "LATE-", 12).unwrap();
    let codes: Vec<Code> = (0..4).map(|i| generator.code(i)).collect();
    store
        .register_campaign(&campaign, DeletionPolicy::Revoke)
        .await
        .unwrap();
    let first = TermsPass::Change {
        before: None,
        codes: 0,
    };
    store
        .apply_campaign_terms(&campaign, (0, 0), &terms(5), 1, &first)
        .await
        .unwrap();
    let five = terms(5);
    let batch = |from: usize, to: usize| Batch {
        from: from as u32,
        codes: &codes[from..to],
        terms: &five,
        of: 4,
        generation: 1,
        key_fingerprint: generator.fingerprint(),
    };
    assert_eq!(
        store
            .generate_campaign_codes(&campaign, &batch(0, 2))
            .await
            .unwrap(),
        Chunk::Generated { generated: 2 }
    );
    // The new leader deletes the campaign (Revoke) while the old one is mid-generation.
    while store.release_campaign(&campaign, None).await.unwrap() == Release::More {}
    assert_eq!(
        store
            .generate_campaign_codes(&campaign, &batch(2, 4))
            .await
            .unwrap(),
        Chunk::Released,
        "the old leader's next chunk"
    );
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM promo_codes WHERE code LIKE 'LATE-%' AND deleted_at IS NULL",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM promo_codes WHERE code LIKE 'LATE-%'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!((live, all), (0, 2), "both revoked, none added");
}

#[tokio::test]
async fn no_writer_hides_an_edit_by_saying_bulk() {
    use sqlx::postgres::PgListener;
    let store = store().await;
    let pool = store.pool().clone();
    sqlx::query("INSERT INTO promo_codes (code, credit_omr) VALUES ('PLAIN-1', 5)")
        .execute(&pool)
        .await
        .unwrap();
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen("voucher_operator_codes").await.unwrap();
    // What psql or the admin page could do: claim to be a campaign's bulk change.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('voucher_operator.bulk', 'on', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE promo_codes SET credit_omr = 999 WHERE code = 'PLAIN-1'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let heard = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(
        heard.payload(),
        "PLAIN-1",
        "named, so drift correction hears it"
    );
}

#[tokio::test]
async fn a_former_leader_never_writes_an_older_spec_of_a_voucher() {
    use voucher_operator::store::sync::Wanted;
    let store = store().await;
    let launch = code("ELDER-1");
    let me = owner("voucher-uid");
    let wanted = |generation: i64, credit: i32| (generation, terms(credit));
    let sync = |(generation, terms): (i64, Terms)| {
        let (store, launch, me) = (store.clone(), launch.clone(), me.clone());
        async move {
            store
                .sync_voucher(&Wanted {
                    code: &launch,
                    owner: &me,
                    generation,
                    terms: &terms,
                    request: Request::default(),
                    deletion_policy: DeletionPolicy::Revoke,
                    suspended: false,
                    now: Utc::now(),
                    global: None,
                })
                .await
        }
    };
    sync(wanted(1, 5)).await.unwrap();
    sync(wanted(2, 6)).await.unwrap();
    // The replica that lost its lease finishes a reconcile of generation 1.
    let stale = sync(wanted(1, 5)).await.unwrap_err();
    assert!(stale.is_superseded(), "{stale}");
    let credit: i32 =
        sqlx::query_scalar("SELECT credit_omr FROM promo_codes WHERE code = 'ELDER-1'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(credit, 6, "generation 2's terms stay");
}
