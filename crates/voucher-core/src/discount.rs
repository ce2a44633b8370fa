//! Discount terms (DESIGN §10): what a discount voucher grants instead of a
//! credit, the Sovereign's money (a currency and its minor units) and the
//! charge categories a discount may name. Money is integer minor units.

use chrono::{DateTime, Months, Utc};
use serde::{Deserialize, Serialize};

/// Smallest and largest `percentOff`.
pub const MIN_PERCENT_OFF: i32 = 1;
pub const MAX_PERCENT_OFF: i32 = 100;
/// Smallest `amountOff`, in minor units.
pub const MIN_AMOUNT_OFF: i64 = 1;
/// Largest `amountOff`, in minor units: 100,000 of a three-decimal currency
/// (the largest credit a voucher grants), so that a typo cannot mint a fortune.
pub const MAX_AMOUNT_OFF: i64 = 100_000_000;
/// Shortest and longest `durationMonths` (absent: once).
pub const MIN_DURATION_MONTHS: i32 = 1;
pub const MAX_DURATION_MONTHS: i32 = 36;
/// Most categories one discount names.
pub const MAX_CATEGORIES: usize = 16;
/// A charge category: lower-case letters, digits and '-', as the configured list names them.
pub const CATEGORY_PATTERN: &str = "^[a-z][a-z0-9-]{0,62}$";

/// How much a discount takes off: a share of each matching line, or an
/// amount off the order's matching lines together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Off {
    /// 1..=100 percent of each matching line (floored to a minor unit).
    PercentOff(i32),
    /// Minor units off the order's matching lines, once per order.
    AmountOff(i64),
}

impl Off {
    /// `(percent_off, amount_off)`: the two fields or columns it is written as, one of them set.
    pub fn split(self) -> (Option<i32>, Option<i64>) {
        match self {
            Self::PercentOff(percent) => (Some(percent), None),
            Self::AmountOff(amount) => (None, Some(amount)),
        }
    }

    /// The two as read back: the percentage when it is set, else the amount. Neither (or both,
    /// which every writer refuses) reads as 0 percent, which [`Discount::validate`] refuses.
    pub fn join(percent: Option<i32>, amount: Option<i64>) -> Self {
        match (percent, amount) {
            (Some(percent), None) => Self::PercentOff(percent),
            (None, Some(amount)) => Self::AmountOff(amount),
            _ => Self::PercentOff(0),
        }
    }
}

/// A discount voucher's terms, as the billing database keeps them
/// (`promo_codes.discount`) and answers show them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Discount {
    #[serde(flatten)]
    pub off: Off,
    /// Charge categories it applies to; empty: every charge.
    #[serde(default)]
    pub applies_to: Vec<String>,
    /// Calendar months (UTC) from the redemption; `None`: once, on the first
    /// order it discounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_months: Option<i32>,
}

/// Why a discount cannot be a voucher's terms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiscountError {
    #[error(
        "percentOff is {0}; a discount takes {MIN_PERCENT_OFF} to {MAX_PERCENT_OFF} percent off"
    )]
    Percent(i32),
    #[error(
        "amountOff is {0}; a discount takes {MIN_AMOUNT_OFF} to {MAX_AMOUNT_OFF} minor units off"
    )]
    Amount(i64),
    #[error(
        "durationMonths is {0}; a discount lasts {MIN_DURATION_MONTHS} to {MAX_DURATION_MONTHS} months (leave it out for once)"
    )]
    Duration(i32),
    #[error("appliesTo names {0} categories; at most {MAX_CATEGORIES}")]
    TooManyCategories(usize),
    #[error(
        "appliesTo names \"{0}\", which is not a charge category (lower-case letters, digits and '-')"
    )]
    MalformedCategory(String),
    #[error("appliesTo names \"{0}\" twice")]
    RepeatedCategory(String),
}

impl Discount {
    /// Checks the rules every discount follows (the configured categories
    /// are checked by [`Categories::unknown`]).
    pub fn validate(&self) -> Result<(), DiscountError> {
        match self.off {
            Off::PercentOff(p) if !(MIN_PERCENT_OFF..=MAX_PERCENT_OFF).contains(&p) => {
                return Err(DiscountError::Percent(p));
            }
            Off::AmountOff(a) if !(MIN_AMOUNT_OFF..=MAX_AMOUNT_OFF).contains(&a) => {
                return Err(DiscountError::Amount(a));
            }
            _ => {}
        }
        if let Some(months) = self.duration_months
            && !(MIN_DURATION_MONTHS..=MAX_DURATION_MONTHS).contains(&months)
        {
            return Err(DiscountError::Duration(months));
        }
        if self.applies_to.len() > MAX_CATEGORIES {
            return Err(DiscountError::TooManyCategories(self.applies_to.len()));
        }
        for (i, category) in self.applies_to.iter().enumerate() {
            if !is_category(category) {
                return Err(DiscountError::MalformedCategory(category.clone()));
            }
            if self.applies_to[..i].contains(category) {
                return Err(DiscountError::RepeatedCategory(category.clone()));
            }
        }
        Ok(())
    }

    /// When a grant redeemed at `starts_at` ends: `durationMonths` calendar
    /// months later (UTC; the 31st of January + 1 month is the last day of
    /// February), or — a once-grant — at the voucher's `expires_at`, or never.
    pub fn ends_at(
        &self,
        starts_at: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        match self.duration_months {
            Some(months) => starts_at.checked_add_months(Months::new(months.unsigned_abs())),
            None => expires_at,
        }
    }

    /// `20% install 3mo`, `5.000 OMR off install once`, `10% all once`: what
    /// a printer column and an Event say.
    pub fn summary(&self, currency: &Currency) -> String {
        let off = match self.off {
            Off::PercentOff(p) => format!("{p}%"),
            Off::AmountOff(a) => format!("{} off", currency.format(a)),
        };
        let scope = if self.applies_to.is_empty() {
            "all".to_owned()
        } else {
            self.applies_to.join(",")
        };
        let duration = self
            .duration_months
            .map_or("once".to_owned(), |m| format!("{m}mo"));
        format!("{off} {scope} {duration}")
    }
}

fn is_category(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The Sovereign's billing as discounts see it: its currency and its charge
/// categories (the operator's `--currency` and `--charge-categories`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Billing {
    pub currency: Currency,
    pub categories: Categories,
}

/// The charge categories of the Sovereign's billing (`--charge-categories`):
/// a discount naming another is refused, so a typo (`instal`) never becomes
/// a discount that applies to nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categories(Vec<String>);

impl Default for Categories {
    fn default() -> Self {
        Self(
            ["install", "subscription", "usage", "support"]
                .map(String::from)
                .to_vec(),
        )
    }
}

impl Categories {
    /// The list as configured: comma-separated names, each of the category grammar.
    pub fn parse(list: &str) -> Result<Self, String> {
        let names: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if names.is_empty() {
            return Err("name at least one charge category, e.g. install,subscription".into());
        }
        if let Some(bad) = names.iter().find(|n| !is_category(n)) {
            return Err(format!(
                "\"{bad}\" is not a charge category: lower-case letters, digits and '-', starting with a letter"
            ));
        }
        Ok(Self(names))
    }

    /// The categories `discount` names that are not configured, in its order.
    pub fn unknown<'a>(&self, discount: &'a Discount) -> Vec<&'a str> {
        discount
            .applies_to
            .iter()
            .filter(|c| !self.0.contains(c))
            .map(String::as_str)
            .collect()
    }

    /// Whether `name` is one of them.
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|c| c == name)
    }

    /// `install,subscription,…`: as the flag takes it.
    pub fn joined(&self) -> String {
        self.0.join(",")
    }
}

/// The Sovereign's currency: an ISO 4217 code and its minor unit.
/// Serialised as its code, and read back through [`Currency::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl TryFrom<String> for Currency {
    type Error = String;

    fn try_from(code: String) -> Result<Self, String> {
        Self::parse(&code)
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> Self {
        currency.0
    }
}

impl Default for Currency {
    fn default() -> Self {
        Self("OMR".into())
    }
}

impl Currency {
    /// Three upper-case letters (ISO 4217).
    pub fn parse(code: &str) -> Result<Self, String> {
        let code = code.trim();
        if code.len() == 3 && code.chars().all(|c| c.is_ascii_uppercase()) {
            Ok(Self(code.to_owned()))
        } else {
            Err(format!(
                "\"{code}\" is not a currency code: three upper-case letters (ISO 4217), e.g. OMR"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Digits of the minor unit (ISO 4217): 3 for the rial and the dinars
    /// (baisa, fils), 0 for the yen and the won, 2 for the others.
    pub fn exponent(&self) -> u32 {
        match self.0.as_str() {
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            "CLP" | "ISK" | "JPY" | "KRW" | "PYG" | "UGX" | "VND" | "XAF" | "XOF" => 0,
            _ => 2,
        }
    }

    /// `5.000 OMR` for 5000 minor units of the rial.
    pub fn format(&self, minor: i64) -> String {
        let exp = self.exponent();
        if exp == 0 {
            return format!("{minor} {}", self.0);
        }
        let unit = 10_i64.pow(exp);
        let sign = if minor < 0 { "-" } else { "" };
        let (major, rest) = (minor.abs() / unit, minor.abs() % unit);
        format!(
            "{sign}{major}.{rest:0width$} {}",
            self.0,
            width = exp as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn percent(p: i32, applies_to: &[&str], months: Option<i32>) -> Discount {
        Discount {
            off: Off::PercentOff(p),
            applies_to: applies_to.iter().map(|s| s.to_string()).collect(),
            duration_months: months,
        }
    }

    #[test]
    fn terms_outside_the_discount_rules_are_refused() {
        // (discount, the refusal or none, why)
        let amount = |a| Discount {
            off: Off::AmountOff(a),
            ..percent(1, &[], None)
        };
        let cases = [
            (
                percent(20, &["install"], Some(3)),
                None,
                "the issue's example",
            ),
            (
                percent(0, &[], None),
                Some(DiscountError::Percent(0)),
                "nothing off",
            ),
            (
                percent(101, &[], None),
                Some(DiscountError::Percent(101)),
                "more than the line",
            ),
            (percent(100, &[], None), None, "all of it is a discount"),
            (amount(0), Some(DiscountError::Amount(0)), "nothing off"),
            (
                amount(-5),
                Some(DiscountError::Amount(-5)),
                "a negative amount adds to the bill",
            ),
            (
                amount(MAX_AMOUNT_OFF + 1),
                Some(DiscountError::Amount(MAX_AMOUNT_OFF + 1)),
                "a typo's fortune",
            ),
            (
                percent(5, &[], Some(0)),
                Some(DiscountError::Duration(0)),
                "no month",
            ),
            (
                percent(5, &[], Some(37)),
                Some(DiscountError::Duration(37)),
                "past three years",
            ),
            (percent(5, &[], Some(36)), None, "three years"),
            (
                percent(5, &["Install"], None),
                Some(DiscountError::MalformedCategory("Install".into())),
                "categories are lower-case",
            ),
            (
                percent(5, &["install", "install"], None),
                Some(DiscountError::RepeatedCategory("install".into())),
                "named twice",
            ),
        ];
        for (discount, refusal, why) in cases {
            assert_eq!(discount.validate().err(), refusal, "{why}");
        }
    }

    #[test]
    fn a_grant_ends_after_calendar_months_in_utc() {
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 10, 30, 0).unwrap();
        let monthly = |n| percent(20, &[], Some(n));
        // (redeemed at, months, ends at, why)
        let cases = [
            (
                at(2027, 1, 31),
                1,
                at(2027, 2, 28),
                "the 31st of January + 1 month: February's last day",
            ),
            (at(2028, 1, 31), 1, at(2028, 2, 29), "in a leap year"),
            (
                at(2027, 1, 15),
                3,
                at(2027, 4, 15),
                "the same day three months on",
            ),
            (
                at(2027, 11, 30),
                3,
                at(2028, 2, 29),
                "across a year into a leap February",
            ),
        ];
        for (starts, months, ends, why) in cases {
            assert_eq!(monthly(months).ends_at(starts, None), Some(ends), "{why}");
        }
        let once = percent(20, &[], None);
        assert_eq!(
            once.ends_at(at(2027, 1, 1), None),
            None,
            "a once-grant lives until used"
        );
        assert_eq!(
            once.ends_at(at(2027, 1, 1), Some(at(2027, 6, 1))),
            Some(at(2027, 6, 1)),
            "or until the voucher's expiresAt"
        );
    }

    #[test]
    fn a_summary_says_the_grant_in_a_column() {
        let omr = Currency::default();
        assert_eq!(
            percent(20, &["install"], Some(3)).summary(&omr),
            "20% install 3mo"
        );
        assert_eq!(percent(10, &[], None).summary(&omr), "10% all once");
        let amount = Discount {
            off: Off::AmountOff(5000),
            ..percent(1, &["install", "support"], None)
        };
        assert_eq!(amount.summary(&omr), "5.000 OMR off install,support once");
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(usd.format(1999), "19.99 USD");
        assert_eq!(Currency::parse("JPY").unwrap().format(500), "500 JPY");
        assert!(Currency::parse("omr").is_err());
    }

    #[test]
    fn a_category_outside_the_configured_list_is_named() {
        let configured = Categories::default();
        let typo = percent(20, &["install", "instal"], None);
        assert_eq!(configured.unknown(&typo), vec!["instal"]);
        assert!(configured.unknown(&percent(20, &[], None)).is_empty());
        assert!(Categories::parse("install, Usage").is_err());
        assert!(Categories::parse(" , ").is_err());
        assert_eq!(
            Categories::parse("install,usage").unwrap().joined(),
            "install,usage"
        );
    }

    #[test]
    fn the_database_form_is_the_answers_form() {
        let json = serde_json::to_value(percent(20, &["install"], Some(3))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"percent_off": 20, "applies_to": ["install"], "duration_months": 3})
        );
        let back: Discount =
            serde_json::from_value(serde_json::json!({"amount_off": 5000})).unwrap();
        assert_eq!(back.off, Off::AmountOff(5000));
        assert!(back.applies_to.is_empty() && back.duration_months.is_none());
    }
}
