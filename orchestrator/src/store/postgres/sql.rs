//! Every statement of the PostgreSQL store, named.
//!
//! The write statements are one family (`write_statement!`): they differ only in how the
//! instances' rows are written (inserted, updated under the transaction's locks, or updated
//! only where still at the `seq` a decision was made on), and every other write joins the rows
//! that statement wrote (`w`). Their parameters, the same in all three:
//!
//! | | |
//! |---|---|
//! | `$1` | now |
//! | `$2` | events: `[{i, s, b, plan_id?}]` (instance, seq, body, the plan a `started` event names) |
//! | `$3` | instance rows: `[{i, definition, version, mode, status, seq, prev, state, plan_id, failure, key?, request?}]` |
//! | `$4` | timers to delete: `[{i, k, t?}]` (with `t`, only while the stored timer is `t`) |
//! | `$5` | timers to set: `[{i, k, at, t}]` |
//! | `$6` | outbox rows, in order: `[{i, p, m, b}]` (participant, message id, command) |
//! | `$7` | the outbox grace period in milliseconds |
//! | `$8` | the ids of the batch's instances |
//! | `$9` | plans that may not be stored yet: `[{i, plan}]` |
//! | `$10` | ids of published outbox rows to delete (any instance's: see `OutboxDeletes`) |
//!
//! They return the instances written (`written`) and the outbox rows' ids with their message
//! ids. `= ANY($8)` lets the planner reach the rows to update and delete through the primary
//! keys: joined only to the JSON rows, whose count it cannot know, it chose to scan the whole
//! tables.

/// A write statement: `$target` defines `w`, the instances whose rows it writes, and writes
/// their rows; the plans, events, timers and outbox rows follow, each joined to `w`, so an
/// instance whose row is not written gets nothing else written either. Published outbox rows
/// (`od`, of any instance) are deleted whatever else is written.
macro_rules! write_statement {
    ($target:literal) => {
        concat!(
            "WITH ",
            $target,
            ",
             pl AS (
               INSERT INTO sagas_plans (id, plan)
               SELECT (r->>'i')::uuid, r->'plan' FROM jsonb_array_elements($9) AS r
               ON CONFLICT (id) DO NOTHING),
             ev AS (
               INSERT INTO sagas_events
                 (instance_id, seq, kind, step, operation, attempt, body, at, plan_id)
               SELECT w.id, (e->>'s')::bigint, e->'b'->>'kind', (e->'b'->>'step')::int,
                      e->'b'->>'operation', (e->'b'->>'attempt')::int, e->'b', $1,
                      (e->>'plan_id')::uuid
               FROM jsonb_array_elements($2) AS e JOIN w ON w.id = (e->>'i')::uuid),
             tdel AS (
               DELETE FROM sagas_timers t
               USING jsonb_array_elements($4) AS r, w
               WHERE t.instance_id = ANY($8) AND t.instance_id = w.id
                 AND t.instance_id = (r->>'i')::uuid AND t.key = r->>'k'
                 AND (NOT r ? 't' OR t.timer = r->'t')),
             tset AS (
               INSERT INTO sagas_timers (instance_id, key, due_at, timer)
               SELECT w.id, r->>'k', (r->>'at')::timestamptz, r->'t'
               FROM jsonb_array_elements($5) AS r JOIN w ON w.id = (r->>'i')::uuid
               ON CONFLICT (instance_id, key) DO UPDATE SET due_at = EXCLUDED.due_at, timer = EXCLUDED.timer),
             ob AS (
               INSERT INTO sagas_outbox (instance_id, participant, message_id, body, created_at, available_at)
               SELECT w.id, r.r->>'p', r.r->>'m', r.r->'b', $1, $1 + make_interval(secs => $7::float8 / 1000)
               FROM jsonb_array_elements($6) WITH ORDINALITY AS r(r, ord)
               JOIN w ON w.id = (r.r->>'i')::uuid
               ORDER BY r.ord
               RETURNING id, message_id),
             od AS (
               DELETE FROM sagas_outbox WHERE id = ANY($10))
             SELECT coalesce((SELECT array_agg(id) FROM w), '{}') AS written,
                    coalesce((SELECT array_agg(id ORDER BY id) FROM ob), '{}') AS ids,
                    coalesce((SELECT array_agg(message_id ORDER BY id) FROM ob), '{}') AS message_ids"
        )
    };
}

/// New instances: each row is inserted unless its id or its idempotency key is taken, and then
/// nothing of that instance is written. A concurrent start with the same key waits on the
/// unique index until the first commits.
pub(super) const WRITE_NEW: &str = write_statement!(
    "w AS (
       INSERT INTO sagas_instances
         (id, definition, version, mode, status, seq, state, plan_id, failure, created_at,
          updated_at, idempotency_key, request)
       SELECT (r->>'i')::uuid, r->>'definition', (r->>'version')::int, r->>'mode',
              r->>'status', (r->>'seq')::bigint, r->'state', (r->>'plan_id')::uuid,
              r->>'failure', $1, $1, r->>'key', nullif(r->'request', 'null'::jsonb)
       FROM jsonb_array_elements($3) AS r
       ON CONFLICT DO NOTHING
       RETURNING id)"
);

/// Instances the transaction has locked (`LOCK_STATES`): every row of the batch is written
/// (an instance whose state did not change may still have a fired timer to delete).
pub(super) const WRITE_LOCKED: &str = write_statement!(
    "inst AS (
       UPDATE sagas_instances i
       SET status = r->>'status', seq = (r->>'seq')::bigint, state = r->'state',
           plan_id = (r->>'plan_id')::uuid, failure = r->>'failure', updated_at = $1
       FROM jsonb_array_elements($3) AS r
       WHERE i.id = ANY($8) AND i.id = (r->>'i')::uuid),
     w AS (SELECT unnest($8::uuid[]) AS id)"
);

/// Instances decided on cached states, in one implicit transaction: the rows are locked first
/// in id order (`lk`, as `LOCK_STATES` locks them: without it the update locked in its plan's
/// order, and two batches sharing instances deadlocked now and then), and a row is written
/// only while its `seq` is still the one its decision was made on (`prev`).
pub(super) const WRITE_GUARDED: &str = write_statement!(
    "lk AS (
       SELECT id FROM sagas_instances WHERE id = ANY($8) ORDER BY id FOR UPDATE),
     w AS (
       UPDATE sagas_instances i
       SET status = r->>'status', seq = (r->>'seq')::bigint, state = r->'state',
           plan_id = (r->>'plan_id')::uuid, failure = r->>'failure', updated_at = $1
       FROM jsonb_array_elements($3) AS r, lk
       WHERE i.id = ANY($8) AND i.id = lk.id AND i.id = (r->>'i')::uuid
         AND i.seq = (r->>'prev')::bigint
       RETURNING i.id)"
);

/// Locks the batch's instances in id order (so concurrent transactions cannot deadlock on
/// them) and reads their states.
pub(super) const LOCK_STATES: &str =
    "SELECT id, state, plan_id FROM sagas_instances WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// Plans by id.
pub(super) const PLANS: &str = "SELECT id, plan FROM sagas_plans WHERE id = ANY($1)";

/// The instance of a definition started with an idempotency key, and its request.
pub(super) const BY_IDEMPOTENCY_KEY: &str = "SELECT id, request FROM sagas_instances
     WHERE definition = $1 AND idempotency_key = $2";

/// An instance's projection, with its plan.
pub(super) const GET: &str =
    "SELECT state, created_at, updated_at FROM sagas_instance_states WHERE id = $1";

/// An instance's log, with the plan in its `started` event.
pub(super) const EVENTS: &str =
    "SELECT seq, at, body FROM sagas_event_bodies WHERE instance_id = $1 ORDER BY seq";

/// Instances newest first, from a keyset position: the row comparison walks the
/// `(created_at, id)` index backwards from the cursor.
pub(super) const LIST: &str = "SELECT state, created_at, updated_at FROM sagas_instance_states
     WHERE ($1::text IS NULL OR status = $1)
       AND ($2::text IS NULL OR definition = $2)
       AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
       AND ($6::timestamptz IS NULL OR created_at >= $6)
       AND ($7::timestamptz IS NULL OR created_at < $7)
       AND ($8::text IS NULL OR idempotency_key = $8)
     ORDER BY created_at DESC, id DESC
     LIMIT $5";

pub(super) const PING: &str = "SELECT 1";

/// Leases up to `$2` timers due at `$1` until `$3`, skipping those another process holds.
pub(super) const CLAIM_TIMERS: &str = "UPDATE sagas_timers t SET due_at = $3
     FROM (SELECT instance_id, key FROM sagas_timers
           WHERE due_at <= $1 ORDER BY due_at LIMIT $2
           FOR UPDATE SKIP LOCKED) due
     WHERE t.instance_id = due.instance_id AND t.key = due.key
     RETURNING t.instance_id, t.timer";

/// Leases up to `$2` outbox rows available at `$1` until `$3`, skipping those another process
/// holds.
pub(super) const CLAIM_OUTBOX: &str = "UPDATE sagas_outbox o SET available_at = $3
     FROM (SELECT id FROM sagas_outbox WHERE available_at <= $1
           ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) due
     WHERE o.id = due.id
     RETURNING o.id, o.participant, o.body";

/// Deletes published outbox rows, in a transaction whose commit does not wait for the WAL
/// flush (the one-time filter sets `synchronous_commit` before any row is deleted): a delete
/// lost in a crash only lets the relay publish those commands again, which the participants'
/// barrier absorbs, so it need not cost an fsync of its own (at low load, one in eight of a
/// saga's commits).
pub(super) const DELETE_OUTBOX: &str = "DELETE FROM sagas_outbox WHERE id = ANY($1)
     AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'";

/// Announces settled instances: one notification on channel `$1` per payload of `$2`
/// (`settlements`), all in the statement's own transaction. A NOTIFY gives its transaction an
/// id, so its commit writes WAL; nothing in it needs to be durable, so the commit does not
/// wait for the flush.
pub(super) const ANNOUNCE: &str =
    "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, p)
     FROM unnest($2::text[]) AS p";

/// The backend pid of the session (a listener's own).
pub(super) const BACKEND_PID: &str = "SELECT pg_backend_pid()";

/// Whether a listener (`$1`, the listeners' `application_name`) other than the one of pid `$2`
/// is connected to this database.
pub(super) const OTHERS_LISTENING: &str = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
     WHERE datname = current_database() AND application_name = $1 AND pid <> $2)";

/// Takes the prune lock (`$1`) for the transaction if no other process holds it.
pub(super) const PRUNE_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// Up to `$2` instances that finished before `$1`, oldest first (index
/// `sagas_instances_finished` on `finished_at`, set by PostgreSQL once the status is final),
/// locked; rows another transaction holds are skipped.
pub(super) const DUE_FOR_PRUNING: &str = "SELECT id FROM sagas_instances
     WHERE finished_at < $1
     ORDER BY finished_at LIMIT $2
     FOR UPDATE SKIP LOCKED";

/// How many instances finished before `$1`.
pub(super) const COUNT_PRUNABLE: &str =
    "SELECT count(*) FROM sagas_instances WHERE finished_at < $1";

/// The instances `$1` as JSON documents, oldest finished first: the row with its whole state
/// (`sagas_instance_states`) and `events`, its log (each event with `seq` and `logged_at`, as
/// the API shows it).
pub(super) const EXPORT: &str = "SELECT (to_jsonb(i) || jsonb_build_object('events', coalesce(
         (SELECT jsonb_agg(jsonb_build_object('seq', e.seq, 'logged_at', e.at) || e.body
                           ORDER BY e.seq)
          FROM sagas_event_bodies e WHERE e.instance_id = i.id), '[]'::jsonb)))::text
     FROM sagas_instance_states i WHERE i.id = ANY($1)
     ORDER BY i.updated_at, i.id";

/// Deletes the instances `$1` with their events, timers and outbox rows, and moves the prune
/// horizon to `$2` if that is newer.
pub(super) const PRUNE: &str = "WITH ev AS (
       DELETE FROM sagas_events WHERE instance_id = ANY($1)),
     tm AS (
       DELETE FROM sagas_timers WHERE instance_id = ANY($1)),
     ob AS (
       DELETE FROM sagas_outbox WHERE instance_id = ANY($1)),
     hz AS (
       INSERT INTO sagas_retention (pruned_before) VALUES ($2)
       ON CONFLICT (singleton) DO UPDATE
       SET pruned_before = greatest(sagas_retention.pruned_before, EXCLUDED.pruned_before))
     DELETE FROM sagas_instances WHERE id = ANY($1)";

/// What the gauges show, in one statement: open instances by status, through the partial
/// index `sagas_instances_open` (whose predicate keeps `resolved` rows, filtered here); the
/// outbox's rows and the oldest one (one scan of a table that is small unless the broker is
/// behind); the timers due at `$1`, through `sagas_timers_due`.
pub(super) const GAUGES: &str =
    "SELECT o.statuses, o.counts, o.oldest, ob.n, ob.oldest, t.n, t.oldest
     FROM (SELECT array_agg(status) AS statuses, array_agg(n) AS counts, min(oldest) AS oldest
           FROM (SELECT status, count(*) AS n, min(created_at) AS oldest FROM sagas_instances
                 WHERE status NOT IN ('completed', 'compensated') AND status <> 'resolved'
                 GROUP BY status) s) o,
          (SELECT count(*) AS n, min(created_at) AS oldest FROM sagas_outbox) ob,
          (SELECT count(*) AS n, min(due_at) AS oldest FROM sagas_timers WHERE due_at <= $1) t";

/// What may still act on instance `$1`: its outbox rows (a scan of a table that is small
/// unless the broker is behind) and its timers (by the primary key), earliest first.
pub(super) const IN_FLIGHT: &str = "SELECT
       (SELECT count(*) FROM sagas_outbox WHERE instance_id = $1),
       coalesce((SELECT jsonb_agg(jsonb_build_object('due_at', due_at, 'timer', timer)
                                  ORDER BY due_at, key)
                 FROM sagas_timers WHERE instance_id = $1), '[]'::jsonb)";

/// The stuck steps of stuck instances (through the partial index `sagas_instances_open`),
/// each with its plan step's name and participant, oldest change first.
pub(super) const STUCK_STEPS: &str =
    "SELECT i.id, i.definition, p.pl->>'name', p.pl->>'participant', s.st->>'last_error',
            i.updated_at
     FROM sagas_instance_states i
     CROSS JOIN LATERAL jsonb_array_elements(i.state->'steps') WITH ORDINALITY AS s(st, n)
     JOIN LATERAL jsonb_array_elements(i.state->'plan'->'steps') WITH ORDINALITY AS p(pl, n)
       ON p.n = s.n
     WHERE i.status = 'stuck' AND (s.st->>'stuck')::boolean
     ORDER BY i.updated_at, i.id, s.n";

/// Instances by minute (since 1970) since `$1`: created (`started`, through
/// `sagas_instances_created`), by when they finished for those now finished (`finished_at`,
/// through `sagas_instances_finished`), and by their last change for those stuck (through
/// `sagas_instances_open`).
pub(super) const ACTIVITY: &str = "SELECT m, k, count(*) FROM (
       SELECT floor(extract(epoch FROM created_at) / 60)::bigint AS m, 'started' AS k
       FROM sagas_instances WHERE created_at >= $1
       UNION ALL
       SELECT floor(extract(epoch FROM finished_at) / 60)::bigint, status
       FROM sagas_instances WHERE finished_at >= $1
       UNION ALL
       SELECT floor(extract(epoch FROM updated_at) / 60)::bigint, status
       FROM sagas_instances WHERE status = 'stuck' AND updated_at >= $1) a
     GROUP BY m, k";

/// How many instances finished since `$1`, and the nearest-rank percentiles 50, 90 and 99 of
/// the microseconds they took.
pub(super) const LATENCY: &str = "SELECT n, p[1], p[2], p[3] FROM (
       SELECT count(*) AS n, percentile_disc(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY
                (extract(epoch FROM finished_at - created_at) * 1000000)::bigint) AS p
       FROM sagas_instances WHERE finished_at >= $1) l";

/// The `$1` oldest open instances, oldest first.
pub(super) const OLDEST_OPEN: &str =
    "SELECT state, created_at, updated_at FROM sagas_instance_states
     WHERE status IN ('running', 'compensating', 'stuck')
     ORDER BY created_at, id
     LIMIT $1";

/// A definition (`$1` name, `$2` version, `$3` plan id, `$4` plan, `$5` document or NULL) and
/// its plan, unless they are stored already.
pub(super) const REGISTER_DEFINITION: &str = "WITH plan AS (
       INSERT INTO sagas_plans (id, plan) VALUES ($3, $4) ON CONFLICT DO NOTHING)
     INSERT INTO sagas_definitions (name, version, plan_id, document)
     VALUES ($1, $2, $3, $5)
     ON CONFLICT (name, version) DO NOTHING";

/// The newest version of definition `$1` stored as a document.
pub(super) const NEWEST_DOCUMENT_VERSION: &str =
    "SELECT max(version) FROM sagas_definitions WHERE name = $1 AND document IS NOT NULL";

/// How many definitions are stored as documents.
pub(super) const DOCUMENT_COUNT: &str =
    "SELECT count(*) FROM sagas_definitions WHERE document IS NOT NULL";

/// The stored definitions with their plans, of definition `$1` only unless it is NULL, and of
/// version `$2` only unless it is NULL.
pub(super) const DEFINITIONS: &str = "SELECT p.plan, d.document
     FROM sagas_definitions d JOIN sagas_plans p ON p.id = d.plan_id
     WHERE ($1::text IS NULL OR d.name = $1) AND ($2::bigint IS NULL OR d.version = $2)
     ORDER BY d.name, d.version";

/// Adds a closed breaker, as `$2` (JSON), for each participant in `$1` that has none yet, at
/// `$3`: before the rows are locked, so that a new participant's row is locked like the others.
pub(super) const ADD_BREAKERS: &str = "INSERT INTO sagas_breakers (participant, state, updated_at) \
     SELECT p, $2::jsonb, $3 FROM unnest($1::text[]) AS p \
     ON CONFLICT (participant) DO NOTHING";

/// Every breaker, locked until the transaction ends.
pub(super) const LOCK_BREAKERS: &str =
    "SELECT participant, state FROM sagas_breakers ORDER BY participant FOR UPDATE";

/// Writes the breakers of participants `$1` with states `$2` (JSON) at `$3`.
pub(super) const WRITE_BREAKERS: &str = "UPDATE sagas_breakers AS b SET state = n.state, updated_at = $3 \
     FROM unnest($1::text[], $2::jsonb[]) AS n (participant, state) \
     WHERE b.participant = n.participant";
