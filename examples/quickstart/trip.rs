//! The quickstart's saga: booking a trip. A flight, then a hotel, then a rental car; when a
//! step fails, the bookings already made are cancelled, last first.
//!
//! The three participants (`flights`, `hotels`, `cars`) keep their bookings in memory. There
//! are no cars in Venice: a trip there is compensated.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sagas::orchestrator::transport::memory::MemoryHandler;
use sagas::orchestrator::{Definition, Registry, RetryPolicy};
use sagas::participant::{Command, Operation, Outcome};
use serde::Deserialize;
use serde_json::{Value, json};

/// The definition's name (`POST /v1/sagas/trip`).
pub const NAME: &str = "trip";

/// The participants, in step order.
pub const PARTICIPANTS: [&str; 3] = ["flights", "hotels", "cars"];

/// A trip that completes.
pub fn completes() -> Value {
    json!({ "traveler": "ada", "destination": "Lisbon", "nights": 3 })
}

/// A trip that is compensated: the car rental fails, so the hotel and the flight are cancelled.
pub fn compensates() -> Value {
    json!({ "traveler": "grace", "destination": "Venice", "nights": 2 })
}

/// The input of a trip.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trip {
    /// Who travels.
    pub traveler: String,
    /// Where to.
    pub destination: String,
    /// Hotel nights.
    pub nights: u32,
}

/// The `trip` saga. Every attempt waits `timeout` for its reply, and a step is tried up to
/// five times, so a process stopped in the middle of a trip has a while to come back before
/// the trip is compensated instead.
pub fn definition(timeout: Duration) -> Definition {
    let retry = RetryPolicy::exponential(5, Duration::from_millis(200), Duration::from_secs(2));
    Definition::saga::<Trip>(NAME, 1)
        .validate(|t| {
            if t.traveler.trim().is_empty() || t.destination.trim().is_empty() {
                return Err("traveler and destination must not be empty".into());
            }
            if !(1..=30).contains(&t.nights) {
                return Err("nights must be between 1 and 30".into());
            }
            Ok(())
        })
        .step("book_flight", "flights", |s| {
            s.command(|t, _| json!({ "traveler": t.traveler, "to": t.destination }))
                .timeout(timeout)
                .retry(retry)
        })
        .step("book_hotel", "hotels", |s| {
            s.command(
                |t, _| json!({ "traveler": t.traveler, "city": t.destination, "nights": t.nights }),
            )
            .timeout(timeout)
            .retry(retry)
        })
        .step("rent_car", "cars", |s| {
            // Earlier outputs feed later commands: the car is picked up at the flight's arrival.
            s.command(|t, out| {
                json!({
                    "traveler": t.traveler,
                    "city": t.destination,
                    "flight": out.get("book_flight").and_then(|f| f.get("booking")).cloned(),
                })
            })
            .timeout(timeout)
            .retry(retry)
        })
        .build()
        .expect("the trip definition is valid")
}

/// A registry with the trip saga.
pub fn registry(timeout: Duration) -> Registry {
    Registry::new()
        .with(definition(timeout))
        .expect("one definition")
}

/// A booking a participant holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    /// The booking reference.
    pub reference: String,
    /// Who it is for.
    pub traveler: String,
    /// False once cancelled by a compensation.
    pub active: bool,
}

/// One of the trip's participants: books on `action`, cancels on `compensate`.
#[derive(Clone)]
pub struct Agency {
    name: &'static str,
    prefix: &'static str,
    /// Pause before answering (to watch a trip in flight, or stop the process mid-way).
    delay: Duration,
    /// Print what it does.
    verbose: bool,
    /// Bookings by transaction id.
    bookings: Arc<Mutex<BTreeMap<String, Booking>>>,
}

impl Agency {
    /// The participant `name` (one of [`PARTICIPANTS`]).
    pub fn new(name: &'static str, delay: Duration, verbose: bool) -> Agency {
        let prefix = match name {
            "flights" => "FL",
            "hotels" => "HT",
            _ => "CR",
        };
        Agency {
            name,
            prefix,
            delay,
            verbose,
            bookings: Arc::default(),
        }
    }

    /// The participant's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its bookings, active or cancelled.
    pub fn bookings(&self) -> Vec<Booking> {
        self.bookings.lock().unwrap().values().cloned().collect()
    }

    fn say(&self, cmd: &Command, what: &str) {
        if self.verbose {
            let short = &cmd.transaction_id.simple().to_string()[20..];
            println!(
                "  [{:<7}] trip …{short} {:<11} {:<10} {what}",
                self.name, cmd.step, cmd.operation
            );
        }
    }

    fn book(&self, cmd: &Command) -> Outcome {
        let traveler = cmd.payload["traveler"].as_str().unwrap_or("?").to_owned();
        let city = cmd.payload["city"]
            .as_str()
            .or(cmd.payload["to"].as_str())
            .unwrap_or("?");
        if self.name == "cars" && city.eq_ignore_ascii_case("venice") {
            let reason = "no cars in Venice".to_owned();
            self.say(cmd, &format!("failed: {reason}"));
            return Outcome::failed(reason);
        }
        // One booking per transaction: the reference is derived from it.
        let tx = cmd.transaction_id.simple().to_string();
        let reference = format!("{}-{}", self.prefix, tx[26..].to_uppercase());
        self.bookings.lock().unwrap().insert(
            tx,
            Booking {
                reference: reference.clone(),
                traveler: traveler.clone(),
                active: true,
            },
        );
        self.say(cmd, &format!("booked {reference} for {traveler} ({city})"));
        Outcome::succeeded(json!({ "booking": reference }))
    }

    fn cancel(&self, cmd: &Command) -> Outcome {
        let tx = cmd.transaction_id.simple().to_string();
        let mut bookings = self.bookings.lock().unwrap();
        match bookings.get_mut(&tx) {
            Some(b) => {
                b.active = false;
                let reference = b.reference.clone();
                drop(bookings);
                self.say(cmd, &format!("cancelled {reference}"));
                Outcome::succeeded(json!({ "cancelled": reference }))
            }
            // Booked by a process that has since stopped (the bookings lived in its memory).
            None => {
                drop(bookings);
                self.say(cmd, "nothing to cancel here");
                Outcome::succeeded(json!({ "cancelled": null }))
            }
        }
    }
}

#[async_trait]
impl MemoryHandler for Agency {
    async fn handle(&self, cmd: &Command) -> Outcome {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match cmd.operation {
            Operation::Action => self.book(cmd),
            Operation::Compensate => self.cancel(cmd),
            other => Outcome::failed(format!("{other} is not a saga operation")),
        }
    }
}
