//! The sagas participant SDK.
//!
//! A participant is a service that executes saga steps (`action`/`compensate`) or TCC steps
//! (`try`/`confirm`/`cancel`) on behalf of the orchestrator. This crate gives it:
//!
//! - [`protocol`]: the wire types, shared with the orchestrator;
//! - [`handler`]: the traits a participant implements, and a [`Router`] to dispatch steps;
//! - [`barrier`]: exactly-once effects, null compensation and anti-hanging in the
//!   participant's own PostgreSQL database;
//! - [`runtime`]: the AMQP consumer that ties them together;
//! - [`amqp`]: the AMQP toolkit both sides use: declarations, header names, message
//!   properties, dead letters, reconnection;
//! - [`start`]: transactional starts: [`start_in`] writes a start request in the service's
//!   own transaction, and the [`StartRelay`] delivers it to the orchestrator;
//! - [`linger`]: how long a batch waits for more, on both sides;
//! - [`config`]: a strict reader of the environment, and a participant process's
//!   configuration from it;
//! - [`testing`]: a harness to unit-test handlers through the barrier, without a broker.
//!
//! docs/participant.md walks through a participant written from scratch.

pub mod amqp;
pub mod barrier;
pub mod config;
pub mod handler;
pub mod linger;
pub mod protocol;
pub mod runtime;
pub mod start;
#[cfg(feature = "otel")]
pub mod telemetry;
pub mod testing;

pub use amqp::QueueOptions;
pub use barrier::BarrierError;
pub use handler::{Handler, HandlerError, Router, Saga, SagaHandler, Tcc, TccHandler};
pub use protocol::{Command, Operation, Outcome, Reply, Topology, TraceParent};
pub use runtime::{Participant, RuntimeError, Stats};
pub use start::{StartError, StartRelay, start_in, start_version_in};
