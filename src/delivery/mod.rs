//! Delivery: one engine for every source of deliveries ([`drive`], deciding each step with
//! [`decide`]), the dispatcher that sends attempts within their slots, the egress guard, the
//! retry policy, the HTTP client, and the sources that are not the API's: direct lines and
//! JetStream work items.

mod attempt;
mod client;
pub mod direct;
mod dispatcher;
mod egress;
mod engine;
pub mod history;
mod in_flight;
pub mod jetstream;
mod limits;
mod manual;
pub mod ordering;
mod rate_limit;
pub mod records;
mod retry;
mod source;

pub use attempt::{Step, decide, is_final};
pub use client::{AddressMap, Attempt, HttpSender, TestNames, USER_AGENT};
pub use dispatcher::{
    AttemptReport, Attempted, Delivery, Dispatcher, DispatcherConfig, GoneNotice, RouteCheck,
    Slots, delivery_id,
};
pub use egress::{EgressDenied, EgressPolicy, redact_url, special_range};
pub use engine::{Ending, InHand, Keeper, Parked, Wait, drive, new_target, reserve_until};
pub use in_flight::{InFlight, InFlightGuard};
pub use limits::KeyedLimits;
pub use manual::{MANUAL_SLOT_WAIT, Refusal, deliver_now};
pub use ordering::{Sequencer, Ticket};
pub use retry::{AttemptResult, RetryPolicy, Verdict, parse_retry_after};
pub use source::Source;
