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

    /// Adds attempts in the order they happened.
    pub fn record(&mut self, records: impl IntoIterator<Item = DeliveryRecord>, now: Timestamp) {
        for mut record in records {
            if let Some(error) = &mut record.error {
                truncate_error(error);
            }
            match record.outcome {
                Outcome::Succeeded => {
                    self.stats.succeeded += 1;
                    self.stats.consecutive_failures = 0;
                    self.stats.last_success_time = Some(record.time.clone());
                    self.stats.failing_since = None;
                }
                Outcome::Retrying | Outcome::Failed => {
                    self.stats.consecutive_failures += 1;
                    self.stats.last_failure_time = Some(record.time.clone());
                    if self.stats.failing_since.is_none() {
                        self.stats.failing_since = Some(record.time.clone());
                    }
                    if record.outcome == Outcome::Failed {
                        self.stats.failed += 1;
                    }
                }
            }
            self.recent.push_front(record);
        }
        self.recent.truncate(RECENT_DELIVERIES);
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
