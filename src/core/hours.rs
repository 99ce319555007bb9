//! Online hours in the core: each department with `hours` keeps its parsed schedule and
//! whether it is closed now, and one timer armed at its next boundary. The timer flips the
//! department at that instant and arms the next one; nothing polls. The rules themselves are
//! in `crate::hours`.

use std::time::Duration;

use jiff::Timestamp;

use super::*;
use crate::hours::Schedule;

/// A department's hours as the core holds them.
pub(super) struct DeptHours {
    schedule: Schedule,
    /// Bumped whenever the hours are (re)set: a timer of an older generation does nothing.
    generation: u64,
    /// Closed now: Some(the next opening, ms since the epoch, or None for never).
    pub(super) closed: Option<Option<i64>>,
}

impl Core {
    /// Takes in a department's hours (put, loaded or replicated) and arms its boundary timer.
    pub(super) fn set_hours(&mut self, d: u64, now: Instant) {
        let hours = self.departments.get(&d).and_then(|x| x.hours.clone());
        let Some(hours) = hours else {
            self.hours.remove(&d);
            return;
        };
        let schedule = match Schedule::parse(&hours) {
            Ok(s) => s,
            Err(e) => {
                // Only validated hours are accepted, so this is a store written by hand.
                tracing::warn!(department = d, cause = %e, "ignoring invalid online hours");
                self.hours.remove(&d);
                return;
            }
        };
        self.hours_generation += 1;
        let generation = self.hours_generation;
        self.hours.insert(
            d,
            DeptHours {
                schedule,
                generation,
                closed: None,
            },
        );
        self.refresh_hours(d, now);
    }

    /// A boundary timer fired: re-reads the clock, flips the department if its time has
    /// come and arms the next boundary.
    pub fn hours_boundary(&mut self, d: u64, generation: u64, now: Instant) {
        if self
            .hours
            .get(&d)
            .is_some_and(|h| h.generation == generation)
        {
            self.refresh_hours(d, now);
            self.settle(now);
        }
    }

    /// Closed now (reason `closed`): the next opening, if any.
    pub(super) fn closed_by_hours(&self, d: u64) -> Option<Option<i64>> {
        self.hours.get(&d).and_then(|h| h.closed)
    }

    fn refresh_hours(&mut self, d: u64, now: Instant) {
        let wall = Timestamp::now();
        let Some(h) = self.hours.get_mut(&d) else {
            return;
        };
        let state = h.schedule.state(wall);
        h.closed = (!state.open).then(|| state.opens_at.map(Timestamp::as_millisecond));
        let generation = h.generation;
        self.dirty_depts.insert(d);
        if let Some(next) = state.next_change {
            // A timer that wakes a hair early finds the same boundary: it then sleeps again
            // for at least a millisecond rather than spinning.
            let wait = wall
                .duration_until(next)
                .try_into()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(1));
            if let Some(at) = now.checked_add(wait) {
                self.timers.push(Timer::HoursBoundary {
                    department: d,
                    generation,
                    at,
                });
            }
        }
    }
}
