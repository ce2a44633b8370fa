use super::*;

/// The searches with every rule in force: the base faults with two
/// Sovereigns, then each further fault kind beside them, then three
/// Sovereigns.
fn scenarios() -> Vec<(&'static str, Bounds)> {
    let base = Bounds::default();
    let with = |faults: Faults| Bounds { faults, ..base };
    vec![
        (
            "two Sovereigns: loss, duplication, reordering, a replica crash, a database restore",
            base,
        ),
        (
            "the hub restored and the cap lowered",
            with(Faults {
                hub_restore: 1,
                lower_cap: 1,
                db_restore: 0,
                ..Faults::BASE
            }),
        ),
        (
            "the cap lowered from 3",
            Bounds {
                cap: 3,
                ..with(Faults {
                    lower_cap: 1,
                    ..Faults::BASE
                })
            },
        ),
        (
            "three Sovereigns, one request each, the hub restored",
            Bounds {
                sovereigns: 3,
                requests: 1,
                ..with(Faults {
                    hub_restore: 1,
                    ..Faults::BASE
                })
            },
        ),
        (
            "three Sovereigns, two requests each, messages lost",
            Bounds {
                sovereigns: 3,
                ..with(Faults {
                    loss: 1,
                    ..Faults::default()
                })
            },
        ),
    ]
}

#[test]
fn the_promise_holds_in_every_reachable_state_with_every_rule() {
    for (name, bounds) in scenarios() {
        let started = std::time::Instant::now();
        let outcome = Check {
            rules: Rules::ALL,
            bounds,
        }
        .run();
        println!("{name}: {} ({:?})", outcome.describe(), started.elapsed());
        match outcome {
            Outcome::Holds { states } => assert!(states > 1000, "{name}: {states} states only"),
            broken => panic!("{name}: {}", broken.describe()),
        }
    }
}

fn without(change: impl Fn(&mut Rules)) -> Rules {
    let mut rules = Rules::ALL;
    change(&mut rules);
    rules
}

#[test]
fn each_rule_removed_lets_the_search_break_the_promise() {
    let base = Bounds::default();
    // A duplicated or stale reply to a return needs a third request (ask, re-send, return).
    let deep = Bounds {
        requests: 3,
        ..base
    };
    let with = |faults: Faults| Bounds { faults, ..base };
    // (the rule removed, the search, why the rule is there)
    let cases: Vec<(Rules, Bounds, &str)> = vec![
        (
            without(|r| r.one_record = false),
            base,
            "1. one record per code (write skew)",
        ),
        (
            without(|r| r.versioned_requests = false),
            deep,
            "2. versioned absolute requests (a duplicate applies twice)",
        ),
        (
            without(|r| r.ok_after_write = false),
            base,
            "2. an OK only after the write (an OK whose compare-and-set then fails)",
        ),
        (
            without(|r| r.newer_replies_only = false),
            deep,
            "3. newer replies only (a stale reply undoes a return)",
        ),
        (
            without(|r| r.local_state_kept = false),
            with(Faults {
                recreate: 1,
                ..Faults::BASE
            }),
            "4. the local state never deleted (a re-created Voucher spends its units again)",
        ),
        (
            without(|r| r.sync_after_restore = false),
            base,
            "5. a sync after a restore (the returned units served again)",
        ),
        (
            without(|r| r.new_epoch_after_hub_restore = false),
            with(Faults {
                hub_restore: 1,
                ..Faults::BASE
            }),
            "6. a new epoch after a hub restore (the restored record forgets a grant)",
        ),
        (
            without(|r| r.cap_change_moves_the_record = false),
            Bounds {
                cap: 3,
                ..with(Faults {
                    lower_cap: 1,
                    ..Faults::BASE
                })
            },
            "7. the cap's change is a write on the record (a grant decided under the old cap)",
        ),
        (
            without(|r| r.only_the_sovereign_lowers = false),
            with(Faults {
                reclaim: 1,
                ..Faults::BASE
            }),
            "7. only the Sovereign lowers its share (the hub reclaims a spent unit)",
        ),
        (
            without(|r| r.guard = false),
            base,
            "9. the guard (max_redemptions 0 means unlimited to the legacy checkout)",
        ),
        (
            without(|r| r.reported_usage = false),
            base,
            "10. reported usage (410 while another Sovereign holds a unit)",
        ),
        (
            without(|r| r.identity_from_account = false),
            with(Faults {
                forge: 1,
                ..Faults::BASE
            }),
            "11. the Sovereign taken from its account (another's share returned in its name)",
        ),
    ];
    for (rules, bounds, why) in cases {
        let started = std::time::Instant::now();
        match (Check { rules, bounds }).run() {
            Outcome::Holds { states } => {
                panic!("without {why} the promise still held in all {states} states")
            }
            broken => println!(
                "without {why} ({:?}): {}",
                started.elapsed(),
                broken.describe()
            ),
        }
    }
}
