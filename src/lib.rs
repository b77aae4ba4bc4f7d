//! hookrelay: a Kubernetes operator that delivers signed webhooks for document events.
//!
//! ```text
//!  Secret <-- secretRef -- Webhook            DocumentEvent / POST /api/events
//!                            |                          |
//!                    controller (resolve,               |
//!                    validate, route)                   v
//!                            |                    routing table lookup
//!                            v                    (namespace, event type)
//!                      RoutingTable ----------------->  |
//!                                                       v
//!                                       dispatcher: sign, POST, retry
//!                                                       |
//!                                       status writer --> Webhook / DocumentEvent status
//! ```

pub mod controller;
pub mod crd;
pub mod delivery;
pub mod emit;
pub mod health;
pub mod http;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod ports;
#[cfg(test)]
mod proptest_support;
pub mod receiver;
pub mod routing;
pub mod status;
pub mod telemetry;
pub mod wire;
