//! What a participant says about itself on every reply it publishes: its name, and whether
//! (and how large) command batches it accepts (docs/protocol.md, "Batches").
//!
//! The orchestrator sends command batches only to participants whose replies announce them,
//! so a participant that does not know batches (one written from the protocol before them, in
//! any language) never receives one: it announces nothing.

use lapin::BasicProperties;
use lapin::types::AMQPValue;

use super::headers::{ACCEPTS_BATCH_HEADER, PARTICIPANT_HEADER, header_i64, header_str};
use crate::protocol::MAX_BATCH;

/// A participant's announcement: who sent a reply, and the most elements of a command batch
/// it accepts (0: none, every command must come alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The participant's name (its routing key).
    pub participant: String,
    /// The most elements of a command batch it accepts, at most [`MAX_BATCH`]; 0: none.
    pub accepts_batch: usize,
}

impl Announcement {
    /// The announcement of `participant`, accepting command batches of up to `accepts_batch`
    /// elements (capped at [`MAX_BATCH`]; 0: none).
    pub fn new(participant: impl Into<String>, accepts_batch: usize) -> Announcement {
        Announcement {
            participant: participant.into(),
            accepts_batch: accepts_batch.min(MAX_BATCH),
        }
    }

    /// `properties` with the announcement's headers added to the ones they have.
    pub fn stamp(&self, properties: BasicProperties) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            PARTICIPANT_HEADER.into(),
            AMQPValue::LongString(self.participant.as_str().into()),
        );
        headers.insert(
            ACCEPTS_BATCH_HEADER.into(),
            AMQPValue::LongLongInt(i64::try_from(self.accepts_batch).unwrap_or(i64::MAX)),
        );
        properties.with_headers(headers)
    }

    /// The announcement a message carries: `None` without a participant name. A missing,
    /// non-integer or negative limit reads as 0 (no batches), one above [`MAX_BATCH`] as
    /// [`MAX_BATCH`].
    pub fn read(properties: &BasicProperties) -> Option<Announcement> {
        let participant = header_str(properties, PARTICIPANT_HEADER)?;
        let accepts = header_i64(properties, ACCEPTS_BATCH_HEADER).unwrap_or(0);
        let accepts = usize::try_from(accepts.max(0)).unwrap_or(MAX_BATCH);
        Some(Announcement::new(participant, accepts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::TRACEPARENT_HEADER;
    use lapin::types::FieldTable;

    #[test]
    fn an_announcement_reads_back_and_keeps_the_headers_already_there() {
        let mut headers = FieldTable::default();
        headers.insert(TRACEPARENT_HEADER.into(), AMQPValue::LongString("t".into()));
        let properties = BasicProperties::default().with_headers(headers);
        let stamped = Announcement::new("accounts", 16).stamp(properties);
        assert_eq!(
            Announcement::read(&stamped),
            Some(Announcement::new("accounts", 16))
        );
        assert_eq!(header_str(&stamped, TRACEPARENT_HEADER), Some("t"));
        assert_eq!(header_i64(&stamped, ACCEPTS_BATCH_HEADER), Some(16));
    }

    #[test]
    fn without_a_name_there_is_no_announcement_and_odd_limits_read_as_none_or_the_protocol_limit() {
        assert_eq!(Announcement::read(&BasicProperties::default()), None);
        let with = |value: Option<AMQPValue>| {
            let mut headers = FieldTable::default();
            headers.insert(PARTICIPANT_HEADER.into(), AMQPValue::LongString("p".into()));
            if let Some(value) = value {
                headers.insert(ACCEPTS_BATCH_HEADER.into(), value);
            }
            let properties = BasicProperties::default().with_headers(headers);
            Announcement::read(&properties).map(|a| a.accepts_batch)
        };
        assert_eq!(with(None), Some(0));
        assert_eq!(with(Some(AMQPValue::LongString("16".into()))), Some(0));
        assert_eq!(with(Some(AMQPValue::LongLongInt(-3))), Some(0));
        assert_eq!(with(Some(AMQPValue::ShortInt(8))), Some(8));
        assert_eq!(with(Some(AMQPValue::LongLongInt(100_000))), Some(MAX_BATCH));
        assert_eq!(Announcement::new("p", 1000).accepts_batch, MAX_BATCH);
    }
}
