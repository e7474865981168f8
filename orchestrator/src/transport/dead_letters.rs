//! Dead letters as an operator sees them: the messages in the dead-letter queue, each with a
//! stable id, and what may be done with one (put it back on the queue it came from, or drop it).
//!
//! The id of a dead letter is its AMQP `message_id` when it has one that fits in a URL path
//! (1 to 200 of `A-Za-z0-9._:~-`; commands and replies have one), otherwise `h` and 16 hex
//! digits of a 64-bit FNV-1a hash of its body and of the headers it shows ([`DeadLetter::headers`]).
//! It stays the same while the message waits, whoever looks. Two identical messages (a reply
//! dead-lettered twice) share an id: an action on it takes the first of them.

use std::collections::BTreeMap;

/// Most messages an action on one dead letter looks through to find it.
pub const MAX_SCAN: usize = 10_000;

/// Longest message id used as a dead letter's id as it is.
const MAX_ID: usize = 200;

/// A message in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its stable id (see the module's documentation).
    pub id: String,
    /// The queue it was taken from (`x-sagas-queue`, else the first `x-death` entry's), if known.
    pub queue: Option<String>,
    /// Why it was dead-lettered (`x-sagas-reason`, else the first `x-death` entry's reason).
    pub reason: Option<String>,
    /// Its content type.
    pub content_type: Option<String>,
    /// Its body.
    pub body: Vec<u8>,
    /// Its headers whose values are text, numbers or booleans, as text (tables and arrays, such
    /// as RabbitMQ's `x-death`, are left out).
    pub headers: BTreeMap<String, String>,
    /// Whether the broker delivered it before (a listing takes messages and puts them back, so
    /// a dead letter that was listed once is redelivered from then on).
    pub redelivered: bool,
}

/// What an operator does with a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterAction {
    /// Publish it again to the queue it came from (confirmed), then remove it.
    Requeue,
    /// Remove it.
    Drop,
}

impl DeadLetterAction {
    /// `requeue` or `drop`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterAction::Requeue => "requeue",
            DeadLetterAction::Drop => "drop",
        }
    }
}

/// Whether `id` may be a dead letter's id as it is: it fits in a URL path segment unescaped.
pub fn usable_id(id: &str) -> bool {
    (1..=MAX_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'~' | b'-'))
}

/// The stable id of a message with this `message_id`, `body` and (shown) `headers`.
pub fn stable_id(
    message_id: Option<&str>,
    body: &[u8],
    headers: &BTreeMap<String, String>,
) -> String {
    if let Some(id) = message_id.filter(|id| usable_id(id)) {
        return id.to_owned();
    }
    let mut hash = Fnv::default();
    hash.field(body);
    for (name, value) in headers {
        hash.field(name.as_bytes());
        hash.field(value.as_bytes());
    }
    format!("h{:016x}", hash.0)
}

/// 64-bit FNV-1a: small, and the same on every platform and in every version.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// A length-prefixed field, so that field boundaries count.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_usable_message_id_is_the_id_and_anything_else_is_hashed_from_body_and_headers() {
        let h = headers(&[("x-sagas-reason", "malformed reply")]);
        let reply = "0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d:debit:action:1:reply";
        assert_eq!(stable_id(Some(reply), b"{}", &h), reply);
        for unusable in [None, Some(""), Some("a/b"), Some("with space")] {
            let id = stable_id(unusable, b"{not json", &h);
            assert_eq!(id.len(), 17, "{id}");
            assert!(id.starts_with('h') && usable_id(&id), "{id}");
            assert_eq!(id, stable_id(unusable, b"{not json", &h), "stable");
        }
        let long = "x".repeat(201);
        assert!(stable_id(Some(&long), b"", &h).starts_with('h'));
    }

    #[test]
    fn the_hash_tells_bodies_headers_and_their_boundaries_apart() {
        let none = headers(&[]);
        let ids = [
            stable_id(None, b"ab", &none),
            stable_id(None, b"abc", &none),
            stable_id(None, b"ab", &headers(&[("c", "")])),
            stable_id(None, b"a", &headers(&[("bc", "")])),
            stable_id(None, b"ab", &headers(&[("c", "d")])),
            stable_id(None, b"ab", &headers(&[("cd", "")])),
        ];
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        // Fixed forever: ids given out stay valid across versions.
        assert_eq!(stable_id(None, b"", &none), "ha8c7f832281a39c5");
    }
}
