//! Batch messages on AMQP: telling a batch from a single message, and a batch's properties.
//!
//! The body of a batch (a JSON array of single bodies) is [`crate::protocol::join_batch`] and
//! [`crate::protocol::split_batch`]; docs/protocol.md, "Batches", has the rules.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use super::headers::BATCH_HEADER;
use crate::protocol::BATCH_CONTENT_TYPE;

/// Whether a message with these properties is a batch (its content type says so).
pub fn is_batch(properties: &BasicProperties) -> bool {
    properties
        .content_type()
        .as_ref()
        .is_some_and(|ct| ct.as_str() == BATCH_CONTENT_TYPE)
}

/// The AMQP properties of a batch of `count` messages whose first has the message id
/// `first_id` (docs/protocol.md, "Batches"); a command batch adds its `reply_to`.
pub fn batch_properties(first_id: &str, count: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        BATCH_HEADER.into(),
        AMQPValue::LongLongInt(i64::try_from(count).unwrap_or(i64::MAX)),
    );
    super::properties::persistent(BATCH_CONTENT_TYPE)
        .with_message_id(format!("batch:{first_id}:{count}").into())
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::header_i64;
    use crate::protocol::CONTENT_TYPE;

    #[test]
    fn a_batch_is_told_by_its_content_type_alone() {
        assert!(is_batch(&batch_properties("m", 2)));
        let single = BasicProperties::default().with_content_type(CONTENT_TYPE.into());
        assert!(!is_batch(&single));
        assert!(!is_batch(&BasicProperties::default()), "no content type");
        let headers_only = BasicProperties::default()
            .with_headers(batch_properties("m", 2).headers().clone().expect("headers"));
        assert!(
            !is_batch(&headers_only),
            "the count header does not make a batch"
        );
    }

    #[test]
    fn batch_properties_carry_the_count_and_a_message_id_from_the_first_element() {
        let properties = batch_properties("t:s:action:1", 3);
        assert_eq!(header_i64(&properties, BATCH_HEADER), Some(3));
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.as_str()),
            Some("batch:t:s:action:1:3")
        );
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(properties.reply_to(), &None);
    }
}
