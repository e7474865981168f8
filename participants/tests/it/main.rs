//! The participant SDK's integration tests, against a real PostgreSQL and RabbitMQ: one test
//! binary, one module per subject, and one set of helpers. Every test has a database and AMQP
//! names of its own, so they run in parallel in this process.
//!
//! `broker_restart` stops and starts the local RabbitMQ: it is only built with the feature
//! `broker-restart-tests`, and `scripts/test` runs it alone, last
//! (`cargo test … --test it -- broker_restart:: --test-threads=1`).

mod helpers;

mod barrier;
mod batch;
mod batch_locks;
mod batch_messages;
mod batch_trace;
#[cfg(feature = "broker-restart-tests")]
mod broker_restart;
mod declarations;
mod in_progress;
mod outage;
mod pool;
mod runtime;
mod schemas;
mod testing;
mod trace;
mod wire;
