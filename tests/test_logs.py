"""Tests for :mod:`secure_echo.daemon.logs`: JSON Lines records and the rotating file service."""

from __future__ import annotations

import datetime
import io
import json
import math
import stat
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.daemon.logs import (
    DEFAULT_EVENT,
    JSONLinesObserver,
    JSONLogService,
    _Timestamps,
    event_as_record,
    open_log_file,
    render_message,
)

HEAD = ["time", "level", "event", "namespace", "message"]


class RecordTests(SynchronousTestCase):
    """What one event becomes."""

    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.stream = io.StringIO()
        self.publisher.addObserver(JSONLinesObserver(self.stream))
        self.log = Logger(namespace="secure_echo.test", observer=self.publisher)

    def lines(self) -> list[str]:
        text = self.stream.getvalue()
        self.assertTrue(text.endswith("\n"))
        return text.splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def test_head_fields_first(self) -> None:
        """Every record starts with time, level, event, namespace and message, in order."""
        self.log.info("hello {name}", event="greeting", name="world")
        [record] = self.records()
        self.assertEqual(list(record)[:5], HEAD)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["event"], "greeting")
        self.assertEqual(record["namespace"], "secure_echo.test")
        self.assertEqual(record["message"], "hello world")
        self.assertEqual(record["name"], "world")

    def test_internal_fields_dropped(self) -> None:
        """Twisted's log_* bookkeeping does not reach the record."""
        self.log.warn("x {a}", a=1)
        [record] = self.records()
        self.assertEqual(sorted(record), sorted([*HEAD, "a"]))
        self.assertEqual(record["level"], "warn")

    def test_time(self) -> None:
        """The time is ISO 8601 UTC with microseconds."""
        record = event_as_record({"log_time": 1.5, "log_format": "x"})
        self.assertEqual(record["time"], "1970-01-01T00:00:01.500000+00:00")

    def test_missing_time_and_level(self) -> None:
        """An event without time or level still makes a record (with nulls)."""
        record = event_as_record({"log_format": "bare"})
        self.assertEqual(list(record)[:5], HEAD)
        self.assertIsNone(record["time"])
        self.assertIsNone(record["level"])
        self.assertEqual(record["message"], "bare")

    def test_default_event(self) -> None:
        """An event without an ``event`` field (Twisted's own) gets 'twisted'."""
        self.log.info("from twisted")
        [record] = self.records()
        self.assertEqual(DEFAULT_EVENT, "twisted")
        self.assertEqual(record["event"], "twisted")

    def test_field_named_like_head_does_not_override(self) -> None:
        """An event field called ``time`` or ``message`` cannot replace the head fields."""
        self.log.info("real", event="e", time="bogus", message="bogus")
        [record] = self.records()
        self.assertEqual(record["message"], "real")
        self.assertNotEqual(record["time"], "bogus")

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        *HEAD,
                        "log_time",
                        "log_level",
                        "log_format",
                        "log_extra",
                        "conn_id",
                        "peer",
                        "a",
                        "b",
                        "traceback",
                    ]
                ),
                st.one_of(
                    st.none(),
                    st.integers(0, 2**31),
                    st.text(max_size=3),
                    st.just(LogLevel.warn),
                ),
            ),
            max_size=12,
        ),
        st.integers(min_value=1, max_value=3),
    )
    def test_same_as_key_by_key(self, items: list[tuple[str, object]], repeat: int) -> None:
        """Any event, of a shape seen before or not, gives the record a key-by-key copy gives."""
        event = dict(items)
        event.setdefault("log_format", "x")
        for _ in range(repeat):  # the first copy makes the shape's plan, the rest use it
            self.assertEqual(
                list(event_as_record(event).items()), list(_key_by_key(event).items())
            )

    def test_head_kept_against_every_named_field(self) -> None:
        """Fields named level and namespace do not replace the head's either."""
        event: dict[str, object] = {"event": "e", "level": "bogus", "namespace": "bogus"}
        event["time"] = event["message"] = "bogus"
        event.update(log_format="real", log_level=LogLevel.warn, log_namespace="ns", log_time=1.5)
        record = event_as_record(event)
        self.assertEqual((record["level"], record["namespace"]), ("warn", "ns"))
        self.assertEqual((record["time"][:4], record["message"]), ("1970", "real"))

    def test_event_with_failure_keeps_every_field(self) -> None:
        """A failure's event is copied field by field: all of them, in order, after the head."""
        failure = Failure(ZeroDivisionError("x"))
        record = event_as_record(
            {
                "event": "e",
                "first": 1,
                "log_format": "x",
                "log_failure": failure,
                "log_other": failure,
                "level": "bogus",
                "last": 2,
            }
        )
        self.assertEqual(list(record), [*HEAD, "first", "traceback", "last"])
        self.assertEqual((record["first"], record["last"], record["level"]), (1, 2, None))

    def test_failure_that_is_not_a_failure(self) -> None:
        """A ``log_failure`` that is no Failure is dropped, not rendered."""
        record = event_as_record({"log_format": "x", "log_failure": "oops", "a": 1})
        self.assertEqual(list(record), [*HEAD, "a"])

    def test_failure_becomes_traceback(self) -> None:
        """A logged failure is rendered into ``traceback``."""
        try:
            1 / 0  # noqa: B018 - raising on purpose
        except ZeroDivisionError:
            self.log.failure("handler crashed", event="handler_error")
        [record] = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["event"], "handler_error")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertNotIn("log_failure", record)

    def test_awkward_values(self) -> None:
        """Bytes, sets, tuples and arbitrary objects are written, not fatal."""
        marker = object()
        self.log.info(
            "values",
            raw=b"ab\xff\x00",
            tags={"b"},
            frozen=frozenset({1}),
            pair=(1, 2),
            nested=[{3}],
            thing=marker,
        )
        [record] = self.records()
        self.assertEqual(record["raw"], "ab\\xff\x00")
        self.assertEqual(record["tags"], ["b"])
        self.assertEqual(record["frozen"], [1])
        self.assertEqual(record["pair"], [1, 2])
        self.assertEqual(record["nested"], [[3]])
        self.assertEqual(record["thing"], repr(marker))

    def test_values_json_cannot_hold(self) -> None:
        """Keys that are no scalars and cycles become their repr; NaN null; the record is kept."""
        cycle: list[object] = []
        cycle.append(cycle)
        self.log.info(
            "odd", event="odd", keyed={(1, 2): "x"}, cycle=cycle, nan=math.nan, inf=math.inf, ok=1
        )
        [line] = self.lines()
        self.assertNotIn("NaN", line)
        self.assertNotIn("Infinity", line)
        record = json.loads(line)
        self.assertEqual(record["event"], "odd")
        self.assertEqual(record["keyed"], "{(1, 2): 'x'}")
        self.assertEqual(record["cycle"], "[[...]]")
        self.assertIsNone(record["nan"])
        self.assertIsNone(record["inf"])
        self.assertEqual(record["ok"], 1)

    def test_nan_alone_is_null(self) -> None:
        """In an otherwise ordinary record, NaN and infinities are null: JSON has neither."""
        self.log.info("odd", event="odd", nan=math.nan, inf=-math.inf, ok=1.5)
        [line] = self.lines()
        self.assertNotIn("NaN", line)
        self.assertNotIn("Infinity", line)
        record = json.loads(line)
        self.assertIsNone(record["nan"])
        self.assertIsNone(record["inf"])
        self.assertEqual(record["ok"], 1.5)

    def test_one_line_no_separator(self) -> None:
        """Newlines in values are escaped: one record, one line, no \\x1e anywhere."""
        self.log.info("multi\nline {v}", v="a\nb\r\x1ec")
        self.log.info("second")
        text = self.stream.getvalue()
        self.assertEqual(text.count("\n"), 2)
        self.assertNotIn("\x1e", text)
        first, second = self.records()
        self.assertEqual(first["v"], "a\nb\r\x1ec")
        self.assertEqual(first["message"], "multi\nline a\nb\r\x1ec")
        self.assertEqual(second["message"], "second")

    def test_unicode(self) -> None:
        """Non-ASCII text is written as UTF-8 text and read back unchanged."""
        self.log.info("caf\u00e9 {who}", who="\u00fc")
        [record] = self.records()
        self.assertEqual(record["message"], "caf\u00e9 \u00fc")
        self.assertIn("caf\u00e9", self.stream.getvalue())

    def test_unformattable_message(self) -> None:
        """A format string that cannot be rendered still gives a record."""
        self.log.info("missing {field}", event="broken")
        [record] = self.records()
        self.assertEqual(record["event"], "broken")
        self.assertIsInstance(record["message"], str)

    def test_levels(self) -> None:
        """Each level is written by its name."""
        for level in LogLevel.iterconstants():
            self.log.emit(level, "x")
        self.assertEqual(
            [r["level"] for r in self.records()],
            [level.name for level in LogLevel.iterconstants()],
        )


class TimestampTests(SynchronousTestCase):
    """The record's ``time``: the same text ``datetime`` would write, made cheaper."""

    @given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
    def test_same_as_datetime(self, when: float) -> None:
        """Any time, including ones that round up into the next second."""
        expected = datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(
            timespec="microseconds"
        )
        self.assertEqual(_Timestamps()(when), expected)

    def test_second_reused_and_renewed(self) -> None:
        """One stamp object across seconds, and a fraction that rounds to the next."""
        stamps = _Timestamps()
        self.assertEqual(stamps(1.25), "1970-01-01T00:00:01.250000+00:00")
        self.assertEqual(stamps(1.5), "1970-01-01T00:00:01.500000+00:00")
        self.assertEqual(stamps(2.0), "1970-01-01T00:00:02.000000+00:00")
        self.assertEqual(stamps(2.9999999), "1970-01-01T00:00:03.000000+00:00")
        self.assertEqual(stamps(2.1), "1970-01-01T00:00:02.100000+00:00")


class LogFileServiceTests(SynchronousTestCase):
    """The service that attaches the observer on a rotating file."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        self.path = self.directory / "echo.jsonl"
        self.publisher = LogPublisher()
        self.log = Logger(namespace="secure_echo.test", observer=self.publisher)

    def read(self, path: Path | None = None) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (path or self.path).read_text().splitlines()]

    def test_writes_while_running(self) -> None:
        """Records go to the file while the service runs and stop after it stops."""
        service = JSONLogService(self.path, 1_000_000, 3, publisher=self.publisher)
        service.startService()
        self.log.info("one", event="first")
        self.assertEqual([r["event"] for r in self.read()], ["first"])
        service.stopService()
        self.log.info("two", event="second")
        self.assertEqual([r["event"] for r in self.read()], ["first"])
        self.assertFalse(service.running)

    def test_privileged_start_opens(self) -> None:
        """The privileged start opens the file (mode 0640); the normal start keeps it."""
        service = JSONLogService(self.path, 1_000_000, 3, publisher=self.publisher)
        service.privilegedStartService()
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o640)
        self.log.info("early", event="early")
        service.startService()
        self.log.info("late", event="late")
        service.stopService()
        self.assertEqual([r["event"] for r in self.read()], ["early", "late"])

    def test_appends(self) -> None:
        """A restarted service appends to the existing file."""
        for name in ("first", "second"):
            service = JSONLogService(self.path, 1_000_000, 3, publisher=self.publisher)
            service.startService()
            self.log.info(name, event=name)
            service.stopService()
        self.assertEqual([r["event"] for r in self.read()], ["first", "second"])

    def test_stop_without_start(self) -> None:
        """Stopping a service that never started does nothing."""
        service = JSONLogService(self.path, 1_000_000, 3, publisher=self.publisher)
        service.stopService()
        self.assertFalse(self.path.exists())

    def test_rotation_keeps_at_most_keep(self) -> None:
        """At max_bytes the file rotates; only ``keep`` rotated files remain, all whole."""
        service = JSONLogService(self.path, 1000, 2, publisher=self.publisher)
        service.startService()
        for number in range(200):
            self.log.info("record {number} {padding}", number=number, padding="x" * 50)
        service.stopService()
        names = sorted(p.name for p in self.directory.iterdir())
        self.assertEqual(names, ["echo.jsonl", "echo.jsonl.1", "echo.jsonl.2"])
        numbers: list[int] = []
        for path in (self.path.with_name(n) for n in reversed(names)):
            records = self.read(path)
            numbers += [r["number"] for r in records]
        # The newest records, in order, with no gap and none split across files.
        self.assertEqual(numbers, list(range(200 - len(numbers), 200)))
        self.assertGreaterEqual(self.path.with_name("echo.jsonl.1").stat().st_size, 1000)
        self.assertLess(self.path.with_name("echo.jsonl.1").stat().st_size, 1200)

    def test_lone_surrogate(self) -> None:
        """A field holding an undecodable file name is written as a JSON escape, not lost."""
        service = JSONLogService(self.path, 1_000_000, 3, publisher=self.publisher)
        service.startService()
        self.log.info("loaded {cert}", event="tls_context_loaded", cert="/etc/\udcff.pem")
        service.stopService()
        [record] = self.read()
        self.assertEqual(record["event"], "tls_context_loaded")
        self.assertEqual(record["cert"], "/etc/\udcff.pem")

    def test_open_log_file(self) -> None:
        """open_log_file rotates at max_bytes and keeps ``keep`` files."""
        log_file = open_log_file(self.path, 4096, 7)
        self.addCleanup(log_file.close)
        self.assertEqual(log_file.rotateLength, 4096)
        self.assertEqual(log_file.maxRotatedFiles, 7)
        self.assertEqual(Path(log_file.path), self.path)


class RenderMessageTests(SynchronousTestCase):
    """The fast message rendering agrees with Twisted's and falls back to it."""

    def test_same_text_as_twisted(self) -> None:
        """Field-only format strings render exactly as formatEvent renders them."""
        from twisted.logger import formatEvent  # noqa: PLC0415

        from secure_echo.daemon.logs import render_message  # noqa: PLC0415

        event = {
            "log_format": "connection {conn_id} from {peer!r} closed: {close_reason} {n:.2f}",
            "conn_id": 7,
            "peer": "[::1]:5",
            "close_reason": "eof",
            "n": 1.5,
        }
        self.assertEqual(render_message(event), formatEvent(event))

    def test_fallback(self) -> None:
        """Twisted's own syntax and broken events go through formatEvent."""
        from twisted.logger import formatEvent  # noqa: PLC0415

        from secure_echo.daemon.logs import render_message  # noqa: PLC0415

        class Source:
            def name(self) -> str:
                return "called"

        for event in (
            {"log_format": "{source.name()}", "source": Source()},
            {"log_format": "{missing}"},
            {"message": ("legacy",)},
        ):
            self.assertEqual(render_message(event), formatEvent(event))
        self.assertEqual(
            render_message({"log_format": "{source.name()}", "source": Source()}), "called"
        )


def _key_by_key(event: dict[str, object]) -> dict[str, object]:
    """The record as the module's docstring describes it, field by field.

    The head's values are made as the other tests check them.
    """
    when = event.get("log_time")
    record: dict[str, object] = {
        "time": _Timestamps()(when) if isinstance(when, int | float) else None,
        "level": getattr(event.get("log_level"), "name", None),
        "event": event.get("event", DEFAULT_EVENT),
        "namespace": event.get("log_namespace"),
        "message": render_message(event),
    }
    for key, value in event.items():
        if key not in record and not key.startswith("log_"):
            record[key] = value
    return record
