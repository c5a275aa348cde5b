"""The log relay: a worker's lines into the supervisor's log and into the pool's state."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final, cast

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from secure_echo.daemon.logs import event_as_record
from secure_echo.pool.contract import WorkerState
from secure_echo.pool.health import PoolState
from secure_echo.pool.relay import LogRelay, record_as_event

if TYPE_CHECKING:
    from collections.abc import Mapping

    from twisted.logger import LogEvent


def line(event: str, **fields: object) -> bytes:
    """A worker's record line (without its newline)."""
    return json.dumps({"level": "info", "event": event, "message": event, **fields}).encode()


class RecordAsEventTests(SynchronousTestCase):
    """A worker's record goes back into the supervisor's log with ``worker`` added."""

    RECORD: Final = {
        "time": "2026-01-02T03:04:05.123456+00:00",
        "level": "warn",
        "event": "connection_closed",
        "namespace": "secure_echo.tls.connection.TLSServerFactory",
        "message": "connection 2-7 closed: {not a format}",
        "conn_id": "2-7",
        "peer": "127.0.0.1:5000",
        "nested": {"a": [1, 2]},
        "traceback": "Traceback ...",
    }

    def test_round_trip(self) -> None:
        """Written by the supervisor, the record is the worker's plus ``worker``, in order."""
        event = record_as_event(self.RECORD, 2, now=0.0)
        written = json.loads(json.dumps(event_as_record(event)))
        expected = dict(self.RECORD)
        self.assertEqual(written, {**expected, "worker": 2})
        self.assertEqual(
            list(written)[:8],
            ["time", "level", "event", "namespace", "message", "worker", "conn_id", "peer"],
        )
        self.assertEqual(event["log_level"], LogLevel.warn)

    def test_missing_head_fields(self) -> None:
        """No time, level or message: now, info and an empty message stand in."""
        event = record_as_event({"x": 1, "worker": 9, "log_format": "{x}"}, 1, now=1000.0)
        self.assertEqual(event["log_time"], 1000.0)
        self.assertEqual(event["log_level"], LogLevel.info)
        written = event_as_record(event)
        self.assertEqual(written["event"], "twisted")
        self.assertEqual(written["message"], "")
        self.assertEqual(written["worker"], 1)
        self.assertEqual(written["x"], 1)
        bad = record_as_event({"level": "loud", "time": "yesterday"}, 1, now=5.0)
        self.assertEqual((bad["log_level"], bad["log_time"]), (LogLevel.info, 5.0))


class LogRelayTests(SynchronousTestCase):
    """Where each kind of line goes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = PoolState(2, self.clock, deadline=10.0)
        self.state.started(1, 101)
        self.state.started(2, 102)
        self.published: list[LogEvent] = []
        self.connections: list[LogEvent] = []
        self.seen: list[tuple[int, Mapping[str, Any]]] = []
        self.relay = LogRelay(
            self.clock,
            self.state,
            self.published.append,
            self.connections.append,
            on_record=lambda worker, record: self.seen.append((worker, record)),
        )
        self.logged = EventLoggingObserver.createWithCleanup(
            cast("TestCase", self), globalLogPublisher
        )

    def test_log_records(self) -> None:
        """Records are published with ``worker``; connection records to their own place."""
        self.clock.advance(5)
        self.relay.line(1, 101, line("tls_error", peer="x"))
        self.relay.line(2, 102, line("connection_closed", conn_id="2-1"))
        self.assertEqual([(e["event"], e["worker"]) for e in self.published], [("tls_error", 1)])
        self.assertEqual([e["conn_id"] for e in self.connections], ["2-1"])
        self.assertEqual([w for w, _ in self.seen], [1, 2])
        self.assertEqual(self.state.views[1].last_seen, 5.0)

    def test_heartbeats_are_consumed(self) -> None:
        """A heartbeat sets state and connection count and is neither logged nor passed on."""
        self.relay.line(1, 101, line("worker_heartbeat", state="serving", connections=4))
        self.relay.line(2, 102, line("worker_heartbeat", state="nonsense", connections=9))
        self.assertEqual(self.published, [])
        self.assertEqual(self.seen, [])
        self.assertEqual(self.state.serving, 1)
        self.assertEqual(self.state.connections(), 4)
        self.assertIsNone(self.state.views[2].state)

    def test_states_errors_and_certificates(self) -> None:
        """Ready and stopping records set the state; a failure and the certificate are kept."""
        self.relay.line(1, 101, line("worker_ready"))
        self.relay.line(2, 102, line("worker_failed", error="--cert: gone"))
        self.relay.line(
            1, 101, line("tls_reloaded", subject="CN=new", not_after="2031-05-06T00:00:00+00:00")
        )
        self.relay.line(1, 101, line("worker_stopping", signal="SIGTERM"))
        self.assertIs(self.state.views[1].state, WorkerState.DRAINING)
        self.assertEqual(self.state.start_errors, {2: "--cert: gone"})
        self.assertEqual(self.state.subject, "CN=new")
        self.assertIn("valid until 2031-05-06", self.state.status())
        self.assertEqual(
            [e["event"] for e in self.published],
            ["worker_ready", "worker_failed", "tls_reloaded", "worker_stopping"],
        )

    def test_invalid_output_and_stderr(self) -> None:
        """Non-records and stderr lines are the supervisor's warnings; both count as life."""
        self.clock.advance(3)
        self.relay.line(1, 101, b"not json")
        self.relay.line(1, 101, b'{"cut', cut=True)
        self.clock.advance(3)
        self.relay.stderr(2, 102, b"Traceback (most recent call last):")
        invalid = [e for e in self.logged if e.get("event") == "worker_output_invalid"]
        self.assertEqual([e["reason"] for e in invalid], ["not a JSON object", "too long"])
        (stderr,) = [e for e in self.logged if e.get("event") == "worker_stderr"]
        self.assertEqual((stderr["worker"], stderr["pid"]), (2, 102))
        self.assertEqual(self.published, [])
        self.assertEqual((self.state.views[1].last_seen, self.state.views[2].last_seen), (3, 6))
