//! The auto-assignment policy of SPEC.md section 5 as plain data: who is a candidate and in
//! which order chats and operators are matched. The scheduler in `core.rs` feeds it the queue
//! and the candidates and applies the decisions; a cluster backend can run the same plan.

use std::cmp::Reverse;

use crate::config::Strategy;

/// An operator who may take chats of the department now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    /// `active_chats + pending_chats`.
    pub load: u32,
    pub capacity: u32,
    /// A tick of the assignment clock; 0 = never assigned. Lower = longer ago.
    pub last_assigned: u64,
}

/// A waiting chat, in queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub chat: u64,
    /// Previous owner after an accept timeout: chosen only when nobody else can take it.
    pub avoid: Option<u64>,
}

/// Queue order: priority descending, then oldest first.
pub fn queue_key(priority: i64, seq: u64) -> (Reverse<i64>, u64) {
    (Reverse(priority), seq)
}

/// Index of the candidate that gets the next chat, if any has room.
pub fn choose(strategy: Strategy, cands: &[Candidate], avoid: Option<u64>) -> Option<usize> {
    let rank = |c: &Candidate| match strategy {
        Strategy::LeastLoaded => (c.load as u64, c.last_assigned, c.id),
        Strategy::RoundRobin | Strategy::Off => (0, c.last_assigned, c.id),
    };
    let best = |skip: Option<u64>| {
        cands
            .iter()
            .enumerate()
            .filter(|(_, c)| c.load < c.capacity && Some(c.id) != skip)
            .min_by_key(|(_, c)| rank(c))
            .map(|(i, _)| i)
    };
    match strategy {
        Strategy::Off => None,
        _ => best(avoid).or_else(|| avoid.and_then(|_| best(None))),
    }
}

/// Matches the queue (already in order) with candidates. Stops at the first chat nobody can
/// take, so a later chat never jumps the queue. `clock` is the last tick handed out.
pub fn plan(
    strategy: Strategy,
    queue: impl IntoIterator<Item = Queued>,
    cands: &mut [Candidate],
    clock: &mut u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for q in queue {
        let Some(i) = choose(strategy, cands, q.avoid) else {
            break;
        };
        *clock += 1;
        cands[i].load += 1;
        cands[i].last_assigned = *clock;
        out.push((q.chat, cands[i].id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};
    use std::collections::{HashMap, HashSet};

    fn cand(id: u64, load: u32, capacity: u32, last: u64) -> Candidate {
        Candidate {
            id,
            load,
            capacity,
            last_assigned: last,
        }
    }

    fn q(chat: u64) -> Queued {
        Queued { chat, avoid: None }
    }

    #[test]
    fn least_loaded_picks_fewest_chats_then_longest_idle() {
        let c = [cand(1, 2, 4, 1), cand(2, 1, 4, 5), cand(3, 1, 4, 3)];
        assert_eq!(choose(Strategy::LeastLoaded, &c, None), Some(2));
    }

    #[test]
    fn round_robin_picks_longest_since_assigned() {
        let c = [cand(1, 0, 4, 9), cand(2, 3, 4, 2), cand(3, 1, 4, 5)];
        assert_eq!(choose(Strategy::RoundRobin, &c, None), Some(1));
    }

    #[test]
    fn capacity_full_operators_are_not_candidates() {
        let c = [cand(1, 4, 4, 0), cand(2, 2, 2, 0)];
        assert_eq!(choose(Strategy::LeastLoaded, &c, None), None);
    }

    #[test]
    fn accept_timeout_prefers_another_candidate() {
        let c = [cand(1, 0, 4, 0), cand(2, 1, 4, 0)];
        assert_eq!(choose(Strategy::LeastLoaded, &c, Some(1)), Some(1));
        assert_eq!(
            choose(Strategy::LeastLoaded, &c[..1], Some(1)),
            Some(0),
            "nobody else: same one"
        );
    }

    #[test]
    fn assignment_off_assigns_nothing() {
        let mut c = [cand(1, 0, 4, 0)];
        assert!(plan(Strategy::Off, [q(1)], &mut c, &mut 0).is_empty());
    }

    #[test]
    fn plan_round_robin_rotates() {
        let mut c = [cand(1, 0, 9, 0), cand(2, 0, 9, 0), cand(3, 0, 9, 0)];
        let got = plan(Strategy::RoundRobin, (1..=6).map(q), &mut c, &mut 0);
        let owners: Vec<u64> = got.iter().map(|(_, o)| *o).collect();
        assert_eq!(owners, vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn queue_order_priority_then_age() {
        let mut keys = [
            (queue_key(0, 1), 'a'),
            (queue_key(5, 3), 'b'),
            (queue_key(5, 2), 'c'),
        ];
        keys.sort();
        assert_eq!(keys.iter().map(|k| k.1).collect::<String>(), "cba");
    }

    proptest! {
        /// Never past capacity, never two owners, FIFO: the chats assigned are a prefix of
        /// the queue.
        #[test]
        fn plan_property_respects_capacity_and_fifo(
            loads in proptest::collection::vec((0u32..5, 0u32..6), 0..8),
            n in 0usize..40,
            rr in any::<bool>(),
        ) {
            let strategy = if rr { Strategy::RoundRobin } else { Strategy::LeastLoaded };
            let mut cands: Vec<Candidate> =
                loads.iter().enumerate().map(|(i, (l, c))| cand(i as u64, *l, *c, 0)).collect();
            let room: u32 = cands.iter().map(|c| c.capacity.saturating_sub(c.load)).sum();
            let before: HashMap<u64, u32> = cands.iter().map(|c| (c.id, c.load)).collect();
            let got = plan(strategy, (0..n as u64).map(q), &mut cands, &mut 0);
            prop_assert_eq!(got.len(), n.min(room as usize));
            let chats: Vec<u64> = got.iter().map(|(c, _)| *c).collect();
            prop_assert_eq!(chats, (0..got.len() as u64).collect::<Vec<_>>());
            let unique: HashSet<u64> = got.iter().map(|(c, _)| *c).collect();
            prop_assert_eq!(unique.len(), got.len());
            for c in &cands {
                let added = got.iter().filter(|(_, o)| *o == c.id).count() as u32;
                prop_assert_eq!(c.load, before[&c.id] + added);
                prop_assert!(c.load <= c.capacity.max(before[&c.id]));
            }
        }
    }
}
