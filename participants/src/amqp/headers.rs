//! Every AMQP header name on the wire, and reading header values back.
//!
//! Two prefixes are on the wire: `x-saga-` for what a command, a batch or a reply carries,
//! and `x-sagas-` (with an s) for what a dead letter carries. The drift is old; it stays, since
//! the names are part of protocol version 1 (docs/protocol.md) and receivers in other
//! languages match them byte for byte.

use lapin::BasicProperties;
use lapin::types::AMQPValue;

/// Command header: the transaction id (long string).
pub const TRANSACTION_HEADER: &str = "x-saga-transaction";

/// Command header: the step name (long string).
pub const STEP_HEADER: &str = "x-saga-step";

/// Command header: the operation (long string).
pub const OPERATION_HEADER: &str = "x-saga-operation";

/// Command header: the attempt (signed 64-bit integer).
pub const ATTEMPT_HEADER: &str = "x-saga-attempt";

/// Command header: the deadline, RFC 3339 (long string; absent when the command has none).
pub const DEADLINE_HEADER: &str = "x-saga-deadline";

/// Header of a batch message: the number of its elements (signed 64-bit integer).
pub const BATCH_HEADER: &str = "x-saga-batch";

/// Reply header: the name of the participant that sent the reply (long string); part of its
/// [announcement](super::Announcement).
pub const PARTICIPANT_HEADER: &str = "x-saga-participant";

/// Reply header: the most elements of a command batch the sender accepts (signed 64-bit
/// integer; 0 or absent: none); part of its [announcement](super::Announcement).
pub const ACCEPTS_BATCH_HEADER: &str = "x-saga-accepts-batch";

/// Header of the W3C trace context (`00-{trace id}-{parent id}-{flags}`), on a command and on
/// its reply.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Dead-letter header: why the message was dead-lettered (long string).
pub const DEAD_LETTER_REASON_HEADER: &str = "x-sagas-reason";

/// Dead-letter header: the queue the message was taken from (long string).
pub const DEAD_LETTER_QUEUE_HEADER: &str = "x-sagas-queue";

/// The header `name` as text, when it is a (valid UTF-8) string.
pub fn header_str<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The header `name` as an integer, when it is one of AMQP's integer types.
pub fn header_i64(properties: &BasicProperties, name: &str) -> Option<i64> {
    match *properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortShortInt(n) => Some(n.into()),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => Some(n),
        _ => None,
    }
}
