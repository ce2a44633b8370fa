//! The database's guard (DESIGN §13) against the real Postgres: the rules the operator promises
//! hold for every writer — the billing service's own checkout (its five statements, as it runs
//! them), its admin page, psql — and no runtime role can switch the guard off.

mod support;

use chrono::Utc;
use sqlx::PgPool;
use voucher_operator::domain::{Code, DeletionPolicy, Owner, Redeemability, Terms};
use voucher_operator::store::Store;
use voucher_operator::store::campaigns::TermsPass;

/// A migrated database and its owner's pool.
async fn migrated(prefix: &str) -> (String, PgPool, Store) {
    let url = support::fresh_database(prefix).await;
    let pool = support::pool(&url).await;
    let store = Store::from_pool(pool.clone());
    store.migrate().await.unwrap();
    (url, pool, store)
}

/// Redemptions, counter and ledger grants of `code`: all three move together or none does.
async fn written(pool: &PgPool, code: &str) -> (i64, i32, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM promo_redemptions WHERE code = $1), \
                (SELECT times_redeemed FROM promo_codes WHERE code = $1), \
                (SELECT count(*) FROM credit_ledger WHERE reason = 'promo:' || $1)",
    )
    .bind(code)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_legacy_checkout_cannot_redeem_outside_the_window() {
    let (_, pool, _) = migrated("guard_window").await;
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr, valid_from, expires_at) VALUES \
           ('EXPIRED-1', 5, NULL, now() - interval '1 hour'), \
           ('LATER-1', 5, now() + interval '1 day', NULL), \
           ('LIVE-1', 5, now() - interval '1 day', now() + interval '1 day')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let refused = support::seed_checkout(&pool, "EXPIRED-1", "alice")
        .await
        .unwrap_err();
    assert!(
        refused.contains("voucher code EXPIRED-1 expired at"),
        "{refused}"
    );
    let refused = support::seed_checkout(&pool, "LATER-1", "alice")
        .await
        .unwrap_err();
    assert!(
        refused.contains("voucher code LATER-1 cannot be redeemed before"),
        "{refused}"
    );
    for code in ["EXPIRED-1", "LATER-1"] {
        assert_eq!(
            written(&pool, code).await,
            (0, 0, 0),
            "{code}: nothing written"
        );
    }
    support::seed_checkout(&pool, "LIVE-1", "alice")
        .await
        .expect("a live code in its window still redeems");
    assert_eq!(written(&pool, "LIVE-1").await, (1, 1, 1));
}

#[tokio::test]
async fn the_legacy_checkout_cannot_consume_a_discount_code() {
    let (_, pool, store) = migrated("guard_discount").await;
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr, discount) VALUES \
           ('INSTALLS-20', 0, '{\"percent_off\": 20, \"applies_to\": [\"install\"]}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The seed's five statements would record a redemption and a credit of 0: refused, not fooled.
    let refused = support::seed_checkout(&pool, "INSTALLS-20", "alice")
        .await
        .unwrap_err();
    assert!(
        refused.contains(
            "voucher code INSTALLS-20 grants a discount: only voucher-operator's redemption"
        ),
        "{refused}"
    );
    assert_eq!(
        written(&pool, "INSTALLS-20").await,
        (0, 0, 0),
        "nothing written"
    );
    // The operator's redemption writes the grant with it.
    let redemption = voucher_operator::store::redeem::Redemption {
        code: Code::parse("INSTALLS-20").unwrap(),
        subject: "alice".into(),
        tenant: Some("t".into()),
        email: String::new(),
        idempotency: None,
        now: Utc::now(),
        currency: Default::default(),
        intent: None,
    };
    let answer = store.redeem(&redemption).await.unwrap();
    assert!(format!("{answer:?}").contains("Discount"), "{answer:?}");
    assert_eq!(
        written(&pool, "INSTALLS-20").await,
        (1, 1, 0),
        "a redemption, no credit"
    );
    // A grant holds what its customer redeemed: no writer edits or deletes it.
    for (edit, says) in [
        (
            "UPDATE voucher_discount_grants SET percent_off = 100",
            "holds the terms its customer redeemed",
        ),
        (
            "UPDATE voucher_discount_grants SET ends_at = now() + interval '1 year'",
            "holds the terms its customer redeemed",
        ),
        ("DELETE FROM voucher_discount_grants", "cannot be deleted"),
    ] {
        let refused = sqlx::raw_sql(edit).execute(&pool).await.unwrap_err();
        assert!(refused.to_string().contains(says), "{edit}: {refused}");
    }
    // Ended once (a reversal), it stays ended.
    sqlx::raw_sql("UPDATE voucher_discount_grants SET ended_at = now()")
        .execute(&pool)
        .await
        .expect("a grant ends");
    let refused = sqlx::raw_sql("UPDATE voucher_discount_grants SET ended_at = NULL")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("only ended_at, once"),
        "{refused}"
    );
}

/// A campaign of `codes` codes (as the controller records it), each row live and active.
async fn campaign(pool: &PgPool, uid: &str, prefix: &str, codes: usize) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO voucher_campaigns (uid, namespace, name, generated) \
           VALUES ('{uid}', 'billing', '{uid}', {codes}); \
         INSERT INTO promo_codes (code, credit_omr, max_redemptions) \
           SELECT '{prefix}' || i, 5, 1 FROM generate_series(0, {codes} - 1) i; \
         INSERT INTO voucher_campaign_codes (code, campaign_uid, code_index) \
           SELECT '{prefix}' || i, '{uid}', i FROM generate_series(0, {codes} - 1) i;"
    )))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_switched_off_campaigns_code_is_refused_to_every_writer_whatever_its_row_says() {
    let (_, pool, store) = migrated("guard_campaign").await;
    campaign(&pool, "camp-off", "OFF-", 3).await;
    let owner = Owner {
        namespace: "billing".into(),
        name: "camp-off".into(),
        uid: "camp-off".into(),
    };
    store
        .register_campaign(&owner, DeletionPolicy::Revoke)
        .await
        .unwrap();
    // The controller switches it off: the first pass of the change flips the campaign's row.
    let on = Terms::granting(5);
    let off = Terms {
        active: false,
        ..on.clone()
    };
    store
        .apply_campaign_terms(
            &owner,
            (0, 0),
            &off,
            2,
            &TermsPass::Change {
                before: Some(&on),
                codes: 3,
            },
        )
        .await
        .unwrap();
    // The codes' rows still say active (they follow in the background), or the admin page
    // flipped one back on: the campaign decides.
    let active: bool = sqlx::query_scalar("SELECT active FROM promo_codes WHERE code = 'OFF-2'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(active, "the row was not rewritten");
    sqlx::query("UPDATE promo_codes SET active = true WHERE code = 'OFF-2'")
        .execute(&pool)
        .await
        .unwrap();
    let refused = support::seed_checkout(&pool, "OFF-2", "bob")
        .await
        .unwrap_err();
    assert!(
        refused.contains("belongs to VoucherCampaign billing/camp-off, which is switched off"),
        "{refused}"
    );
    assert_eq!(written(&pool, "OFF-2").await, (0, 0, 0));
    // The operator's preview and redemption read the same switch.
    let code = Code::parse("OFF-2").unwrap();
    let record = store.find_live(&code).await.unwrap().unwrap();
    assert_eq!(
        Redeemability::of(Some(&record), Utc::now()),
        Redeemability::Unlaunched
    );
    // Back on: one row again, for every path that reads the switch.
    store
        .apply_campaign_terms(
            &owner,
            (0, 0),
            &on,
            3,
            &TermsPass::Change {
                before: Some(&off),
                codes: 3,
            },
        )
        .await
        .unwrap();
    support::seed_checkout(&pool, "OFF-2", "bob")
        .await
        .expect("switched on again");
}

#[tokio::test]
async fn a_revoke_deletion_switches_its_campaign_off_in_one_row_before_any_code_follows() {
    let (_, pool, store) = migrated("guard_revoke").await;
    // One more code than a release chunk (20,000): the last is left to a later step.
    campaign(&pool, "camp-gone", "GONE-", 20_001).await;
    let owner = Owner {
        namespace: "billing".into(),
        name: "camp-gone".into(),
        uid: "camp-gone".into(),
    };
    // The deletion's first step, alone (the controller repeats it until done).
    store.release_campaign(&owner, None).await.unwrap();
    // The last code's own row still says live and active: only the campaign's row moved.
    let row: (bool, bool) = sqlx::query_as(
        "SELECT active, deleted_at IS NULL FROM promo_codes WHERE code = 'GONE-20000'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row, (true, true), "the code's row was rewritten");
    let refused = support::seed_checkout(&pool, "GONE-20000", "frank")
        .await
        .unwrap_err();
    assert!(
        refused.contains("belongs to VoucherCampaign billing/camp-gone, which is switched off"),
        "{refused}"
    );
    assert_eq!(written(&pool, "GONE-20000").await, (0, 0, 0));
    // The preview's lookup reads the same row: the code looks unknown.
    let code = Code::parse("GONE-20000").unwrap();
    let record = store.find_live(&code).await.unwrap();
    assert!(
        Redeemability::of(record.as_ref(), Utc::now()).is_hidden(),
        "{record:?}"
    );
}

#[tokio::test]
async fn a_suspended_code_or_campaign_is_refused_to_every_writer() {
    let (_, pool, store) = migrated("guard_suspended").await;
    campaign(&pool, "camp-s", "SUS-", 2).await;
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr) VALUES ('PLAIN-9', 9); \
         INSERT INTO voucher_suspensions (target, source, actor) VALUES \
           ('PLAIN-9', 'admin', 'root'), ('campaign:camp-s', 'annotation', 'billing/camp-s')",
    )
    .execute(&pool)
    .await
    .unwrap();
    for code in ["PLAIN-9", "SUS-1"] {
        let refused = support::seed_checkout(&pool, code, "carol")
            .await
            .unwrap_err();
        assert!(
            refused.contains(&format!("voucher code {code} is suspended")),
            "{refused}"
        );
        assert_eq!(written(&pool, code).await, (0, 0, 0));
    }
    let plain = store
        .find_live(&Code::parse("PLAIN-9").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        Redeemability::of(Some(&plain), Utc::now()),
        Redeemability::Suspended
    );
    // Lifted: redeemable again.
    sqlx::query("DELETE FROM voucher_suspensions WHERE target = 'PLAIN-9'")
        .execute(&pool)
        .await
        .unwrap();
    support::seed_checkout(&pool, "PLAIN-9", "carol")
        .await
        .expect("lifted");
}

#[tokio::test]
async fn no_role_but_the_owner_can_switch_the_guard_off() {
    let (url, pool, _) = migrated("guard_roles").await;
    sqlx::raw_sql(
        "INSERT INTO promo_codes (code, credit_omr, expires_at) VALUES \
           ('OLD-1', 5, now() - interval '1 hour'), ('FRESH-1', 5, NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The operator's runtime role, with exactly its documented grants; and the billing
    // service's own role, with grants on its tables and none on the operator's.
    let id = std::process::id();
    let (runtime, billing) = (format!("runtime_{id}"), format!("billing_{id}"));
    let grants = include_str!("../src/store/runtime-grants.sql");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS {runtime}; CREATE ROLE {runtime} LOGIN; {}; \
         DROP ROLE IF EXISTS {billing}; CREATE ROLE {billing} LOGIN; \
         GRANT SELECT, INSERT, UPDATE ON promo_codes, customers, promo_redemptions, credit_ledger \
           TO {billing};",
        grants.replace("voucher_runtime", &runtime)
    )))
    .execute(&pool)
    .await
    .unwrap();
    let as_role = |role: &str| {
        let url = url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
        async move { support::pool(&url).await }
    };
    let runtime_pool = as_role(&runtime).await;
    for statement in [
        "ALTER TABLE promo_redemptions DISABLE TRIGGER voucher_operator_guard",
        "ALTER TABLE promo_redemptions DISABLE TRIGGER ALL",
        "DROP TRIGGER voucher_operator_guard ON promo_redemptions",
        "DROP FUNCTION voucher_operator_guard_redemption() CASCADE",
        "DROP TRIGGER voucher_operator_guard_discount ON promo_redemptions",
        "ALTER TABLE voucher_discount_grants DISABLE TRIGGER voucher_operator_grant_kept",
        "DELETE FROM voucher_discount_grants",
        "SET session_replication_role = replica",
        "CREATE OR REPLACE FUNCTION voucher_operator_guard_redemption() RETURNS trigger \
         LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    ] {
        let refused = sqlx::raw_sql(statement)
            .execute(&runtime_pool)
            .await
            .expect_err(statement);
        assert!(
            refused.to_string().contains("must be owner")
                || refused.to_string().contains("permission denied"),
            "{statement}: {refused}"
        );
    }
    // A session variable does not switch it off either.
    let mut tx = runtime_pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('voucher_operator.bulk', 'on', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let customer: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ('dave', 't', '') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let refused =
        sqlx::query("INSERT INTO promo_redemptions (customer_id, code) VALUES ($1, 'OLD-1')")
            .bind(customer)
            .execute(&mut *tx)
            .await
            .unwrap_err();
    assert!(refused.to_string().contains("expired at"), "{refused}");
    drop(tx);
    // Nor tables of its own that shadow the guard's: temporary tables come first in a
    // session's search_path unless the function says otherwise.
    let billing_pool = as_role(&billing).await;
    let mut tx = billing_pool.begin().await.unwrap();
    let customer: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO customers (user_id, tenant_id, email) VALUES ('trudy', 't', '') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::raw_sql(
        "CREATE TEMP TABLE promo_codes (code TEXT, valid_from TIMESTAMPTZ, expires_at TIMESTAMPTZ); \
         CREATE TEMP TABLE voucher_suspensions (target TEXT)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let refused = sqlx::query(
        "INSERT INTO public.promo_redemptions (customer_id, code) VALUES ($1, 'OLD-1')",
    )
    .bind(customer)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(
        refused.to_string().contains("expired at"),
        "shadowed: {refused}"
    );
    drop(tx);
    // The billing service's role passes through the guard without grants on the operator's
    // tables: refused by the rule, never by a permission.
    let billing_pool = as_role(&billing).await;
    let refused = support::seed_checkout(&billing_pool, "OLD-1", "erin")
        .await
        .unwrap_err();
    assert!(refused.contains("expired at"), "{refused}");
    support::seed_checkout(&billing_pool, "FRESH-1", "erin")
        .await
        .expect("its checkout works as before");
}
