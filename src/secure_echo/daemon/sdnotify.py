"""Telling systemd how the daemon is doing: the ``sd_notify`` datagram protocol.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: an ``AF_UNIX``
``SOCK_DGRAM`` address, a filesystem path (``/run/systemd/notify``) or, when it
starts with ``@``, a name in the abstract namespace.  A message is one datagram of
newline-separated ``NAME=value`` assignments, sent verbatim; nothing comes back.
No library is needed beyond a datagram socket (``sd_notify(3)``,
``sd_watchdog_enabled(3)``).

Invariants:

* Never block the reactor.  The socket is non-blocking and every send is
  ``MSG_DONTWAIT``: when systemd's queue is full (``EAGAIN``) the message is dropped,
  as ``sd_notify`` itself would fail; the next state change or ping carries on.
* Never raise into the caller.  A notification is advice to the service manager; a
  missing or broken socket must not stop a reload or a drain.  The first failure
  other than ``EAGAIN`` is logged once (``sd_notify_failed``); later ones are only
  counted in :attr:`Notifier.dropped`.
* One assignment never spans lines: :meth:`Notifier.status` folds newlines, and
  :meth:`Notifier.send` refuses an assignment with a newline (a caller bug, so that
  one *does* raise ``ValueError``), since the rest of it would be read as another
  assignment.

The order the daemon sends messages in (wired in ``tap.py``/``reload.py``):

1. Start-up.  Build a :class:`Notifier` with :meth:`Notifier.from_environment`
   (``None`` outside systemd: then send nothing).  Add
   ``NotifyService(notifier, reactor, watchdog_interval())`` to the top
   ``OrderedMultiService`` **last**, after the listening service: children start in
   order and stop in reverse, so its ``stopService`` (``STOPPING=1``) runs first
   at shutdown, when the drain begins.
2. Once every ``--listen`` port is listening and the TLS context is loaded (the
   ``listening`` events have been logged), call ``notifier.ready(status)``:
   ``READY=1`` and ``STATUS=...`` in one datagram.  ``Type=notify`` start-up waits
   for exactly this; send it once.
3. Any time: ``notifier.status(text)`` updates the line ``systemctl status`` shows.
4. Reload (SIGHUP or file change): ``notifier.reloading()`` *before* the new
   material is read (``RELOADING=1`` with ``MONOTONIC_USEC=``, which
   ``Type=notify-reload`` requires), then ``notifier.ready(status)`` when it is
   done, **also when it failed** (the old context stays in use, the daemon is
   still ready; say so in the status).  A ``RELOADING=1`` without a following
   ``READY=1`` leaves the unit "reloading" until systemd's timeout.
5. Shutdown: ``NotifyService.stopService`` stops the watchdog pings and sends
   ``STOPPING=1``; the drain follows (systemd's ``TimeoutStopSec=`` bounds it).

The watchdog: with ``WATCHDOG_USEC`` set (and ``WATCHDOG_PID`` absent or ours),
:class:`NotifyService` sends ``WATCHDOG=1`` from a ``LoopingCall`` on the reactor
every half interval, so a reactor that blocks stops the pings and systemd
restarts the service (``Restart=on-failure`` covers ``WatchdogSec=`` kills).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from twisted.internet.interfaces import IReactorTime

#: ``errno`` values that mean "systemd's queue is full right now": drop quietly.
_WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, the clock ``MONOTONIC_USEC=`` refers to."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(value: str) -> bytes | None:
    """The ``AF_UNIX`` address ``NOTIFY_SOCKET=value`` names, or ``None`` if unsupported.

    ``/path`` is a filesystem socket; ``@name`` is ``\\0name`` in the abstract
    namespace.  Anything else (a relative path, systemd 254's ``vsock:``) is not
    for us, as ``sd_notify`` also ignores it.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings, or ``None`` if systemd wants none.

    Half of ``WATCHDOG_USEC`` (as ``sd_watchdog_enabled(3)`` advises).  ``None``
    when it is unset, empty, not a positive integer, or when ``WATCHDOG_PID`` is set
    and names another process (the variables leaked to a child of the service).
    """
    if environ is None:
        environ = os.environ
    pid = environ.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", "").strip())
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


class Notifier:
    """Sends ``sd_notify`` messages to one ``NOTIFY_SOCKET``; never blocks, never raises.

    ``address`` is the ``AF_UNIX`` address (see :func:`socket_address`); ``name``
    is the ``NOTIFY_SOCKET`` value, for log records.  ``clock_usec`` returns
    ``CLOCK_MONOTONIC`` in microseconds (replaceable in tests).
    """

    log = Logger()

    def __init__(
        self,
        address: bytes,
        name: str | None = None,
        *,
        clock_usec: Callable[[], int] = monotonic_usec,
    ) -> None:
        self.address = address
        self.name = name if name is not None else os.fsdecode(address)
        self._clock_usec = clock_usec
        self._socket: socket.socket | None = None
        self._failure_logged = False
        #: Messages sent to the socket.
        self.sent = 0
        #: Messages that could not be sent (queue full or an error).
        self.dropped = 0
        #: The last ``STATUS=`` assignment systemd was sent.
        self._status: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """A notifier for ``NOTIFY_SOCKET``, or ``None`` when not run by systemd.

        An unusable value (a relative path, ``vsock:``) logs
        ``sd_notify_unsupported`` and also gives ``None``.
        """
        if environ is None:
            environ = os.environ
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return None
        address = socket_address(value)
        if address is None:
            cls.log.warn(
                "NOTIFY_SOCKET={notify_socket} is not an absolute path or @name; "
                "not notifying systemd",
                event="sd_notify_unsupported",
                notify_socket=value,
            )
            return None
        return cls(address, value)

    # -- the messages ----------------------------------------------------------------

    def send(self, *assignments: str) -> bool:
        """Send ``assignments`` (``"NAME=value"``) verbatim in one datagram.

        True if the datagram was handed to the kernel.  Raises ``ValueError`` only
        for a malformed assignment (no ``=``, or a newline), never for I/O.
        """
        for assignment in assignments:
            if "=" not in assignment or "\n" in assignment:
                msg = f"not one sd_notify assignment: {assignment!r}"
                raise ValueError(msg)
        if not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "surrogateescape")
        try:
            sock = self._open()
            sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as error:
            self.dropped += 1
            if error.errno not in _WOULD_BLOCK:
                self._log_failure(error, assignments)
            return False
        self.sent += 1
        for assignment in assignments:
            if assignment.startswith("STATUS="):
                self._status = assignment
        return True

    def notify(self, **fields: str | int) -> bool:
        """Send ``NAME=value`` for each keyword, in the order given."""
        return self.send(*(f"{name}={value}" for name, value in fields.items()))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (and ``STATUS=status``): start-up or a reload is complete."""
        extra = () if status is None else (_status(status),)
        return self.send("READY=1", *extra)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=now``: a reload begins.

        Follow it with :meth:`ready` when the reload is over, whatever its outcome.
        """
        extra = () if status is None else (_status(status),)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self._clock_usec()}", *extra)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown (the drain) begins."""
        extra = () if status is None else (_status(status),)
        return self.send("STOPPING=1", *extra)

    def status(self, text: str) -> bool:
        """``STATUS=text``: the one line ``systemctl status`` shows (newlines folded).

        Text equal to the status systemd already has is not sent again (True).
        """
        assignment = _status(text)
        if assignment == self._status:
            return True
        return self.send(assignment)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the reactor is alive."""
        return self.send("WATCHDOG=1")

    # -- the socket --------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def _open(self) -> socket.socket:
        if self._socket is None:
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        return self._socket

    def _log_failure(self, error: OSError, assignments: tuple[str, ...]) -> None:
        # A socket that vanished (systemd gone, a test's listener closed) must not
        # flood the log with one record per watchdog ping: tell once.
        if self._failure_logged:
            return
        self._failure_logged = True
        self.log.warn(
            "cannot notify systemd at {notify_socket}: {error}; further failures are not logged",
            event="sd_notify_failed",
            notify_socket=self.name,
            error=os.strerror(error.errno) if error.errno else str(error),
            errno=errno.errorcode.get(error.errno or 0),
            names=[a.partition("=")[0] for a in assignments],
        )


def _status(text: str) -> str:
    """``STATUS=text`` on one line."""
    return "STATUS=" + " ".join(text.splitlines())


class NotifyService(Service):
    """The systemd watchdog pings while running, and ``STOPPING=1`` when stopped.

    ``watchdog_interval`` is seconds between ``WATCHDOG=1`` pings (see
    :func:`watchdog_interval`); ``None`` sends none.  Add it last to the top
    ``OrderedMultiService`` so it is stopped first, as the drain begins.
    """

    log = Logger()

    def __init__(
        self,
        notifier: Notifier,
        clock: IReactorTime,
        watchdog_interval: float | None = None,
    ) -> None:
        self.notifier = notifier
        self._clock = clock
        self.watchdog_interval = watchdog_interval
        self._pings: LoopingCall | None = None

    # Service's methods carry no annotations; pyproject.toml's untyped_calls_exclude
    # does not reach inherited methods, hence the two ignores below.
    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.watchdog_interval is None:
            return
        self.log.info(
            "sending systemd watchdog pings every {interval} s",
            event="watchdog_enabled",
            interval=self.watchdog_interval,
            notify_socket=self.notifier.name,
        )
        self._pings = LoopingCall(self.notifier.watchdog)
        self._pings.clock = self._clock
        # The first ping goes out at once; send() never raises, so the loop
        # cannot end with a failure.
        self._pings.start(self.watchdog_interval, now=True)

    @override
    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        pings, self._pings = self._pings, None
        if pings is not None and pings.running:
            pings.stop()
        self.notifier.stopping()
