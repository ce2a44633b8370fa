use super::*;

const UID: &str = "hub-uid";

fn now() -> DateTime<Utc> {
    "2026-12-05T12:00:00Z".parse().expect("a time")
}

/// A record with cap 10, ceiling 8, 5 a request; S1 holds 4 at version 2
/// (2 spent), S2 holds 3 at version 1.
fn record() -> Record {
    let mut record = Record::new(UID, 10, 8, 5);
    record.sovereigns.insert(
        "s1".into(),
        Entry {
            share: 4,
            version: 2,
            reported: 2,
            known: true,
        },
    );
    record.sovereigns.insert(
        "s2".into(),
        Entry {
            share: 3,
            version: 1,
            reported: 0,
            known: true,
        },
    );
    record
}

fn set(version: u64, share: u64) -> Request {
    Request::Set {
        uid: UID.into(),
        epoch: 0,
        version,
        share,
        used: 2,
    }
}

fn share_of(decision: &Decision) -> Option<u64> {
    decision.write.as_ref().map(|r| r.sovereigns["s1"].share)
}

#[test]
fn each_request_is_decided_by_its_rule() {
    let restored = record().restored(["s1", "s2"]);
    let off = record().with_terms(10, false);
    let mut over = record();
    over.cap = 6;
    // (why, record, request from s1, share written, the reply's kind)
    let cases: Vec<(&str, Record, Request, Option<u64>, &str)> = vec![
        (
            "a raise within the cap is granted at the next version",
            record(),
            set(2, 7),
            Some(7),
            "ok",
        ),
        (
            "a raise past the cap is granted as far as it fits (others hold 3: at most 7)",
            record(),
            set(2, 8),
            Some(7),
            "ok",
        ),
        (
            "a raise once the cap is all granted is refused",
            {
                let mut r = record();
                r.cap = 7;
                r
            },
            set(2, 5),
            None,
            "cap",
        ),
        (
            "a raise past the ceiling is granted up to the ceiling",
            {
                let mut r = record();
                r.cap = 100;
                r
            },
            set(2, 9),
            Some(8),
            "ok",
        ),
        (
            "a raise past the per-request limit is granted up to it (4 held + 5)",
            {
                let mut r = record();
                r.cap = 100;
                r.ceiling = 100;
                r
            },
            set(2, 10),
            Some(9),
            "ok",
        ),
        (
            "a return is always applied",
            record(),
            set(2, 2),
            Some(2),
            "ok",
        ),
        (
            "a return is applied even past a lowered cap",
            over.clone(),
            set(2, 3),
            Some(3),
            "ok",
        ),
        (
            "no grant while Σ shares is above a lowered cap (effective cap)",
            over,
            set(2, 5),
            None,
            "cap",
        ),
        (
            "a request at an older version is refused, whatever it asks",
            record(),
            set(1, 2),
            None,
            "stale",
        ),
        (
            "a request at a newer version than the record's is refused too",
            record(),
            set(3, 5),
            None,
            "stale",
        ),
        (
            "a raise of an inactive voucher is refused",
            off.clone(),
            set(2, 5),
            None,
            "not redeemable",
        ),
        (
            "a return of an inactive voucher is applied",
            off,
            set(2, 3),
            Some(3),
            "ok",
        ),
        (
            "a request of another epoch is answered: sync first",
            record(),
            Request::Set {
                uid: UID.into(),
                epoch: 1,
                version: 2,
                share: 5,
                used: 2,
            },
            None,
            "sync first",
        ),
        (
            "in a restored epoch, a Sovereign that has not synced is answered: sync first",
            restored.clone(),
            Request::Set {
                uid: UID.into(),
                epoch: 1,
                version: 2,
                share: 5,
                used: 2,
            },
            None,
            "sync first",
        ),
        (
            "a sync in a restored epoch takes what the Sovereign says it holds",
            restored,
            Request::Sync {
                uid: UID.into(),
                epoch: 1,
                keep: 6,
                used: 2,
            },
            Some(6),
            "ok",
        ),
        (
            "a sync never raises a share the record knows",
            record(),
            Request::Sync {
                uid: UID.into(),
                epoch: 0,
                keep: 6,
                used: 2,
            },
            Some(4),
            "ok",
        ),
        (
            "a sync after a restore keeps only the high-water count",
            record(),
            Request::Sync {
                uid: UID.into(),
                epoch: 0,
                keep: 2,
                used: 2,
            },
            Some(2),
            "ok",
        ),
        (
            "a request for another Voucher under the code is refused",
            record(),
            Request::Set {
                uid: "other".into(),
                epoch: 0,
                version: 2,
                share: 5,
                used: 2,
            },
            None,
            "other voucher",
        ),
    ];
    for (why, record, request, share, kind) in cases {
        let decision = decide(&record, "s1", &request, now());
        let got = match &decision.reply {
            Reply::Ok { .. } => "ok",
            Reply::Refused {
                reason: Refusal::Cap,
                ..
            } => "cap",
            Reply::Refused {
                reason: Refusal::StaleVersion,
                ..
            } => "stale",
            Reply::Refused {
                reason: Refusal::NotRedeemable,
                ..
            } => "not redeemable",
            Reply::Refused {
                reason: Refusal::OtherVoucher,
                ..
            } => "other voucher",
            Reply::SyncFirst { .. } => "sync first",
            Reply::Unknown => "unknown",
        };
        assert_eq!((share_of(&decision), got), (share, kind), "{why}");
    }
}

#[test]
fn a_refused_raise_still_records_the_usage_it_reports() {
    let asks = Request::Set {
        uid: UID.into(),
        epoch: 0,
        version: 2,
        share: 9,
        used: 3,
    };
    // Every unit granted (S2 holds the other 3): nothing more fits.
    let mut all_granted = record();
    all_granted.cap = 7;
    let decision = decide(&all_granted, "s1", &asks, now());
    let written = decision.write.expect("the usage is written");
    assert_eq!(
        written.sovereigns["s1"],
        Entry {
            share: 4,
            version: 2,
            reported: 3,
            known: true
        }
    );
    assert!(matches!(
        decision.reply,
        Reply::Refused {
            reason: Refusal::Cap,
            share: 4,
            version: 2,
            ..
        }
    ));
}

#[test]
fn a_change_moves_the_version_and_the_reply_carries_what_was_written() {
    let decision = decide(&record(), "s1", &set(2, 6), now());
    assert_eq!(
        decision.reply,
        Reply::Ok {
            epoch: 0,
            share: 6,
            version: 3,
            gone: false
        }
    );
    let sync = decide(
        &record(),
        "s1",
        &Request::Sync {
            uid: UID.into(),
            epoch: 0,
            keep: 9,
            used: 2,
        },
        now(),
    );
    assert!(
        matches!(
            sync.reply,
            Reply::Ok {
                share: 4,
                version: 3,
                ..
            }
        ),
        "a sync moves the version: {sync:?}"
    );
}

#[test]
fn a_duplicate_is_applied_at_most_once_and_never_undoes_a_later_change() {
    let granted = decide(&record(), "s1", &set(2, 7), now())
        .write
        .expect("granted");
    // The same request again (a re-send, a former leader's): refused, nothing written.
    let duplicate = decide(&granted, "s1", &set(2, 7), now());
    assert_eq!(duplicate.write, None);
    assert!(matches!(
        duplicate.reply,
        Reply::Refused {
            reason: Refusal::StaleVersion,
            share: 7,
            version: 3,
            ..
        }
    ));
    // A return, then the old raise replayed: the return stands.
    let returned = decide(&granted, "s1", &set(3, 3), now())
        .write
        .expect("returned");
    assert_eq!(decide(&returned, "s1", &set(2, 7), now()).write, None);
}

#[test]
fn a_restored_hub_charges_every_member_its_ceiling_until_it_syncs() {
    // s3 is a member the backup never saw: it may hold units granted after it.
    let restored = record().restored(["s1", "s2", "s3"]);
    assert_eq!(
        restored.granted(),
        3 * 8,
        "each unheard member at its ceiling"
    );
    let s2_syncs = Request::Sync {
        uid: UID.into(),
        epoch: 1,
        keep: 3,
        used: 0,
    };
    let after = decide(&restored, "s2", &s2_syncs, now())
        .write
        .expect("synced");
    assert_eq!(after.granted(), 8 + 3 + 8);
    // s2 asks for more: s1 and s3 are still charged their ceilings (16 > cap 10).
    let more = Request::Set {
        uid: UID.into(),
        epoch: 1,
        version: 2,
        share: 4,
        used: 0,
    };
    assert!(matches!(
        decide(&after, "s2", &more, now()).reply,
        Reply::Refused {
            reason: Refusal::Cap,
            ..
        }
    ));
}

#[test]
fn used_up_only_when_every_unit_is_granted_and_reported_spent() {
    let mut record = record();
    record.cap = 7;
    assert!(!record.gone(), "s1 and s2 hold unspent units");
    record.sovereigns.get_mut("s1").expect("s1").reported = 4;
    record.sovereigns.get_mut("s2").expect("s2").reported = 3;
    assert!(record.gone());
    let refused = decide(
        &record,
        "s1",
        &Request::Set {
            uid: UID.into(),
            epoch: 0,
            version: 2,
            share: 5,
            used: 4,
        },
        now(),
    );
    assert!(matches!(
        refused.reply,
        Reply::Refused {
            reason: Refusal::Cap,
            gone: true,
            ..
        }
    ));
}

#[test]
fn the_hub_refuses_raises_outside_the_window_by_its_own_clock() {
    let mut record = record();
    record.expires_at = Some(now());
    assert!(matches!(
        decide(&record, "s1", &set(2, 5), now()).reply,
        Reply::Refused {
            reason: Refusal::NotRedeemable,
            ..
        }
    ));
    record.expires_at = None;
    record.valid_from = Some(now() + chrono::Duration::seconds(1));
    assert!(matches!(
        decide(&record, "s1", &set(2, 5), now()).reply,
        Reply::Refused {
            reason: Refusal::NotRedeemable,
            ..
        }
    ));
}

#[test]
fn a_record_reads_back_what_it_wrote() {
    let record = decide(&record(), "s1", &set(2, 7), now())
        .write
        .expect("granted");
    let json = serde_json::to_string(&record).expect("serialises");
    assert_eq!(
        serde_json::from_str::<Record>(&json).expect("parses"),
        record
    );
    let request: Request = serde_json::from_str(
        r#"{"kind":"set","uid":"u","epoch":0,"version":1,"share":5,"used":0}"#,
    )
    .expect("a request");
    assert_eq!(
        request,
        Request::Set {
            uid: "u".into(),
            epoch: 0,
            version: 1,
            share: 5,
            used: 0
        }
    );
}

mod local {
    use super::*;

    const DB: &str = "7301234567890:1";

    fn synced(share: u64, version: u64, high_water: u64) -> Local {
        Local {
            share,
            version,
            high_water,
            synced_identity: Some(DB.into()),
            ..Local::default()
        }
    }

    fn ok(share: u64, version: u64) -> Reply {
        Reply::Ok {
            epoch: 0,
            share,
            version,
            gone: false,
        }
    }

    #[test]
    fn a_new_state_serves_nothing_until_synced() {
        let mut local = Local::default();
        assert_eq!(
            local.local_cap(DB),
            0,
            "0 is an inactive row, never unlimited"
        );
        let sync = local.next_request(UID, DB, 5, 10).expect("a sync");
        assert!(matches!(sync, Request::Sync { keep: 0, .. }), "{sync:?}");
        assert_eq!(
            local.apply(&sync, &ok(0, 1), DB),
            Applied::Moved { share: 0 }
        );
        let refill = local.next_request(UID, DB, 5, 10).expect("a refill");
        assert!(
            matches!(
                refill,
                Request::Set {
                    version: 1,
                    share: 10,
                    ..
                }
            ),
            "{refill:?}"
        );
    }

    #[test]
    fn the_share_rises_only_from_a_newer_reply() {
        let mut local = synced(10, 3, 8);
        let request = local
            .next_request(UID, DB, 5, 10)
            .expect("a refill: 2 left");
        assert_eq!(
            local.apply(&request, &ok(20, 2), DB),
            Applied::Ignored,
            "an older version"
        );
        assert_eq!(local.share, 10);
        assert_eq!(
            local.apply(&request, &ok(20, 4), DB),
            Applied::Moved { share: 20 }
        );
        assert_eq!(local.outstanding, None, "answered");
    }

    #[test]
    fn what_is_spent_is_reported_once_even_when_no_refill_is_due() {
        let mut local = synced(10, 3, 2);
        local.reported = 2;
        assert_eq!(
            local.next_request(UID, DB, 5, 10),
            None,
            "8 left, all reported"
        );
        local.counted(4);
        let report = local.next_request(UID, DB, 5, 10).expect("a report");
        assert!(
            matches!(
                report,
                Request::Set {
                    share: 10,
                    used: 4,
                    version: 3,
                    ..
                }
            ),
            "the share as it is, with the usage: {report:?}"
        );
        assert_eq!(
            local.apply(&report, &ok(10, 4), DB),
            Applied::Moved { share: 10 }
        );
        assert_eq!(local.reported, 4);
        assert_eq!(local.next_request(UID, DB, 5, 10), None, "reported once");
    }

    #[test]
    fn a_return_lowers_the_local_cap_first_and_never_below_the_high_water_count() {
        let mut local = synced(10, 3, 6);
        let request = local.give_back(UID, 2).expect("a return");
        assert_eq!(local.share, 6, "lowered at once, to the high-water count");
        assert!(
            matches!(
                request,
                Request::Set {
                    share: 6,
                    version: 3,
                    ..
                }
            ),
            "{request:?}"
        );
        assert_eq!(local.give_back(UID, 0), None, "one request at a time");
        // A stale refusal (the version before the return) never raises it back.
        assert_eq!(
            local.apply(
                &request,
                &Reply::Refused {
                    reason: Refusal::StaleVersion,
                    epoch: 0,
                    share: 10,
                    version: 3,
                    gone: false
                },
                DB
            ),
            Applied::Ignored
        );
        assert_eq!(local.share, 6);
    }

    #[test]
    fn a_restored_database_serves_nothing_and_keeps_only_what_was_spent() {
        // Restored from a backup taken when it held 10 (4 spent): another identity.
        let mut local = synced(10, 3, 4);
        let restored = "7301234567890:2";
        assert_eq!(local.local_cap(restored), 0);
        let sync = local.next_request(UID, restored, 5, 10).expect("a sync");
        assert!(
            matches!(
                sync,
                Request::Sync {
                    keep: 4,
                    used: 4,
                    ..
                }
            ),
            "{sync:?}"
        );
        assert_eq!(local.local_cap(restored), 0, "until the sync is answered");
        local.apply(&sync, &ok(4, 4), restored);
        assert_eq!(local.local_cap(restored), 4);
    }

    #[test]
    fn a_newer_epoch_asks_for_a_sync_that_keeps_what_is_held() {
        let mut local = synced(10, 3, 4);
        let refill = local.give_back(UID, 8).expect("a return");
        assert_eq!(
            local.apply(&refill, &Reply::SyncFirst { epoch: 1 }, DB),
            Applied::SyncFirst
        );
        assert_eq!(
            local.local_cap(DB),
            8,
            "the units held were granted: still served"
        );
        let sync = local.next_request(UID, DB, 5, 10).expect("a sync");
        assert!(
            matches!(
                sync,
                Request::Sync {
                    epoch: 1,
                    keep: 8,
                    ..
                }
            ),
            "{sync:?}"
        );
        local.apply(
            &sync,
            &Reply::Ok {
                epoch: 1,
                share: 8,
                version: 1,
                gone: false,
            },
            DB,
        );
        assert_eq!(local.local_cap(DB), 8);
        // A late reply of the old epoch is older, whatever its version.
        assert_eq!(local.apply(&refill, &ok(10, 9), DB), Applied::Ignored);
    }
}

#[test]
fn a_vendors_definition_changes_the_terms_and_never_the_shares() {
    let terms = crate::Terms {
        max_redemptions: 100,
        ..crate::Terms::granting(50)
    };
    let defined = Record::defined("uid-1", &terms, 500, 10);
    assert_eq!(
        (defined.cap, defined.ceiling),
        (100, 100),
        "the ceiling is never above the cap"
    );
    let mut held = defined.clone();
    held.sovereigns.insert(
        "sov1".into(),
        Entry {
            share: 30,
            version: 2,
            reported: 12,
            known: true,
        },
    );
    let lowered = Record::defined(
        "uid-2",
        &crate::Terms {
            max_redemptions: 20,
            active: false,
            ..terms.clone()
        },
        500,
        10,
    );
    let after = held.redefined(&lowered);
    assert_eq!(
        (after.cap, after.active, after.uid.as_str()),
        (20, false, "uid-2")
    );
    assert_eq!(
        after.sovereigns, held.sovereigns,
        "units granted stay granted"
    );
    assert_eq!(after.summary(), "sov1=30/12");
    assert_eq!(after.reported(), 12);
}

#[test]
fn a_copy_is_held_to_the_vendors_terms_field_by_field() {
    let terms = crate::Terms {
        max_redemptions: 100,
        ..crate::Terms::granting(50)
    };
    let credits = |pairs: &[(&str, i32)]| {
        pairs
            .iter()
            .map(|(c, n)| (c.to_string(), *n))
            .collect::<BTreeMap<_, _>>()
    };
    let define = |terms: &crate::Terms, credits, once| {
        Record::defined("uid-1", terms, 100, 10).offering(credits, once)
    };
    let record = define(&terms, credits(&[("OMR", 50), ("BHD", 50)]), false);
    // (why, the copy's terms, its credits, its perCustomer: Global, the differences)
    let raised = crate::Terms {
        max_redemptions: 200,
        credit_omr: 500,
        ..terms.clone()
    };
    let cases = [
        (
            "the same definition",
            &terms,
            credits(&[("OMR", 50), ("BHD", 50)]),
            false,
            vec![],
        ),
        (
            "a franchisee raising its copy is told which fields differ (a credit per currency is one field)",
            &raised,
            credits(&[("OMR", 50), ("BHD", 500)]),
            false,
            vec!["maxRedemptions", "creditByCurrency"],
        ),
        (
            "once per customer anywhere cannot be relaxed on one Sovereign",
            &terms,
            credits(&[("OMR", 50), ("BHD", 50)]),
            true,
            vec!["perCustomer"],
        ),
    ];
    for (why, copied, copy_credits, once, differs) in cases {
        let copy = define(copied, copy_credits, once);
        assert_eq!(record.differences(&copy), differs, "{why}");
    }
}

#[test]
fn a_sovereign_grants_the_credit_of_its_own_currency_and_offers_nothing_without_it() {
    let terms = crate::Terms::granting(50);
    let credits: BTreeMap<String, i32> = [("OMR".to_string(), 50), ("BHD".to_string(), 60)].into();
    let record = Record::defined("uid-1", &terms, 100, 10).offering(credits, false);
    assert_eq!(
        record.terms_in("BHD", &terms).map(|t| t.credit_omr),
        Some(60)
    );
    assert_eq!(
        record.terms_in("OMR", &terms).map(|t| t.credit_omr),
        Some(50)
    );
    assert_eq!(
        record.terms_in("USD", &terms),
        None,
        "no credit in USD: not offered"
    );
    let earlier = Record::defined("uid-1", &terms, 100, 10);
    assert_eq!(
        earlier.terms_in("USD", &terms).map(|t| t.credit_omr),
        Some(50),
        "a record of an earlier version states one credit"
    );
}
