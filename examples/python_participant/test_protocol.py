"""The command validation of protocol.py against docs/protocol.md, "Validation of a command
body": what is refused, with which reason, and what is let through.

    python -m unittest discover -s examples/python_participant
"""

import json
import unittest

from protocol import (Malformed, decode_command, decode_json, reply_message_id, split_batch,
                      valid_traceparent)

TID = "0197a3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"
GOOD = {"protocol": 1, "transaction_id": TID, "definition": "transfer_tcc", "step": "debit",
        "operation": "try", "attempt": 1, "payload": {"account": "acct-1", "amount": 250},
        "deadline": "2025-06-01T12:00:05.123456Z"}


def refusal(body) -> str:
    try:
        decode_command(body)
    except Malformed as malformed:
        return str(malformed)
    raise AssertionError(f"accepted: {body!r}")


class Validation(unittest.TestCase):
    def test_a_command_as_the_orchestrator_writes_it_is_accepted(self):
        cmd = decode_command(decode_json(json.dumps(GOOD).encode()))
        self.assertEqual((cmd.transaction_id, cmd.operation, cmd.attempt), (TID, "try", 1))
        self.assertEqual(cmd.deadline.isoformat(), "2025-06-01T12:00:05.123456+00:00")
        reply = cmd.reply({"status": "retry", "reason": "busy"})
        self.assertEqual(reply_message_id(reply), f"{TID}:debit:try:1:reply")

    def test_the_body_and_its_protocol_are_checked_first(self):
        for body in (b"not json", b"\xff"):
            with self.assertRaises(Malformed) as caught:
                decode_json(body)
            self.assertTrue(str(caught.exception).startswith("body is not a protocol message"))
        for body in ([GOOD], {**GOOD, "protocol": 1.0}, {**GOOD, "protocol": "1"},
                     {**GOOD, "protocol": -1}, {k: v for k, v in GOOD.items() if k != "protocol"}):
            self.assertEqual(refusal(body),
                             'body is not a protocol message: no numeric "protocol" field')
        self.assertEqual(refusal({"protocol": 2}), "unsupported protocol version 2 (expected 1)")

    def test_fields_of_the_wrong_kind_are_invalid_commands(self):
        cases = {
            "transaction_id": ["not-a-uuid", 7],
            "definition": [None],
            "operation": ["undo", "Try"],
            "attempt": [-1, 1.0, "1", True, 2**32],
            "deadline": ["tomorrow", "2025-06-01T12:00:05", 5],
        }
        for field, values in cases.items():
            for value in values:
                reason = refusal({**GOOD, field: value})
                self.assertTrue(reason.startswith("invalid command: "), (field, value, reason))
        self.assertEqual(refusal({**GOOD, "attempt": 0}),
                         "invalid command: attempt 0 (attempts count from 1)")
        missing = {k: v for k, v in GOOD.items() if k != "payload"}
        self.assertEqual(refusal(missing), "invalid command: missing field `payload`")

    def test_what_is_let_through(self):
        loose = {**GOOD, "payload": None, "output": None, "deadline": None, "traceparent": "x",
                 "transaction_id": "{" + TID.upper() + "}", "unknown": [1]}
        cmd = decode_command(loose)
        self.assertEqual((cmd.payload, cmd.output, cmd.deadline), (None, None, None))
        self.assertEqual(cmd.transaction_id, TID)
        self.assertIsNone(valid_traceparent(cmd.traceparent))
        good = "00-4bf92f3577b34da6a3ce929d0e0e4736-9c5b1f0e2d3a4b67-01"
        self.assertEqual(valid_traceparent(good), good)
        self.assertIsNone(valid_traceparent("00-" + "0" * 32 + "-9c5b1f0e2d3a4b67-01"))

    def test_a_batch_is_an_array_of_1_to_256_elements(self):
        self.assertEqual(len(split_batch(json.dumps([GOOD, {}]).encode())), 2)
        for body, reason in ((b"{}", "batch body is not a JSON array"),
                             (b"[]", "batch body is an empty array"),
                             (json.dumps([GOOD] * 257).encode(),
                              "batch of 257 elements exceeds the limit of 256")):
            with self.assertRaises(Malformed) as caught:
                split_batch(body)
            self.assertTrue(str(caught.exception).startswith(reason), caught.exception)


if __name__ == "__main__":
    unittest.main()
