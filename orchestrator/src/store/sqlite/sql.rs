//! Every statement of the SQLite store, named.

/// A new instance, unless its id or its idempotency key is taken.
pub(super) const INSERT_INSTANCE: &str = "INSERT INTO sagas_instances
     (id, definition, version, mode, status, seq, state, failure, created_at, updated_at,
     idempotency_key, request)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
     ON CONFLICT DO NOTHING";

/// The instance of a definition started with an idempotency key, and its request.
pub(super) const BY_IDEMPOTENCY_KEY: &str = "SELECT id, request FROM sagas_instances
     WHERE definition = ? AND idempotency_key = ?";

/// An instance's state (inside a write transaction: the file's write lock is the row lock).
pub(super) const STATE: &str = "SELECT state FROM sagas_instances WHERE id = ?";

/// An instance's projection after a transition.
pub(super) const UPDATE_INSTANCE: &str =
    "UPDATE sagas_instances SET status = ?, seq = ?, state = ?, failure = ?, updated_at = ?
     WHERE id = ?";

/// An event, with the columns PostgreSQL extracts from its body.
pub(super) const INSERT_EVENT: &str =
    "INSERT INTO sagas_events (instance_id, seq, kind, step, operation, attempt, body, at)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

/// Sets the timer of a key (upsert).
pub(super) const SET_TIMER: &str =
    "INSERT INTO sagas_timers (instance_id, key, due_at, timer) VALUES (?, ?, ?, ?)
     ON CONFLICT (instance_id, key) DO UPDATE SET due_at = excluded.due_at, timer = excluded.timer";

/// Deletes the timer of a key.
pub(super) const DELETE_TIMER: &str = "DELETE FROM sagas_timers WHERE instance_id = ? AND key = ?";

/// The timer stored under a key (compared as a value before a fired timer is deleted).
pub(super) const TIMER: &str = "SELECT timer FROM sagas_timers WHERE instance_id = ? AND key = ?";

/// An outbox row, available to the relay after the grace period.
pub(super) const INSERT_OUTBOX: &str = "INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
     VALUES (?, ?, ?, ?, ?, ?)
     RETURNING id";

/// An instance's projection.
pub(super) const GET: &str =
    "SELECT state, created_at, updated_at FROM sagas_instances WHERE id = ?";

/// An instance's log.
pub(super) const EVENTS: &str =
    "SELECT seq, at, body FROM sagas_events WHERE instance_id = ? ORDER BY seq";

/// Instances newest first, from a keyset position.
pub(super) const LIST: &str = "SELECT state, created_at, updated_at FROM sagas_instances
     WHERE (?1 IS NULL OR status = ?1)
     AND (?2 IS NULL OR definition = ?2)
     AND (?3 IS NULL OR (created_at, id) < (?3, ?4))
     AND (?6 IS NULL OR created_at >= ?6)
     AND (?7 IS NULL OR created_at < ?7)
     AND (?8 IS NULL OR idempotency_key = ?8)
     ORDER BY created_at DESC, id DESC
     LIMIT ?5";

pub(super) const PING: &str = "SELECT 1";

/// Leases up to `?2` timers due at `?1` until `?3` (claimers are serialized by the write lock).
pub(super) const CLAIM_TIMERS: &str = "UPDATE sagas_timers SET due_at = ?3
     WHERE (instance_id, key) IN
     (SELECT instance_id, key FROM sagas_timers
     WHERE due_at <= ?1 ORDER BY due_at LIMIT ?2)
     RETURNING instance_id, timer";

/// Leases up to `?2` outbox rows available at `?1` until `?3`.
pub(super) const CLAIM_OUTBOX: &str = "UPDATE sagas_outbox SET available_at = ?3
     WHERE id IN (SELECT id FROM sagas_outbox WHERE available_at <= ?1
     ORDER BY id LIMIT ?2)
     RETURNING id, participant, body";

/// Deletes published outbox rows (ids as a JSON array).
pub(super) const DELETE_OUTBOX: &str =
    "DELETE FROM sagas_outbox WHERE id IN (SELECT value FROM json_each(?))";

/// Up to `?2` instances that finished before `?1`, oldest first.
pub(super) const DUE_FOR_PRUNING: &str = "SELECT id FROM sagas_instances
     WHERE status IN ('completed', 'compensated', 'resolved') AND updated_at < ?1
     ORDER BY updated_at LIMIT ?2";

/// Deletes the events of the instances `?` (ids as a JSON array).
pub(super) const PRUNE_EVENTS: &str =
    "DELETE FROM sagas_events WHERE instance_id IN (SELECT value FROM json_each(?))";

/// Deletes the timers of the instances `?`.
pub(super) const PRUNE_TIMERS: &str =
    "DELETE FROM sagas_timers WHERE instance_id IN (SELECT value FROM json_each(?))";

/// Deletes the outbox rows of the instances `?`.
pub(super) const PRUNE_OUTBOX: &str =
    "DELETE FROM sagas_outbox WHERE instance_id IN (SELECT value FROM json_each(?))";

/// Deletes the instances `?`.
pub(super) const PRUNE_INSTANCES: &str =
    "DELETE FROM sagas_instances WHERE id IN (SELECT value FROM json_each(?))";

/// Open instances by status, with the oldest one's creation time.
pub(super) const GAUGES_OPEN: &str = "SELECT status, count(*), min(created_at) FROM sagas_instances
     WHERE status NOT IN ('completed', 'compensated', 'resolved')
     GROUP BY status";

/// The outbox's rows and the oldest one, and the timers due at `?1` and the earliest of them.
pub(super) const GAUGES_QUEUES: &str = "SELECT
     (SELECT count(*) FROM sagas_outbox), (SELECT min(created_at) FROM sagas_outbox),
     (SELECT count(*) FROM sagas_timers WHERE due_at <= ?1),
     (SELECT min(due_at) FROM sagas_timers WHERE due_at <= ?1)";

/// What may still act on instance `?1`: its outbox rows and its timers (due times in
/// microseconds), earliest first.
pub(super) const IN_FLIGHT: &str = "SELECT
     (SELECT count(*) FROM sagas_outbox WHERE instance_id = ?1),
     (SELECT json_group_array(json_object('due_at', due_at, 'timer', json(timer)))
      FROM (SELECT due_at, timer FROM sagas_timers WHERE instance_id = ?1
            ORDER BY due_at, key))";

/// The states of stuck instances, oldest change first.
pub(super) const STUCK: &str = "SELECT state, created_at, updated_at FROM sagas_instances
     WHERE status = 'stuck' ORDER BY updated_at, id";

/// Instances by minute (since 1970; times are microseconds) since `?1`: created (`started`),
/// and by their last change for those now finished or stuck.
pub(super) const ACTIVITY: &str = "SELECT m, k, count(*) FROM (
     SELECT created_at / 60000000 AS m, 'started' AS k FROM sagas_instances WHERE created_at >= ?1
     UNION ALL
     SELECT updated_at / 60000000, status FROM sagas_instances
     WHERE status IN ('completed', 'compensated', 'resolved', 'stuck') AND updated_at >= ?1)
     GROUP BY m, k";

/// How many instances finished since `?1`, and the nearest-rank percentiles 50, 90 and 99 of
/// the microseconds they took (the row numbers `ceil(n * p / 100)`).
pub(super) const LATENCY: &str = "WITH r AS (
     SELECT updated_at - created_at AS d,
            row_number() OVER (ORDER BY updated_at - created_at) AS rn, count(*) OVER () AS n
     FROM sagas_instances
     WHERE status IN ('completed', 'compensated', 'resolved') AND updated_at >= ?1)
     SELECT count(*), max(CASE WHEN rn = (n * 50 + 99) / 100 THEN d END),
            max(CASE WHEN rn = (n * 90 + 99) / 100 THEN d END),
            max(CASE WHEN rn = (n * 99 + 99) / 100 THEN d END)
     FROM r";

/// The `?1` oldest open instances, oldest first.
pub(super) const OLDEST_OPEN: &str = "SELECT state, created_at, updated_at FROM sagas_instances
     WHERE status IN ('running', 'compensating', 'stuck')
     ORDER BY created_at, id
     LIMIT ?1";

/// A definition (name, version, plan, document or NULL, registered at), unless one of its
/// name and version is stored already.
pub(super) const REGISTER_DEFINITION: &str =
    "INSERT INTO sagas_definitions (name, version, plan, document, registered_at)
     VALUES (?, ?, ?, ?, ?)
     ON CONFLICT (name, version) DO NOTHING";

/// The newest version of definition `?` stored as a document.
pub(super) const NEWEST_DOCUMENT_VERSION: &str =
    "SELECT max(version) FROM sagas_definitions WHERE name = ? AND document IS NOT NULL";

/// How many definitions are stored as documents.
pub(super) const DOCUMENT_COUNT: &str =
    "SELECT count(*) FROM sagas_definitions WHERE document IS NOT NULL";

/// The stored definitions' plans and documents, of definition `?1` only unless it is NULL, and
/// of version `?2` only unless it is NULL.
pub(super) const DEFINITIONS: &str = "SELECT plan, document FROM sagas_definitions
     WHERE (?1 IS NULL OR name = ?1) AND (?2 IS NULL OR version = ?2)
     ORDER BY name, version";

/// Adds the closed breaker `?2` (JSON) for participant `?1` unless it has one, at `?3`.
pub(super) const ADD_BREAKER: &str = "INSERT INTO sagas_breakers (participant, state, updated_at) \
     VALUES (?1, ?2, ?3) ON CONFLICT (participant) DO NOTHING";

/// Every breaker (read inside the write transaction, which holds the lock).
pub(super) const BREAKERS: &str =
    "SELECT participant, state FROM sagas_breakers ORDER BY participant";

/// Writes the breaker of participant `?1` as `?2` (JSON) at `?3`.
pub(super) const WRITE_BREAKER: &str =
    "UPDATE sagas_breakers SET state = ?2, updated_at = ?3 WHERE participant = ?1";
