"""The barrier (docs/protocol.md, "Barrier rules"): exactly-once effects in the participant's
own PostgreSQL database, in the same transaction as the business change.

The key is (transaction_id, step, operation), never the attempt. Everything runs at READ
COMMITTED (PostgreSQL's default), so a statement that waited on a row's key sees what the other
transaction committed.
"""

import logging

import psycopg
from psycopg.types.json import Jsonb

from protocol import FORWARD, FORWARD_OF, UNDO, failed, retry, succeeded

log = logging.getLogger("barrier")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sagas_barrier (
    transaction_id uuid        NOT NULL,
    step           text        NOT NULL,
    operation      text        NOT NULL,
    origin         text        NOT NULL,
    reply          jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, step, operation)
);
CREATE INDEX IF NOT EXISTS sagas_barrier_created_at ON sagas_barrier (created_at);
CREATE TABLE IF NOT EXISTS sagas_barrier_retention (
    singleton     boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_before timestamptz NOT NULL
);
"""

# A: claim the command's row (waits while another transaction holds it uncommitted).
CLAIM = """INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply)
           VALUES (%s, %s, %s, 'handler', NULL) ON CONFLICT DO NOTHING"""
# B: an undo guards its forward operation with the refusal a late forward operation gets.
GUARD = """INSERT INTO sagas_barrier (transaction_id, step, operation, origin, reply)
           VALUES (%s, %s, %s, 'guard', %s) ON CONFLICT DO NOTHING"""
# C: a stored reply (FOR UPDATE when an undo reads its forward operation's row).
STORED = """SELECT reply FROM sagas_barrier
            WHERE transaction_id = %s AND step = %s AND operation = %s"""
# D: the command's outcome, in its own row, before the commit.
RECORD = """UPDATE sagas_barrier SET origin = %s, reply = %s
            WHERE transaction_id = %s AND step = %s AND operation = %s"""


class BusinessFailure(Exception):
    """Raised by a handler: the operation did not take effect and never will (`failed`)."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached or the connection was lost: nothing is to be answered;
    run the command again once the database is back."""


class _Discard(Exception):
    """Roll the whole transaction back (the command's row included) and reply `outcome`."""

    def __init__(self, outcome: dict):
        super().__init__(outcome)
        self.outcome = outcome


def install(db: psycopg.Connection, extra_schema: str = "") -> None:
    """Creates the barrier tables (and `extra_schema`), under an advisory lock: two concurrent
    CREATE TABLE IF NOT EXISTS can still collide on the catalog."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(hashtext('sagas_barrier'))")
        db.execute(SCHEMA + extra_schema)


def connection_lost(db: psycopg.Connection, error: Exception) -> bool:
    """Whether `error` means the database is away rather than that the command failed."""
    if db.broken or db.closed:
        return True
    code = getattr(error, "sqlstate", None)
    if isinstance(error, psycopg.OperationalError) and code is None:
        return True
    return code is not None and (code.startswith("08") or code in ("57P01", "57P02", "57P03", "53300"))


def execute(db: psycopg.Connection, cmd, handler) -> dict:
    """Runs `cmd` through the barrier and `handler(db, cmd)` and returns the outcome to reply.

    `db` is in autocommit mode: `db.transaction()` is BEGIN/COMMIT, and a nested one is a
    SAVEPOINT. Raises DatabaseUnavailable when the database went away; every other failure is
    an outcome (`retry` for a database error or a crash of the handler).
    """
    try:
        with db.transaction():
            return _execute_in(db, cmd, handler)
    except _Discard as discarded:
        return discarded.outcome
    except Exception as error:
        if connection_lost(db, error):
            raise DatabaseUnavailable(str(error)) from error
        log.warning("command %s/%s/%s failed; replying retry: %s",
                    cmd.transaction_id, cmd.step, cmd.operation, error)
        return retry(f"{type(error).__name__}: {error}")


def _execute_in(db, cmd, handler) -> dict:
    key = (cmd.transaction_id, cmd.step)
    op = cmd.operation

    # 1. Duplicate: the row exists, so answer with what it stores.
    if db.execute(CLAIM, (*key, op)).rowcount == 0:
        return _stored(db, cmd, op, lock=False)

    # 2. Null compensation: an undo whose forward operation never took effect does nothing.
    if op in UNDO:
        forward = FORWARD_OF[op]
        refusal = failed(f"{forward} refused: it arrived after its {op} (anti-hanging)")
        if db.execute(GUARD, (*key, forward, Jsonb(refusal))).rowcount == 1:
            took_effect = False  # never ran; 3. a late one will find the guard and its refusal
        else:
            status = _stored(db, cmd, forward, lock=True)["status"]
            took_effect = status in ("succeeded", "in_progress")
        if not took_effect:
            outcome = succeeded({"null_compensation": True})
            db.execute(RECORD, ("null_compensation", Jsonb(outcome), *key, op))
            return outcome

    # 4. The handler, in a savepoint so that a business failure undoes its writes alone.
    try:
        with db.transaction():
            outcome = succeeded(handler(db, cmd))
    except BusinessFailure as failure:
        if op not in FORWARD:
            # compensate/confirm/cancel must succeed in the end: store nothing, so that a
            # retry after the participant is fixed runs the handler again.
            raise _Discard(failed(str(failure))) from None
        outcome = failed(str(failure))
    db.execute(RECORD, ("handler", Jsonb(outcome), *key, op))
    return outcome


def _stored(db, cmd, operation: str, lock: bool) -> dict:
    row = db.execute(STORED + (" FOR UPDATE" if lock else ""),
                     (cmd.transaction_id, cmd.step, operation)).fetchone()
    if row is None or row[0] is None:
        # A committed row always has its reply: this one was edited by hand.
        detail = "the row disappeared" if row is None else "no stored reply"
        message = f"barrier row {cmd.transaction_id}/{cmd.step}/{operation} is unusable: {detail}"
        log.error("%s", message)
        raise _Discard(retry(message))
    return row[0]
