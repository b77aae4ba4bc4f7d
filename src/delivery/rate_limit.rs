//! `spec.delivery.rateLimit`: one token bucket per Webhook in the delivering process.
//!
//! The bucket is kept as GCRA (the "virtual scheduling" form of a token bucket): one instant,
//! the theoretical arrival time of the next delivery. A delivery *reserves* its turn, and is
//! told when it may go; the caller waits until then before it asks for a delivery slot, so a
//! waiting delivery holds no slot and spends no attempt, and waiting deliveries go in the order
//! they asked. A reservation given up (the Webhook changed, the process stops) is simply lost:
//! fewer deliveries than the limit allows, never more.
//!
//! A delivery can be delayed between its turn and its send (slots, a new connection, a busy
//! CPU), and the one after it not: two sends would then come closer than the limit allows. So
//! the send itself is counted too, by a second bucket of the same limit, just before the
//! request goes out; it waits only for what such a delay took from the spacing.
//!
//! Where the limit holds across replicas: every delivery to a Webhook with a limit comes from
//! one process. Durable mode delivers on the leader only; direct ingest answers `not_leader`
//! on a standby; in jetstream mode the router publishes such deliveries to their own subject
//! (`hookrelay.serial.<namespace>.<webhook>`), consumed only by the leader
//! (`crate::delivery::jetstream`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{crd::RateLimit, keys::WebhookKey, routing::Route};

/// GCRA state of one Webhook's limit.
#[derive(Debug)]
struct Bucket {
    /// Time between deliveries at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained schedule a burst may run: `(burst - 1) * interval`.
    tolerance: Duration,
    /// When the next delivery would be due at the sustained rate.
    next: Instant,
}

impl Bucket {
    fn new(limit: RateLimit, now: Instant) -> Self {
        let interval = Duration::from_secs(1) / limit.per_second.max(1) as u32;
        Self {
            interval,
            tolerance: interval * (limit.burst.max(1) as u32 - 1),
            next: now,
        }
    }

    /// Takes the next turn: when it may go (`now` or later).
    fn reserve(&mut self, now: Instant) -> Instant {
        let at = self.earliest(now);
        self.next = self.next.max(now) + self.interval;
        at
    }

    /// When a delivery asking now would go, without taking the turn.
    fn earliest(&self, now: Instant) -> Instant {
        let next = self.next.max(now);
        next.checked_sub(self.tolerance).unwrap_or(now).max(now)
    }
}

/// Which limit of which Webhook a bucket counts: a change of the spec (a new generation) or a
/// namesake (a new uid) starts a fresh bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStamp {
    uid: String,
    generation: i64,
    limit: RateLimit,
}

impl LimitStamp {
    /// The limit of `route`, if it has one.
    pub fn of(route: &Route) -> Option<LimitStamp> {
        Some(LimitStamp {
            uid: route.uid.clone(),
            generation: route.generation,
            limit: route.delivery.rate_limit?,
        })
    }
}

/// The buckets of every rate-limited Webhook this process delivers to, pruned to the live ones.
#[derive(Default)]
pub struct RateLimits {
    buckets: Mutex<HashMap<WebhookKey, Buckets>>,
}

/// The turns given out and the sends made under one Webhook's limit.
struct Buckets {
    stamp: LimitStamp,
    turns: Bucket,
    sends: Bucket,
    /// Where the backlog told to come back later has got to: each one refused a turn takes the
    /// next place after the turns given out and the places given before it, one interval apart
    /// (no burst), so that it comes back about when its turn is due, not again and again.
    backlog: Bucket,
}

impl Buckets {
    fn new(stamp: &LimitStamp, now: Instant) -> Self {
        let mut backlog = Bucket::new(stamp.limit, now);
        backlog.tolerance = Duration::ZERO;
        Self {
            stamp: stamp.clone(),
            turns: Bucket::new(stamp.limit, now),
            sends: Bucket::new(stamp.limit, now),
            backlog,
        }
    }
}

impl RateLimits {
    /// Takes the next turn of `key` under `stamp`; when it may go. With `max_wait`, a turn
    /// further off is not taken: the error is how far off the caller's place in the backlog
    /// is, counting the others refused before it (the first refused is one turn away, the next
    /// one interval later, and so on), so that a caller that comes back then finds its turn
    /// near. A place not come back for is lost: the backlog comes back later than it could.
    pub fn reserve(
        &self,
        key: &WebhookKey,
        stamp: &LimitStamp,
        now: Instant,
        max_wait: Option<Duration>,
        live_count: usize,
        is_live: impl Fn(&WebhookKey) -> bool,
    ) -> Result<Instant, Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= 2 * live_count + 64 {
            // Reservations are instants held by their callers, not by the map: dropping the
            // bucket of a Webhook that is gone loses nothing.
            buckets.retain(|k, _| is_live(k));
        }
        let entry = buckets
            .entry(key.clone())
            .or_insert_with(|| Buckets::new(stamp, now));
        if entry.stamp != *stamp {
            *entry = Buckets::new(stamp, now);
        }
        let turn = entry.turns.earliest(now);
        if max_wait.is_some_and(|max| turn.duration_since(now) > max) {
            return Err(entry.backlog.reserve(turn).duration_since(now));
        }
        Ok(entry.turns.reserve(now))
    }

    /// Counts a send of `key` under `stamp` about to happen; when it may go (`now`, unless a
    /// delay after the delivery's turn brought it too close to the previous send).
    pub fn send(&self, key: &WebhookKey, stamp: &LimitStamp, now: Instant) -> Instant {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let entry = buckets
            .entry(key.clone())
            .or_insert_with(|| Buckets::new(stamp, now));
        if entry.stamp != *stamp {
            *entry = Buckets::new(stamp, now);
        }
        entry.sends.reserve(now)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: i32, burst: i32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    /// Turns taken by `n` deliveries asking at once, as offsets from `now`.
    fn turns(bucket: &mut Bucket, now: Instant, n: usize) -> Vec<Duration> {
        (0..n).map(|_| bucket.reserve(now) - now).collect()
    }

    #[test]
    fn a_burst_goes_at_once_and_the_rest_at_the_sustained_rate() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new(limit(20, 3), t0);
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            turns(&mut bucket, t0, 6),
            [ms(0), ms(0), ms(0), ms(50), ms(100), ms(150)]
        );
        // After a quiet spell the bucket is full again, never fuller.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(turns(&mut bucket, later, 4), [ms(0), ms(0), ms(0), ms(50)]);
    }

    #[test]
    fn no_one_second_window_holds_more_than_burst_plus_per_second() {
        for (per_second, burst) in [(20, 1), (20, 5), (1, 1), (7, 3), (1000, 50)] {
            let t0 = Instant::now();
            let mut bucket = Bucket::new(limit(per_second, burst), t0);
            // Deliveries asking at irregular times, some all at once.
            let mut at = Vec::new();
            for i in 0..(3 * per_second as u64 + 40) {
                let asked = t0 + Duration::from_millis((i * 37) % 900 + i * 3);
                at.push(bucket.reserve(asked.max(*at.last().unwrap_or(&t0))));
            }
            at.sort();
            for (i, start) in at.iter().enumerate() {
                let within = at[i..]
                    .iter()
                    .take_while(|t| **t < *start + Duration::from_secs(1))
                    .count();
                assert!(
                    within as i32 <= burst + per_second,
                    "{per_second}/s burst {burst}: {within} in one second"
                );
            }
        }
    }

    #[test]
    fn a_send_delayed_after_its_turn_pushes_the_next_send_back() {
        let limits = RateLimits::default();
        let key = WebhookKey::new("docs", "w");
        let stamp = LimitStamp {
            uid: "u".into(),
            generation: 1,
            limit: limit(20, 1),
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let live = |_: &WebhookKey| true;
        // Turns at 0 and 50 ms; the first is sent 30 ms late, the second on time.
        assert_eq!(limits.reserve(&key, &stamp, t0, None, 1, live), Ok(t0));
        assert_eq!(
            limits.reserve(&key, &stamp, t0, None, 1, live),
            Ok(t0 + ms(50))
        );
        assert_eq!(limits.send(&key, &stamp, t0 + ms(30)), t0 + ms(30));
        // The second waits until 50 ms after the first send, not 20.
        assert_eq!(limits.send(&key, &stamp, t0 + ms(50)), t0 + ms(80));
    }

    #[test]
    fn a_changed_limit_or_a_namesake_starts_a_fresh_bucket() {
        let limits = RateLimits::default();
        let key = WebhookKey::new("docs", "w");
        let stamp = |uid: &str, generation, per_second| LimitStamp {
            uid: uid.into(),
            generation,
            limit: limit(per_second, 1),
        };
        let t0 = Instant::now();
        let live = |_: &WebhookKey| true;
        let first = stamp("u1", 1, 1);
        let reserve = |stamp, max| limits.reserve(&key, stamp, t0, max, 1, live);
        assert_eq!(reserve(&first, None), Ok(t0));
        assert_eq!(reserve(&first, None), Ok(t0 + Duration::from_secs(1)));
        // A turn further off than the caller will wait is not taken.
        let three_s = Some(Duration::from_secs(3));
        assert_eq!(
            reserve(&first, Some(Duration::ZERO)),
            Err(Duration::from_secs(2))
        );
        assert_eq!(reserve(&first, three_s), Ok(t0 + Duration::from_secs(2)));
        assert_eq!(reserve(&first, three_s), Ok(t0 + Duration::from_secs(3)));
        assert_eq!(reserve(&first, three_s), Err(Duration::from_secs(4)));
        // The spec changed: the new limit starts with a full bucket.
        let changed = stamp("u1", 2, 10);
        assert_eq!(reserve(&changed, Some(Duration::ZERO)), Ok(t0));
        // So does a Webhook created again under the same name.
        let namesake = stamp("u2", 1, 10);
        assert_eq!(reserve(&namesake, None), Ok(t0));
    }

    #[test]
    fn buckets_of_webhooks_that_are_gone_are_pruned() {
        let limits = RateLimits::default();
        let stamp = LimitStamp {
            uid: "u".into(),
            generation: 1,
            limit: limit(5, 1),
        };
        let now = Instant::now();
        let live = WebhookKey::new("docs", "live");
        let _ = limits.reserve(&live, &stamp, now, None, 1, |_| true);
        for i in 0..10_000 {
            let key = WebhookKey::new("docs", &format!("gone-{i}"));
            let _ = limits.reserve(&key, &stamp, now, None, 1, |k| *k == live);
        }
        assert!(limits.len() <= 2 + 64, "{} buckets kept", limits.len());
        // The live Webhook kept its bucket, and so its place in the schedule.
        let next = limits.reserve(&live, &stamp, now, Some(Duration::ZERO), 1, |_| true);
        assert_eq!(next, Err(Duration::from_millis(200)));
    }

    /// A backlog of `n` asking at once at `per_second` (burst 1), each refused a turn further
    /// off than `max_wait` coming back `back_before` ahead of the place it was given: how many
    /// times each was refused.
    fn refusals(n: usize, per_second: i32, max_wait: Duration, back_before: Duration) -> Vec<u32> {
        let limits = RateLimits::default();
        let key = WebhookKey::new("docs", "w");
        let stamp = LimitStamp {
            uid: "u".into(),
            generation: 1,
            limit: limit(per_second, 1),
        };
        let t0 = Instant::now();
        let mut refused = vec![0; n];
        // (when it asks, which one), earliest first.
        let mut asking: std::collections::BTreeSet<(Instant, usize)> =
            (0..n).map(|i| (t0, i)).collect();
        while let Some((at, i)) = asking.pop_first() {
            if let Err(place) = limits.reserve(&key, &stamp, at, Some(max_wait), 1, |_| true) {
                refused[i] += 1;
                let back = place
                    .saturating_sub(back_before)
                    .max(Duration::from_secs(1));
                asking.insert((at + back, i));
            }
        }
        refused
    }

    #[test]
    fn a_backlog_refused_a_turn_is_refused_once() {
        // The first 5 s of turns are taken at once; every later one is refused once and given
        // a place at the rate, so that it comes back with its turn near.
        for (n, per_second) in [(5_000, 50), (300, 1), (2_000, 1_000)] {
            let refused = refusals(
                n,
                per_second,
                Duration::from_secs(5),
                Duration::from_millis(2_500),
            );
            let most = refused.iter().max().copied().unwrap_or(0);
            let total: u32 = refused.iter().sum();
            assert!(most <= 1, "{n} at {per_second}/s: one refused {most} times");
            let kept = 5 * per_second as usize + 1;
            assert_eq!(
                total as usize,
                n.saturating_sub(kept),
                "{n} at {per_second}/s"
            );
        }
        // Places follow the turns given out and each other, one interval apart.
        let limits = RateLimits::default();
        let key = WebhookKey::new("docs", "w");
        let stamp = LimitStamp {
            uid: "u".into(),
            generation: 1,
            limit: limit(1, 1),
        };
        let t0 = Instant::now();
        let three_s = Some(Duration::from_secs(3));
        let reserve = || limits.reserve(&key, &stamp, t0, three_s, 1, |_| true);
        let s = Duration::from_secs;
        let given: Vec<_> = (0..7).map(|_| reserve()).collect();
        assert_eq!(
            given,
            [
                Ok(t0),
                Ok(t0 + s(1)),
                Ok(t0 + s(2)),
                Ok(t0 + s(3)),
                Err(s(4)),
                Err(s(5)),
                Err(s(6))
            ]
        );
    }
}
