//! The decision for one delivery, whatever its source: given what the routing table says now
//! and where the delivery stands, what happens next. Pure (no clock, no I/O), so every case is
//! a unit test; [`super::engine`] carries the decision out and each source says how it waits.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::{AttemptReport, RouteCheck, Verdict};
use crate::crd::{TargetDelivery, TargetState};

/// What to do next with a delivery.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// It is final (succeeded, or failed for good): nothing more.
    Done,
    /// Never deliverable: fail it for `why`. `record`: also write an attempt record saying
    /// why (a failure no attempt shows, such as a hold past `--max-hold`), so that the
    /// Webhook's history, `recover` and the delivery search find it.
    Fail { why: String, record: bool },
    /// Held (the Webhook is paused, or blocked by something a person fixes): wait for its
    /// route to change, at most `at_most` (then the hold has lasted `--max-hold`), spending no
    /// attempt.
    Hold { why: String, at_most: Duration },
    /// This replica's routing table has not seen the Webhook as the router did: wait, or leave
    /// it to a replica that has.
    NotHere { why: String },
    /// The earlier deliveries of its ordering key are not final: wait for its turn.
    AwaitTurn,
    /// A retry is due in this long.
    RetryIn(Duration),
    /// Send attempt number `attempt` (1-based).
    Send { attempt: u32 },
}

/// Whether a delivery's state is final.
pub fn is_final(state: TargetState) -> bool {
    matches!(state, TargetState::Succeeded | TargetState::Failed)
}

/// The next step of the delivery standing at `target`, with the routing table saying `check`
/// at `now`. `in_turn`: its ordering key lets it go (true without an ordering). `max_hold` is
/// `--max-hold`.
///
/// A retry's wait comes before the route check (the Webhook may have changed meanwhile); the
/// key's turn before everything (a later event of the key never overtakes an earlier one, not
/// even to fail).
pub fn decide(
    check: &RouteCheck,
    target: &TargetDelivery,
    in_turn: bool,
    now: Timestamp,
    max_hold: Duration,
) -> Step {
    if is_final(target.state) {
        return Step::Done;
    }
    if !in_turn {
        return Step::AwaitTurn;
    }
    if let Some(next) = &target.next_attempt_time
        && next.0 > now
    {
        return Step::RetryIn(next.0.duration_since(now).unsigned_abs());
    }
    match check {
        RouteCheck::Gone(why) => Step::Fail {
            why: why.clone(),
            record: false,
        },
        RouteCheck::NotSeenYet(why) => Step::NotHere { why: why.clone() },
        RouteCheck::Hold { why, .. } => {
            let since = target.held_since.as_ref().map_or(now, |t| t.0);
            let held_for = now.duration_since(since).unsigned_abs();
            if held_for >= max_hold {
                Step::Fail {
                    why: held_too_long(held_for, max_hold, why),
                    record: true,
                }
            } else {
                Step::Hold {
                    why: why.clone(),
                    at_most: max_hold - held_for,
                }
            }
        }
        RouteCheck::Deliver(_) => Step::Send {
            attempt: target.attempts.max(0) as u32 + 1,
        },
    }
}

/// Marks `target` held for `why` since `now` (kept if it was held already, so that a resumed
/// delivery keeps its deadline). True when that changed what the target says.
pub fn hold(target: &mut TargetDelivery, why: &str, now: Timestamp) -> bool {
    target.held_since.get_or_insert(Time(now));
    if target.state == TargetState::Held && target.error.as_deref() == Some(why) {
        return false;
    }
    target.state = TargetState::Held;
    target.error = Some(why.to_owned());
    target.next_attempt_time = None;
    true
}

/// Takes a held `target` off hold (its Webhook can be delivered to again). True when it was
/// held.
pub fn unhold(target: &mut TargetDelivery) -> bool {
    if target.state != TargetState::Held {
        return false;
    }
    target.state = TargetState::Pending;
    target.error = None;
    target.held_since = None;
    true
}

/// Fails `target` for good for `why`.
pub fn fail(target: &mut TargetDelivery, why: String) {
    target.state = TargetState::Failed;
    target.next_attempt_time = None;
    target.error = Some(why);
}

/// Records in `target` how attempt number `attempt` ended (at `now`): final, or a retry due
/// after the retry policy's delay.
pub fn record(target: &mut TargetDelivery, attempt: u32, result: &AttemptReport, now: Timestamp) {
    target.attempts = attempt as i32;
    target.http_status = result.http_status;
    target.last_attempt_time = Some(result.time.clone());
    target.error = result.error.clone();
    match result.verdict {
        Verdict::Succeeded => {
            target.state = TargetState::Succeeded;
            target.next_attempt_time = None;
        }
        Verdict::Retry(after) => {
            target.state = TargetState::Pending;
            target.next_attempt_time = Some(Time(now.checked_add(after).unwrap_or(now)));
        }
        Verdict::Failed | Verdict::Gone => {
            target.state = TargetState::Failed;
            target.next_attempt_time = None;
        }
    }
}

/// Why a delivery held for `held_for` failed (`--max-hold` is `max_hold`).
pub fn held_too_long(held_for: Duration, max_hold: Duration, why: &str) -> String {
    format!(
        "held for {} (the limit, --max-hold, is {}): {why}",
        humantime::format_duration(Duration::from_secs(held_for.as_secs())),
        humantime::format_duration(max_hold)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::routing::Route;

    const MAX_HOLD: Duration = Duration::from_secs(3600);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).unwrap()
    }

    fn target() -> TargetDelivery {
        TargetDelivery::new("hook".into(), "msg_1".into(), TargetState::Pending)
    }

    fn deliver() -> RouteCheck {
        RouteCheck::Deliver(Arc::new(Route::for_tests(
            "docs",
            "hook",
            "http://127.0.0.1:9/",
        )))
    }

    fn held(why: &str) -> RouteCheck {
        RouteCheck::Hold {
            route: Arc::new(Route::for_tests("docs", "hook", "http://127.0.0.1:9/")),
            why: why.into(),
        }
    }

    fn report(verdict: Verdict, status: Option<i32>) -> AttemptReport {
        AttemptReport {
            verdict,
            http_status: status,
            error: None,
            time: Time(at(0)),
            duration: Duration::from_millis(5),
        }
    }

    #[test]
    fn each_route_check_leads_to_its_step() {
        let gone = RouteCheck::Gone("webhook hook was deleted".into());
        let not_seen = RouteCheck::NotSeenYet("routed at version 7".into());
        let cases: [(&str, &RouteCheck, Step); 4] = [
            ("deliverable", &deliver(), Step::Send { attempt: 1 }),
            (
                "deleted",
                &gone,
                Step::Fail {
                    why: "webhook hook was deleted".into(),
                    record: false,
                },
            ),
            (
                "not seen here",
                &not_seen,
                Step::NotHere {
                    why: "routed at version 7".into(),
                },
            ),
            (
                "paused",
                &held("paused"),
                Step::Hold {
                    why: "paused".into(),
                    at_most: MAX_HOLD,
                },
            ),
        ];
        for (case, check, want) in cases {
            assert_eq!(
                decide(check, &target(), true, at(0), MAX_HOLD),
                want,
                "{case}"
            );
        }
    }

    #[test]
    fn a_final_delivery_is_done_whatever_the_route_says() {
        for state in [TargetState::Succeeded, TargetState::Failed] {
            let mut t = target();
            t.state = state;
            for check in [deliver(), held("paused"), RouteCheck::Gone("x".into())] {
                assert_eq!(decide(&check, &t, false, at(0), MAX_HOLD), Step::Done);
            }
        }
    }

    #[test]
    fn the_keys_turn_comes_before_everything_else() {
        let mut t = target();
        t.next_attempt_time = Some(Time(at(60)));
        let gone = RouteCheck::Gone("deleted".into());
        assert_eq!(decide(&gone, &t, false, at(0), MAX_HOLD), Step::AwaitTurn);
    }

    #[test]
    fn a_retry_waits_for_its_time_then_checks_the_route() {
        let mut t = target();
        t.attempts = 2;
        t.next_attempt_time = Some(Time(at(30)));
        let gone = RouteCheck::Gone("deleted".into());
        assert_eq!(
            decide(&gone, &t, true, at(10), MAX_HOLD),
            Step::RetryIn(Duration::from_secs(20))
        );
        assert_eq!(
            decide(&deliver(), &t, true, at(30), MAX_HOLD),
            Step::Send { attempt: 3 }
        );
    }

    #[test]
    fn a_hold_keeps_its_deadline_and_fails_recorded_once_it_has_lasted_max_hold() {
        let mut t = target();
        assert!(hold(&mut t, "paused", at(0)));
        assert!(
            !hold(&mut t, "paused", at(100)),
            "the same hold changes nothing"
        );
        assert_eq!(t.held_since, Some(Time(at(0))));
        assert_eq!(
            decide(&held("paused"), &t, true, at(600), MAX_HOLD),
            Step::Hold {
                why: "paused".into(),
                at_most: MAX_HOLD - Duration::from_secs(600)
            }
        );
        let Step::Fail { why, record } = decide(&held("paused"), &t, true, at(3600), MAX_HOLD)
        else {
            panic!("a hold of --max-hold fails");
        };
        assert!(record, "a failure no attempt shows is recorded");
        assert_eq!(why, "held for 1h (the limit, --max-hold, is 1h): paused");
        assert!(
            hold(&mut t, "secret missing", at(3700)),
            "a new reason is news"
        );
        assert!(unhold(&mut t));
        assert_eq!(
            (t.state, t.held_since, t.error),
            (TargetState::Pending, None, None)
        );
    }

    #[test]
    fn an_attempt_is_recorded_as_final_or_as_a_retry_due_later() {
        let mut t = target();
        record(
            &mut t,
            1,
            &report(Verdict::Retry(Duration::from_secs(5)), Some(503)),
            at(0),
        );
        assert_eq!(t.state, TargetState::Pending);
        assert_eq!((t.attempts, t.http_status), (1, Some(503)));
        assert_eq!(t.next_attempt_time, Some(Time(at(5))));
        assert_eq!(
            decide(&deliver(), &t, true, at(1), MAX_HOLD),
            Step::RetryIn(Duration::from_secs(4))
        );
        record(&mut t, 2, &report(Verdict::Succeeded, Some(200)), at(5));
        assert_eq!(
            (t.state, t.next_attempt_time.clone()),
            (TargetState::Succeeded, None)
        );
        assert_eq!(decide(&deliver(), &t, true, at(6), MAX_HOLD), Step::Done);
        for verdict in [Verdict::Failed, Verdict::Gone] {
            let mut t = target();
            record(&mut t, 1, &report(verdict, Some(410)), at(0));
            assert_eq!(t.state, TargetState::Failed);
        }
    }
}
