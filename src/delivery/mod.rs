//! Delivery: the wire contract (payload, signatures, headers), the egress guard, the retry
//! policy, and the HTTP client that sends attempts.

mod client;
mod dispatcher;
mod egress;
mod engine;
pub mod history;
mod in_flight;
pub mod jetstream;
mod limits;
pub mod ordering;
mod rate_limit;
pub mod records;
mod retry;
mod source;

pub use client::{AddressMap, Attempt, HttpSender, TestNames, USER_AGENT};
pub use dispatcher::{
    AttemptReport, Attempted, Delivery, Dispatcher, DispatcherConfig, GoneNotice, RouteCheck,
    Slots, delivery_id,
};
pub use egress::{EgressDenied, EgressPolicy, redact_url, special_range};
use engine::held_too_long;
pub use engine::{
    FirstAttempt, Report, Unrecorded, attempt_first, deliver, deliver_unrecorded, is_final,
    new_target,
};
pub use in_flight::{InFlight, InFlightGuard};
pub use limits::KeyedLimits;
pub use ordering::{Sequencer, Ticket};
pub use retry::{AttemptResult, RetryPolicy, Verdict, parse_retry_after};
pub use source::Source;
