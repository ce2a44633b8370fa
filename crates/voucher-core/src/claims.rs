//! Once per customer on any Sovereign (`perCustomer: Global`, DESIGN §11
//! rule 8, docs/federation.md): the hub's claim of one customer on one code
//! and the decision a hub replica takes on one request — pure, as the
//! allotment's is, and the one `crates/voucher-model/src/claims.rs` checks.
//!
//! A Sovereign's redemption writes a local intent, asks the hub to create the
//! claim for its intent, then commits and marks the intent done under the
//! intent's row lock. Recovery marks a pending intent aborted under the same
//! lock, then asks the hub to delete the claim, until it is acknowledged.

use std::collections::BTreeSet;

use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The customer as the hub knows them: an HMAC of the token subject under the
/// vendor's claim key (the same on every Sovereign, as the subject is), hex.
/// The hub never sees a subject, and no Sovereign reads another's claims.
pub fn claimant(key: &[u8], subject: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(subject.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The intent that holds a claim: which Sovereign (its NATS account, stamped
/// by the hub from the subject the request came on) and which attempt.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub sovereign: String,
    pub intent: String,
}

/// The hub's claim of one customer on one code: one KV key, every change a
/// compare-and-set on its revision — so that a create and a delete of one
/// intent are never decided on two keys (a marker read apart from the claim
/// would let a late create slip in beside it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerClaim {
    /// The intent whose redemption the claim is for; none: the customer is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
    /// Intents the hub has said "no" to, or whose claim was deleted: final, so
    /// that a late or duplicated create of one is refused again (the model's
    /// lockout traces).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub refused: BTreeSet<Holder>,
}

/// A Sovereign's request about one customer's claim on one code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ClaimAsk {
    /// Claim the customer for `intent`: idempotent for the intent's own claim.
    Create {
        code: String,
        claimant: String,
        intent: String,
    },
    /// Delete the claim if `intent` holds it (recovery, a redemption not
    /// granted, a reversal); the intent's create is refused from then on.
    Delete {
        code: String,
        claimant: String,
        intent: String,
    },
}

impl ClaimAsk {
    /// The key of the claim: the code and the claimant (both within the KV
    /// key alphabet: a code is letters, digits, '-' and '_'; a claimant hex).
    pub fn key(&self) -> String {
        let (Self::Create { code, claimant, .. } | Self::Delete { code, claimant, .. }) = self;
        format!("{code}.{claimant}")
    }

    fn intent(&self) -> &str {
        let (Self::Create { intent, .. } | Self::Delete { intent, .. }) = self;
        intent
    }
}

/// The hub's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClaimAnswer {
    /// The claim is this intent's: redeem.
    Claimed,
    /// Another intent holds the claim, or the hub said "no" to this one
    /// before: the customer redeemed (or is redeeming) elsewhere.
    Held,
    /// The intent holds no claim now, and never will.
    Released,
}

/// What a replica decided: the claim to write (compare-and-set on the
/// revision it read; `None`: nothing changes), and the answer to send once
/// that write is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimDecision {
    pub write: Option<CustomerClaim>,
    pub answer: ClaimAnswer,
}

/// Decides `ask` from `sovereign` on the claim as read (`None`: no key yet).
pub fn decide(current: Option<&CustomerClaim>, sovereign: &str, ask: &ClaimAsk) -> ClaimDecision {
    let claim = current.cloned().unwrap_or_default();
    let this = Holder {
        sovereign: sovereign.to_owned(),
        intent: ask.intent().to_owned(),
    };
    let (next, answer) = match ask {
        ClaimAsk::Create { .. } if claim.refused.contains(&this) => {
            (claim.clone(), ClaimAnswer::Held)
        }
        ClaimAsk::Create { .. } => match &claim.holder {
            None => {
                let next = CustomerClaim {
                    holder: Some(this),
                    ..claim.clone()
                };
                (next, ClaimAnswer::Claimed)
            }
            Some(holder) if *holder == this => (claim.clone(), ClaimAnswer::Claimed),
            // The refusal is final (a duplicate of this create arriving once the
            // claim is free must not make a claim nobody will redeem or delete).
            Some(_) => {
                let mut next = claim.clone();
                next.refused.insert(this);
                (next, ClaimAnswer::Held)
            }
        },
        ClaimAsk::Delete { .. } => {
            let mut next = claim.clone();
            // Only the intent's own claim: a late delete never frees another's.
            if next.holder.as_ref() == Some(&this) {
                next.holder = None;
            }
            next.refused.insert(this);
            (next, ClaimAnswer::Released)
        }
    };
    let write = (current != Some(&next)).then_some(next);
    ClaimDecision { write, answer }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(intent: &str) -> ClaimAsk {
        ClaimAsk::Create {
            code: "WORLD-LAUNCH".into(),
            claimant: "ab".into(),
            intent: intent.into(),
        }
    }

    fn delete(intent: &str) -> ClaimAsk {
        ClaimAsk::Delete {
            code: "WORLD-LAUNCH".into(),
            claimant: "ab".into(),
            intent: intent.into(),
        }
    }

    fn held_by(sovereign: &str, intent: &str) -> CustomerClaim {
        CustomerClaim {
            holder: Some(Holder {
                sovereign: sovereign.into(),
                intent: intent.into(),
            }),
            refused: BTreeSet::new(),
        }
    }

    fn holder(sovereign: &str, intent: &str) -> Holder {
        Holder {
            sovereign: sovereign.into(),
            intent: intent.into(),
        }
    }

    /// (why, claim as read, from, ask, answer, claim after)
    type Case = (
        &'static str,
        Option<CustomerClaim>,
        &'static str,
        ClaimAsk,
        ClaimAnswer,
        CustomerClaim,
    );

    #[test]
    fn each_claim_request_is_decided_by_rule_8() {
        let refused_i1 = CustomerClaim {
            holder: None,
            refused: [holder("sov1", "i1")].into(),
        };
        let cases: Vec<Case> = vec![
            (
                "a free customer is claimed for the intent",
                None,
                "sov1",
                create("i1"),
                ClaimAnswer::Claimed,
                held_by("sov1", "i1"),
            ),
            (
                "a create re-sent by its own intent is claimed again, nothing written",
                Some(held_by("sov1", "i1")),
                "sov1",
                create("i1"),
                ClaimAnswer::Claimed,
                held_by("sov1", "i1"),
            ),
            (
                "another Sovereign's intent finds the customer held, and its refusal is final",
                Some(held_by("sov1", "i1")),
                "sov2",
                create("i2"),
                ClaimAnswer::Held,
                CustomerClaim {
                    holder: Some(holder("sov1", "i1")),
                    refused: [holder("sov2", "i2")].into(),
                },
            ),
            (
                "the same intent name from another Sovereign is another intent (the account decides)",
                Some(held_by("sov1", "i1")),
                "sov2",
                create("i1"),
                ClaimAnswer::Held,
                CustomerClaim {
                    holder: Some(holder("sov1", "i1")),
                    refused: [holder("sov2", "i1")].into(),
                },
            ),
            (
                "a delete of the holder frees the customer and refuses the intent from then on",
                Some(held_by("sov1", "i1")),
                "sov1",
                delete("i1"),
                ClaimAnswer::Released,
                refused_i1.clone(),
            ),
            (
                "a create delayed past its delete is refused (abort marker)",
                Some(refused_i1.clone()),
                "sov1",
                create("i1"),
                ClaimAnswer::Held,
                refused_i1.clone(),
            ),
            (
                "a late delete of another intent leaves the holder's claim",
                Some(held_by("sov1", "i1")),
                "sov1",
                delete("i0"),
                ClaimAnswer::Released,
                CustomerClaim {
                    holder: Some(holder("sov1", "i1")),
                    refused: [holder("sov1", "i0")].into(),
                },
            ),
            (
                "another Sovereign cannot delete a claim it does not hold",
                Some(held_by("sov1", "i1")),
                "sov2",
                delete("i1"),
                ClaimAnswer::Released,
                CustomerClaim {
                    holder: Some(holder("sov1", "i1")),
                    refused: [holder("sov2", "i1")].into(),
                },
            ),
            (
                "a delete of a never-created intent leaves a marker, so its late create is refused",
                None,
                "sov1",
                delete("i1"),
                ClaimAnswer::Released,
                refused_i1,
            ),
        ];
        for (why, read, from, ask, answer, after) in cases {
            let decision = decide(read.as_ref(), from, &ask);
            assert_eq!(decision.answer, answer, "{why}");
            let written = decision
                .write
                .clone()
                .unwrap_or_else(|| read.clone().unwrap_or_default());
            assert_eq!(written, after, "{why}");
            assert_eq!(
                decision.write.is_none(),
                read.as_ref() == Some(&after),
                "{why}: writes only a change"
            );
        }
    }

    #[test]
    fn the_claimant_is_the_same_on_every_sovereign_and_hides_the_subject() {
        let key = b"vendor claim key";
        let a = claimant(key, "customer-42");
        assert_eq!(a, claimant(key, "customer-42"));
        assert_ne!(a, claimant(key, "customer-43"));
        assert_ne!(a, claimant(b"another key", "customer-42"));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("customer"));
    }
}
