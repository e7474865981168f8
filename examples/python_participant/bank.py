"""The bank transfer's `accounts` participant (examples/bank_transfer/bank.rs, the same tables
and the same effects): the steps `debit` and `credit` of `transfer_saga` (action/compensate)
and of `transfer_tcc` (try/confirm/cancel).

Every payload is `{"account": "acct-1", "amount": 250}`; every output is the account and its
available balance after the change. A statement that matches no row is a business failure.
"""

import time

from barrier import BusinessFailure

SCHEMA = """
CREATE TABLE IF NOT EXISTS bank_accounts (
    id        text    PRIMARY KEY,
    available bigint  NOT NULL CHECK (available >= 0),
    frozen    bigint  NOT NULL DEFAULT 0 CHECK (frozen >= 0),
    pending   bigint  NOT NULL DEFAULT 0 CHECK (pending >= 0),
    closed    boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS bank_seed (id int PRIMARY KEY CHECK (id = 1), total bigint NOT NULL);
"""

# Each takes (account, amount) and returns the available balance after the change.
DEBIT = """UPDATE bank_accounts SET available = available - %(amount)s
           WHERE id = %(account)s AND available >= %(amount)s RETURNING available"""
REFUND = """UPDATE bank_accounts SET available = available + %(amount)s
            WHERE id = %(account)s RETURNING available"""
CREDIT = """UPDATE bank_accounts SET available = available + %(amount)s
            WHERE id = %(account)s AND NOT closed RETURNING available"""
TAKE_BACK = """UPDATE bank_accounts SET available = available - %(amount)s
               WHERE id = %(account)s RETURNING available"""
FREEZE = """UPDATE bank_accounts SET available = available - %(amount)s, frozen = frozen + %(amount)s
            WHERE id = %(account)s AND available >= %(amount)s RETURNING available"""
SPEND_FROZEN = """UPDATE bank_accounts SET frozen = frozen - %(amount)s
                  WHERE id = %(account)s RETURNING available"""
UNFREEZE = """UPDATE bank_accounts SET frozen = frozen - %(amount)s, available = available + %(amount)s
              WHERE id = %(account)s RETURNING available"""
EXPECT = """UPDATE bank_accounts SET pending = pending + %(amount)s
            WHERE id = %(account)s AND NOT closed RETURNING available"""
RECEIVE = """UPDATE bank_accounts SET pending = pending - %(amount)s, available = available + %(amount)s
             WHERE id = %(account)s RETURNING available"""
FORGET = """UPDATE bank_accounts SET pending = pending - %(amount)s
            WHERE id = %(account)s RETURNING available"""

NO_FUNDS = "insufficient funds or no such account"
NOT_OPEN = "account closed or unknown"
UNKNOWN = "no such account"

# (definition, step) -> its mode and, per operation, the statement and the reason it fails with.
STEPS = {
    ("transfer_saga", "debit"): ("saga", {"action": (DEBIT, NO_FUNDS), "compensate": (REFUND, UNKNOWN)}),
    ("transfer_saga", "credit"): ("saga", {"action": (CREDIT, NOT_OPEN), "compensate": (TAKE_BACK, UNKNOWN)}),
    ("transfer_tcc", "debit"): ("TCC", {"try": (FREEZE, NO_FUNDS), "confirm": (SPEND_FROZEN, UNKNOWN),
                                        "cancel": (UNFREEZE, UNKNOWN)}),
    ("transfer_tcc", "credit"): ("TCC", {"try": (EXPECT, NOT_OPEN), "confirm": (RECEIVE, UNKNOWN),
                                         "cancel": (FORGET, UNKNOWN)}),
}


class Accounts:
    """The handler: `accounts(db, cmd)` applies one command inside the barrier's transaction."""

    def __init__(self, delay_ms: int = 0):
        self.delay = delay_ms / 1000

    def __call__(self, db, cmd):
        found = STEPS.get((cmd.definition, cmd.step))
        if found is None:
            raise BusinessFailure(f'no handler for step "{cmd.step}" of "{cmd.definition}"')
        mode, operations = found
        if cmd.operation not in operations:
            article = "a saga" if mode == "saga" else "a TCC"
            raise BusinessFailure(f'step "{cmd.step}" of "{cmd.definition}" is {article} step '
                                  f"and does not support {cmd.operation}")
        sql, why = operations[cmd.operation]
        leg = leg_of(cmd.payload)
        if self.delay:
            time.sleep(self.delay)  # a test hook, so that commands are in flight for longer
        row = db.execute(sql, leg).fetchone()
        if row is None:
            raise BusinessFailure(f"{leg['account']}: {why}")
        return {"account": leg["account"], "available": row[0]}


def leg_of(payload) -> dict:
    amount = payload.get("amount") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or not isinstance(payload.get("account"), str) \
            or not isinstance(amount, int) or isinstance(amount, bool):
        raise BusinessFailure(f"malformed command payload: {payload!r}")
    return {"account": payload["account"], "amount": payload["amount"]}
