"""Every timer of one connection, in one object.

Five deadlines bound a connection's life: the handshake must finish, a silent
client is closed (idle), an old one is drained (age), a client that stops reading
is dropped (write stall), and a lingering close is polled until the client has our
data.  :class:`Deadlines` holds them on three timers at most, one for the phase
(handshake, or the nearer of idle and age), one for the stall watch and one for
the linger poll, and tells its owner when one passes by the lifecycle
:class:`~secure_echo.tls.lifecycle.Event` it stands for.

The idle deadline costs nothing per read: the connection stores the time of its
last read in :attr:`Deadlines.last_read`, and the timer, when it fires, looks
whether the deadline really passed and otherwise sleeps again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

from secure_echo.tls.lifecycle import Event

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from secure_echo.tls.writer import StreamWriter

#: How often per write-stall timeout the unsent count is sampled: a stall is
#: found at most a tenth of the timeout late.
STALL_SAMPLES: Final = 10
#: Time differences below this are rounding, not time left.
EPSILON: Final = 1e-9
#: Seconds to the first check of a lingering close, and the longest between two:
#: on a local network the client's acknowledgement comes within a millisecond.
LINGER_FIRST: Final = 0.001
LINGER_POLL: Final = 0.05


class Timeouts:
    """The deadlines' lengths in seconds, shared by every connection of a factory.

    0 switches idle, write-stall and age off; the handshake always has one.
    """

    __slots__ = ("handshake", "idle", "max_age", "write_stall")

    def __init__(
        self,
        *,
        handshake: float = 10.0,
        idle: float = 300.0,
        write_stall: float = 30.0,
        max_age: float = 0.0,
    ) -> None:
        self.handshake = handshake
        self.idle = idle
        self.write_stall = write_stall
        self.max_age = max_age


class DeadlineOwner(Protocol):
    """The connection a :class:`Deadlines` reports to."""

    def deadline_passed(self, event: Event) -> None:
        """``event`` (a deadline, a stall, a finished linger) happened."""

    def owes_replies(self) -> bool:
        """Whether the application still has replies to write (the silence is ours)."""
        ...


class _Gone:
    """The owner of a finished connection's timers: hears nothing, owes nothing."""

    def deadline_passed(self, event: Event) -> None:
        """Nothing is left to do."""

    def owes_replies(self) -> bool:
        """Nothing is owed."""
        return False


_GONE: Final = _Gone()


class Deadlines:
    """The timers of one connection (see the module docstring)."""

    __slots__ = (
        "_clock",
        "_linger_timer",
        "_owner",
        "_phase_timer",
        "_stall_timer",
        "_started",
        "last_read",
    )

    def __init__(self, owner: DeadlineOwner, clock: IReactorTime, started: float) -> None:
        self._owner = owner
        self._clock = clock
        self._started = started
        #: When the client's last read arrived (the connection keeps it current).
        self.last_read = started
        self._phase_timer: IDelayedCall | None = None
        self._stall_timer: IDelayedCall | None = None
        self._linger_timer: IDelayedCall | None = None

    # -- the phase timer: handshake, then idle and age ----------------------------

    def arm_handshake(self, timeouts: Timeouts) -> None:
        """The handshake must finish within ``timeouts.handshake``."""
        self._phase_timer = self._clock.callLater(timeouts.handshake, self._handshake_passed)

    def arm_established(self, timeouts: Timeouts, now: float | None = None) -> None:
        """Arm the timer for the nearer of the idle and the age deadline (if any).

        ``now``, if given, is the client's last read (the handshake's end).
        """
        if now is not None:
            self.last_read = now
        deadlines: list[float] = []
        if timeouts.idle > 0:
            deadlines.append(self.last_read + timeouts.idle)
        if timeouts.max_age > 0:
            deadlines.append(self._started + timeouts.max_age)
        if deadlines:
            delay = max(min(deadlines) - self._clock.seconds(), 0.0)
            self._phase_timer = self._clock.callLater(delay, self._established_passed, timeouts)

    def cancel(self) -> None:
        """Stop the phase timer (handshake, idle, age)."""
        timer, self._phase_timer = self._phase_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _handshake_passed(self) -> None:
        self._phase_timer = None
        self._owner.deadline_passed(Event.HANDSHAKE_DEADLINE)

    def _established_passed(self, timeouts: Timeouts) -> None:
        self._phase_timer = None
        now = self._clock.seconds()
        if timeouts.max_age > 0 and now >= self._started + timeouts.max_age:
            self._owner.deadline_passed(Event.AGE_DEADLINE)
            return
        if timeouts.idle > 0 and now >= self.last_read + timeouts.idle:
            if not self._owner.owes_replies():
                self._owner.deadline_passed(Event.IDLE_DEADLINE)
                return
            # We still owe replies: the silence is ours, not the client's.  The
            # handler timeout bounds the wait; look again after the idle time.
            self.last_read = now
        self.arm_established(timeouts)

    # -- the stream timers: stall watch, linger poll ---------------------------------

    def watch_stall(self, writer: StreamWriter, timeout: float) -> None:
        """Start watching ``writer``'s unsent count, sampled ten times per ``timeout``.

        Already watching (or ``timeout`` of 0): nothing changes.
        """
        if self._stall_timer is None and timeout > 0:
            writer.start_stall_watch(self._clock.seconds())
            self._stall_timer = self._clock.callLater(
                timeout / STALL_SAMPLES, self._stall_check, writer, timeout
            )

    def stop_stall_watch(self) -> None:
        """Stop the stall watch (the send buffer drained)."""
        timer, self._stall_timer = self._stall_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stall_check(self, writer: StreamWriter, timeout: float) -> None:
        self._stall_timer = None
        left = writer.stall_left(self._clock.seconds(), timeout)
        if left > EPSILON:
            self._stall_timer = self._clock.callLater(
                min(timeout / STALL_SAMPLES, left), self._stall_check, writer, timeout
            )
            return
        self._owner.deadline_passed(Event.WRITE_STALLED)

    def poll_linger(self, writer: StreamWriter, delay: float = LINGER_FIRST) -> None:
        """Until every reply is acknowledged, look again: after 1 ms, doubling to 50 ms.

        The stall watch stays on beside it: a client that never acknowledges is
        still dropped on time.
        """
        self._linger_timer = self._clock.callLater(delay, self._linger_check, writer, delay)

    def _linger_check(self, writer: StreamWriter, delay: float) -> None:
        self._linger_timer = None
        if writer.replies_unacknowledged() == 0:
            self._owner.deadline_passed(Event.LINGER_DONE)
            return
        self.poll_linger(writer, min(delay * 2, LINGER_POLL))

    def detach(self) -> None:
        """Stop every timer and let go of the owner (its connection has ended).

        The owner holds this object and this object its owner: without this the
        pair, and what hangs off it, waits for the cyclic garbage collector.
        """
        self.cancel_all()
        self._owner = _GONE

    def cancel_all(self) -> None:
        """Stop every timer (the connection is gone)."""
        self.cancel()
        self.stop_stall_watch()
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
