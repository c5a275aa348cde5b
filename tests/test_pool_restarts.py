"""Restart backoff and the pool's give-up, on simulated time."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.pool.restarts import (
    BASE_DELAY,
    GIVE_UP_FAILURES,
    GIVE_UP_WINDOW,
    MAX_DELAY,
    STABLE_AFTER,
    Backoff,
    GiveUp,
)


class BackoffTests(SynchronousTestCase):
    """A slot's restart delays."""

    def test_doubles_to_the_cap(self) -> None:
        """0.1 s, doubling each time, never more than 30 s."""
        backoff = Backoff()
        delays = [backoff.next_delay() for _ in range(12)]
        self.assertEqual(delays[:5], [0.1, 0.2, 0.4, 0.8, 1.6])
        self.assertEqual(delays[-1], MAX_DELAY)
        self.assertEqual(max(delays), MAX_DELAY)
        self.assertEqual(delays, sorted(delays))

    def test_reset_after_serving_a_while(self) -> None:
        """A worker that served long enough restarts after the base delay again."""
        backoff = Backoff()
        for _ in range(6):
            backoff.next_delay()
        self.assertEqual(backoff.next_delay(served=STABLE_AFTER - 1), BASE_DELAY * 2**6)
        self.assertEqual(backoff.next_delay(served=STABLE_AFTER), BASE_DELAY)
        self.assertEqual(backoff.next_delay(served=None), BASE_DELAY * 2)


class GiveUpTests(SynchronousTestCase):
    """K failures within the window, with no worker serving, end the pool."""

    def test_gives_up_at_the_limit(self) -> None:
        """The fifth failure with nothing serving gives up; earlier ones do not."""
        clock = Clock()
        give_up = GiveUp(clock)
        outcomes = []
        for n in range(GIVE_UP_FAILURES):
            clock.advance(1)
            outcomes.append(give_up.ended(n % 2 + 1, "exited with status 2", "no cert", 0))
        self.assertEqual(outcomes, [False] * (GIVE_UP_FAILURES - 1) + [True])
        self.assertEqual(len(give_up.failures), GIVE_UP_FAILURES)
        self.assertEqual(give_up.failures[0].error, "no cert")

    def test_old_failures_leave_the_window(self) -> None:
        """Failures further apart than the window never add up to a give-up."""
        clock = Clock()
        give_up = GiveUp(clock)
        for _ in range(3 * GIVE_UP_FAILURES):
            self.assertFalse(give_up.ended(1, "was killed by signal 9", None, 0))
            clock.advance(GIVE_UP_WINDOW / (GIVE_UP_FAILURES - 1) + 0.1)
        self.assertLess(len(give_up.failures), GIVE_UP_FAILURES)

    def test_not_while_a_worker_serves(self) -> None:
        """One slot crash-looping while another serves is no reason to give up."""
        clock = Clock()
        give_up = GiveUp(clock)
        for _ in range(3 * GIVE_UP_FAILURES):
            clock.advance(0.5)
            self.assertFalse(give_up.ended(2, "exited with status 2", "x", 1))
        self.assertEqual(give_up.failures, [])

    def test_serving_clears(self) -> None:
        """A worker that serves between failures starts the count again."""
        clock = Clock()
        give_up = GiveUp(clock)
        for _ in range(GIVE_UP_FAILURES - 1):
            give_up.ended(1, "exited with status 1", None, 0)
        give_up.serving()
        self.assertFalse(give_up.ended(1, "exited with status 1", None, 0))
        self.assertEqual(len(give_up.failures), 1)
