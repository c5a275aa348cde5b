"""When a worker that ended starts again, and when the pool stops trying.

Two rules, both on the reactor's clock (injected, so tests run on simulated time):

* :class:`Backoff`, one per worker slot: the first restart waits :data:`BASE_DELAY`
  seconds and each further one twice as long, up to :data:`MAX_DELAY`.  A worker
  that served for :data:`STABLE_AFTER` seconds or more before it ended resets its
  slot: its restart waits :data:`BASE_DELAY` again.
* :class:`GiveUp`, one for the pool: a worker that ends unexpectedly while no other
  worker serves is a failure of the whole pool.  :data:`GIVE_UP_FAILURES` such
  failures within :data:`GIVE_UP_WINDOW` seconds, with no worker serving in between
  (a worker that serves clears the count), and the supervisor logs why and exits
  with :data:`GIVE_UP_EXIT_STATUS`, so that systemd's ``Restart=`` (or Kubernetes,
  or the operator) takes over instead of a loop that serves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

#: Seconds before the first restart of a slot.
BASE_DELAY: Final = 0.1
#: The longest wait before a restart.
MAX_DELAY: Final = 30.0
#: A worker that served this many seconds resets its slot's backoff.
STABLE_AFTER: Final = 30.0
#: Failures with no worker serving that make the pool give up ...
GIVE_UP_FAILURES: Final = 5
#: ... when they fall within this many seconds.
GIVE_UP_WINDOW: Final = 60.0
#: The supervisor's exit status when it gave up (an orderly stop exits 0, a
#: forced one 1, a start-up error 1 or 2).
GIVE_UP_EXIT_STATUS: Final = 3


class Backoff:
    """The restart delays of one worker slot; see the module's rules."""

    def __init__(
        self,
        *,
        base: float = BASE_DELAY,
        cap: float = MAX_DELAY,
        stable_after: float = STABLE_AFTER,
    ) -> None:
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        #: Restarts since the slot was last reset.
        self.restarts = 0

    def next_delay(self, served: float | None = None) -> float:
        """Seconds until the next start of a worker that served ``served`` seconds.

        ``served`` is None for a worker that never served (or never started).
        """
        if served is not None and served >= self.stable_after:
            self.restarts = 0
        delay = min(self.base * 2.0**self.restarts, self.cap)
        self.restarts += 1
        return delay


@dataclass(frozen=True)
class Failure:
    """One worker that ended while no other served."""

    #: Reactor time of the end.
    at: float
    worker: int
    #: How it ended ("exited with status 2", "was killed by signal 9", ...).
    how: str
    #: Why it could not start, when it said so (``worker_failed``).
    error: str | None = None


class GiveUp:
    """Counts the pool's failures; see the module's rules."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        limit: int = GIVE_UP_FAILURES,
        window: float = GIVE_UP_WINDOW,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self._failures: list[Failure] = []

    @property
    def failures(self) -> list[Failure]:
        """The failures that still count, oldest first."""
        self._forget_old(self._clock.seconds())
        return list(self._failures)

    def ended(self, worker: int, how: str, error: str | None, serving: int) -> bool:
        """Worker ``worker`` ended unexpectedly with ``serving`` others serving.

        True when the pool should give up now.
        """
        if serving:
            return False
        now = self._clock.seconds()
        self._failures.append(Failure(now, worker, how, error))
        self._forget_old(now)
        return len(self._failures) >= self.limit

    def serving(self) -> None:
        """A worker serves: the pool is not in a loop that serves nothing."""
        self._failures.clear()

    def _forget_old(self, now: float) -> None:
        self._failures = [f for f in self._failures if f.at > now - self.window]
