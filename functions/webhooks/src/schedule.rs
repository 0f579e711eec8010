//! When to try a webhook again: exponential backoff with jitter, spanning hours, pure.
//!
//! Attempts are numbered from 1 (the first delivery). The delay before attempt `n ≥ 2` grows
//! from `base` by doubling, up to `cap`; jitter spreads the retries of many messages that
//! failed together (a receiver that was down) so they do not all come back at once. Every
//! delay is a function of the attempt number and a per-message seed, so a stateless consumer
//! (a Lambda reading the attempt count off the queue message) gets the same schedule on every
//! invocation without storing the previous delay.

use crate::Outcome;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// The longest delay a schedule may have: SQS's longest visibility timeout, so any delay can
/// be expressed as one message's visibility.
pub const MAX_DELAY: Duration = Duration::from_secs(12 * 60 * 60);

/// How each delay is drawn from its exponential ceiling `min(cap, base × 2^(n-2))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]` (AWS's "full jitter"). Spreads retries the most, but a delay
    /// can be close to zero and the expected span is half the ceilings'.
    Full,
    /// Uniform in `[ceiling / 2, ceiling]` ("equal jitter"): still spread, and the schedule's
    /// span stays within a factor of two of the ceilings' sum, which is what a tenant is told.
    Equal,
    /// `min(cap, uniform(base, 3 × previous))` (AWS's "decorrelated jitter"), the chain drawn
    /// from the message's seed. Wanders: the span of one schedule varies widely.
    Decorrelated,
}

/// The retry schedule: `(base, cap, max_attempts)` and the jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    base: Duration,
    cap: Duration,
    max_attempts: u32,
    jitter: Jitter,
}

/// What the consumer should do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Delivered; nothing more to do.
    Done,
    /// Try again after this delay.
    RetryIn(Duration),
    /// The receiver (or the guard) refused the message for good: do not retry.
    GiveUp,
    /// It might have succeeded later, but this was the last attempt the schedule allows.
    Exhausted,
}

/// A schedule that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the base delay must be positive")]
    ZeroBase,
    #[error("the cap ({cap:?}) must be at least the base delay ({base:?})")]
    CapBelowBase { base: Duration, cap: Duration },
    #[error("the cap ({0:?}) exceeds the longest delay, {MAX_DELAY:?}")]
    CapTooLong(Duration),
    #[error("a schedule allows at least one attempt")]
    NoAttempts,
}

impl Default for RetrySchedule {
    /// 30 s doubling to a 6 h cap, 14 attempts, equal jitter: the 13 delays' ceilings sum to
    /// about 26.5 h, so the last attempt comes between about 13 h and 26.5 h after the first
    /// (about 20 h typically). With a 2 h cap, 14 attempts would span at most about 12 h.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(30),
            cap: Duration::from_secs(6 * 60 * 60),
            max_attempts: 14,
            jitter: Jitter::Equal,
        }
    }
}

impl RetrySchedule {
    /// A schedule whose delays start near `base`, double up to `cap` (at most [`MAX_DELAY`]),
    /// and which allows `max_attempts` attempts in all, the first included.
    pub fn new(base: Duration, cap: Duration, max_attempts: u32, jitter: Jitter) -> Result<Self, ScheduleError> {
        if base.is_zero() {
            return Err(ScheduleError::ZeroBase);
        }
        if cap < base {
            return Err(ScheduleError::CapBelowBase { base, cap });
        }
        if cap > MAX_DELAY {
            return Err(ScheduleError::CapTooLong(cap));
        }
        if max_attempts == 0 {
            return Err(ScheduleError::NoAttempts);
        }
        Ok(Self { base, cap, max_attempts, jitter })
    }

    /// The first delay's ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// How many attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The jitter.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// Whether attempt number `attempt` (from 1), having failed in a way worth retrying, may
    /// be followed by another.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The exponential ceiling of the delay before attempt `attempt`: zero for the first,
    /// then `min(cap, base × 2^(attempt-2))`; never decreasing.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let doublings = attempt - 2;
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.cap, |delay| delay.min(self.cap))
    }

    /// The delay before attempt `attempt` (from 1; zero for the first) of the message whose
    /// jitter seed is `seed` (see [`jitter_seed`]). The same arguments give the same delay.
    /// Never more than `cap`.
    pub fn delay_before(&self, attempt: u32, seed: u64) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        match self.jitter {
            Jitter::Full => uniform(&mut attempt_rng(seed, attempt), Duration::ZERO, self.ceiling(attempt)),
            Jitter::Equal => {
                let ceiling = self.ceiling(attempt);
                uniform(&mut attempt_rng(seed, attempt), ceiling / 2, ceiling)
            }
            Jitter::Decorrelated => {
                // The chain is replayed from the seed: cheap for a few dozen attempts, and it
                // keeps the function pure.
                let mut rng = StdRng::seed_from_u64(seed);
                let mut delay = self.base;
                for _ in 2..=attempt {
                    let upper = delay.saturating_mul(3).max(self.base);
                    delay = uniform(&mut rng, self.base, upper).min(self.cap);
                }
                delay
            }
        }
    }

    /// What to do after attempt number `attempt` (from 1) ended with `outcome`. A receiver's
    /// `Retry-After` is a lower bound on the delay, still capped at `cap`.
    pub fn next_step(&self, attempt: u32, outcome: &Outcome, seed: u64) -> NextStep {
        match outcome {
            Outcome::Delivered => NextStep::Done,
            Outcome::GiveUp => NextStep::GiveUp,
            Outcome::Retry { .. } if !self.should_retry(attempt) => NextStep::Exhausted,
            Outcome::Retry { after } => {
                let scheduled = self.delay_before(attempt.saturating_add(1), seed);
                NextStep::RetryIn(scheduled.max(after.unwrap_or_default()).min(self.cap))
            }
        }
    }
}

/// A jitter seed derived from a message id: stable for one message, different between them.
pub fn jitter_seed(message_id: &str) -> u64 {
    let digest = Sha256::digest(message_id.as_bytes());
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// An RNG for one attempt of one message, independent of the other attempts'.
fn attempt_rng(seed: u64, attempt: u32) -> StdRng {
    // Odd multiplier (2^64 / φ) so consecutive attempts land far apart in seed space.
    StdRng::seed_from_u64(seed ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Uniform in `[low, high]`, at millisecond resolution.
fn uniform(rng: &mut StdRng, low: Duration, high: Duration) -> Duration {
    let (low, high) = (millis(low), millis(high));
    if high <= low {
        return Duration::from_millis(low);
    }
    Duration::from_millis(rng.random_range(low..=high))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const SEEDS: std::ops::Range<u64> = 0..2_000;

    fn schedule(jitter: Jitter) -> RetrySchedule {
        RetrySchedule { jitter, ..RetrySchedule::default() }
    }

    fn total(schedule: &RetrySchedule, seed: u64) -> Duration {
        (2..=schedule.max_attempts()).map(|attempt| schedule.delay_before(attempt, seed)).sum()
    }

    #[test]
    fn ceilings_double_from_the_base_and_stop_at_the_cap() {
        let schedule = RetrySchedule::default();
        let secs = |attempt| schedule.ceiling(attempt).as_secs();
        assert_eq!((secs(0), secs(1), secs(2), secs(3), secs(4), secs(11)), (0, 0, 30, 60, 120, 15_360));
        assert_eq!(schedule.ceiling(12), 6 * HOUR);
        assert_eq!(schedule.ceiling(u32::MAX), 6 * HOUR);
        for attempt in 1..200 {
            assert!(schedule.ceiling(attempt) <= schedule.ceiling(attempt + 1), "attempt {attempt}");
            assert!(schedule.ceiling(attempt) <= schedule.cap());
        }
    }

    #[test]
    fn every_jitter_keeps_each_delay_within_its_range() {
        for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
            let schedule = schedule(jitter);
            for seed in SEEDS {
                assert_eq!(schedule.delay_before(1, seed), Duration::ZERO);
                for attempt in 2..=40 {
                    let delay = schedule.delay_before(attempt, seed);
                    let ceiling = schedule.ceiling(attempt);
                    let (low, high) = match jitter {
                        Jitter::Full => (Duration::ZERO, ceiling),
                        Jitter::Equal => (ceiling / 2, ceiling),
                        Jitter::Decorrelated => (schedule.base(), schedule.cap()),
                    };
                    assert!(low <= delay && delay <= high, "{jitter:?} seed {seed} attempt {attempt}: {delay:?}");
                }
            }
        }
    }

    #[test]
    fn decorrelated_delays_stay_within_three_times_the_previous_one() {
        let schedule = schedule(Jitter::Decorrelated);
        for seed in SEEDS {
            let mut previous = schedule.base();
            for attempt in 2..=30 {
                let delay = schedule.delay_before(attempt, seed);
                assert!(delay <= (previous * 3).min(schedule.cap()), "seed {seed} attempt {attempt}");
                previous = delay;
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays_and_seeds_spread_them() {
        for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
            let schedule = schedule(jitter);
            assert_eq!(schedule.delay_before(5, 42), schedule.delay_before(5, 42));
            let distinct: std::collections::BTreeSet<_> = SEEDS.map(|seed| schedule.delay_before(5, seed)).collect();
            assert!(distinct.len() > 100, "{jitter:?}: only {} distinct delays", distinct.len());
        }
        assert_eq!(jitter_seed("msg_1"), jitter_seed("msg_1"));
        assert_ne!(jitter_seed("msg_1"), jitter_seed("msg_2"));
    }

    #[test]
    fn the_default_schedule_spans_most_of_a_day() {
        let schedule = RetrySchedule::default();
        let ceilings: Duration = (2..=schedule.max_attempts()).map(|attempt| schedule.ceiling(attempt)).sum();
        assert!(ceilings > 26 * HOUR && ceilings < 27 * HOUR, "{ceilings:?}");
        for seed in SEEDS {
            let span = total(&schedule, seed);
            assert!(span >= ceilings / 2 && span <= ceilings, "seed {seed}: {span:?}");
        }
        let mean = SEEDS.map(|seed| total(&schedule, seed)).sum::<Duration>() / SEEDS.count() as u32;
        assert!(mean > 18 * HOUR && mean < 22 * HOUR, "{mean:?}");
    }

    #[test]
    fn retries_until_the_last_attempt() {
        let schedule = RetrySchedule::new(Duration::from_secs(1), Duration::from_secs(10), 3, Jitter::Full).unwrap();
        assert!(schedule.should_retry(1));
        assert!(schedule.should_retry(2));
        assert!(!schedule.should_retry(3));
        let retry = Outcome::Retry { after: None };
        assert!(
            matches!(schedule.next_step(2, &retry, 7), NextStep::RetryIn(delay) if delay <= Duration::from_secs(2))
        );
        assert_eq!(schedule.next_step(3, &retry, 7), NextStep::Exhausted);
        assert_eq!(schedule.next_step(1, &Outcome::Delivered, 7), NextStep::Done);
        assert_eq!(schedule.next_step(1, &Outcome::GiveUp, 7), NextStep::GiveUp);
    }

    #[test]
    fn retry_after_is_a_lower_bound_within_the_cap() {
        let schedule = RetrySchedule::new(Duration::from_secs(1), Duration::from_secs(600), 5, Jitter::Equal).unwrap();
        let after = |secs| Outcome::Retry { after: Some(Duration::from_secs(secs)) };
        assert_eq!(schedule.next_step(1, &after(120), 3), NextStep::RetryIn(Duration::from_secs(120)));
        assert_eq!(schedule.next_step(1, &after(86_400), 3), NextStep::RetryIn(Duration::from_secs(600)));
        // A short Retry-After does not shorten the schedule's own delay (4 s to 8 s here).
        let scheduled = schedule.delay_before(5, 3);
        assert!(scheduled >= Duration::from_secs(4), "{scheduled:?}");
        assert_eq!(schedule.next_step(4, &after(0), 3), NextStep::RetryIn(scheduled));
    }

    #[test]
    fn refuses_schedules_that_cannot_work() {
        let s = Duration::from_secs;
        assert_eq!(RetrySchedule::new(Duration::ZERO, s(10), 3, Jitter::Full), Err(ScheduleError::ZeroBase));
        assert_eq!(
            RetrySchedule::new(s(10), s(5), 3, Jitter::Full),
            Err(ScheduleError::CapBelowBase { base: s(10), cap: s(5) })
        );
        assert_eq!(
            RetrySchedule::new(s(10), s(13 * 3600), 3, Jitter::Full),
            Err(ScheduleError::CapTooLong(s(13 * 3600)))
        );
        assert_eq!(RetrySchedule::new(s(10), s(60), 0, Jitter::Full), Err(ScheduleError::NoAttempts));
        assert!(RetrySchedule::new(s(10), MAX_DELAY, 1, Jitter::Equal).is_ok());
    }
}
