//! Once per customer on any Sovereign (`perCustomer: Global`, DESIGN §11
//! rule 8): a redemption writes a local intent, creates a claim for the
//! customer on the hub (a bucket only the hub reads), then commits and marks
//! the intent done. A Sovereign that hears nothing recovers a pending intent:
//! marks it aborted under its row lock, then deletes the claim it may have
//! made, retrying until the hub acknowledges.
//!
//! The actors: one customer trying on two Sovereigns (each attempt an
//! intent), the hub's claim bucket, and the network (any message delivered
//! next, duplicated by re-sends, or lost). The promise: at most one
//! redemption for the customer anywhere; and once everything has settled
//! (no message in flight, every intent done, refused or aborted with its
//! delete acknowledged), a customer who never redeemed is not locked out by
//! a claim nobody will ever delete.

use crate::search::{self, Model, Outcome};

/// Attempts (intents) the customer may make, on either Sovereign.
const MAX_INTENTS: usize = 3;

/// Rule 8's parts, each of which can be removed to see why it is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The redemption commits only if its intent is still pending, checked
    /// and written under the intent's row lock (recovery takes the same
    /// lock). Without: it checks, then commits, and recovery may abort the
    /// intent in between.
    pub intent_locked: bool,
    /// A delete applies only if the claim's value is the intent's. Without:
    /// a late delete removes whatever claim is there.
    pub matching_deletes: bool,
    /// The hub's "no" to an intent is final: recovery's delete leaves an
    /// abort marker, and a refused create leaves one too, so a late or
    /// duplicated create of that intent is refused again. Without: a create
    /// delayed past the delete — or a duplicate of a refused create, arriving
    /// once the claim is free — makes a claim for an intent that will never
    /// redeem, and nothing will ever delete it.
    pub final_refusals: bool,
}

impl Rules {
    pub const ALL: Rules = Rules {
        intent_locked: true,
        matching_deletes: true,
        final_refusals: true,
    };
}

/// How far a search goes.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub intents: usize,
    /// Re-sends of creates and deletes, in all.
    pub resends: u8,
    pub losses: u8,
    pub in_flight: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            intents: MAX_INTENTS,
            resends: 2,
            losses: 1,
            in_flight: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Message {
    Create { intent: u8 },
    Created { intent: u8, ok: bool },
    Delete { intent: u8 },
    Deleted { intent: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    Pending,
    Done,
    /// The hub refused the claim: the customer hears "already redeemed".
    Refused,
    Aborted {
        acknowledged: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Intent {
    sovereign: u8,
    phase: Phase,
    /// Checked pending and about to commit (only without the row lock).
    committing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct State {
    intents: [Option<Intent>; MAX_INTENTS],
    /// The hub's claim for the customer: the intent that made it.
    claim: Option<u8>,
    /// Abort markers on the hub, one bit an intent.
    markers: u8,
    network: Vec<Message>,
    redeemed: u8,
    resends: u8,
    losses: u8,
}

/// A step of a trace (its fields are read by `Debug`, for the trace).
#[derive(Clone, Debug)]
#[allow(dead_code)]
pub(crate) enum Step {
    Tries { intent: u8, sovereign: u8 },
    ReSends { message: Message },
    Recovers { intent: u8 },
    HubHandles { message: Message },
    Delivered { message: Message },
    Commits { intent: u8 },
    Lost { message: Message },
}

pub struct Check {
    pub rules: Rules,
    pub bounds: Bounds,
}

impl Check {
    pub fn run(&self) -> Outcome {
        assert!(self.bounds.intents <= MAX_INTENTS);
        search::check(self)
    }
}

impl Model for Check {
    type State = State;
    type Step = Step;

    fn initial(&self) -> State {
        State {
            intents: [None; MAX_INTENTS],
            claim: None,
            markers: 0,
            network: Vec::new(),
            redeemed: 0,
            resends: 0,
            losses: 0,
        }
    }

    fn next(&self, state: &State, steps: &mut Vec<(Step, State)>) {
        self.customer_steps(state, steps);
        for (i, message) in state.network.iter().enumerate() {
            let mut next = state.clone();
            next.network.remove(i);
            if state.losses < self.bounds.losses {
                let mut lost = next.clone();
                lost.losses += 1;
                steps.push((Step::Lost { message: *message }, lost));
            }
            match *message {
                Message::Create { intent } => self.create(&mut next, intent),
                Message::Delete { intent } => self.delete(&mut next, intent),
                Message::Created { intent, ok } => self.created(&mut next, intent, ok),
                Message::Deleted { intent } => {
                    if let Some(it) = &mut next.intents[intent as usize] {
                        it.phase = Phase::Aborted { acknowledged: true };
                    }
                }
            }
            let step = match message {
                Message::Create { .. } | Message::Delete { .. } => {
                    Step::HubHandles { message: *message }
                }
                _ => Step::Delivered { message: *message },
            };
            steps.push((step, next));
        }
    }

    fn promise(&self, state: &State) -> Result<(), String> {
        if state.redeemed > 1 {
            return Err(format!("the customer redeemed {} times", state.redeemed));
        }
        let settled = state.network.is_empty()
            && state.intents.iter().flatten().all(|it| {
                !it.committing
                    && matches!(
                        it.phase,
                        Phase::Done | Phase::Refused | Phase::Aborted { acknowledged: true }
                    )
            });
        if settled
            && state.redeemed == 0
            && let Some(holder) = state.claim
        {
            return Err(format!(
                "the customer never redeemed and is locked out: the claim is held by intent {holder}, which will never redeem"
            ));
        }
        Ok(())
    }
}

impl Check {
    fn customer_steps(&self, state: &State, steps: &mut Vec<(Step, State)>) {
        let room = state.network.len() < self.bounds.in_flight;
        let used = state.intents.iter().flatten().count();
        if room && used < self.bounds.intents {
            for sovereign in 0..2u8 {
                let intent = used as u8;
                let mut next = state.clone();
                next.intents[used] = Some(Intent {
                    sovereign,
                    phase: Phase::Pending,
                    committing: false,
                });
                next.send(Message::Create { intent });
                steps.push((Step::Tries { intent, sovereign }, next));
            }
        }
        for (i, it) in state.intents.iter().enumerate() {
            let Some(it) = it else { continue };
            let intent = i as u8;
            let resend = match it.phase {
                Phase::Pending => Some(Message::Create { intent }),
                Phase::Aborted {
                    acknowledged: false,
                } => Some(Message::Delete { intent }),
                _ => None,
            };
            if let Some(message) = resend
                && room
                && state.resends < self.bounds.resends
            {
                let mut next = state.clone();
                next.resends += 1;
                next.send(message);
                steps.push((Step::ReSends { message }, next));
            }
            // Recovery of a pending intent: aborted under its row lock, then
            // its claim deleted (retried until acknowledged).
            if it.phase == Phase::Pending && room {
                let mut next = state.clone();
                next.intents[i].as_mut().expect("present").phase = Phase::Aborted {
                    acknowledged: false,
                };
                next.send(Message::Delete { intent });
                steps.push((Step::Recovers { intent }, next));
            }
            if it.committing {
                let mut next = state.clone();
                let it = next.intents[i].as_mut().expect("present");
                it.committing = false;
                if it.phase == Phase::Pending {
                    it.phase = Phase::Done;
                }
                next.redeemed += 1;
                steps.push((Step::Commits { intent }, next));
            }
        }
    }

    /// The hub creates the claim, or finds it is this intent's already.
    fn create(&self, state: &mut State, intent: u8) {
        let marked = state.markers & (1 << intent) != 0;
        let ok = !marked
            && match state.claim {
                None => {
                    state.claim = Some(intent);
                    true
                }
                Some(holder) => holder == intent,
            };
        if !ok && self.rules.final_refusals {
            state.markers |= 1 << intent;
        }
        state.send(Message::Created { intent, ok });
    }

    fn delete(&self, state: &mut State, intent: u8) {
        if self.rules.final_refusals {
            state.markers |= 1 << intent;
        }
        if state.claim == Some(intent) || !self.rules.matching_deletes {
            state.claim = None;
        }
        state.send(Message::Deleted { intent });
    }

    /// The Sovereign hears the hub's answer to a create.
    fn created(&self, state: &mut State, intent: u8, ok: bool) {
        let locked = self.rules.intent_locked;
        let Some(it) = &mut state.intents[intent as usize] else {
            return;
        };
        if it.phase != Phase::Pending || it.committing {
            return;
        }
        if !ok {
            it.phase = Phase::Refused;
        } else if locked {
            it.phase = Phase::Done;
            state.redeemed += 1;
        } else {
            it.committing = true;
        }
    }
}

impl State {
    fn send(&mut self, message: Message) {
        let at = self.network.partition_point(|m| *m < message);
        self.network.insert(at, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_redemption_per_customer_anywhere_with_every_rule() {
        let outcome = Check {
            rules: Rules::ALL,
            bounds: Bounds::default(),
        }
        .run();
        println!("claims: {}", outcome.describe());
        match outcome {
            Outcome::Holds { states } => assert!(states > 1000, "{states} states only"),
            broken => panic!("{}", broken.describe()),
        }
    }

    #[test]
    fn each_part_of_rule_8_removed_lets_the_search_break_the_promise() {
        let cases = [
            (
                Rules {
                    intent_locked: false,
                    ..Rules::ALL
                },
                "the intent's row lock (recovery aborts between the check and the commit)",
            ),
            (
                Rules {
                    matching_deletes: false,
                    ..Rules::ALL
                },
                "matching deletes (a late delete removes another intent's claim)",
            ),
            (
                Rules {
                    final_refusals: false,
                    ..Rules::ALL
                },
                "final refusals (a late create claims for an intent that will never redeem)",
            ),
        ];
        for (rules, why) in cases {
            match (Check {
                rules,
                bounds: Bounds::default(),
            })
            .run()
            {
                Outcome::Holds { states } => {
                    panic!("without {why} the promise still held in all {states} states")
                }
                broken => println!("without {why}: {}", broken.describe()),
            }
        }
    }
}
