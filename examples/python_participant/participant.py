"""The bank example's `accounts` participant in Python, written from docs/protocol.md.

    python participant.py [--delay-ms N]

Environment (the same as the Rust participant's):
    AMQP_URL                 default amqp://guest:guest@127.0.0.1:5672/%2f
    ACCOUNTS_DATABASE_URL    default postgres://postgres@127.0.0.1:5432/postgres
    SAGAS_AMQP_PREFIX        default sagas
    SAGAS_QUORUM_QUEUES      1/true/yes/on for quorum queues (as the orchestrator's)
    SAGAS_QUEUE_EXPIRES_MS   queue expiry in ms (as the orchestrator's; tests and demos)
    SAGAS_PARTICIPANT_PREFETCH        unacknowledged commands the broker may push (default 16)
    SAGAS_PARTICIPANT_ACCEPTS_BATCH   command batches announced, 0 to 256 (default 16; 0: none)
    LOG_LEVEL                default INFO

One command at a time, each in its own database transaction through the barrier; a command
batch is handled element by element and answered with one reply batch.
"""

import argparse
import logging
import os
import signal
import sys
import time

import pika
import psycopg
from pika.exceptions import AMQPError, NackError, UnroutableError

import barrier
import bank
from protocol import (BATCH_CONTENT_TYPE, CONTENT_TYPE, MAX_BATCH, Malformed, decode_command,
                      decode_json, encode, reply_message_id, split_batch, valid_traceparent)

PARTICIPANT = "accounts"
log = logging.getLogger("participant")


class Stopping(Exception):
    """The process is asked to stop while a command waits for the database: the command is
    left unanswered and unacked, and the broker gives it to another consumer."""


class Backoff:
    """100 ms, doubling up to 5 s, for as long as it takes."""

    def __init__(self):
        self.delay = 0.1

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, 5.0)
        return delay

    def reset(self):
        self.delay = 0.1


class Settings:
    def __init__(self, env=os.environ):
        self.amqp_url = env.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        self.database_url = env.get("ACCOUNTS_DATABASE_URL",
                                    "postgres://postgres@127.0.0.1:5432/postgres")
        self.prefix = env.get("SAGAS_AMQP_PREFIX", "sagas")
        self.quorum = env.get("SAGAS_QUORUM_QUEUES", "no").lower() in ("1", "true", "yes", "on")
        expires = env.get("SAGAS_QUEUE_EXPIRES_MS", "").strip()
        self.expires_ms = int(expires) if expires else None
        self.prefetch = int(env.get("SAGAS_PARTICIPANT_PREFETCH", "16"))
        # A batch is handled one element after the other: a small one stays well within a step's
        # timeout (the orchestrator sends at most 16 anyway).
        self.accepts_batch = min(int(env.get("SAGAS_PARTICIPANT_ACCEPTS_BATCH", "16")), MAX_BATCH)

    @property
    def queue(self) -> str:
        return f"{self.prefix}.participant.{PARTICIPANT}"


class Database:
    """One connection to the accounts database, made again when lost."""

    def __init__(self, url: str):
        self.url = url
        self.conn = None

    def connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            try:
                self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                            application_name="sagas-python-participant")
                # The barrier's rules hold at READ COMMITTED, whatever the server's default.
                self.conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            except psycopg.OperationalError as error:
                raise barrier.DatabaseUnavailable(str(error)) from error
        return self.conn


def declare(ch, s: Settings):
    """The topology, with exactly the orchestrator's options and arguments (docs/protocol.md,
    "Topology"); {p}.replies is the orchestrator's and is not declared here."""

    def arguments(dead_letter_exchange=None) -> dict:
        args = {}
        if dead_letter_exchange:
            args["x-dead-letter-exchange"] = dead_letter_exchange
        if s.quorum:
            args["x-queue-type"] = "quorum"
        if s.expires_ms is not None:
            args["x-expires"] = s.expires_ms
        return args

    p = s.prefix
    auto_delete = s.expires_ms is not None
    ch.exchange_declare(f"{p}.dlx", "fanout", durable=True, auto_delete=auto_delete)
    ch.queue_declare(f"{p}.dead", durable=True, arguments=arguments())
    ch.queue_bind(f"{p}.dead", f"{p}.dlx", routing_key="")
    ch.exchange_declare(f"{p}.commands", "direct", durable=True, auto_delete=auto_delete)
    ch.queue_declare(s.queue, durable=True, arguments=arguments(f"{p}.dlx"))
    ch.queue_bind(s.queue, f"{p}.commands", routing_key=PARTICIPANT)


class Session:
    """One broker connection: consume commands, answer each through the barrier, until the
    connection is lost (an AMQPError) or `stopping()` is true."""

    def __init__(self, conn, s: Settings, db: Database, handler, stopping):
        self.conn, self.s, self.db, self.handler, self.stopping = conn, s, db, handler, stopping
        self.user = pika.URLParameters(s.amqp_url).credentials.username
        self.ch = conn.channel()
        self.ch.confirm_delivery()  # every publish below waits for the broker's confirm

    def run(self):
        declare(self.ch, self.s)
        self.ch.basic_qos(prefetch_count=self.s.prefetch)
        log.info("consuming %s", self.s.queue)
        for method, props, body in self.ch.consume(self.s.queue, inactivity_timeout=0.5):
            if self.stopping():
                self.ch.cancel()  # unacked deliveries go back to the queue
                return
            if method is not None:
                self.on_delivery(method, props, body)
        raise AMQPError("the broker cancelled the consumer (was the queue deleted?)")

    def on_delivery(self, method, props, body):
        reply_to = props.reply_to or ""
        if props.content_type == BATCH_CONTENT_TYPE:
            return self.on_batch(method, props, body, reply_to)
        try:
            cmd = decode_command(decode_json(body))
            if not reply_to:
                raise Malformed("missing reply_to property")
        except Malformed as malformed:
            return self.dead_letter(method, props, body, str(malformed))
        reply = cmd.reply(self.process(cmd))
        headers = self.announcement()
        trace = valid_traceparent((props.headers or {}).get("traceparent"))
        if trace:
            headers["traceparent"] = trace
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2, message_id=reply_message_id(reply),
            correlation_id=cmd.transaction_id, headers=headers)
        self.answer(method, reply_to, encode(reply), properties)

    def on_batch(self, method, props, body, reply_to):
        try:
            elements = split_batch(body)
            if not reply_to:
                raise Malformed("missing reply_to property")
        except Malformed as malformed:
            return self.dead_letter(method, props, body, str(malformed))
        log.debug("a command batch of %d", len(elements))
        replies = []
        for element in elements:
            try:
                cmd = decode_command(element)
            except Malformed as malformed:
                if not self.dead_letter_element(element, str(malformed)):
                    # Not lost: the whole batch comes back, and the barrier answers the
                    # elements already handled from their stored replies.
                    return self.ch.basic_nack(method.delivery_tag, requeue=True)
                continue
            replies.append(cmd.reply(self.process(cmd)))
        if not replies:
            return self.ch.basic_ack(method.delivery_tag)
        headers = self.announcement()
        headers["x-saga-batch"] = len(replies)
        properties = pika.BasicProperties(
            content_type=BATCH_CONTENT_TYPE, delivery_mode=2,
            message_id=f"batch:{reply_message_id(replies[0])}:{len(replies)}", headers=headers)
        self.answer(method, reply_to, encode(replies), properties)

    def announcement(self) -> dict:
        if self.s.accepts_batch <= 0:
            return {}
        return {"x-saga-participant": PARTICIPANT, "x-saga-accepts-batch": self.s.accepts_batch}

    def process(self, cmd) -> dict:
        """The command's outcome. While the database is away nothing is answered: the command
        waits (holding its delivery) and runs again once the database is back."""
        backoff = Backoff()
        while True:
            try:
                outcome = barrier.execute(self.db.connection(), cmd, self.handler)
                log.debug("%s %s/%s/%s#%d: %s", cmd.definition, cmd.transaction_id, cmd.step,
                          cmd.operation, cmd.attempt, outcome["status"])
                return outcome
            except barrier.DatabaseUnavailable as error:
                if self.stopping():
                    raise Stopping() from error
                delay = backoff.next()
                log.warning("database unavailable (%s); trying again in %.1f s", error, delay)
                self.conn.sleep(delay)  # keeps the broker connection served meanwhile

    def answer(self, method, reply_to, body, properties):
        """Publishes a reply to the default exchange and acks the command once confirmed."""
        try:
            self.ch.basic_publish("", reply_to, body, properties, mandatory=True)
        except UnroutableError:
            # No queue for it: requeueing would loop; the orchestrator's timeout resends the
            # command and the barrier answers again.
            log.warning("reply to %s unroutable (no such queue); dropped", reply_to)
        except NackError:
            log.warning("reply refused (nacked) by the broker; requeueing the command")
            return self.ch.basic_nack(method.delivery_tag, requeue=True)
        self.ch.basic_ack(method.delivery_tag)

    def dead_letter(self, method, props, body, reason):
        """Republishes a malformed message to {p}.dlx with its own properties and the reason,
        then acks it; rejects it without requeue if the broker refuses."""
        log.warning("dead-lettering a message: %s", reason)
        headers = dict(props.headers or {})
        headers["x-sagas-reason"] = reason
        headers["x-sagas-queue"] = self.s.queue
        kept = pika.BasicProperties(
            content_type=props.content_type, content_encoding=props.content_encoding,
            headers=headers, delivery_mode=2, priority=props.priority,
            correlation_id=props.correlation_id, reply_to=props.reply_to,
            expiration=props.expiration, message_id=props.message_id, timestamp=props.timestamp,
            type=props.type, app_id=props.app_id, cluster_id=props.cluster_id,
            # RabbitMQ refuses (and closes the channel for) a user_id that is not ours.
            user_id=props.user_id if props.user_id == self.user else None)
        try:
            self.ch.basic_publish(f"{self.s.prefix}.dlx", "", body, kept)
        except NackError:
            return self.ch.basic_reject(method.delivery_tag, requeue=False)
        self.ch.basic_ack(method.delivery_tag)

    def dead_letter_element(self, element, reason) -> bool:
        """Dead-letters one element of a batch alone, as a JSON message; False if refused."""
        log.warning("dead-lettering an element of a command batch: %s", reason)
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2,
            headers={"x-sagas-reason": reason, "x-sagas-queue": self.s.queue})
        try:
            self.ch.basic_publish(f"{self.s.prefix}.dlx", "", encode(element), properties)
            return True
        except NackError:
            return False


def close_quietly(conn):
    if conn is not None and conn.is_open:
        try:
            conn.close()
        except AMQPError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=int, default=0,
                        help="pause inside every handler (to watch transfers in flight)")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)  # it logs every connection step
    s = Settings()
    handler = bank.Accounts(delay_ms=args.delay_ms)

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))

    def stopping() -> bool:
        return bool(stop)

    db = Database(s.database_url)
    backoff = Backoff()
    while not stopping():
        try:
            barrier.install(db.connection(), bank.SCHEMA)
            break
        except (barrier.DatabaseUnavailable, psycopg.OperationalError) as error:
            log.warning("creating the tables: database unavailable (%s)", error)
            time.sleep(backoff.next())

    params = pika.URLParameters(s.amqp_url)
    params.socket_timeout = params.stack_timeout = 10  # one connection attempt: 10 s at most
    params.connection_attempts = 1
    params.client_properties = {"connection_name": f"sagas-python-participant {s.prefix}"}
    backoff.reset()
    conn = None
    while not stopping():
        try:
            conn = pika.BlockingConnection(params)
            log.info("connected to the broker")
            session = Session(conn, s, db, handler, stopping)
            backoff.reset()
            session.run()
        except Stopping:
            break
        except AMQPError as error:
            delay = backoff.next()
            log.warning("broker connection lost (%r); reconnecting in %.1f s", error, delay)
            close_quietly(conn)
            time.sleep(delay)
    close_quietly(conn)  # unacked commands go back to the queue
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
