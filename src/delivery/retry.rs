//! What an attempt's result means, and when the next attempt goes out. Pure.

use std::time::Duration;

use crate::crd::DeliveryPolicy;

/// How one attempt ended, as the HTTP client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// The endpoint answered with this status; `retry_after` from a `Retry-After` header.
    Status {
        code: u16,
        retry_after: Option<Duration>,
        /// The start of a non-2xx answer's body, as one line of text, for the attempt's record
        /// (receivers explain their refusals there). Never parsed.
        excerpt: Option<String>,
    },
    /// No answer: connect error, timeout, refused by the egress guard, ...
    Error { message: String, permanent: bool },
}

/// The verdict on a delivery after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    /// Try again after this delay.
    Retry(Duration),
    /// Stop: attempts exhausted or a permanent error.
    Failed,
    /// 410 Gone: stop, and stop delivering to this webhook.
    Gone,
}

/// The shortest wait a `Retry-After` answer can ask for.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Exponential backoff with jitter from a Webhook's `delivery` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl From<&DeliveryPolicy> for RetryPolicy {
    fn from(p: &DeliveryPolicy) -> Self {
        Self {
            max_attempts: p.max_attempts.max(1) as u32,
            initial_backoff: Duration::from_secs(p.initial_backoff_seconds.max(1) as u64),
            max_backoff: Duration::from_secs(p.max_backoff_seconds.max(1) as u64),
        }
    }
}

impl RetryPolicy {
    /// The verdict after attempt number `attempt` (1-based) ended with `result`. `jitter` in
    /// [0, 1) picks the point in the jitter window (pass a random number; tests pass fixed ones).
    pub fn verdict(&self, attempt: u32, result: &AttemptResult, jitter: f64) -> Verdict {
        let retry_after = match result {
            AttemptResult::Status { code, .. } if (200..300).contains(code) => {
                return Verdict::Succeeded;
            }
            AttemptResult::Status { code: 410, .. } => return Verdict::Gone,
            AttemptResult::Status {
                code: 429 | 503,
                retry_after,
                ..
            } => *retry_after,
            AttemptResult::Error {
                permanent: true, ..
            } => return Verdict::Failed,
            _ => None,
        };
        if attempt >= self.max_attempts {
            return Verdict::Failed;
        }
        let delay = match retry_after {
            // Honoured, but never sooner than a second (`Retry-After: 0` or a past date would
            // spend every attempt at once) nor beyond the Webhook's own maximum backoff.
            Some(after) => after.max(MIN_RETRY_AFTER).min(self.max_backoff),
            None => self.backoff(attempt, jitter),
        };
        Verdict::Retry(delay)
    }

    /// The exponential step (`initialBackoffSeconds`, doubling) plus up to half of it at random
    /// on top, never more than `maxBackoffSeconds`. The jitter goes on top, so no retry comes
    /// before its step (the first never before `initialBackoffSeconds`); until the cap each
    /// window [step, 1.5 step] ends before the next begins, so gaps grow and concurrent retries
    /// spread out.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let step = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(31)));
        (step + step.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)).min(self.max_backoff)
    }
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(10),
        }
    }

    fn status(code: u16) -> AttemptResult {
        AttemptResult::Status {
            code,
            retry_after: None,
            excerpt: None,
        }
    }

    #[test]
    fn any_2xx_succeeds() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(policy().verdict(1, &status(code), 0.5), Verdict::Succeeded);
        }
    }

    #[test]
    fn failures_and_redirects_retry_until_attempts_run_out() {
        for code in [301, 302, 400, 404, 500, 502] {
            assert!(
                matches!(policy().verdict(1, &status(code), 0.5), Verdict::Retry(_)),
                "{code}"
            );
            assert_eq!(
                policy().verdict(5, &status(code), 0.5),
                Verdict::Failed,
                "{code}"
            );
        }
        let timeout = AttemptResult::Error {
            message: "timed out".into(),
            permanent: false,
        };
        assert!(matches!(
            policy().verdict(4, &timeout, 0.5),
            Verdict::Retry(_)
        ));
        let blocked = AttemptResult::Error {
            message: "egress".into(),
            permanent: true,
        };
        assert_eq!(policy().verdict(1, &blocked, 0.5), Verdict::Failed);
    }

    #[test]
    fn gone_stops_at_once() {
        assert_eq!(policy().verdict(1, &status(410), 0.5), Verdict::Gone);
    }

    #[test]
    fn backoff_doubles_with_jitter_on_top_and_is_capped() {
        let p = policy();
        // Attempt n waits within [step, 1.5 step], step = 2s * 2^(n-1), never beyond 10s.
        assert_eq!(p.backoff(1, 0.0), Duration::from_secs(2));
        assert_eq!(p.backoff(1, 1.0), Duration::from_secs(3));
        assert_eq!(p.backoff(2, 0.0), Duration::from_secs(4));
        assert_eq!(p.backoff(2, 1.0), Duration::from_secs(6));
        assert_eq!(p.backoff(3, 0.5), Duration::from_secs(10));
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(8));
        assert_eq!(p.backoff(4, 0.0), Duration::from_secs(10));
        assert_eq!(p.backoff(30, 1.0), Duration::from_secs(10));
        // The first retry never comes before initialBackoffSeconds, whatever the jitter.
        for j in [0.0, 0.25, 0.5, 0.999] {
            assert!(p.backoff(1, j) >= p.initial_backoff, "jitter {j}");
            assert!(p.backoff(40, j) <= p.max_backoff, "jitter {j}");
        }
        // Below the cap, whatever the jitter, a later gap is never shorter than an earlier one.
        for n in 1..3 {
            assert!(p.backoff(n + 1, 0.0) >= p.backoff(n, 0.999), "attempt {n}");
        }
    }

    #[test]
    fn retry_after_zero_or_in_the_past_waits_at_least_a_second() {
        let p = policy();
        for after in [Duration::ZERO, Duration::from_millis(10)] {
            let r = AttemptResult::Status {
                code: 503,
                retry_after: Some(after),
                excerpt: None,
            };
            assert_eq!(p.verdict(1, &r, 0.5), Verdict::Retry(MIN_RETRY_AFTER));
        }
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let past = parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now);
        assert_eq!(past, Some(Duration::ZERO));
        let r = AttemptResult::Status {
            code: 429,
            retry_after: past,
            excerpt: None,
        };
        assert_eq!(p.verdict(1, &r, 0.5), Verdict::Retry(MIN_RETRY_AFTER));
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = policy();
        let r = |secs| AttemptResult::Status {
            code: 429,
            retry_after: Some(Duration::from_secs(secs)),
            excerpt: None,
        };
        assert_eq!(
            p.verdict(1, &r(7), 0.5),
            Verdict::Retry(Duration::from_secs(7))
        );
        assert_eq!(
            p.verdict(1, &r(3600), 0.5),
            Verdict::Retry(Duration::from_secs(10))
        );
        let unavailable = AttemptResult::Status {
            code: 503,
            retry_after: Some(Duration::from_secs(4)),
            excerpt: None,
        };
        assert_eq!(
            p.verdict(2, &unavailable, 0.5),
            Verdict::Retry(Duration::from_secs(4))
        );
        // Retry-After on other codes is not a promise the endpoint made.
        let other = AttemptResult::Status {
            code: 500,
            retry_after: Some(Duration::from_secs(9)),
            excerpt: None,
        };
        assert_eq!(
            p.verdict(1, &other, 0.0),
            Verdict::Retry(Duration::from_secs(2))
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// Policies the API server accepts: 1..=86400 s each, max not below initial.
    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (1i32..=50, 1i32..=86_400)
            .prop_flat_map(|(attempts, initial)| (Just(attempts), Just(initial), initial..=86_400))
            .prop_map(
                |(max_attempts, initial_backoff_seconds, max_backoff_seconds)| {
                    RetryPolicy::from(&DeliveryPolicy {
                        max_attempts,
                        initial_backoff_seconds,
                        max_backoff_seconds,
                        ..DeliveryPolicy::default()
                    })
                },
            )
    }

    fn jitter() -> impl Strategy<Value = f64> {
        // rand::random::<f64>() is in [0, 1); both ends included here.
        prop_oneof![0.0..1.0f64, Just(0.0), Just(1.0)]
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(1024))]

        #[test]
        fn backoff_stays_in_its_jitter_window_between_floor_and_cap(
            p in policy(),
            attempt in 1u32..=60,
            j in jitter(),
        ) {
            let wait = p.backoff(attempt, j);
            prop_assert!(wait >= p.initial_backoff, "{:?} below the floor", wait);
            prop_assert!(wait <= p.max_backoff, "{:?} beyond the cap", wait);
            let step = p.initial_backoff.saturating_mul(2u32.saturating_pow((attempt - 1).min(31)));
            prop_assert!(wait >= step.min(p.max_backoff));
            prop_assert!(wait <= (step + step / 2).min(p.max_backoff));
        }

        #[test]
        fn backoff_never_shrinks_from_one_attempt_to_the_next_whatever_the_jitter(
            p in policy(),
            attempt in 1u32..=60,
            later in 1u32..=10,
            j1 in jitter(),
            j2 in jitter(),
        ) {
            let (a, b) = (p.backoff(attempt, j1), p.backoff(attempt + later, j2));
            prop_assert!(a <= b, "attempt {} waits {:?}, attempt {} only {:?}", attempt, a, attempt + later, b);
            // And within one attempt, more jitter never waits less.
            let (lo, hi) = if j1 <= j2 { (j1, j2) } else { (j2, j1) };
            prop_assert!(p.backoff(attempt, lo) <= p.backoff(attempt, hi));
        }

        #[test]
        fn retry_verdicts_wait_between_a_second_and_the_cap(
            p in policy(),
            attempt in 1u32..=60,
            code in 100u16..600,
            retry_after in proptest::option::of(0u64..1_000_000),
            j in jitter(),
        ) {
            let result = AttemptResult::Status { code, retry_after: retry_after.map(Duration::from_secs), excerpt: None };
            match p.verdict(attempt, &result, j) {
                Verdict::Retry(wait) => {
                    prop_assert!(attempt < p.max_attempts);
                    prop_assert!(wait >= MIN_RETRY_AFTER.min(p.initial_backoff));
                    prop_assert!(wait <= p.max_backoff);
                    if retry_after.is_none() || !matches!(code, 429 | 503) {
                        prop_assert_eq!(wait, p.backoff(attempt, j));
                    }
                }
                Verdict::Succeeded => prop_assert!((200..300).contains(&code)),
                Verdict::Gone => prop_assert_eq!(code, 410),
                Verdict::Failed => prop_assert!(attempt >= p.max_attempts),
            }
        }
    }
}
