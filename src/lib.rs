//! `sagas`: a durable orchestrator for distributed transactions (sagas and TCC).
//!
//! This umbrella crate re-exports the orchestrator and the participant SDK so that
//! applications, the examples and the end-to-end tests depend on one crate.

pub use sagas_orchestrator as orchestrator;
pub use sagas_participant as participant;
