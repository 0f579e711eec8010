//! Fair share across tenants at a runner's intake: which received messages the runner holds,
//! which it sends back to the end of the queue, and which held one starts when a job slot frees.
//! A pure policy over the runner's own view.
//!
//! A runner has `slots` job slots (`KILN_MAX_IN_FLIGHT` × devices) and holds up to `hold`
//! received messages it has not started. While other tenants have messages held (waiting for a
//! slot), a tenant's share of the slots is in proportion to its weight among them and itself, at
//! least one slot; with none waiting, its share is every slot (nothing idles while work waits).
//! A received message whose tenant already has its share running or held, and one more held
//! (its next in line), is deferred: sent again to the end of the queue, so the runner reads past
//! one tenant's backlog to the other tenants' jobs behind it; the others' messages are held.
//! Reading ahead finds a tenant's jobs out of their order (what went back is behind the rest),
//! so the next in line is the oldest of the tenant's jobs seen: an older one takes its place
//! and the newer goes back, and one tenant's jobs start about in the order they came. When a slot frees, the held message that
//! starts is the one whose tenant has the fewest jobs running for its weight (the longest held
//! first among equals).
//!
//! Priority comes first: a held job of a higher priority starts before any of a lower one, and
//! a high one is held even when its tenant has its share. A job's priority rises one level per
//! [`kiln_domain::Priority::AGING`] of its age (since submission), so a low one waits a bounded
//! time whatever arrives after it; and a full hold makes room for a job of a higher (aged)
//! priority by sending its lowest back.
//!
//! Reading past a backlog costs a send and a delete per deferred message, so the receives that
//! only look ahead (every slot busy or spoken for) are budgeted ([`ScanBudget`]): past `budget`
//! deferrals in a window the runner looks again only when a slot frees.
//!
//! On AWS the job queue's messages also carry the tenant as their message group: SQS fair queues
//! then deliver a quiet tenant's messages ahead of a noisy one's backlog by themselves.

use kiln_domain::Priority;
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// A runner's slots and how much it holds beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeLimits {
    /// Jobs running at once.
    pub slots: usize,
    /// Most messages held at once (received, not yet started).
    pub hold: usize,
    /// Fair share on; off, messages start in the order received and none is deferred (the
    /// runner then receives only for its free slots).
    pub fair: bool,
}

/// A message held by the runner.
#[derive(Debug)]
struct Held<T> {
    tenant: String,
    weight: u32,
    priority: Priority,
    /// When its job was submitted, on this runner's clock.
    born: Instant,
    /// Delivered again: never sent back (see [`Arrival::pinned`]).
    pinned: bool,
    item: T,
}

/// A tenant's jobs running on this runner, and its weight as their messages gave it.
#[derive(Debug, Clone, Copy)]
struct Running {
    jobs: usize,
    weight: u32,
}

/// A received message's tenant, weight, priority and age.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub tenant: &'a str,
    pub weight: u32,
    pub priority: Priority,
    /// When its job was submitted, on this runner's clock.
    pub born: Instant,
    /// Held whatever the shares and the hold's room: a message delivered again, which may be
    /// the one a running job's run holds (its runner died). Only that message may restart the
    /// job; sent back as a new message it would leave the job running for ever.
    pub pinned: bool,
}

/// `priority` lifted one level per [`Priority::AGING`] since `born`, at `now` (0 to 2).
fn effective(priority: Priority, born: Instant, now: Instant) -> u8 {
    let aged = now.saturating_duration_since(born).as_secs() / Priority::AGING.as_secs().max(1);
    (u64::from(priority.level()) + aged).min(2) as u8
}

/// The runner's held messages and running jobs, by tenant.
#[derive(Debug)]
pub struct Intake<T> {
    limits: IntakeLimits,
    /// In the order they were received.
    held: Vec<Held<T>>,
    running: HashMap<String, Running>,
}

/// What became of an offered message.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Held, to start when a slot frees and its turn comes.
    Held,
    /// Its tenant has its share of the slots running or held already, or the runner holds all it
    /// may: send it back to the end of the queue.
    Defer(T),
}

impl<T> Intake<T> {
    pub fn new(limits: IntakeLimits) -> Self {
        Self { limits, held: Vec::new(), running: HashMap::new() }
    }

    /// How many more messages the runner may hold.
    pub fn room(&self) -> usize {
        self.limits.hold.max(1).saturating_sub(self.held.len())
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn running(&self, tenant: &str) -> usize {
        self.running.get(tenant).map_or(0, |running| running.jobs)
    }

    /// The tenant's weight, as its running or held messages gave it (1 for a tenant absent).
    fn weight(&self, tenant: &str) -> u32 {
        let held = || self.held.iter().find(|held| held.tenant == tenant).map(|held| held.weight);
        self.running.get(tenant).map(|running| running.weight).or_else(held).unwrap_or(1)
    }

    /// `tenant`'s share of the slots among itself and the tenants with messages held: in
    /// proportion to the weights, rounded up, at least one.
    pub fn share(&self, tenant: &str) -> usize {
        self.share_of(tenant, self.weight(tenant))
    }

    /// [`Intake::share`], for `tenant` weighing `weight`.
    fn share_of(&self, tenant: &str, weight: u32) -> usize {
        let mut others: Vec<&str> =
            self.held.iter().map(|held| held.tenant.as_str()).filter(|other| *other != tenant).collect();
        others.sort_unstable();
        others.dedup();
        let weight = u64::from(weight.max(1));
        let total: u64 = weight + others.iter().map(|other| u64::from(self.weight(other))).sum::<u64>();
        let slots = self.limits.slots.max(1) as u64;
        (slots * weight).div_ceil(total).max(1) as usize
    }

    /// A received message of `tenant`, whose share weighs `weight` (at least 1), at `now`.
    pub fn offer(&mut self, arrival: Arrival<'_>, item: T, now: Instant) -> Offer<T> {
        let Arrival { tenant, weight, priority, born, pinned } = arrival;
        let held = Held { tenant: tenant.to_owned(), weight: weight.max(1), priority, born, pinned, item };
        if pinned {
            self.held.push(held);
            return Offer::Held;
        }
        let level = effective(priority, born, now);
        let level_of = |held: &Held<T>| effective(held.priority, held.born, now);
        let of_tenant = self.held.iter().filter(|held| held.tenant == tenant).count();
        // A tenant may have its share running or held, and one more held: its next in line, the
        // oldest of its jobs the runner has seen, so its jobs start in their order however the
        // reading ahead finds them.
        if self.limits.fair && level < 2 && self.running(tenant) + of_tenant > self.share_of(tenant, weight) {
            // The tenant's own order is kept: an older job of its takes the place of its newest
            // held one of no higher level, which goes back instead.
            let newer = (0..self.held.len())
                .filter(|&i| {
                    let other = &self.held[i];
                    other.tenant == tenant && !other.pinned && other.born > born && level_of(other) <= level
                })
                .max_by_key(|&i| self.held[i].born);
            return match newer {
                Some(i) => Offer::Defer(std::mem::replace(&mut self.held[i], held).item),
                None => Offer::Defer(held.item),
            };
        }
        let mut evicted = None;
        if self.room() == 0 {
            // Room for a higher (aged) priority: the lowest held, the newest among equals, goes
            // (never one delivered again).
            let lowest = (0..self.held.len())
                .filter(|&i| !self.held[i].pinned)
                .min_by_key(|&i| (level_of(&self.held[i]), std::cmp::Reverse(i)));
            match lowest {
                Some(i) if self.limits.fair && level_of(&self.held[i]) < level => {
                    evicted = Some(self.held.remove(i).item);
                }
                _ => return Offer::Defer(held.item),
            }
        }
        self.held.push(held);
        match evicted {
            Some(evicted) => Offer::Defer(evicted),
            None => Offer::Held,
        }
    }

    /// The held message to start now (its tenant's running count goes up), if any: with fair
    /// share, the highest (aged) priority, then the tenant with the fewest running jobs for its
    /// weight, then the longest held; without, the longest held.
    pub fn start_next(&mut self, now: Instant) -> Option<(String, T)> {
        if self.held.is_empty() {
            return None;
        }
        let index = match self.limits.fair {
            false => 0,
            true => (0..self.held.len())
                .min_by(|&a, &b| {
                    let (ha, hb) = (&self.held[a], &self.held[b]);
                    let (pa, pb) = (effective(ha.priority, ha.born, now), effective(hb.priority, hb.born, now));
                    // running / weight compared as fractions.
                    let (ta, tb) = (&ha.tenant, &hb.tenant);
                    let ra = self.running(ta) as u64 * u64::from(self.weight(tb));
                    let rb = self.running(tb) as u64 * u64::from(self.weight(ta));
                    pb.cmp(&pa).then(ra.cmp(&rb)).then(a.cmp(&b))
                })
                .expect("not empty"),
        };
        let Held { tenant, weight, item, .. } = self.held.remove(index);
        let running = self.running.entry(tenant.clone()).or_insert(Running { jobs: 0, weight });
        running.jobs += 1;
        running.weight = weight;
        Some((tenant, item))
    }

    /// A job of `tenant` started by [`Intake::start_next`] ended.
    pub fn finished(&mut self, tenant: &str) {
        if let Some(running) = self.running.get_mut(tenant) {
            running.jobs = running.jobs.saturating_sub(1);
            if running.jobs == 0 {
                self.running.remove(tenant);
            }
        }
    }

    /// Every held message, emptied (at shutdown: each goes back to the queue).
    pub fn drain(&mut self) -> Vec<T> {
        self.held.drain(..).map(|held| held.item).collect()
    }
}

/// At most `budget` deferred messages per `window`: past it, how long to wait before receiving
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanBudget {
    budget: usize,
    window: Duration,
    started: Option<Instant>,
    spent: usize,
}

impl ScanBudget {
    pub fn new(budget: usize, window: Duration) -> Self {
        Self { budget, window, started: None, spent: 0 }
    }

    /// `deferred` messages were deferred at `now`.
    pub fn spend(&mut self, deferred: usize, now: Instant) {
        if deferred == 0 {
            return;
        }
        match self.started {
            Some(started) if now < started + self.window => self.spent += deferred,
            _ => {
                self.started = Some(now);
                self.spent = deferred;
            }
        }
    }

    /// How long to wait before the next receive, from `now`: zero while budget is left.
    pub fn wait(&self, now: Instant) -> Duration {
        match self.started {
            Some(started) if self.spent >= self.budget => (started + self.window).saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers and starts at one instant, at normal priority (the tests of fair share).
    trait Plain {
        fn put(&mut self, tenant: &str, weight: u32, item: u32) -> Offer<u32>;
        fn next(&mut self) -> Option<(String, u32)>;
    }

    impl Plain for Intake<u32> {
        fn put(&mut self, tenant: &str, weight: u32, item: u32) -> Offer<u32> {
            let now = Instant::now();
            self.offer(Arrival { tenant, weight, priority: Priority::Normal, born: now, pinned: false }, item, now)
        }

        fn next(&mut self) -> Option<(String, u32)> {
            self.start_next(Instant::now())
        }
    }

    fn intake(slots: usize, hold: usize) -> Intake<u32> {
        Intake::new(IntakeLimits { slots, hold, fair: true })
    }

    #[test]
    fn a_tenant_alone_takes_every_slot_and_nothing_of_its_waits() {
        let mut intake = intake(4, 4);
        for n in 0..4 {
            assert_eq!(intake.put("a", 1, n), Offer::Held, "{n}");
        }
        assert_eq!(intake.put("a", 1, 4), Offer::Defer(4), "a fifth: the hold is full");
        let started: Vec<u32> = (0..4).map(|_| intake.next().unwrap().1).collect();
        assert_eq!(started, [0, 1, 2, 3], "in the order received");
        assert_eq!(intake.put("a", 1, 5), Offer::Held, "its share is running: one more, next in line");
        assert_eq!(intake.put("a", 1, 6), Offer::Defer(6), "past its share and its next in line");
        intake.finished("a");
        assert_eq!(intake.put("a", 1, 7), Offer::Held, "a slot freed");
    }

    #[test]
    fn a_second_tenant_is_held_past_the_first_ones_backlog_and_starts_first() {
        let mut intake = intake(4, 4);
        for n in 0..4 {
            intake.put("a", 1, n);
        }
        for _ in 0..4 {
            intake.next();
        }
        // a runs 4 of 4 slots and holds its next in line; the rest of its backlog is deferred,
        // b's job behind it held.
        assert_eq!(intake.put("a", 1, 10), Offer::Held);
        assert_eq!(intake.put("a", 1, 11), Offer::Defer(11));
        assert_eq!(intake.put("b", 1, 20), Offer::Held);
        assert_eq!(intake.share("a"), 2, "b waits: two slots each");
        assert_eq!(intake.put("b", 1, 21), Offer::Held, "b, waiting, may claim its two slots");
        intake.finished("a");
        assert_eq!(intake.next(), Some(("b".into(), 20)), "b before a's next in line, held longer");
        // a's messages are deferred while b waits and a has its share.
        intake.finished("a");
        assert_eq!(intake.put("a", 1, 12), Offer::Defer(12), "a runs 2 and holds 1 while b waits");
        assert_eq!(intake.next(), Some(("b".into(), 21)));
        // Nobody else waits: a may take every slot again as b's jobs end.
        assert_eq!(intake.share("a"), 4);
        assert_eq!(intake.put("a", 1, 13), Offer::Held, "a runs 2, b 2: held for the next free slot");
        intake.finished("b");
        assert_eq!(intake.next(), Some(("a".into(), 10)), "a's oldest first");
        assert_eq!(intake.put("a", 1, 14), Offer::Held, "a runs 3 and holds 1: its four");
        assert_eq!(intake.put("a", 1, 15), Offer::Defer(15), "and one more next in line is all");
    }

    #[test]
    fn slots_follow_the_weights() {
        let mut intake = intake(8, 64);
        assert_eq!(intake.put("a", 3, 0), Offer::Held);
        assert_eq!(intake.put("b", 1, 1), Offer::Held);
        assert_eq!((intake.share("a"), intake.share("b")), (6, 2));
        let mut offered = 2;
        for _ in 0..20 {
            intake.put("a", 3, offered);
            intake.put("b", 1, offered + 1);
            offered += 2;
        }
        // Each holds its share and its next in line.
        let started: Vec<String> = std::iter::from_fn(|| intake.next().map(|(tenant, _)| tenant)).collect();
        assert_eq!(started.iter().filter(|t| *t == "a").count(), 6 + 1, "{started:?}");
        assert_eq!(started.iter().filter(|t| *t == "b").count(), 2 + 1, "{started:?}");
    }

    #[test]
    fn the_longest_held_goes_first_among_equals_and_a_drain_empties_the_hold() {
        let mut intake = intake(4, 2);
        assert_eq!(intake.put("b", 1, 1), Offer::Held);
        assert_eq!(intake.put("a", 1, 2), Offer::Held);
        assert_eq!(intake.put("c", 1, 3), Offer::Defer(3), "the hold is full");
        assert_eq!(intake.next().unwrap().0, "b");
        assert_eq!(intake.drain(), vec![2]);
        assert_eq!(intake.room(), 2);
    }

    #[test]
    fn without_fair_share_everything_is_held_and_starts_in_order() {
        let mut intake = Intake::new(IntakeLimits { slots: 1, hold: 3, fair: false });
        for (tenant, n) in [("a", 1), ("a", 2), ("b", 3)] {
            assert_eq!(intake.put(tenant, 1, n), Offer::Held);
        }
        assert_eq!(intake.put("c", 1, 4), Offer::Defer(4), "only a full hold refuses");
        let order: Vec<u32> = std::iter::from_fn(|| intake.next().map(|(_, n)| n)).collect();
        assert_eq!(order, [1, 2, 3]);
    }

    #[test]
    fn a_higher_priority_starts_first_and_is_held_past_its_tenants_share() {
        let now = Instant::now();
        let mut intake = intake(2, 4);
        let arrival = |tenant, priority| Arrival { tenant, weight: 1, priority, born: now, pinned: false };
        intake.offer(arrival("a", Priority::Low), 1, now);
        intake.offer(arrival("b", Priority::Normal), 2, now);
        assert_eq!(intake.offer(arrival("a", Priority::High), 3, now), Offer::Held);
        assert_eq!(intake.start_next(now), Some(("a".into(), 3)), "high first");
        assert_eq!(intake.start_next(now), Some(("b".into(), 2)), "then normal");
        // a runs 1 of its share of 1 (b waits... b runs): a normal job of a's is over its share,
        // a high one is held anyway.
        intake.offer(arrival("b", Priority::Normal), 4, now);
        assert_eq!(intake.offer(arrival("a", Priority::Normal), 5, now), Offer::Defer(5));
        assert_eq!(intake.offer(arrival("a", Priority::High), 6, now), Offer::Held);
        assert_eq!(intake.start_next(now).map(|(_, n)| n), Some(6));
    }

    #[test]
    fn a_low_job_rises_with_its_age_and_a_full_hold_makes_room_for_it() {
        let now = Instant::now();
        let old = now - 2 * Priority::AGING;
        let mut intake = intake(1, 2);
        let arrival = |tenant, priority, born| Arrival { tenant, weight: 1, priority, born, pinned: false };
        intake.offer(arrival("a", Priority::Normal, now), 1, now);
        intake.offer(arrival("b", Priority::Normal, now), 2, now);
        // The hold is full of fresh normal jobs; a low job two agings old counts as high.
        assert_eq!(intake.offer(arrival("c", Priority::Low, old), 3, now), Offer::Defer(2), "the newest normal goes");
        assert_eq!(intake.start_next(now), Some(("c".into(), 3)));
        // A fresh low job finds no room and nothing lower to send back.
        assert_eq!(intake.offer(arrival("e", Priority::Normal, now), 5, now), Offer::Held);
        assert_eq!(intake.offer(arrival("d", Priority::Low, now), 4, now), Offer::Defer(4));
        assert_eq!(effective(Priority::Low, now - Priority::AGING, now), 1);
        assert_eq!(effective(Priority::High, old, now), 2, "no higher than high");
    }

    #[test]
    fn a_message_delivered_again_is_held_whatever_the_shares_and_the_room() {
        let now = Instant::now();
        let mut intake = intake(1, 1);
        intake.put("a", 1, 1);
        intake.next();
        assert_eq!(intake.put("a", 1, 2), Offer::Held, "a has its one slot: its next in line");
        assert_eq!(intake.put("a", 1, 5), Offer::Defer(5), "a has its one slot and its next");
        let again = Arrival { tenant: "a", weight: 1, priority: Priority::Low, born: now, pinned: true };
        assert_eq!(intake.offer(again, 3, now), Offer::Held, "maybe its own running job's message");
        assert_eq!(intake.offer(again, 4, now), Offer::Held, "past the hold's room too");
        assert_eq!(intake.held(), 3);
    }

    /// A runner reading ahead sees a tenant's jobs out of their order (what it sent back is at
    /// the end of the queue): it keeps the oldest it has seen, so one tenant's jobs still start
    /// about in the order they were submitted.
    #[test]
    fn a_tenants_older_job_takes_the_place_of_its_newer_held_one() {
        let now = Instant::now();
        let mut intake = intake(1, 2);
        let at = |age: u64, pinned| Arrival {
            tenant: "a",
            weight: 1,
            priority: Priority::Normal,
            born: now - Duration::from_secs(age),
            pinned,
        };
        assert_eq!(intake.offer(at(10, false), 10, now), Offer::Held);
        intake.start_next(now);
        assert_eq!(intake.offer(at(5, false), 5, now), Offer::Held, "its next in line");
        assert_eq!(intake.offer(at(3, false), 3, now), Offer::Defer(3), "newer: it goes back");
        assert_eq!(intake.offer(at(8, false), 8, now), Offer::Defer(5), "older: it stays, the newer goes back");
        assert_eq!(intake.offer(at(1, true), 1, now), Offer::Held, "delivered again");
        assert_eq!(intake.offer(at(9, false), 9, now), Offer::Defer(8), "never in a pinned one's place");
        assert_eq!(intake.held(), 2);
        // A job of a higher level than the held one is not swapped in by age (it is held by
        // its priority's own rules).
        let mut intake = intake_of(1, 1);
        intake.offer(at(2, false), 2, now);
        let high = Arrival { priority: Priority::High, ..at(1, true) };
        assert_eq!(intake.offer(Arrival { pinned: false, ..high }, 1, now), Offer::Defer(2), "room for the higher");
        assert_eq!(intake.offer(at(1, true), 7, now), Offer::Held);
        let mut full = intake_of(1, 1);
        full.offer(at(2, true), 2, now);
        assert_eq!(
            full.offer(Arrival { pinned: false, ..high }, 1, now),
            Offer::Defer(1),
            "a pinned one is never evicted"
        );
    }

    fn intake_of(slots: usize, hold: usize) -> Intake<u32> {
        intake(slots, hold)
    }

    #[test]
    fn deferrals_past_the_budget_wait_for_the_window_to_end() {
        let start = Instant::now();
        let mut scan = ScanBudget::new(20, Duration::from_secs(10));
        scan.spend(10, start);
        assert_eq!(scan.wait(start), Duration::ZERO);
        scan.spend(10, start + Duration::from_secs(2));
        assert_eq!(scan.wait(start + Duration::from_secs(3)), Duration::from_secs(7));
        // A new window.
        scan.spend(5, start + Duration::from_secs(11));
        assert_eq!(scan.wait(start + Duration::from_secs(11)), Duration::ZERO);
    }
}
