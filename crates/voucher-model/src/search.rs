//! The breadth-first search both models share: each reachable state once,
//! the step that first reached it remembered, so that a broken promise comes
//! with the shortest trace to it.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;

/// A protocol as the search sees it.
pub(crate) trait Model {
    type State: Clone + Eq + Hash;
    /// What a step is called in a trace (formatted only for the trace).
    type Step: Clone + Debug;
    fn initial(&self) -> Self::State;
    /// Every state reachable from `state` in one step.
    fn next(&self, state: &Self::State, steps: &mut Vec<(Self::Step, Self::State)>);
    /// What the promise says of `state`: `Err` names the broken part.
    fn promise(&self, state: &Self::State) -> Result<(), String>;
}

/// What the search found.
#[derive(Debug)]
pub enum Outcome {
    /// The promise held in every reachable state; how many there were.
    Holds { states: usize },
    /// The shortest trace to a state that breaks it, and what broke.
    Broken { trace: Vec<String>, broken: String },
}

impl Outcome {
    /// The trace as lines, for a test's message.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Holds { states } => format!("the promise held in all {states} states"),
            Outcome::Broken { trace, broken } => {
                format!("{broken}, after:\n  {}", trace.join("\n  "))
            }
        }
    }
}

pub(crate) fn check<M: Model>(model: &M) -> Outcome {
    let mut index: HashMap<M::State, u32> = HashMap::new();
    let mut states: Vec<M::State> = vec![model.initial()];
    let mut parent: Vec<Option<(u32, M::Step)>> = vec![None];
    index.insert(states[0].clone(), 0);
    let mut queue = VecDeque::from([0u32]);
    let mut steps = Vec::new();
    while let Some(at) = queue.pop_front() {
        if let Err(broken) = model.promise(&states[at as usize]) {
            return Outcome::Broken {
                trace: trace(&parent, at),
                broken,
            };
        }
        steps.clear();
        model.next(&states[at as usize], &mut steps);
        for (step, next) in steps.drain(..) {
            if index.contains_key(&next) {
                continue;
            }
            let id = u32::try_from(states.len()).expect("fewer than 2^32 states");
            index.insert(next.clone(), id);
            states.push(next);
            parent.push(Some((at, step)));
            queue.push_back(id);
        }
    }
    Outcome::Holds {
        states: states.len(),
    }
}

fn trace<S: Debug>(parent: &[Option<(u32, S)>], at: u32) -> Vec<String> {
    let mut trace = Vec::new();
    let mut here = at;
    while let Some((before, step)) = &parent[here as usize] {
        trace.push(format!("{step:?}"));
        here = *before;
    }
    trace.reverse();
    trace
}
