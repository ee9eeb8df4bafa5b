//! Failover singletons: entities that a `failover` action places on one node of a
//! candidate list, and the rule that keeps at most one copy among the live candidates.
//!
//! A failover picks the first live candidate of its own membership view. While the
//! cluster is healthy every node has the same view, so the singleton starts once.
//! Two things break that: a partition (each side starts its copy), and the death of
//! the node that holds the singleton when no condition watches that node. So every
//! node re-checks each singleton after membership changes, and periodically:
//!
//! - a candidate that holds a copy while a candidate *before it* in the list also
//!   holds one stops its own ([`Verdict::Yield`]): the best-ranked copy never yields,
//!   so two nodes checking at once never both stop;
//! - once a singleton has been placed, if no live candidate holds it, it is started on
//!   the first live candidate ([`Verdict::Restore`]); a start of a running entity is a
//!   no-op, so nodes that decide this at once do no harm.
//!
//! A copy on a node that is not a candidate is that node's own business (its config
//! started it) and is never stopped.

use crate::spec::{ActionKind, ActionSpec, EntitySpec};

/// An entity that `failover` places, and the nodes that may run it, best first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Singleton {
    /// The entity (declared on every candidate).
    pub entity: String,
    /// The candidates, in order of preference.
    pub candidates: Vec<String>,
}

/// Every singleton the entities' `failover` actions declare (also in `on_fail`
/// chains), once per entity: the first declaration found wins.
pub fn singletons<'a>(entities: impl IntoIterator<Item = &'a EntitySpec>) -> Vec<Singleton> {
    let mut found: Vec<Singleton> = Vec::new();
    for e in entities {
        for c in &e.conditions {
            collect(&c.actions, &mut found);
        }
    }
    found
}

fn collect(actions: &[ActionSpec], found: &mut Vec<Singleton>) {
    for a in actions {
        if let ActionKind::Failover { entity, candidates } = &a.kind
            && !found.iter().any(|s| &s.entity == entity)
        {
            found.push(Singleton {
                entity: entity.clone(),
                candidates: candidates.clone(),
            });
        }
        collect(&a.on_fail, found);
    }
}

/// What one node does about one singleton after a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to change.
    Steady,
    /// Stop the local copy: `winner`, a better-ranked candidate, holds one too.
    Yield {
        /// The candidate whose copy stays.
        winner: String,
    },
    /// The singleton was placed but no live candidate holds it: start it on `on`.
    Restore {
        /// The first live candidate.
        on: String,
    },
}

/// The verdict of node `me` on `s`, given the candidates that are up in its view
/// (`me` counts as up), which of them hold a copy (running, starting, restarting),
/// and whether the singleton has been placed (a failover ran, or a copy was seen).
pub fn verdict(
    me: &str,
    s: &Singleton,
    is_up: impl Fn(&str) -> bool,
    holds: impl Fn(&str) -> bool,
    placed: bool,
) -> Verdict {
    let live: Vec<&str> = s
        .candidates
        .iter()
        .map(String::as_str)
        .filter(|c| *c == me || is_up(c))
        .collect();
    if live.contains(&me) && holds(me) {
        return match live.iter().take_while(|c| **c != me).find(|c| holds(c)) {
            Some(winner) => Verdict::Yield {
                winner: winner.to_string(),
            },
            None => Verdict::Steady,
        };
    }
    if placed
        && !live.iter().any(|c| holds(c))
        && let Some(first) = live.first()
    {
        return Verdict::Restore {
            on: first.to_string(),
        };
    }
    Verdict::Steady
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn db() -> Singleton {
        Singleton {
            entity: "db".into(),
            candidates: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    fn set<'a>(names: &'a [&'a str]) -> impl Fn(&str) -> bool + 'a {
        move |n| names.contains(&n)
    }

    #[test]
    fn the_best_ranked_copy_stays_and_the_others_yield_to_it() {
        let s = db();
        let up = set(&["a", "b", "c"]);
        let holders = set(&["b", "c"]);
        assert_eq!(verdict("b", &s, &up, &holders, true), Verdict::Steady);
        assert_eq!(
            verdict("c", &s, &up, &holders, true),
            Verdict::Yield { winner: "b".into() }
        );
        // a holds nothing and is not asked to act: b's copy is the one.
        assert_eq!(verdict("a", &s, &up, &holders, true), Verdict::Steady);
    }

    #[test]
    fn a_copy_on_a_node_that_is_down_does_not_count() {
        let s = db();
        // c still believes a holds db, but a is down in c's view.
        let v = verdict("c", &s, set(&["c"]), set(&["a", "c"]), true);
        assert_eq!(v, Verdict::Steady);
    }

    #[test]
    fn a_placed_singleton_nobody_holds_is_restored_on_the_first_live_candidate() {
        let s = db();
        let none = set(&[]);
        assert_eq!(
            verdict("c", &s, set(&["b", "c"]), &none, true),
            Verdict::Restore { on: "b".into() }
        );
        // Never placed: nothing starts it (its home node may simply not have failed).
        assert_eq!(
            verdict("c", &s, set(&["b", "c"]), &none, false),
            Verdict::Steady
        );
        // A node that is not a candidate restores it too (on the first live one).
        assert_eq!(
            verdict("x", &s, set(&["c"]), &none, true),
            Verdict::Restore { on: "c".into() }
        );
    }

    #[test]
    fn a_node_that_is_not_a_candidate_never_yields() {
        let s = db();
        let v = verdict("x", &s, set(&["a", "b", "c"]), set(&["a", "x"]), true);
        assert_eq!(v, Verdict::Steady);
    }

    #[test]
    fn singletons_come_from_every_failover_action_once_per_entity() {
        let cfg = parse(
            "t.toml",
            r#"
[[entity]]
name = "watch-a"
global = true
[[entity.condition]]
on = "node-down"
node = "a"
action = [{ do = "failover", entity = "db", candidates = ["b", "c"] }]

[[entity]]
name = "watch-b"
global = true
[[entity.condition]]
on = "node-down"
node = "b"
action = [
  { do = "failover", entity = "db", candidates = ["c", "a"] },
  { do = "failover", entity = "cache", candidates = ["a"], on_fail = [
    { do = "failover", entity = "queue", candidates = ["c"] },
  ] },
]
"#,
        )
        .expect("valid config");
        let found = singletons(&cfg.entities);
        let names: Vec<&str> = found.iter().map(|s| s.entity.as_str()).collect();
        assert_eq!(names, ["db", "cache", "queue"]);
        assert_eq!(found[0].candidates, ["b", "c"]);
    }
}
