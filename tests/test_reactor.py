"""The epoll reactor without a log context per event (``--reactor=secure-echo-epoll``).

Two kinds of tests:

* Twisted's own reactor conformance suites (``twisted.internet.test``: TCP, UNIX,
  processes, TLS, signals, time, descriptors, threads), run against
  :class:`~secure_echo.daemon.reactor.DirectEPollReactor` exactly as Twisted runs
  them against its own reactors.  They are what "the reactor behaves like
  epoll's" means, and they fail first if a Twisted release changes the private
  attributes the subclass relies on.
* ``doPoll``'s own contract, event by event, on a poller that returns what the
  test says.

The daemon's integration tests run on this reactor as well (``tests/daemon.py``).
"""

from __future__ import annotations

import errno
import stat
import sys
from pathlib import Path
from typing import Any

from twisted.application.reactors import getReactorTypes
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.test import (
    test_core,
    test_fdset,
    test_process,
    test_socket,
    test_tcp,
    test_threads,
    test_time,
    test_tls,
    test_unix,
)
from twisted.internet.test.connectionmixins import ConnectableProtocol, runProtocolsWithReactor
from twisted.logger import capturedLogs
from twisted.python import context
from twisted.python.log import ILogContext
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from secure_echo.daemon.reactor import NAME, DirectEPollReactor, name_of
from secure_echo.pool.contract import WorkerSpec

#: The reactor under test, as Twisted's ReactorBuilder names reactors.
_OURS = "secure_echo.daemon.reactor.DirectEPollReactor"

#: Twisted's suites that apply to an epoll reactor on Linux.
_BUILDERS: tuple[Any, ...] = (
    test_core.SystemEventTestsBuilder,
    test_time.TimeTestsBuilder,
    test_fdset.ReactorFDSetTestsBuilder,
    test_threads.ThreadTestsBuilder,
    test_tcp.TCP4ClientTestsBuilder,
    test_tcp.TCP6ClientTestsBuilder,
    test_tcp.TCPPortTestsBuilder,
    test_tcp.TCPFDPortTestsBuilder,
    test_tcp.TCPConnectionTestsBuilder,
    test_tcp.TCPTransportTestsBuilder,
    test_tcp.AdoptStreamConnectionTestsBuilder,
    test_tcp.AbortConnectionTests,
    test_unix.UNIXTestsBuilder,
    test_unix.UNIXPortTestsBuilder,
    test_unix.UNIXFDPortTestsBuilder,
    test_unix.UNIXAdoptStreamConnectionTestsBuilder,
    test_socket.IReactorSocketVerificationTestsBuilder,
    test_socket.AdoptStreamPortErrorsTestsBuilder,
    test_process.ProcessTestsBuilder,
    test_tls.TLSPortTestsBuilder,
    test_tls.AbortSSLConnectionTests,
)


#: What Twisted's suites know about its own epoll reactor (skips) applies to ours.
_EPOLL = "twisted.internet.epollreactor.EPollReactor"


def _others_can_run(executable: str) -> bool:
    """Whether a process of another user can run ``executable`` (every directory searchable)."""
    path = Path(executable).resolve()
    needed = [(path, stat.S_IXOTH)] + [(d, stat.S_IXOTH) for d in path.parents]
    return all(p.stat().st_mode & bit for p, bit in needed)


_UID_SKIP = (
    None
    if _others_can_run(sys.executable)
    else f"a child with uid 1 cannot run {sys.executable} (a directory above it is private); "
    "Twisted's own EPollReactor fails this test the same way here"
)


def _no_system_context(self: Any) -> None:
    """The one deliberate difference: no legacy log context around ``doRead``.

    Twisted's ``test_logPrefix`` checks that a protocol's ``dataReceived`` runs with
    its ``logPrefix()`` as the legacy log ``system``; that context is what this
    reactor leaves out.  This replacement runs the same exchange and states the
    difference: the transports still name their protocol's prefix, the context
    during ``dataReceived`` is the default one.
    """

    class Prefixed(ConnectableProtocol):
        def __init__(self, prefix: str) -> None:
            self._prefix = prefix
            self.system: str | None = None
            self.transport_prefix: str | None = None

        def connectionMade(self) -> None:
            transport: Any = self.transport
            transport.write(b"a")

        def logPrefix(self) -> str:
            return self._prefix

        def dataReceived(self, data: bytes) -> None:
            transport: Any = self.transport
            self.system = context.get(ILogContext)["system"]
            self.transport_prefix = transport.logPrefix()
            transport.write(b"b")
            if b"b" in data:
                transport.loseConnection()

    client, server = Prefixed("Custom Client"), Prefixed("Custom Server")
    runProtocolsWithReactor(self, server, client, self.endpoints)
    self.assertEqual((client.system, server.system), ("-", "-"))
    self.assertIn("Custom Server", server.transport_prefix)
    self.assertIn("Custom Client", client.transport_prefix)


def _skipped(reason: str) -> Any:
    """A test method that only skips (so that Twisted's own stays untouched)."""

    def test(self: Any) -> None:  # noqa: ARG001
        raise SkipTest(reason)

    return test


#: Tests Twisted's suites skip or cannot pass for an epoll reactor, and why.
_NOT_FOR_EPOLL: dict[str, str | None] = {
    # Twisted skips this by the class name "EPollReactor"; ours has another name.
    "test_lostFileDescriptor": "epoll cannot detect lost file descriptors (Twisted's "
    "own skip for EPollReactor)",
    "test_changeUID": _UID_SKIP,
}


def _conformance(builder: Any) -> dict[str, type]:
    """``builder``'s test cases for our reactor only, named after the builder."""
    body: dict[str, Any] = {"_reactors": [_OURS], "__module__": __name__}
    skips = dict(getattr(builder, "skippedReactors", {}))
    if _EPOLL in skips:
        body["skippedReactors"] = {_OURS: skips[_EPOLL]}
    if hasattr(builder, "test_logPrefix"):
        body["test_logPrefix"] = _no_system_context
    for name, reason in _NOT_FOR_EPOLL.items():
        if reason is not None and hasattr(builder, name):
            body[name] = _skipped(reason)
    ours: Any = type(builder.__name__, (builder,), body)
    classes: dict[str, type] = ours.makeTestCaseClasses()
    return classes


for _builder in _BUILDERS:
    globals().update(_conformance(_builder))


class _Poller:
    """An epoll stand-in: returns the events it was given, or raises."""

    def __init__(self, events: list[tuple[int, int]], error: OSError | None = None) -> None:
        self.events = events
        self.error = error
        self.calls: list[tuple[float, int]] = []

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        self.calls.append((timeout, maxevents))
        if self.error is not None:
            raise self.error
        return self.events


class _Selectable:
    def __init__(self, name: str) -> None:
        self.name = name

    def logPrefix(self) -> str:
        return self.name


def _reactor(
    poller: _Poller, selectables: dict[int, Any], dispatch: Any = None
) -> tuple[Any, list[tuple[Any, int, int]]]:
    """A reactor object with only what ``doPoll`` uses (no descriptors opened)."""
    reactor: Any = DirectEPollReactor.__new__(DirectEPollReactor)
    reactor._poller = poller
    reactor._selectables = selectables
    seen: list[tuple[Any, int, int]] = []

    def record(selectable: Any, fd: int, event: int) -> None:
        seen.append((selectable, fd, event))
        if dispatch is not None:
            dispatch(selectable, fd, event)

    reactor._doReadOrWrite = record
    return reactor, seen


class DoPollTests(SynchronousTestCase):
    """``doPoll`` event by event."""

    def test_every_event_in_order(self) -> None:
        """Each event goes to ``_doReadOrWrite`` with its selectable, in epoll's order."""
        a, b = _Selectable("a"), _Selectable("b")
        poller = _Poller([(4, 1), (3, 4), (4, 5)])
        reactor, seen = _reactor(poller, {3: a, 4: b})
        reactor.doPoll(0.5)
        self.assertEqual(seen, [(b, 4, 1), (a, 3, 4), (b, 4, 5)])

    def test_timeout_and_batch_size(self) -> None:
        """The timeout is passed on (None: wait for ever), at most one event per descriptor."""
        poller = _Poller([])
        reactor, _ = _reactor(poller, {3: _Selectable("a"), 4: _Selectable("b")})
        reactor.doPoll(None)
        reactor.doPoll(1.5)
        self.assertEqual(poller.calls, [(-1, 2), (1.5, 2)])

    def test_unknown_descriptor_skipped(self) -> None:
        """An event for a descriptor removed meanwhile is dropped; the others go on."""
        a = _Selectable("a")
        reactor, seen = _reactor(_Poller([(9, 1), (3, 1)]), {3: a})
        reactor.doPoll(0)
        self.assertEqual(seen, [(a, 3, 1)])

    def test_interrupted_poll(self) -> None:
        """EINTR ends the iteration quietly, with nothing dispatched."""
        reactor, seen = _reactor(_Poller([], OSError(errno.EINTR, "interrupted")), {})
        reactor.doPoll(0)
        self.assertEqual(seen, [])

    def test_other_poll_error_raised(self) -> None:
        """Any other epoll error is a programming error: it propagates."""
        reactor, _ = _reactor(_Poller([], OSError(errno.EBADF, "bad fd")), {})
        error = self.assertRaises(OSError, reactor.doPoll, 0)
        self.assertEqual(error.errno, errno.EBADF)

    def test_error_logged_and_batch_goes_on(self) -> None:
        """An exception out of the dispatch is logged with the prefix; later events still run."""
        a, b = _Selectable("conn-a"), _Selectable("conn-b")

        def dispatch(selectable: Any, fd: int, event: int) -> None:  # noqa: ARG001
            if selectable is a:
                raise RuntimeError("connectionLost broke")

        reactor, seen = _reactor(_Poller([(3, 1), (4, 1)]), {3: a, 4: b}, dispatch)
        with capturedLogs() as events:
            reactor.doPoll(0)
        self.assertEqual([s for s, _, _ in seen], [a, b])
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["system"], "conn-a")
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_broken_log_prefix(self) -> None:
        """A selectable whose logPrefix raises still gets its error logged."""

        class Broken:
            def logPrefix(self) -> str:
                raise ValueError("no prefix")

        def dispatch(selectable: Any, fd: int, event: int) -> None:  # noqa: ARG001
            raise RuntimeError("broke")

        reactor, _ = _reactor(_Poller([(3, 1)]), {3: Broken()}, dispatch)
        with capturedLogs() as events:
            reactor.doPoll(0)
        self.assertEqual(
            [e["system"] for e in events if "log_failure" in e], ["(buggy logPrefix method)"]
        )
        self.flushLoggedErrors(RuntimeError)

    def test_keyboard_interrupt_propagates(self) -> None:
        """^C is not an application error: it stops the reactor loop."""

        def dispatch(selectable: Any, fd: int, event: int) -> None:  # noqa: ARG001
            raise KeyboardInterrupt

        reactor, _ = _reactor(_Poller([(3, 1)]), {3: _Selectable("a")}, dispatch)
        self.assertRaises(KeyboardInterrupt, reactor.doPoll, 0)

    def test_do_iteration_is_do_poll(self) -> None:
        """The reactor loop calls ``doIteration``: it must be ours, not epoll's."""
        self.assertIs(DirectEPollReactor.doIteration, DirectEPollReactor.doPoll)
        self.assertIsNot(DirectEPollReactor.doIteration, EPollReactor.doIteration)


class NameTests(SynchronousTestCase):
    """How twistd and the worker pool find the reactor."""

    def test_plugin_registers_the_name(self) -> None:
        """``--reactor=secure-echo-epoll`` names this module."""
        found = {r.shortName: getattr(r, "moduleName", None) for r in getReactorTypes()}
        self.assertEqual(found.get(NAME), "secure_echo.daemon.reactor")

    def test_name_of(self) -> None:
        """Only this reactor has a name to pass to the workers."""
        ours: Any = DirectEPollReactor.__new__(DirectEPollReactor)
        theirs: Any = EPollReactor.__new__(EPollReactor)
        self.assertEqual(name_of(ours), NAME)
        self.assertIsNone(name_of(theirs))
        self.assertIsNone(name_of(object()))

    def test_worker_spec_carries_the_reactor(self) -> None:
        """A worker is told the supervisor's reactor; an old spec without it means default."""
        spec = WorkerSpec(1, {}, reactor=NAME)
        self.assertEqual(WorkerSpec.from_json(spec.to_json()).reactor, NAME)
        self.assertIsNone(WorkerSpec.from_json(WorkerSpec(1, {}).to_json()).reactor)
        bad = spec.to_json().replace(f'"{NAME}"', "7")
        self.assertRaises(ValueError, WorkerSpec.from_json, bad)
