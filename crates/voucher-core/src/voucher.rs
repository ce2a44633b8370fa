//! What a voucher is and what follows from its state: redeemability, phase, next boundary.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::discount::{Categories, Currency, Discount, DiscountError};

/// The commercial terms of a voucher: everything the `Voucher` resource owns.
/// `max_redemptions == 0` means unlimited. A voucher grants a credit
/// (`credit_omr` > 0) or a discount (`discount`, with `credit_omr` 0 — the
/// billing service's column cannot be NULL), never both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    pub credit_omr: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discount: Option<Discount>,
    pub description: String,
    pub active: bool,
    pub max_redemptions: i32,
    pub valid_from: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A `promo_codes` row as the billing database holds it. The database owns
/// `times_redeemed`; the resource owns the terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    pub code: String,
    pub terms: Terms,
    pub times_redeemed: i32,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// For one of a VoucherCampaign's codes, whether its campaign is switched
    /// on — its one-row switch, which decides before the row's own `active`
    /// (the rows follow in the background); `None` for any other code. A
    /// campaign's code is a secret until it can be redeemed.
    pub campaign_on: Option<bool>,
    /// Suspended (the code, or its campaign): redeemed by no one until lifted.
    pub suspended: bool,
    /// For a global (cross-Sovereign) code, whether the hub last said every
    /// unit is granted and spent everywhere; `None` for any other code. A
    /// global code whose local share is used up is "try again" (another
    /// Sovereign may return units), never "fully redeemed", until then.
    pub global_gone: Option<bool>,
    /// A global code redeemed once per customer on any Sovereign
    /// (`perCustomer: Global`): each redemption holds the hub's claim first.
    pub once_anywhere: bool,
}

impl CodeRecord {
    pub fn is_tombstoned(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// Redemptions left before the cap, `None` when unlimited.
    pub fn remaining(&self) -> Option<i32> {
        (self.terms.max_redemptions > 0)
            .then(|| (self.terms.max_redemptions - self.times_redeemed).max(0))
    }

    pub fn is_capped(&self) -> bool {
        self.remaining() == Some(0)
    }

    /// A global code's row as its Voucher's phase reads it: the vendor's terms
    /// (`hub`), not the cap and switch the local share sets (a used-up share is
    /// not an exhausted voucher, a share of 0 not a switched-off one); exhausted
    /// only once the hub said every unit is granted and spent everywhere.
    pub fn as_global(&self, hub: &Terms) -> CodeRecord {
        let gone = self.global_gone == Some(true);
        CodeRecord {
            terms: Terms {
                max_redemptions: if gone { self.times_redeemed.max(1) } else { 0 },
                ..hub.clone()
            },
            times_redeemed: if gone {
                self.times_redeemed.max(1)
            } else {
                self.times_redeemed
            },
            global_gone: None,
            ..self.clone()
        }
    }
}

/// Whether a code can be redeemed now, and if not, why. Serialised as a
/// redemption's outcome is recorded (`{"reason": "capped", ...}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Redeemability {
    Redeemable,
    Unknown,
    Tombstoned,
    /// A campaign's code that cannot be redeemed yet (its campaign switched
    /// off, or before its window): told apart from an unknown code, it would
    /// let anyone harvest a campaign's codes before launch.
    Unlaunched,
    /// Suspended by an administrator (an incident): told like an inactive code.
    Suspended,
    Inactive,
    NotYetValid {
        valid_from: DateTime<Utc>,
    },
    Expired {
        expired_at: DateTime<Utc>,
    },
    Capped {
        max_redemptions: i32,
    },
    /// A global code whose share on this Sovereign is used up (or not yet
    /// granted) while units remain elsewhere: answered 503 with Retry-After.
    ShareUsedUp,
}

impl Redeemability {
    /// Decides for `record` at `now`. Checks run in the order a person would
    /// want to hear about them: existence first, then the operator's switch,
    /// then the window, then the cap.
    pub fn of(record: Option<&CodeRecord>, now: DateTime<Utc>) -> Self {
        let Some(record) = record else {
            return Self::Unknown;
        };
        let terms = &record.terms;
        let scheduled = terms.valid_from.is_some_and(|from| now < from);
        let switched_on = record.campaign_on.unwrap_or(terms.active);
        if record.is_tombstoned() {
            Self::Tombstoned
        } else if record.campaign_on.is_some() && (!switched_on || record.suspended || scheduled) {
            Self::Unlaunched
        } else if record.suspended {
            Self::Suspended
        } else if record.global_gone == Some(false)
            && (!switched_on || record.is_capped())
            && !scheduled
            && terms.expires_at.is_none_or(|at| now < at)
        {
            Self::ShareUsedUp
        } else if !switched_on {
            Self::Inactive
        } else if let Some(valid_from) = terms.valid_from.filter(|from| now < *from) {
            Self::NotYetValid { valid_from }
        } else if let Some(expired_at) = terms.expires_at.filter(|at| now >= *at) {
            Self::Expired { expired_at }
        } else if record.is_capped() {
            Self::Capped {
                max_redemptions: terms.max_redemptions,
            }
        } else {
            Self::Redeemable
        }
    }

    pub fn is_redeemable(self) -> bool {
        self == Self::Redeemable
    }

    /// Unknown and soft-deleted codes (and a campaign's codes before launch)
    /// must look the same on every public surface.
    pub fn is_hidden(self) -> bool {
        matches!(self, Self::Unknown | Self::Tombstoned | Self::Unlaunched)
    }

    /// A sentence a checkout page can show as is. Never reveals counters, and
    /// never tells a tombstone from a code that never existed.
    pub fn public_reason(self) -> String {
        match self {
            Self::Redeemable => "the code can be redeemed".into(),
            Self::Unknown | Self::Tombstoned | Self::Unlaunched => "no such voucher code".into(),
            Self::Inactive | Self::Suspended => "this voucher code is not active".into(),
            Self::NotYetValid { valid_from } => format!(
                "this voucher code can be redeemed from {}",
                valid_from.to_rfc3339()
            ),
            Self::Expired { expired_at } => {
                format!("this voucher code expired at {}", expired_at.to_rfc3339())
            }
            Self::Capped { .. } => "this voucher code has been fully redeemed".into(),
            Self::ShareUsedUp => "this voucher code is redeemed on several platforms and this one's share is used up for now; please try again shortly".into(),
        }
    }
}

/// The lifecycle phase shown in `.status.phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Redeemable now.
    Active,
    /// Switched off by `spec.active: false`.
    Inactive,
    /// Before `spec.validFrom`.
    Scheduled,
    /// At or after `spec.expiresAt`.
    Expired,
    /// `spec.maxRedemptions` reached.
    Exhausted,
    /// Another Voucher resource owns the code, or the row exists and the
    /// resource did not ask to adopt or reissue it; nothing was written.
    Conflict,
    /// The resource is outside the issuer namespaces; nothing was written.
    Forbidden,
    /// Suspended by an administrator (the admin endpoint, or the resource's
    /// `catalyst.openova.io/suspended` annotation): redeemed by no one until
    /// lifted, whatever the spec says.
    Suspended,
    /// The code was revoked (the admin revoke, the admin page, by hand) and
    /// stays so: only a `spec.reissue` naming that revocation brings it back.
    Revoked,
    /// The last reconcile failed; see the conditions.
    Error,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Active,
        Phase::Inactive,
        Phase::Scheduled,
        Phase::Expired,
        Phase::Exhausted,
        Phase::Conflict,
        Phase::Forbidden,
        Phase::Suspended,
        Phase::Revoked,
        Phase::Error,
    ];

    /// The phase of a synced row. `Conflict`, `Forbidden` and `Error` are
    /// decided by the controller, not by the row.
    pub fn of(record: &CodeRecord, now: DateTime<Utc>) -> Self {
        match Redeemability::of(Some(record), now) {
            Redeemability::Redeemable => Self::Active,
            Redeemability::Inactive
            | Redeemability::Tombstoned
            | Redeemability::Unknown
            | Redeemability::Unlaunched => Self::Inactive,
            Redeemability::Suspended => Self::Suspended,
            Redeemability::NotYetValid { .. } => Self::Scheduled,
            Redeemability::Expired { .. } => Self::Expired,
            Redeemability::Capped { .. } => Self::Exhausted,
            // A used-up share is not an exhausted voucher.
            Redeemability::ShareUsedUp => Self::Active,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "Active",
            Self::Inactive => "Inactive",
            Self::Scheduled => "Scheduled",
            Self::Expired => "Expired",
            Self::Exhausted => "Exhausted",
            Self::Conflict => "Conflict",
            Self::Forbidden => "Forbidden",
            Self::Suspended => "Suspended",
            Self::Revoked => "Revoked",
            Self::Error => "Error",
        }
    }
}

/// Smallest credit a voucher grants, in whole OMR.
pub const MIN_CREDIT_OMR: i32 = 1;
/// Largest credit one voucher grants, in whole OMR: a typo must not mint a
/// fortune. A namespace can be held lower by the chart's admission policy.
pub const MAX_CREDIT_OMR: i32 = 100_000;
/// `max_redemptions` below this is meaningless (0 means unlimited).
pub const MIN_MAX_REDEMPTIONS: i32 = 0;
/// The largest cap: a bound for every integer of the schema, so that no value
/// can pass the API server and then fail to be read (an int32 overflow).
pub const MAX_MAX_REDEMPTIONS: i32 = 100_000_000;
/// Longest description shown to customers, in characters.
pub const MAX_DESCRIPTION_LEN: usize = 1024;

/// Why a set of terms cannot be a voucher. The same rules are checked by the
/// CRD's schema (built from the constants above), by adoption of existing rows
/// and by the admin endpoints, so every surface refuses the same things.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TermError {
    #[error("the credit is {0} OMR; a voucher grants at least {MIN_CREDIT_OMR} OMR")]
    CreditTooSmall(i32),
    #[error("the credit is {0} OMR; a voucher grants at most {MAX_CREDIT_OMR} OMR")]
    CreditTooLarge(i32),
    #[error(
        "the redemption cap is {0}; it must be at least {MIN_MAX_REDEMPTIONS} (0 means unlimited)"
    )]
    NegativeCap(i32),
    #[error(
        "the redemption cap is {0}; it can be at most {MAX_MAX_REDEMPTIONS} (0 means unlimited)"
    )]
    CapTooLarge(i32),
    #[error("the description has {0} characters; at most {MAX_DESCRIPTION_LEN} are allowed")]
    DescriptionTooLong(usize),
    #[error("the redemption window is empty: the expiry must be later than the start")]
    EmptyWindow,
    #[error("a discount voucher grants no credit, yet credit_omr is {0}")]
    CreditBesideDiscount(i32),
    #[error(transparent)]
    Discount(#[from] DiscountError),
    #[error(
        "spec.discount.appliesTo names {unknown}, which is not a charge category of this Sovereign (configured: {configured})"
    )]
    UnknownCategory { unknown: String, configured: String },
}

impl TermError {
    /// The condition's reason: a category outside the configured list is told
    /// apart (its fix is in the operator's settings or the spelling).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownCategory { .. } => "UnknownCategory",
            _ => "InvalidTerms",
        }
    }
}

impl Terms {
    /// A voucher granting `credit_omr`: active, unlimited, without a window.
    pub fn granting(credit_omr: i32) -> Self {
        Self {
            credit_omr,
            discount: None,
            description: String::new(),
            active: true,
            max_redemptions: 0,
            valid_from: None,
            expires_at: None,
        }
    }

    /// Checks the rules every voucher's terms follow.
    pub fn validate(&self) -> Result<(), TermError> {
        if let Some(discount) = &self.discount {
            discount.validate()?;
            if self.credit_omr != 0 {
                return Err(TermError::CreditBesideDiscount(self.credit_omr));
            }
        } else if self.credit_omr < MIN_CREDIT_OMR {
            return Err(TermError::CreditTooSmall(self.credit_omr));
        }
        if self.credit_omr > MAX_CREDIT_OMR {
            return Err(TermError::CreditTooLarge(self.credit_omr));
        }
        if self.max_redemptions < MIN_MAX_REDEMPTIONS {
            return Err(TermError::NegativeCap(self.max_redemptions));
        }
        if self.max_redemptions > MAX_MAX_REDEMPTIONS {
            return Err(TermError::CapTooLarge(self.max_redemptions));
        }
        let len = self.description.chars().count();
        if len > MAX_DESCRIPTION_LEN {
            return Err(TermError::DescriptionTooLong(len));
        }
        if let (Some(from), Some(until)) = (self.valid_from, self.expires_at)
            && until <= from
        {
            return Err(TermError::EmptyWindow);
        }
        Ok(())
    }

    /// [`Terms::validate`], and a discount names only `categories`.
    pub fn validate_for(&self, categories: &Categories) -> Result<(), TermError> {
        self.validate()?;
        let Some(discount) = &self.discount else {
            return Ok(());
        };
        let unknown = categories.unknown(discount);
        if unknown.is_empty() {
            return Ok(());
        }
        Err(TermError::UnknownCategory {
            unknown: unknown.join(", "),
            configured: categories.joined(),
        })
    }

    /// What a redemption grants, as a column shows it: `50 OMR` (a credit
    /// is in whole rial, whatever the currency of discounts), `20% install 3mo`.
    pub fn grant(&self, currency: &Currency) -> String {
        match &self.discount {
            Some(discount) => discount.summary(currency),
            // In whole units of the Sovereign's currency (the column is named for the rial).
            None => format!("{} {}", self.credit_omr, currency.as_str()),
        }
    }

    /// The next instant at which the phase changes by the clock alone, so the
    /// controller can requeue exactly then.
    pub fn next_boundary(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        [self.valid_from, self.expires_at]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min()
    }

    /// The fields where `self` differs from `current`, in a stable order.
    pub fn changes_from(&self, current: &Terms) -> Vec<TermField> {
        let mut changed = Vec::new();
        let mut check = |field, differs: bool| {
            if differs {
                changed.push(field);
            }
        };
        check(TermField::CreditOmr, self.credit_omr != current.credit_omr);
        check(TermField::Discount, self.discount != current.discount);
        check(
            TermField::Description,
            self.description != current.description,
        );
        check(TermField::Active, self.active != current.active);
        check(
            TermField::MaxRedemptions,
            self.max_redemptions != current.max_redemptions,
        );
        check(TermField::ValidFrom, self.valid_from != current.valid_from);
        check(TermField::ExpiresAt, self.expires_at != current.expires_at);
        changed
    }
}

/// A field of [`Terms`], named as in the `promo_codes` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TermField {
    CreditOmr,
    Discount,
    Description,
    Active,
    MaxRedemptions,
    ValidFrom,
    ExpiresAt,
}

impl TermField {
    /// The column name, as audit records and events name a field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreditOmr => "credit_omr",
            Self::Discount => "discount",
            Self::Description => "description",
            Self::Active => "active",
            Self::MaxRedemptions => "max_redemptions",
            Self::ValidFrom => "valid_from",
            Self::ExpiresAt => "expires_at",
        }
    }

    /// The field as a Voucher's spec names it.
    pub fn spec_name(self) -> &'static str {
        match self {
            Self::CreditOmr => "creditOMR",
            Self::Discount => "discount",
            Self::Description => "description",
            Self::Active => "active",
            Self::MaxRedemptions => "maxRedemptions",
            Self::ValidFrom => "validFrom",
            Self::ExpiresAt => "expiresAt",
        }
    }

    /// `credit_omr, active`: a list for a sentence.
    pub fn join(fields: &[TermField]) -> String {
        fields
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub const ALL: [TermField; 7] = [
        TermField::CreditOmr,
        TermField::Discount,
        TermField::Description,
        TermField::Active,
        TermField::MaxRedemptions,
        TermField::ValidFrom,
        TermField::ExpiresAt,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, hour, 0, 0).unwrap()
    }

    fn record() -> CodeRecord {
        CodeRecord {
            global_gone: None,
            once_anywhere: false,
            code: "LAUNCH-50".into(),
            terms: Terms {
                credit_omr: 50,
                discount: None,
                description: "launch".into(),
                active: true,
                max_redemptions: 3,
                valid_from: Some(at(8)),
                expires_at: Some(at(18)),
            },
            times_redeemed: 1,
            created_at: at(0),
            deleted_at: None,
            campaign_on: None,
            suspended: false,
        }
    }

    #[test]
    fn a_global_codes_phase_follows_the_vendors_terms_not_its_local_share() {
        let hub = Terms {
            max_redemptions: 1000,
            ..record().terms
        };
        // (why, local active, local cap, redeemed, gone, hub active, at, phase)
        let cases = [
            (
                "a share of 0 is no switched-off voucher",
                false,
                1,
                0,
                Some(false),
                true,
                9,
                Phase::Active,
            ),
            (
                "a used-up share is no exhausted voucher",
                true,
                3,
                3,
                Some(false),
                true,
                9,
                Phase::Active,
            ),
            (
                "every unit spent everywhere is",
                true,
                3,
                3,
                Some(true),
                true,
                9,
                Phase::Exhausted,
            ),
            (
                "the vendor switched it off",
                true,
                3,
                1,
                Some(false),
                false,
                9,
                Phase::Inactive,
            ),
            (
                "before the vendor's window",
                false,
                1,
                0,
                Some(false),
                true,
                7,
                Phase::Scheduled,
            ),
            (
                "after it",
                true,
                3,
                1,
                Some(false),
                true,
                18,
                Phase::Expired,
            ),
        ];
        for (why, active, cap, redeemed, gone, hub_active, hour, phase) in cases {
            let mut row = record();
            (
                row.terms.active,
                row.terms.max_redemptions,
                row.times_redeemed,
                row.global_gone,
            ) = (active, cap, redeemed, gone);
            let hub = Terms {
                active: hub_active,
                ..hub.clone()
            };
            assert_eq!(Phase::of(&row.as_global(&hub), at(hour)), phase, "{why}");
        }
    }

    #[test]
    fn a_global_codes_used_up_share_is_try_again_until_the_hub_says_all_is_spent() {
        // (why, global_gone, active, times_redeemed, at, verdict)
        let cases = [
            (
                "share used up, units left elsewhere",
                Some(false),
                true,
                3,
                9,
                Redeemability::ShareUsedUp,
            ),
            (
                "no share yet (an inactive row)",
                Some(false),
                false,
                0,
                9,
                Redeemability::ShareUsedUp,
            ),
            (
                "every unit spent everywhere",
                Some(true),
                true,
                3,
                9,
                Redeemability::Capped { max_redemptions: 3 },
            ),
            (
                "units left here",
                Some(false),
                true,
                1,
                9,
                Redeemability::Redeemable,
            ),
            (
                "outside the window it says so",
                Some(false),
                true,
                3,
                19,
                Redeemability::Expired { expired_at: at(18) },
            ),
            (
                "a code that is not global is fully redeemed",
                None,
                true,
                3,
                9,
                Redeemability::Capped { max_redemptions: 3 },
            ),
        ];
        for (why, global_gone, active, times_redeemed, hour, verdict) in cases {
            let mut code = record();
            code.global_gone = global_gone;
            code.terms.active = active;
            code.times_redeemed = times_redeemed;
            assert_eq!(Redeemability::of(Some(&code), at(hour)), verdict, "{why}");
        }
        let mut used_up = record();
        used_up.global_gone = Some(false);
        used_up.times_redeemed = 3;
        assert_eq!(
            Phase::of(&used_up, at(9)),
            Phase::Active,
            "a used-up share is not an exhausted voucher"
        );
    }

    #[test]
    fn terms_outside_the_voucher_rules_are_refused() {
        let ok = record().terms;
        assert_eq!(ok.validate(), Ok(()));
        let with = |f: fn(&mut Terms)| {
            let mut t = ok.clone();
            f(&mut t);
            t.validate()
        };
        assert_eq!(
            with(|t| t.credit_omr = 0),
            Err(TermError::CreditTooSmall(0))
        );
        assert_eq!(
            with(|t| t.max_redemptions = -1),
            Err(TermError::NegativeCap(-1))
        );
        assert_eq!(with(|t| t.max_redemptions = 0), Ok(()));
        assert_eq!(
            with(|t| t.description = "x".repeat(MAX_DESCRIPTION_LEN + 1)),
            Err(TermError::DescriptionTooLong(MAX_DESCRIPTION_LEN + 1))
        );
        assert_eq!(
            with(|t| t.expires_at = t.valid_from),
            Err(TermError::EmptyWindow)
        );
        assert_eq!(with(|t| t.valid_from = None), Ok(()));
    }

    #[test]
    fn a_campaign_code_before_launch_looks_unknown() {
        let code = CodeRecord {
            campaign_on: Some(true),
            ..record()
        };
        // Before its window, switched off or suspended: no different from a guess.
        let off = CodeRecord {
            campaign_on: Some(false),
            ..code.clone()
        };
        let suspended = CodeRecord {
            suspended: true,
            ..code.clone()
        };
        for (row, now) in [(&code, at(7)), (&off, at(9)), (&suspended, at(9))] {
            let verdict = Redeemability::of(Some(row), now);
            assert_eq!(verdict, Redeemability::Unlaunched);
            assert!(verdict.is_hidden());
            assert_eq!(
                verdict.public_reason(),
                Redeemability::Unknown.public_reason()
            );
        }
        assert_eq!(
            Redeemability::of(Some(&code), at(9)),
            Redeemability::Redeemable
        );
        // The campaign's one-row switch decides, not the row (which follows in the background):
        // switched off while the row still says active, or back on while it still says inactive.
        let row_lags_off = CodeRecord {
            campaign_on: Some(false),
            ..code.clone()
        };
        assert!(Redeemability::of(Some(&row_lags_off), at(9)).is_hidden());
        let row_lags_on = CodeRecord {
            terms: Terms {
                active: false,
                ..code.terms.clone()
            },
            ..code.clone()
        };
        assert_eq!(
            Redeemability::of(Some(&row_lags_on), at(9)),
            Redeemability::Redeemable
        );
        // Once launched, its end is no secret: it was public while it ran.
        assert!(matches!(
            Redeemability::of(Some(&code), at(19)),
            Redeemability::Expired { .. }
        ));
        // A Voucher's code keeps its reasons (410 with them).
        assert_eq!(
            Redeemability::of(Some(&record()), at(7)),
            Redeemability::NotYetValid { valid_from: at(8) }
        );
    }

    #[test]
    fn a_suspended_voucher_is_redeemed_by_no_one_whatever_its_spec() {
        let suspended = CodeRecord {
            suspended: true,
            ..record()
        };
        let verdict = Redeemability::of(Some(&suspended), at(9));
        assert_eq!(verdict, Redeemability::Suspended);
        assert!(!verdict.is_redeemable() && !verdict.is_hidden());
        assert_eq!(Phase::of(&suspended, at(9)), Phase::Suspended);
        // Told like an inactive code: an incident is nobody's business on the checkout page.
        assert_eq!(
            verdict.public_reason(),
            Redeemability::Inactive.public_reason()
        );
    }

    #[test]
    fn redeemability_names_each_reason() {
        let r = record();
        assert_eq!(Redeemability::of(None, at(9)), Redeemability::Unknown);
        assert_eq!(
            Redeemability::of(Some(&r), at(9)),
            Redeemability::Redeemable
        );

        let tomb = CodeRecord {
            deleted_at: Some(at(1)),
            ..r.clone()
        };
        assert_eq!(
            Redeemability::of(Some(&tomb), at(9)),
            Redeemability::Tombstoned
        );

        let mut off = r.clone();
        off.terms.active = false;
        assert_eq!(
            Redeemability::of(Some(&off), at(9)),
            Redeemability::Inactive
        );

        assert_eq!(
            Redeemability::of(Some(&r), at(7)),
            Redeemability::NotYetValid { valid_from: at(8) }
        );
        assert_eq!(
            Redeemability::of(Some(&r), at(18)),
            Redeemability::Expired { expired_at: at(18) }
        );

        let full = CodeRecord {
            times_redeemed: 3,
            ..r.clone()
        };
        assert_eq!(
            Redeemability::of(Some(&full), at(9)),
            Redeemability::Capped { max_redemptions: 3 }
        );
    }

    #[test]
    fn window_start_is_inclusive_and_end_exclusive() {
        let r = record();
        assert!(Redeemability::of(Some(&r), at(8)).is_redeemable());
        assert!(!Redeemability::of(Some(&r), at(18)).is_redeemable());
    }

    #[test]
    fn tombstones_and_unknown_codes_look_the_same_in_public() {
        let tomb = CodeRecord {
            deleted_at: Some(at(1)),
            ..record()
        };
        let hidden = Redeemability::of(Some(&tomb), at(9));
        assert!(hidden.is_hidden());
        assert_eq!(
            hidden.public_reason(),
            Redeemability::Unknown.public_reason()
        );
        assert!(!Redeemability::Inactive.is_hidden());
    }

    #[test]
    fn public_reasons_never_reveal_counters() {
        let reason = Redeemability::Capped { max_redemptions: 3 }.public_reason();
        assert!(!reason.contains('3'), "{reason}");
    }

    #[test]
    fn unlimited_codes_are_never_capped() {
        let mut r = record();
        r.terms.max_redemptions = 0;
        r.times_redeemed = 1_000_000;
        assert_eq!(r.remaining(), None);
        assert!(Redeemability::of(Some(&r), at(9)).is_redeemable());
    }

    #[test]
    fn remaining_never_goes_below_zero() {
        // An adopted row can already be past a cap that the resource lowered.
        let r = CodeRecord {
            times_redeemed: 7,
            ..record()
        };
        assert_eq!(r.remaining(), Some(0));
    }

    #[test]
    fn phase_follows_the_row_and_the_clock() {
        let r = record();
        assert_eq!(Phase::of(&r, at(7)), Phase::Scheduled);
        assert_eq!(Phase::of(&r, at(9)), Phase::Active);
        assert_eq!(Phase::of(&r, at(19)), Phase::Expired);
        let full = CodeRecord {
            times_redeemed: 3,
            ..r.clone()
        };
        assert_eq!(Phase::of(&full, at(9)), Phase::Exhausted);
        let mut off = r;
        off.terms.active = false;
        assert_eq!(Phase::of(&off, at(9)), Phase::Inactive);
    }

    #[test]
    fn next_boundary_is_the_nearest_future_edge() {
        let terms = record().terms;
        assert_eq!(terms.next_boundary(at(7)), Some(at(8)));
        assert_eq!(terms.next_boundary(at(8)), Some(at(18)));
        assert_eq!(terms.next_boundary(at(18)), None);
        let open = Terms {
            valid_from: None,
            expires_at: None,
            ..terms
        };
        assert_eq!(open.next_boundary(at(7)), None);
    }

    #[test]
    fn field_names_are_their_serialised_names() {
        for field in TermField::ALL {
            assert_eq!(serde_json::to_value(field).unwrap(), field.as_str());
        }
        assert_eq!(
            TermField::join(&[TermField::CreditOmr, TermField::Active]),
            "credit_omr, active"
        );
    }

    #[test]
    fn changes_list_exactly_the_differing_fields() {
        let current = record().terms;
        assert!(current.changes_from(&current).is_empty());
        let wanted = Terms {
            credit_omr: 60,
            active: false,
            expires_at: None,
            ..current.clone()
        };
        assert_eq!(
            wanted.changes_from(&current),
            vec![
                TermField::CreditOmr,
                TermField::Active,
                TermField::ExpiresAt
            ]
        );
    }
}
