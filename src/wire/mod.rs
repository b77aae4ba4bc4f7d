//! The wire contract, below everything that routes or delivers: the payload's bytes, its
//! signatures, the headers a Webhook adds, and the Service a Webhook may name. Nothing here
//! knows about routing, delivery or the API server; `routing` builds routes from these pieces
//! and `delivery` sends them.

mod headers;
mod payload;
mod service;
mod signer;

pub use headers::{CustomHeaders, custom_headers, is_reserved_header};
pub use payload::{EventBody, timestamp_of};
pub use service::ServiceTarget;
pub use signer::{MIN_SECRET_BYTES, SecretError, Signatures, Signer, Verified};
