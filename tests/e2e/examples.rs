//! The examples' own code (definitions, participants, seeding), compiled once here for the
//! modules that drive it. Each module is the example's file as it is.

#[path = "../../examples/bank_transfer/bank.rs"]
#[allow(dead_code)]
pub mod bank;

#[path = "../../examples/order_saga/shop.rs"]
#[allow(dead_code)]
pub mod shop;

#[path = "../../examples/quickstart/trip.rs"]
#[allow(dead_code)]
pub mod trip;

#[path = "../../examples/quickstart/embedded.rs"]
#[allow(dead_code)]
pub mod embedded;
