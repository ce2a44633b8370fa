//! What a checkout's order takes off (DESIGN §10): the customer's discount
//! grants applied to the order's lines, purely — the quote and the commit
//! both call [`price`], so a quote equals the commit when nothing changed in
//! between. Money is integer minor units; no floating point.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

use crate::discount::{Discount, Off};

/// Most lines one order may have.
pub const MAX_LINES: usize = 200;
/// Largest amount of one line, in minor units (10^12): far beyond any charge,
/// small enough that no sum of 200 lines overflows.
pub const MAX_LINE_AMOUNT: i64 = 1_000_000_000_000;
/// Longest line id and order id.
pub const MAX_ID_LEN: usize = 128;

/// A line of an order: its id, charge category and amount (minor units).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub id: String,
    pub category: String,
    pub amount: i64,
}

/// A customer's discount grant as the checkout sees it. `G` identifies it
/// (the database's grant id); grants are told apart in the tie order by
/// `created_at`, then `G`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held<G> {
    pub id: G,
    pub discount: Discount,
    pub created_at: DateTime<Utc>,
    pub starts_at: DateTime<Utc>,
    pub ends_at: Option<DateTime<Utc>>,
    /// A once-grant (no `durationMonths`) already consumed by an order.
    pub consumed: bool,
}

impl<G> Held<G> {
    /// A once-grant is consumed by the first order it discounts.
    pub fn is_once(&self) -> bool {
        self.discount.duration_months.is_none()
    }

    /// Whether it may discount an order at `now`.
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        !self.consumed && self.starts_at <= now && self.ends_at.is_none_or(|end| now < end)
    }

    fn applies_to(&self, line: &Line) -> bool {
        self.discount.applies_to.is_empty() || self.discount.applies_to.contains(&line.category)
    }

    /// What it takes off each of `lines` it applies to, by position, if it
    /// alone discounted them: a percentage floored per line; an amount
    /// spread over the lines by id, never more than a line.
    fn takes(&self, lines: &[&Line]) -> Vec<i64> {
        match self.discount.off {
            Off::PercentOff(percent) => lines
                .iter()
                .map(|l| {
                    if self.applies_to(l) {
                        l.amount * i64::from(percent) / 100
                    } else {
                        0
                    }
                })
                .collect(),
            Off::AmountOff(amount) => {
                let mut order: Vec<usize> = (0..lines.len()).collect();
                order.sort_by(|&a, &b| lines[a].id.cmp(&lines[b].id));
                let mut left = amount;
                let mut takes = vec![0; lines.len()];
                for i in order {
                    if self.applies_to(lines[i]) {
                        let take = left.min(lines[i].amount);
                        takes[i] = take;
                        left -= take;
                    }
                }
                takes
            }
        }
    }
}

/// What one line takes off, and which grant took it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priced<G> {
    pub line: Line,
    pub discount: i64,
    /// The grant that discounted the line; `None` when none did.
    pub grant: Option<G>,
}

/// The order priced: every line in the order given, the total and the discount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote<G> {
    pub lines: Vec<Priced<G>>,
    pub total: i64,
    pub discount: i64,
}

impl<G: Clone + PartialEq> Quote<G> {
    /// The grants that took something off (each once): what a commit uses,
    /// and — the once-grants among them — consumes.
    pub fn used(&self) -> Vec<G> {
        let mut used: Vec<G> = Vec::new();
        for grant in self.lines.iter().filter_map(|l| l.grant.clone()) {
            if !used.contains(&grant) {
                used.push(grant);
            }
        }
        used
    }
}

/// The tie order between grants that take the same off an order: an
/// unconsumed grant that ends first (no end last), then the oldest.
fn tie<G: Ord>(a: &Held<G>, b: &Held<G>) -> Ordering {
    let end = |h: &Held<G>| (h.ends_at.is_none(), h.ends_at);
    end(a)
        .cmp(&end(b))
        .then(a.created_at.cmp(&b.created_at))
        .then(a.id.cmp(&b.id))
}

/// Prices `lines` with the grants usable at `now` among `held`. Grants never
/// stack: each line takes the single grant that takes most off the whole
/// order (ties in the order of [`tie`]); a grant's share of an order is what
/// it takes off the lines that chose it. A grant that takes nothing is not used.
pub fn price<G: Clone + Ord>(lines: &[Line], held: &[Held<G>], now: DateTime<Utc>) -> Quote<G> {
    let all: Vec<&Line> = lines.iter().collect();
    let mut ranked: Vec<(&Held<G>, i64)> = held
        .iter()
        .filter(|h| h.usable_at(now))
        .map(|h| (h, h.takes(&all).iter().sum::<i64>()))
        .filter(|(_, value)| *value > 0)
        .collect();
    ranked.sort_by(|(a, va), (b, vb)| vb.cmp(va).then_with(|| tie(a, b)));
    let mut chosen: Vec<Option<&Held<G>>> = vec![None; lines.len()];
    for (grant, _) in &ranked {
        for (i, line) in lines.iter().enumerate() {
            if chosen[i].is_none() && grant.applies_to(line) {
                chosen[i] = Some(grant);
            }
        }
    }
    let mut discounts = vec![0; lines.len()];
    for (grant, _) in &ranked {
        let mine: Vec<usize> = (0..lines.len())
            .filter(|&i| chosen[i].is_some_and(|c| std::ptr::eq(c, *grant)))
            .collect();
        let subset: Vec<&Line> = mine.iter().map(|&i| &lines[i]).collect();
        for (&i, take) in mine.iter().zip(grant.takes(&subset)) {
            discounts[i] = take;
        }
    }
    let priced: Vec<Priced<G>> = lines
        .iter()
        .zip(discounts)
        .zip(chosen)
        .map(|((line, discount), grant)| Priced {
            line: line.clone(),
            discount,
            grant: grant.filter(|_| discount > 0).map(|g| g.id.clone()),
        })
        .collect();
    Quote {
        total: lines.iter().map(|l| l.amount).sum(),
        discount: priced.iter().map(|p| p.discount).sum(),
        lines: priced,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2027, 1, day, 12, 0, 0).unwrap()
    }

    fn line(id: &str, category: &str, amount: i64) -> Line {
        Line {
            id: id.into(),
            category: category.into(),
            amount,
        }
    }

    fn grant(id: u32, off: Off, applies_to: &[&str], months: Option<i32>) -> Held<u32> {
        Held {
            id,
            discount: Discount {
                off,
                applies_to: applies_to.iter().map(|s| s.to_string()).collect(),
                duration_months: months,
            },
            created_at: at(1),
            starts_at: at(1),
            ends_at: months.map(|m| {
                at(1)
                    .checked_add_months(chrono::Months::new(m as u32))
                    .unwrap()
            }),
            consumed: false,
        }
    }

    #[test]
    fn the_issues_order_twenty_percent_off_two_installs() {
        let lines = [
            line("a", "install", 10_007),
            line("b", "install", 3_000),
            line("c", "support", 7_000),
        ];
        let held = [grant(1, Off::PercentOff(20), &["install"], Some(3))];
        let quote = price(&lines, &held, at(2));
        let discounts: Vec<i64> = quote.lines.iter().map(|l| l.discount).collect();
        // floor(10007 × 20 / 100) = floor(2001.4) = 2001; the support line is not an install.
        assert_eq!(discounts, [2001, 600, 0]);
        assert_eq!((quote.total, quote.discount), (20_007, 2601));
        assert_eq!(quote.used(), [1]);
        assert_eq!(quote.lines[2].grant, None);
    }

    #[test]
    fn grants_never_stack_and_the_larger_takes_the_line() {
        let lines = [line("a", "install", 10_000), line("b", "usage", 2_000)];
        // (grants, the discount of each line, why)
        type Case = (Vec<Held<u32>>, Vec<i64>, &'static str);
        let cases: [Case; 4] = [
            (
                vec![
                    grant(1, Off::PercentOff(10), &[], None),
                    grant(2, Off::PercentOff(30), &["install"], None),
                ],
                vec![3000, 200],
                "30 % of the install beats 10 % of all; the usage line keeps the 10 %",
            ),
            (
                vec![
                    grant(1, Off::AmountOff(5_000), &[], None),
                    grant(2, Off::PercentOff(20), &[], None),
                ],
                vec![5000, 0],
                "5,000 off the order beats 20 % (2,400): by id, the first line takes it all",
            ),
            (
                vec![grant(1, Off::AmountOff(11_000), &[], None)],
                vec![10_000, 1_000],
                "an amount spread by line id, never more than a line",
            ),
            (
                vec![grant(1, Off::AmountOff(50_000), &["support"], None)],
                vec![0, 0],
                "a grant matching no line takes nothing",
            ),
        ];
        for (held, expected, why) in cases {
            let quote = price(&lines, &held, at(2));
            let got: Vec<i64> = quote.lines.iter().map(|l| l.discount).collect();
            assert_eq!(got, expected, "{why}");
        }
    }

    #[test]
    fn ties_go_to_the_grant_that_ends_first_then_the_oldest() {
        let lines = [line("a", "install", 1_000)];
        let ends_later = grant(1, Off::PercentOff(10), &[], Some(6));
        let ends_sooner = grant(2, Off::PercentOff(10), &[], Some(2));
        let never_ends = grant(0, Off::PercentOff(10), &[], None);
        let quote = price(
            &lines,
            &[ends_later.clone(), never_ends.clone(), ends_sooner],
            at(2),
        );
        assert_eq!(quote.used(), [2], "ends first");
        let quote = price(&lines, &[never_ends.clone(), ends_later.clone()], at(2));
        assert_eq!(quote.used(), [1], "an end before none");
        let older = Held {
            created_at: at(1),
            id: 9,
            ..never_ends.clone()
        };
        let newer = Held {
            created_at: at(3),
            id: 3,
            ..never_ends
        };
        assert_eq!(
            price(&lines, &[newer, older], at(4)).used(),
            [9],
            "then the oldest"
        );
    }

    #[test]
    fn only_usable_grants_discount() {
        let lines = [line("a", "install", 1_000)];
        let ended = grant(1, Off::PercentOff(50), &[], Some(1));
        let consumed = Held {
            consumed: true,
            ..grant(2, Off::PercentOff(50), &[], None)
        };
        let later = Held {
            starts_at: at(1).checked_add_months(chrono::Months::new(3)).unwrap(),
            ..grant(3, Off::PercentOff(50), &[], None)
        };
        let quote = price(
            &lines,
            &[ended, consumed, later],
            at(1).checked_add_months(chrono::Months::new(2)).unwrap(),
        );
        assert_eq!(quote.discount, 0);
        assert!(quote.used().is_empty());
    }

    fn arb_lines() -> impl Strategy<Value = Vec<Line>> {
        proptest::collection::vec(
            (
                0u8..20,
                prop_oneof!["install", "usage", "support"],
                0i64..1_000_000,
            ),
            0..12,
        )
        .prop_map(|raw| {
            let mut seen = std::collections::BTreeSet::new();
            raw.into_iter()
                .filter(|(id, _, _)| seen.insert(*id))
                .map(|(id, category, amount)| line(&format!("l{id:02}"), &category, amount))
                .collect()
        })
    }

    fn arb_grants() -> impl Strategy<Value = Vec<Held<u32>>> {
        proptest::collection::vec(
            (
                prop_oneof![
                    (1i32..=100).prop_map(Off::PercentOff),
                    (1i64..2_000_000).prop_map(Off::AmountOff)
                ],
                proptest::sample::subsequence(vec!["install", "usage", "support"], 0..=2),
                proptest::option::of(1i32..=3),
                1u32..28,
                any::<bool>(),
            ),
            0..6,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (off, applies_to, months, day, consumed))| Held {
                    created_at: at(day),
                    consumed,
                    ..grant(i as u32, off, &applies_to, months)
                })
                .collect()
        })
    }

    proptest! {
        /// Never more than a line, never two grants on a line, only usable grants, the
        /// totals add up, and the same order priced twice (a quote, then its commit) is
        /// priced the same, whatever order the grants were read in.
        #[test]
        fn a_price_never_discounts_more_than_a_line_nor_stacks(lines in arb_lines(), held in arb_grants()) {
            let now = at(15);
            let quote = price(&lines, &held, now);
            for priced in &quote.lines {
                prop_assert!(priced.discount >= 0 && priced.discount <= priced.line.amount);
                prop_assert_eq!(priced.grant.is_some(), priced.discount > 0);
                if let Some(id) = priced.grant {
                    let g = held.iter().find(|h| h.id == id).unwrap();
                    prop_assert!(g.usable_at(now) && g.applies_to(&priced.line));
                }
            }
            prop_assert_eq!(quote.discount, quote.lines.iter().map(|l| l.discount).sum::<i64>());
            prop_assert_eq!(quote.total, lines.iter().map(|l| l.amount).sum::<i64>());
            // An amount grant never takes more than its amount off the order.
            for h in &held {
                if let Off::AmountOff(amount) = h.discount.off {
                    let took: i64 = quote.lines.iter().filter(|l| l.grant == Some(h.id)).map(|l| l.discount).sum();
                    prop_assert!(took <= amount);
                }
            }
            let mut reversed = held.clone();
            reversed.reverse();
            prop_assert_eq!(price(&lines, &reversed, now), quote);
        }

        /// Each line takes the grant (among the usable ones that match it) that takes most
        /// off the whole order, the tie order deciding between equals.
        #[test]
        fn each_line_takes_the_best_grant_for_the_order(lines in arb_lines(), held in arb_grants()) {
            let now = at(15);
            let all: Vec<&Line> = lines.iter().collect();
            let value = |h: &Held<u32>| h.takes(&all).iter().sum::<i64>();
            let quote = price(&lines, &held, now);
            for priced in quote.lines.iter().filter(|p| p.grant.is_some()) {
                let best = held
                    .iter()
                    .filter(|h| h.usable_at(now) && h.applies_to(&priced.line) && value(h) > 0)
                    .min_by(|a, b| value(b).cmp(&value(a)).then_with(|| tie(a, b)))
                    .map(|h| h.id);
                prop_assert_eq!(priced.grant, best);
            }
        }
    }
}
