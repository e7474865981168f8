//! The end-to-end tests, against a real PostgreSQL and RabbitMQ (and the quickstart's SQLite):
//! one test binary, one module per subject, and one harness (`helpers`). Every test has
//! databases and an AMQP prefix of its own, so they run in parallel in this process.

mod examples;
mod helpers;

mod api;
mod bank;
mod batches;
mod breaker;
mod config;
mod conformance;
mod console;
mod dead_letters;
mod definitions;
mod fault_suite;
mod faults;
mod monitoring;
mod operator;
mod orders;
mod python_participant;
mod quickstart;
mod reconcile;
mod signals;
mod store;
mod tls;
mod traces;
mod transactional_start;
mod wait;
