//! The delivery part of a Webhook's status: counters, the bounded history, and the `Degraded`
//! condition. Pure: records in, status out.

use std::collections::VecDeque;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::crd::{
    ConditionState, DeliveryRecord, DeliveryStats, Outcome, WebhookStatus, merge_condition,
};

/// Entries kept in `status.recentDeliveries`.
pub const RECENT_DELIVERIES: usize = 20;
/// Consecutive failed attempts that make a Webhook `Degraded`.
pub const DEGRADED_AFTER: i64 = 5;
/// Characters of an error kept in a record.
pub const MAX_ERROR_CHARS: usize = 256;

/// What the delivery engine has written of one Webhook's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryLog {
    pub stats: DeliveryStats,
    /// Newest first.
    pub recent: VecDeque<DeliveryRecord>,
    pub degraded: Option<Condition>,
}

impl DeliveryLog {
    /// Starts from what the Webhook's status already says, so counters survive restarts.
    pub fn from_status(status: Option<&WebhookStatus>) -> Self {
        let Some(status) = status else {
            return Self::default();
        };
        Self {
            stats: status.delivery_stats.clone(),
            recent: status
                .recent_deliveries
                .iter()
                .take(RECENT_DELIVERIES)
                .cloned()
                .collect(),
            degraded: status
                .conditions
                .iter()
                .find(|c| c.type_ == "Degraded")
                .cloned(),
        }
    }

    /// Adds attempt records. Records of several replicas (JetStream) may come out of order: a
    /// success older than a failure already recorded ends no failing streak, a failure older
    /// than the last success starts none, and the history stays newest first by time.
    pub fn record(&mut self, records: impl IntoIterator<Item = DeliveryRecord>, now: Timestamp) {
        for mut record in records {
            if let Some(error) = &mut record.error {
                truncate_error(error);
            }
            let at = record.time.0;
            let stats = &mut self.stats;
            match record.outcome {
                Outcome::Succeeded => {
                    stats.succeeded += 1;
                    if stats.last_failure_time.as_ref().is_none_or(|f| f.0 <= at) {
                        stats.consecutive_failures = 0;
                        stats.failing_since = None;
                    }
                    stats.last_success_time = latest(stats.last_success_time.take(), &record.time);
                }
                Outcome::Retrying | Outcome::Failed => {
                    if record.outcome == Outcome::Failed {
                        stats.failed += 1;
                    }
                    stats.last_failure_time = latest(stats.last_failure_time.take(), &record.time);
                    if stats.last_success_time.as_ref().is_none_or(|s| s.0 < at) {
                        stats.consecutive_failures += 1;
                        stats.failing_since = earliest(stats.failing_since.take(), &record.time);
                    }
                }
            }
            let newer = self.recent.iter().take_while(|r| r.time.0 > at).count();
            self.recent.insert(newer, record);
        }
        self.recent.truncate(RECENT_DELIVERIES);
        self.update_degraded(now);
    }

    /// Adds `pending` (a log started from nothing, of records newer than this log's, not
    /// written yet) as if its records had been recorded here: counters add up, the histories
    /// merge by time, and the failing streak goes on or ends as `pending` says. What waits to
    /// be written stays bounded however long the API server is away.
    pub fn absorb(&mut self, pending: DeliveryLog, now: Timestamp) {
        let p = pending.stats;
        let stats = &mut self.stats;
        stats.succeeded += p.succeeded;
        stats.failed += p.failed;
        if p.last_success_time.is_some() {
            // The streak, if any, is the one after pending's last success.
            stats.consecutive_failures = p.consecutive_failures;
            stats.failing_since = p.failing_since;
        } else if let Some(since) = &p.failing_since {
            stats.consecutive_failures += p.consecutive_failures;
            stats.failing_since = earliest(stats.failing_since.take(), since);
        }
        if let Some(t) = &p.last_success_time {
            stats.last_success_time = latest(stats.last_success_time.take(), t);
        }
        if let Some(t) = &p.last_failure_time {
            stats.last_failure_time = latest(stats.last_failure_time.take(), t);
        }
        let mut recent: Vec<DeliveryRecord> = pending.recent.into_iter().collect();
        recent.extend(self.recent.drain(..));
        // Stable: of two records at the same time, pending's (newer) stays first.
        recent.sort_by_key(|r| std::cmp::Reverse(r.time.0));
        recent.truncate(RECENT_DELIVERIES);
        self.recent = recent.into();
        self.update_degraded(now);
    }

    fn update_degraded(&mut self, now: Timestamp) {
        let failures = self.stats.consecutive_failures;
        let state = if failures >= DEGRADED_AFTER {
            let last = self.recent.front().and_then(|r| {
                r.error
                    .clone()
                    .or(r.http_status.map(|s| format!("HTTP {s}")))
            });
            ConditionState::new(
                "Degraded",
                true,
                "ConsecutiveFailures",
                format!(
                    "{failures} consecutive failed attempts; last: {}",
                    last.unwrap_or_default()
                ),
            )
        } else if self.degraded.is_none() && failures == 0 && self.stats.succeeded == 0 {
            return;
        } else {
            ConditionState::new(
                "Degraded",
                false,
                "DeliveriesSucceeding",
                "the latest attempts succeed or fail only occasionally",
            )
        };
        let mut conditions: Vec<Condition> = self.degraded.take().into_iter().collect();
        merge_condition(&mut conditions, &state, None, now);
        self.degraded = conditions.pop();
    }

    /// The status fields this log owns, for a server-side apply.
    pub fn to_status(&self) -> serde_json::Value {
        serde_json::json!({
            "deliveryStats": self.stats,
            "recentDeliveries": self.recent,
            "conditions": self.degraded.iter().collect::<Vec<_>>(),
        })
    }
}

fn latest(current: Option<Time>, t: &Time) -> Option<Time> {
    Some(current.filter(|c| c.0 >= t.0).unwrap_or_else(|| t.clone()))
}

fn earliest(current: Option<Time>, t: &Time) -> Option<Time> {
    Some(current.filter(|c| c.0 <= t.0).unwrap_or_else(|| t.clone()))
}

/// Shortens an attempt's error to `MAX_ERROR_CHARS` characters (marked with an ellipsis), as
/// kept in both resources' status.
pub fn truncate_error(s: &mut String) {
    if let Some((i, _)) = s.char_indices().nth(MAX_ERROR_CHARS) {
        s.truncate(i);
        s.push('…');
    }
}

/// A record's time.
pub fn now_time() -> Time {
    Time(Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(attempt: i32, outcome: Outcome, status: Option<i32>) -> DeliveryRecord {
        DeliveryRecord {
            id: "msg_1".into(),
            event: "document.completed".into(),
            source: "doc-1".into(),
            attempt,
            outcome,
            http_status: status,
            duration_ms: 5,
            time: Time(Timestamp::from_second(1000 + attempt as i64).unwrap()),
            error: None,
        }
    }

    #[test]
    fn counters_and_history_follow_the_attempts() {
        let mut log = DeliveryLog::default();
        let now = Timestamp::from_second(2000).unwrap();
        log.record(
            [
                record(1, Outcome::Retrying, Some(500)),
                record(2, Outcome::Retrying, Some(500)),
                record(3, Outcome::Succeeded, Some(200)),
            ],
            now,
        );
        assert_eq!(log.stats.succeeded, 1);
        assert_eq!(log.stats.failed, 0);
        assert_eq!(log.stats.consecutive_failures, 0);
        assert_eq!(
            log.recent.iter().map(|r| r.attempt).collect::<Vec<_>>(),
            [3, 2, 1],
            "newest first"
        );
        assert_eq!(
            log.stats.last_success_time,
            Some(Time(Timestamp::from_second(1003).unwrap()))
        );
    }

    #[test]
    fn failing_since_is_the_first_failure_after_a_success() {
        let mut log = DeliveryLog::default();
        let now = Timestamp::from_second(2000).unwrap();
        let at = |s| Some(Time(Timestamp::from_second(s).unwrap()));
        log.record(
            [
                record(1, Outcome::Retrying, Some(500)),
                record(2, Outcome::Retrying, Some(500)),
            ],
            now,
        );
        assert_eq!(log.stats.failing_since, at(1001));
        log.record([record(3, Outcome::Failed, Some(500))], now);
        assert_eq!(log.stats.failing_since, at(1001), "kept while failing");
        log.record([record(4, Outcome::Succeeded, Some(200))], now);
        assert_eq!(log.stats.failing_since, None);
        log.record([record(5, Outcome::Retrying, None)], now);
        assert_eq!(log.stats.failing_since, at(1005));
    }

    #[test]
    fn history_is_bounded_and_errors_truncated() {
        let mut log = DeliveryLog::default();
        let mut long = record(1, Outcome::Failed, None);
        long.error = Some("x".repeat(1000));
        log.record(
            std::iter::repeat_n(long, 50),
            Timestamp::from_second(5).unwrap(),
        );
        assert_eq!(log.recent.len(), RECENT_DELIVERIES);
        assert_eq!(log.stats.failed, 50);
        assert_eq!(
            log.recent[0].error.as_ref().unwrap().chars().count(),
            MAX_ERROR_CHARS + 1
        );
    }

    #[test]
    fn degraded_after_consecutive_failures_and_recovers() {
        let mut log = DeliveryLog::default();
        let t = |s| Timestamp::from_second(s).unwrap();
        log.record(
            (1..=4).map(|a| record(a, Outcome::Retrying, Some(503))),
            t(10),
        );
        assert_eq!(
            log.degraded.as_ref().map(|c| c.status.as_str()),
            Some("False")
        );
        log.record([record(5, Outcome::Retrying, Some(503))], t(20));
        let degraded = log.degraded.clone().unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ConsecutiveFailures")
        );
        assert!(
            degraded
                .message
                .contains("5 consecutive failed attempts; last: HTTP 503"),
            "{}",
            degraded.message
        );
        log.record([record(6, Outcome::Succeeded, Some(200))], t(30));
        let recovered = log.degraded.clone().unwrap();
        assert_eq!(recovered.status, "False");
        assert_eq!(recovered.last_transition_time, Time(t(30)));
    }

    /// Records of several replicas come out of order: a late failure must not move
    /// `failingSince` before the last success, nor a late success end a newer streak.
    #[test]
    fn records_out_of_order_keep_the_streak_and_the_history_in_time_order() {
        let now = Timestamp::from_second(2000).unwrap();
        let at = |s| Some(Time(Timestamp::from_second(s).unwrap()));
        let mut log = DeliveryLog::default();
        log.record([record(5, Outcome::Succeeded, Some(200))], now);
        // A failure from before that success arrives late.
        log.record([record(3, Outcome::Retrying, Some(500))], now);
        assert_eq!(log.stats.failing_since, None, "{:?}", log.stats);
        assert_eq!(log.stats.consecutive_failures, 0);
        log.record([record(7, Outcome::Retrying, Some(500))], now);
        assert_eq!(log.stats.failing_since, at(1007));
        // A success from before that failure arrives late: the streak goes on.
        log.record([record(6, Outcome::Succeeded, Some(200))], now);
        assert_eq!(log.stats.failing_since, at(1007));
        assert_eq!(log.stats.consecutive_failures, 1);
        assert_eq!(log.stats.last_success_time, at(1006));
        assert_eq!(
            log.recent.iter().map(|r| r.attempt).collect::<Vec<_>>(),
            [7, 6, 5, 3],
            "newest first by time"
        );
    }

    /// What waits to be written while the API server is away is a log of its own, bounded,
    /// and adds up with the stored status once that can be read.
    #[test]
    fn a_pending_log_adds_up_with_the_stored_one() {
        let now = Timestamp::from_second(5000).unwrap();
        let at = |s| Some(Time(Timestamp::from_second(s).unwrap()));
        let mut stored = DeliveryLog::default();
        stored.record(
            [
                record(1, Outcome::Succeeded, Some(200)),
                record(2, Outcome::Retrying, Some(500)),
            ],
            now,
        );
        // 1,000 records while the status could not be read: all failures.
        let mut pending = DeliveryLog::default();
        pending.record(
            (10..1010).map(|a| record(a, Outcome::Failed, Some(500))),
            now,
        );
        assert_eq!(pending.recent.len(), RECENT_DELIVERIES, "bounded");
        let mut failing = stored.clone();
        failing.absorb(pending.clone(), now);
        assert_eq!(failing.stats.failed, 1000);
        assert_eq!(failing.stats.succeeded, 1);
        assert_eq!(failing.stats.consecutive_failures, 1001);
        assert_eq!(failing.stats.failing_since, at(1002), "the streak goes on");
        assert_eq!(failing.recent.len(), RECENT_DELIVERIES);
        assert_eq!(failing.recent[0].attempt, 1009);
        // A success among the pending records ends the stored streak.
        pending.record([record(1010, Outcome::Succeeded, Some(200))], now);
        let mut recovered = stored;
        recovered.absorb(pending, now);
        assert_eq!(recovered.stats.consecutive_failures, 0);
        assert_eq!(recovered.stats.failing_since, None);
        assert_eq!(recovered.stats.succeeded, 2);
        assert_eq!(recovered.stats.last_success_time, at(2010));
    }

    #[test]
    fn seeded_from_an_existing_status() {
        let mut status = WebhookStatus::default();
        status.delivery_stats.succeeded = 41;
        status.recent_deliveries = vec![record(1, Outcome::Succeeded, Some(200))];
        let mut log = DeliveryLog::from_status(Some(&status));
        log.record(
            [record(2, Outcome::Succeeded, Some(204))],
            Timestamp::from_second(9).unwrap(),
        );
        assert_eq!(log.stats.succeeded, 42);
        assert_eq!(log.recent.len(), 2);
    }
}
