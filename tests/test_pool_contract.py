"""The supervisor-worker contract: the spec, the record stream and what records report."""

from __future__ import annotations

import itertools
import json
import socket
from typing import Final

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.pool.contract import (
    HEARTBEAT_EVENT,
    LOG_BUFFER_BYTES,
    READY_EVENT,
    SPEC_ENV,
    RecordReader,
    SharedSocket,
    TLSFileCopy,
    WorkerSpec,
    WorkerState,
    connection_count,
    parse_record,
    reported_state,
)


class RecordReaderTests(SynchronousTestCase):
    """Splitting a worker's stdout into lines."""

    STREAM: Final = b'{"a": 1}\n{"b": "x\\ny"}\n\n{"c": [1, 2]}\n'
    LINES: Final = [b'{"a": 1}', b'{"b": "x\\ny"}', b"", b'{"c": [1, 2]}']

    def test_every_split_point(self) -> None:
        """Fed in pieces of any size, the stream gives the same lines."""
        for size in range(1, len(self.STREAM) + 1):
            reader = RecordReader()
            lines: list[bytes] = []
            for start in range(0, len(self.STREAM), size):
                lines += [line for line, cut in reader.feed(self.STREAM[start : start + size])]
            self.assertEqual(lines, self.LINES, size)
            self.assertEqual(reader.finish(), [])

    @given(st.lists(st.binary().map(lambda b: b.replace(b"\n", b""))), st.data())
    def test_any_lines_split_anywhere(self, lines: list[bytes], data: st.DataObject) -> None:
        """Any lines, cut at any points, come out whole and in order."""
        stream = b"".join(line + b"\n" for line in lines)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)))))
        reader = RecordReader()
        out: list[bytes] = []
        for start, end in itertools.pairwise([0, *cuts, len(stream)]):
            out += [line for line, _ in reader.feed(stream[start:end])]
        self.assertEqual(out, lines)

    def test_unterminated_last_line(self) -> None:
        """At end of file an unterminated last line is still delivered."""
        reader = RecordReader()
        self.assertEqual(reader.feed(b'{"a": 1}\n{"b"'), [(b'{"a": 1}', False)])
        self.assertEqual(reader.finish(), [(b'{"b"', False)])
        self.assertEqual(reader.finish(), [])

    def test_overlong_line_is_cut_once(self) -> None:
        """A line over the limit comes out once, cut, and the rest of it is dropped."""
        reader = RecordReader(limit=10)
        self.assertEqual(reader.feed(b"0123456789"), [])  # exactly the limit: waits
        self.assertEqual(reader.feed(b"ABC"), [(b"0123456789", True)])
        self.assertEqual(reader.feed(b"DEFGHIJKLMNOPQRSTUVWXYZ"), [])
        self.assertEqual(reader.feed(b"end\nok\n"), [(b"ok", False)])
        self.assertEqual(
            reader.feed(b"0123456789ABC\n0123456789\n"),
            [
                (b"0123456789", True),
                (b"0123456789", False),
            ],
        )
        reader.feed(b"0123456789ABC")
        self.assertEqual(reader.finish(), [])

    def test_parse_record(self) -> None:
        """Only a JSON object is a record."""
        self.assertEqual(parse_record(b'{"event": "x"}'), {"event": "x"})
        for line in (b"", b"[1]", b'"text"', b"{broken", b"\xff\xfe"):
            self.assertIsNone(parse_record(line), line)


class ReportedStateTests(SynchronousTestCase):
    """Which records say what state their worker is in."""

    def test_states(self) -> None:
        """Ready serves, a stop or drain drains, a heartbeat says which; others say nothing."""
        cases: list[tuple[dict[str, object], WorkerState | None]] = [
            ({"event": READY_EVENT}, WorkerState.SERVING),
            ({"event": "worker_stopping"}, WorkerState.DRAINING),
            ({"event": "supervisor_gone"}, WorkerState.DRAINING),
            ({"event": "drain_started"}, WorkerState.DRAINING),
            ({"event": HEARTBEAT_EVENT, "state": "serving"}, WorkerState.SERVING),
            ({"event": HEARTBEAT_EVENT, "state": "draining"}, WorkerState.DRAINING),
            ({"event": HEARTBEAT_EVENT, "state": "asleep"}, None),
            ({"event": HEARTBEAT_EVENT, "state": 1}, None),
            ({"event": HEARTBEAT_EVENT}, None),
            ({"event": "connection_closed", "state": "serving"}, None),
            ({}, None),
        ]
        for record, state in cases:
            self.assertEqual(reported_state(record), state, record)

    def test_connection_count(self) -> None:
        """A heartbeat's count is a non-negative whole number; anything else is 0."""
        self.assertEqual(connection_count({"connections": 7}), 7)
        for bad in (None, "9", True, -4, 2.5):
            self.assertEqual(connection_count({"connections": bad}), 0, bad)


class SpecTests(SynchronousTestCase):
    """What a worker is told."""

    def test_round_trip(self) -> None:
        """A spec survives JSON, repeatable command-line values as tuples."""
        spec = WorkerSpec(
            3,
            {"max-pending": "8", "allow-cn": ["a", "b"], "cert": None},
            (SharedSocket(7, "INET", "127.0.0.1:1"), SharedSocket(8, "UNIX", "/x.sock")),
            "/etc/se.toml",
            {"allow-cn": ("a", "b"), "max-pending": "8"},
            4096,
            (TLSFileCopy("/etc/key.pem", 9),),
            start=4,
        )
        again = WorkerSpec.from_json(spec.to_json())
        self.assertEqual(again.start, 4)
        self.assertEqual(again.index, 3)
        self.assertEqual(dict(again.values), dict(spec.values))
        self.assertEqual(again.sockets, spec.sockets)
        self.assertEqual(again.config_file, "/etc/se.toml")
        self.assertEqual(dict(again.command_line), dict(spec.command_line))
        self.assertEqual(again.sockets[1].address_family, socket.AF_UNIX)
        self.assertEqual((again.log_buffer, again.tls_files), (4096, spec.tls_files))

    def test_defaults(self) -> None:
        """A spec without the newer fields has the default buffer and no TLS copies."""
        data = json.loads(WorkerSpec(1, {}).to_json())
        del data["log_buffer"], data["tls_files"], data["start"]
        spec = WorkerSpec.from_json(json.dumps(data))
        self.assertEqual((spec.log_buffer, spec.tls_files), (LOG_BUFFER_BYTES, ()))
        self.assertEqual(spec.start, 1)

    def test_bad_specs(self) -> None:
        """A spec that is not one is a ValueError naming the variable."""
        good = json.loads(WorkerSpec(1, {}).to_json())
        for bad in (
            "",
            "[]",
            json.dumps({**good, "index": 0}),
            json.dumps({**good, "index": True}),
            json.dumps({**good, "values": []}),
            json.dumps({**good, "sockets": [[3, "BLUETOOTH", "x"]]}),
            json.dumps({**good, "sockets": [[3]]}),
            json.dumps({**good, "log_buffer": -1}),
            json.dumps({**good, "log_buffer": "big"}),
            json.dumps({**good, "tls_files": [["/k", "x"]]}),
            json.dumps({**good, "start": 0}),
            json.dumps({**good, "start": "first"}),
        ):
            error = self.assertRaises(ValueError, WorkerSpec.from_json, bad)
            self.assertIn(SPEC_ENV, str(error))
