//! Reconcilers. The Webhook controller turns Webhooks (and the Secrets they name) into routes
//! and `Ready` conditions: resolve -> validate -> update routing -> status.

mod document_event;
mod freshness;
mod namespaces;
mod resolve;
mod rotation;
mod scope;
mod webhook;

pub use document_event::{DocumentEventController, Retention};
pub use freshness::watch_view;
pub use namespaces::watch_namespaces;
pub use resolve::{PREVIOUS_KEY, Resolution, SIGNING_SECRET_LABEL, ready_reason, resolve};
pub use scope::Scope;
pub use webhook::WebhookController;
