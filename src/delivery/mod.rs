//! Delivery: signing, the egress guard (and, later, the dispatcher and retry policy).

mod egress;
mod signer;

pub use egress::{EgressDenied, EgressPolicy, special_range};
pub use signer::{SecretError, Signatures, Signer};
