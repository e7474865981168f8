"""The wire protocol, version 1 (docs/protocol.md): command bodies in, reply bodies out.

Only the standard library: decoding and validating a command, and building the reply bodies
and their AMQP properties. Nothing here talks to the broker or the database.
"""

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

PROTOCOL = 1
CONTENT_TYPE = "application/json"
BATCH_CONTENT_TYPE = "application/vnd.sagas.batch+json"
MAX_BATCH = 256

FORWARD = {"action", "try"}
UNDO = {"compensate", "cancel"}
OPERATIONS = FORWARD | UNDO | {"confirm"}
# The forward operation that an undo (or a confirm) belongs to.
FORWARD_OF = {"compensate": "action", "cancel": "try", "confirm": "try"}

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


class Malformed(Exception):
    """A message that can never be handled: it is dead-lettered with str(self) as the reason."""


@dataclass(frozen=True)
class Command:
    transaction_id: str  # canonical lowercase hyphenated form
    definition: str
    step: str
    operation: str
    attempt: int
    payload: Any
    output: Any = None
    deadline: Optional[datetime] = None
    traceparent: Optional[str] = None

    def reply(self, outcome: dict) -> dict:
        """The reply body answering this command with `outcome`."""
        return {
            "protocol": PROTOCOL,
            "transaction_id": self.transaction_id,
            "step": self.step,
            "operation": self.operation,
            "attempt": self.attempt,
            "outcome": outcome,
        }


def succeeded(output: Any) -> dict:
    return {"status": "succeeded", "output": output}


def failed(reason: str) -> dict:
    return {"status": "failed", "reason": reason}


def retry(reason: str) -> dict:
    return {"status": "retry", "reason": reason}


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Malformed(f"body is not a protocol message: {e}") from None


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_command(value: Any) -> Command:
    """Validates a decoded command body in the order of "Validation of a command body"."""
    protocol = value.get("protocol") if isinstance(value, dict) else None
    if not is_integer(protocol) or protocol < 0:
        raise Malformed('body is not a protocol message: no numeric "protocol" field')
    if protocol != PROTOCOL:
        raise Malformed(f"unsupported protocol version {protocol} (expected {PROTOCOL})")

    def invalid(why: str) -> Malformed:
        return Malformed(f"invalid command: {why}")

    for field in ("transaction_id", "definition", "step", "operation", "attempt", "payload"):
        if field not in value:
            raise invalid(f"missing field `{field}`")
    for field in ("transaction_id", "definition", "step", "operation"):
        if not isinstance(value[field], str):
            raise invalid(f"invalid type: `{field}` must be a string")
    try:
        transaction_id = str(uuid.UUID(value["transaction_id"]))
    except ValueError:
        raise invalid(f"`transaction_id` is not a UUID: {value['transaction_id']!r}") from None
    if value["operation"] not in OPERATIONS:
        raise invalid(f"unknown variant `{value['operation']}`")
    attempt = value["attempt"]
    if not is_integer(attempt) or not 0 <= attempt <= 0xFFFFFFFF:
        raise invalid(f"`attempt` must be an integer from 1 to 4294967295, got {attempt!r}")
    if attempt == 0:
        raise invalid("attempt 0 (attempts count from 1)")
    deadline = value.get("deadline")
    if deadline is not None:
        deadline = parse_deadline(deadline)
        if deadline is None:
            raise invalid(f"`deadline` is not an RFC 3339 date-time: {value['deadline']!r}")
    traceparent = value.get("traceparent")
    return Command(
        transaction_id=transaction_id,
        definition=value["definition"],
        step=value["step"],
        operation=value["operation"],
        attempt=attempt,
        payload=value["payload"],
        output=value.get("output"),
        deadline=deadline,
        traceparent=traceparent if isinstance(traceparent, str) else None,
    )


def parse_deadline(text: Any) -> Optional[datetime]:
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def split_batch(body: bytes) -> list:
    """The elements of a command batch, each still to be judged on its own."""
    try:
        elements = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Malformed(f"batch body is not a JSON array: {e}") from None
    if not isinstance(elements, list):
        raise Malformed(f"batch body is not a JSON array: found {type(elements).__name__}")
    if not elements:
        raise Malformed("batch body is an empty array")
    if len(elements) > MAX_BATCH:
        raise Malformed(f"batch of {len(elements)} elements exceeds the limit of {MAX_BATCH}")
    return elements


def valid_traceparent(value: Any) -> Optional[str]:
    """`value` if it is a W3C trace context this protocol passes on, else None (ignored)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    m = _TRACEPARENT.match(value)
    if not m:
        return None
    version, trace_id, parent_id, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return None
    return value


def encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def reply_message_id(reply: dict) -> str:
    r = reply
    return f"{r['transaction_id']}:{r['step']}:{r['operation']}:{r['attempt']}:reply"
