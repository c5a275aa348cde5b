"""The epoll reactor, dispatching socket events without a log context per event.

``twistd --reactor=secure-echo-epoll secure-echo ...`` (the plugin in
``twisted/plugins/secure_echo_plugin.py``) installs :class:`DirectEPollReactor`.

Why: Twisted's epoll reactor hands every readable or writable socket to
``twisted.python.log.callWithLogger``, which asks the socket's ``logPrefix()``,
copies the legacy log context into a new dict and pushes it on a context stack
around ``doRead``/``doWrite``.  On a line server that is a fixed cost per socket
event (measured: about a sixth of the Python time per line of 50 ping-pong
connections), and what it buys, the ``system`` field of *legacy*
``twisted.python.log`` messages emitted during the call, is nothing to a daemon
that logs through ``twisted.logger`` with named fields.

The contract is otherwise the epoll reactor's own:

* every event is dispatched through the reactor's own ``_doReadOrWrite`` (which
  catches, logs and disconnects on an exception from ``doRead``/``doWrite``), in
  the order epoll returned them;
* an exception that escapes even that (a ``connectionLost`` that raises) is
  logged with the selectable's log prefix, and the rest of the batch is still
  dispatched, as ``callWithLogger`` does;
* ``KeyboardInterrupt`` propagates.

It depends on two undocumented attributes of ``EPollReactor`` (``_poller`` and
``_selectables``): the tests run the daemon's suites on this reactor, so a
Twisted that changes them fails there, not in production.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger

_log = Logger()

#: The ``--reactor`` name (``twisted/plugins/secure_echo_plugin.py`` registers it).
NAME = "secure-echo-epoll"


class DirectEPollReactor(EPollReactor):
    """``EPollReactor`` whose ``doPoll`` calls ``_doReadOrWrite`` directly."""

    def doPoll(self, timeout: float | None) -> None:
        """Wait for socket events up to ``timeout`` seconds and dispatch them."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch: Any = self._doReadOrWrite
        for fd, event in events:
            selectable: Any = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _log.failure(
                    "unhandled error dispatching an event of {system}",
                    system=_prefix(selectable),
                )

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    """The selectable's log prefix, as ``callWithLogger`` would have used it."""
    try:
        return str(selectable.logPrefix())
    except Exception:  # a broken logPrefix must not hide the error
        return "(buggy logPrefix method)"


def name_of(reactor: object) -> str | None:
    """``reactor``'s ``--reactor`` name if it is this module's, else None."""
    return NAME if isinstance(reactor, DirectEPollReactor) else None


def install() -> None:
    """Install :class:`DirectEPollReactor` as the global reactor."""
    installReactor(DirectEPollReactor())  # type: ignore[no-untyped-call]
