//! The AMQP toolkit both sides use: the orchestrator's transport and the participant runtime.
//!
//! What is on the wire is written and read here only, so that the two sides cannot drift:
//! the [`topology`] and its declarations, every [`headers`] name, the [`properties`] of a
//! command and of a reply, a participant's [`announcement`] on its replies, [`batch`]
//! messages, [`dead_letter`]s, and the [`connection`]
//! (connecting, and reconnecting with backoff). Message bodies are [`crate::protocol`].

pub mod announcement;
pub mod batch;
pub mod connection;
pub mod dead_letter;
pub mod headers;
pub mod properties;
pub mod publish;
pub mod topology;

pub use announcement::Announcement;
pub use batch::{batch_properties, is_batch};
pub use connection::{
    Backoff, CONNECT_TIMEOUT, Sessions, check_url, confirm_channel, connect, connect_within,
    keep_serving,
};
pub use dead_letter::{DeadLetterError, DeadLetters};
pub use properties::{
    command_properties, reply_properties, start_answer_properties, start_properties,
};
pub use publish::{Confirmed, publish_to_queue};
pub use topology::{
    QueueOptions, declare_dead_letter, declare_participant, declare_replies, declare_start_answers,
    declare_starts, delete_topology, look_at_queue,
};
