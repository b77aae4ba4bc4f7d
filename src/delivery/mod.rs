//! Delivery: the wire contract (payload, signatures, headers), the egress guard, the retry
//! policy, and the HTTP client that sends attempts.

mod client;
mod dispatcher;
mod egress;
mod payload;
mod retry;
mod signer;

pub use client::{Attempt, HttpSender, USER_AGENT};
pub use dispatcher::{
    AttemptReport, Delivery, Dispatcher, DispatcherConfig, GoneNotice, delivery_id,
};
pub use egress::{EgressDenied, EgressPolicy, special_range};
pub use payload::EventBody;
pub use retry::{AttemptResult, RetryPolicy, Verdict, parse_retry_after};
pub use signer::{SecretError, Signatures, Signer};
