//! The sagas orchestrator: definitions, the pure state machine, the PostgreSQL log, the AMQP
//! transport, the engine that drives them, and the HTTP API.
//!
//! Cargo features (all on by default): `cli` (the `sagactl` command line and its crates),
//! `sqlite` (the embedded [`store::SqliteStore`]), `mimalloc` (`sagad`'s allocator) and
//! `console` (the web console at `/ui`, served with the API). With
//! `default-features = false` the crate is the engine, the PostgreSQL store, the AMQP
//! transport and the HTTP API.

pub mod api;
pub mod breaker;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "console")]
pub mod console;
pub mod definition;
pub mod document;
pub mod engine;
pub mod machine;
pub mod reconcile;
pub mod server;
pub mod store;
pub mod transport;

pub use definition::{Definition, Mode, Outputs, Registry, RetryPolicy, Step};
pub use engine::{Engine, EngineConfig, EngineError};
pub use machine::Status;
