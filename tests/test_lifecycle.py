"""Tests for :mod:`secure_echo.tls.lifecycle`: every phase against every event.

The expected table below is written out by hand from the module's numbered rules,
not derived from the code: a change to the table that the rules do not call for
fails here.
"""

from __future__ import annotations

from typing import Final

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.lifecycle import (
    CLEAN_CLAIMS,
    TABLE,
    Action,
    Event,
    Phase,
    Step,
    next_reason,
    step,
)
from secure_echo.tls.record import CloseReason

P = Phase
E = Event
A = Action
R = CloseReason

CLOSE: Final = (A.CANCEL_DEADLINES, A.SEND_CLOSE_NOTIFY, A.CLOSE_STREAM)
ABORT: Final = (A.CANCEL_DEADLINES, A.ABORT_STREAM)
FAIL_HANDSHAKE: Final = (
    A.CANCEL_DEADLINES,
    A.LOG_HANDSHAKE_FAILED,
    A.FLUSH_TLS,
    A.CLOSE_STREAM,
)
TLS_FAILED: Final = (
    A.CANCEL_DEADLINES,
    A.LOG_TLS_ERROR,
    A.FLUSH_TLS,
    A.CLOSE_STREAM,
)
STALLED: Final = (A.LOG_SLOW_READER, A.CANCEL_DEADLINES, A.ABORT_STREAM)
GONE: Final = (A.FINISH,)


def after_handshake(app_close_reason: CloseReason | None) -> dict[Event, Step]:
    """Rows shared by OPEN, INPUT_ENDED and DRAINING."""
    return {
        E.TLS_ERROR: Step(P.CLOSING, TLS_FAILED, R.TLS_ERROR),
        E.DRAIN_DEADLINE: Step(P.ABORTING, ABORT, R.DRAIN_TIMEOUT),
        E.APP_ABORT: Step(P.ABORTING, ABORT, R.ABORTED),
        E.WRITE_STALLED: Step(P.ABORTING, STALLED, R.SLOW_READER),
        E.LOST_CLEAN: Step(P.CLOSED, GONE, R.CONNECTION_LOST),
        E.LOST_ERROR: Step(P.CLOSED, GONE, R.RESET),
        E.LOST_ERROR_FLUSHED: Step(P.CLOSED, GONE, R.RESET),
        E.APP_CLOSE: Step(P.CLOSING, CLOSE, app_close_reason),
    }


def closing_rows() -> dict[Event, Step]:
    """Rows shared by CLOSING and LINGERING."""
    return {
        E.DRAIN_DEADLINE: Step(P.ABORTING, ABORT, R.DRAIN_TIMEOUT),
        E.APP_ABORT: Step(P.ABORTING, ABORT, R.ABORTED),
        E.WRITE_STALLED: Step(P.ABORTING, (A.LOG_SLOW_READER, A.ABORT_STREAM), R.CLOSE_STALLED),
        E.LOST_CLEAN: Step(P.CLOSED, GONE),
        E.LOST_ERROR: Step(P.CLOSED, GONE, R.RESET),
        E.LOST_ERROR_FLUSHED: Step(P.CLOSED, GONE),
    }


EXPECTED: Final[dict[Phase, dict[Event, Step]]] = {
    P.ACCEPTED: {
        E.TLS_BYTES: Step(P.HANDSHAKING),
        E.PLAINTEXT_BYTES: Step(
            P.CLOSING,
            (A.CANCEL_DEADLINES, A.SEND_HINT, A.CLOSE_STREAM),
            R.PLAINTEXT_CLIENT,
        ),
        E.HANDSHAKE_DEADLINE: Step(P.ABORTING, ABORT, R.HANDSHAKE_TIMEOUT),
        E.FIN: Step(P.CLOSING, (A.CANCEL_DEADLINES, A.CLOSE_STREAM), R.NO_DATA),
        E.DRAIN: Step(P.ABORTING, ABORT, R.SERVER_SHUTDOWN),
        E.APP_ABORT: Step(P.ABORTING, ABORT, R.ABORTED),
        E.LOST_CLEAN: Step(P.CLOSED, GONE, R.NO_DATA),
        E.LOST_ERROR: Step(P.CLOSED, GONE, R.NO_DATA),
        E.LOST_ERROR_FLUSHED: Step(P.CLOSED, GONE, R.NO_DATA),
    },
    P.HANDSHAKING: {
        E.HANDSHAKE_DONE: Step(P.OPEN, (A.CANCEL_DEADLINES, A.ARM_ESTABLISHED, A.START_APP)),
        E.HANDSHAKE_ERROR: Step(P.CLOSING, FAIL_HANDSHAKE, R.HANDSHAKE_FAILED),
        E.FIN: Step(P.CLOSING, FAIL_HANDSHAKE, R.HANDSHAKE_FAILED),
        E.HANDSHAKE_DEADLINE: Step(P.ABORTING, ABORT, R.HANDSHAKE_TIMEOUT),
        E.DRAIN: Step(P.ABORTING, ABORT, R.SERVER_SHUTDOWN),
        E.DRAIN_DEADLINE: Step(P.ABORTING, ABORT, R.DRAIN_TIMEOUT),
        E.APP_ABORT: Step(P.ABORTING, ABORT, R.ABORTED),
        E.WRITE_STALLED: Step(P.ABORTING, STALLED, R.SLOW_READER),
        E.LOST_CLEAN: Step(P.CLOSED, GONE, R.HANDSHAKE_FAILED),
        E.LOST_ERROR: Step(P.CLOSED, GONE, R.HANDSHAKE_FAILED),
        E.LOST_ERROR_FLUSHED: Step(P.CLOSED, GONE, R.HANDSHAKE_FAILED),
    },
    P.OPEN: {
        **after_handshake(R.SERVER_CLOSED),
        E.CLOSE_NOTIFY: Step(P.INPUT_ENDED, (A.END_APP_INPUT,), R.EOF),
        E.FIN: Step(P.INPUT_ENDED, (A.END_APP_INPUT,), R.CLIENT_CLOSED),
        E.IDLE_DEADLINE: Step(P.CLOSING, CLOSE, R.IDLE_TIMEOUT),
        E.AGE_DEADLINE: Step(P.DRAINING, (A.CANCEL_DEADLINES, A.DRAIN_APP), R.MAX_CONNECTION_AGE),
        E.DRAIN: Step(P.DRAINING, (A.CANCEL_DEADLINES, A.DRAIN_APP), R.SERVER_SHUTDOWN),
    },
    P.INPUT_ENDED: after_handshake(None),
    P.DRAINING: after_handshake(None),
    P.CLOSING: {
        **closing_rows(),
        E.UNREAD_INPUT: Step(P.LINGERING, (A.LINGER, A.WATCH_CLOSE)),
    },
    P.LINGERING: {
        **closing_rows(),
        E.FIN: Step(P.LINGERING, (A.LOSE_STREAM,)),
        E.LINGER_DONE: Step(P.LINGERING, (A.LOSE_STREAM,)),
    },
    P.ABORTING: {
        E.LOST_CLEAN: Step(P.CLOSED, GONE),
        E.LOST_ERROR: Step(P.CLOSED, GONE),
        E.LOST_ERROR_FLUSHED: Step(P.CLOSED, GONE),
    },
    P.CLOSED: {},
}

#: How far along its life each phase is: no step ever goes back.
RANK: Final = {
    P.ACCEPTED: 0,
    P.HANDSHAKING: 1,
    P.OPEN: 2,
    P.INPUT_ENDED: 3,
    P.DRAINING: 3,
    P.CLOSING: 4,
    P.LINGERING: 5,
    P.ABORTING: 6,
    P.CLOSED: 7,
}


class TableTests(SynchronousTestCase):
    """The table, phase by phase and event by event."""

    def test_every_phase_against_every_event(self) -> None:
        """Each of the phases x events pairs has the step the rules give it."""
        for phase in Phase:
            rows = EXPECTED[phase]
            for event in Event:
                expected = rows.get(event, Step(phase))
                with self.subTest(phase=phase, event=event):
                    self.assertEqual(step(phase, event), expected)

    def test_table_has_nothing_more(self) -> None:
        """The table holds exactly the expected rows; every other pair is ignored."""
        expected = {(p, e) for p, rows in EXPECTED.items() for e in rows}
        self.assertEqual(set(TABLE), expected)

    def test_ignored_pairs_do_nothing(self) -> None:
        """A pair without a row keeps its phase and takes no action (rule 8)."""
        ignored = [(p, e) for p in Phase for e in Event if (p, e) not in TABLE]
        self.assertGreater(len(ignored), 100)
        for phase, event in ignored:
            outcome = step(phase, event)
            self.assertEqual((outcome.phase, outcome.actions, outcome.reason), (phase, (), None))

    def test_closed_is_final(self) -> None:
        """Nothing leaves CLOSED, and nothing leaves ABORTING but the stream's end."""
        for event in Event:
            self.assertEqual(step(P.CLOSED, event), Step(P.CLOSED))
            self.assertIn(step(P.ABORTING, event).phase, {P.ABORTING, P.CLOSED})

    def test_finish_only_on_entering_closed(self) -> None:
        """FINISH is the action of exactly the steps that enter CLOSED."""
        for (phase, _event), outcome in TABLE.items():
            entering = outcome.phase is P.CLOSED and phase is not P.CLOSED
            self.assertEqual(A.FINISH in outcome.actions, entering)
            if entering:
                self.assertEqual(outcome.actions, (A.FINISH,))

    def test_close_last_and_lingering_watched(self) -> None:
        """Closing the stream is a step's last action; only lingering is watched (rule 9).

        The close may report unread input, a nested step that replaces the rest;
        that step, the only one entering LINGERING, arms the stall watch.
        """
        for (phase, _event), outcome in TABLE.items():
            if A.CLOSE_STREAM in outcome.actions:
                self.assertEqual(outcome.actions[-1], A.CLOSE_STREAM)
            entering = outcome.phase is P.LINGERING and phase is not P.LINGERING
            self.assertEqual(A.WATCH_CLOSE in outcome.actions, entering)
            if entering:
                self.assertEqual(outcome.actions, (A.LINGER, A.WATCH_CLOSE))

    def test_aborts_and_closes_stop_the_deadlines(self) -> None:
        """Every step that leaves the live work for a close or abort stops the phase timer."""
        for (phase, _event), outcome in TABLE.items():
            leaving = outcome.phase in {P.CLOSING, P.ABORTING} and phase not in {
                P.CLOSING,
                P.LINGERING,
            }
            if leaving:
                self.assertIn(A.CANCEL_DEADLINES, outcome.actions)


class ReasonTests(SynchronousTestCase):
    """next_reason: clean claims give way, what went wrong stays (rule 7)."""

    def test_first_reason_set(self) -> None:
        """With no reason yet, the proposed one is taken."""
        self.assertEqual(next_reason(None, R.EOF), R.EOF)

    def test_none_proposed_keeps(self) -> None:
        """A step without a reason keeps the current one."""
        self.assertEqual(next_reason(R.EOF, None), R.EOF)
        self.assertIsNone(next_reason(None, None))

    def test_clean_claims_replaced(self) -> None:
        """Every clean claim gives way to a later reason."""
        for claim in CLEAN_CLAIMS:
            self.assertEqual(next_reason(claim, R.RESET), R.RESET)
            self.assertEqual(next_reason(claim, R.DRAIN_TIMEOUT), R.DRAIN_TIMEOUT)

    def test_failures_stay(self) -> None:
        """A reason that says what went wrong is never replaced."""
        for reason in set(CloseReason) - CLEAN_CLAIMS:
            self.assertEqual(next_reason(reason, R.RESET), reason)
            self.assertEqual(next_reason(reason, R.EOF), reason)

    def test_clean_claims(self) -> None:
        """The clean claims are exactly the six that promise every reply was written."""
        self.assertEqual(
            CLEAN_CLAIMS,
            {
                R.EOF,
                R.CLIENT_CLOSED,
                R.SERVER_SHUTDOWN,
                R.IDLE_TIMEOUT,
                R.MAX_CONNECTION_AGE,
                R.SERVER_CLOSED,
            },
        )


def run(events: list[Event]) -> tuple[list[Phase], CloseReason | None, list[Action]]:
    """Feed ``events`` from ACCEPTED; return the phases passed, the reason, the actions."""
    phase = P.ACCEPTED
    reason: CloseReason | None = None
    phases = [phase]
    actions: list[Action] = []
    for event in events:
        outcome = step(phase, event)
        reason = next_reason(reason, outcome.reason)
        phase = outcome.phase
        phases.append(phase)
        actions.extend(outcome.actions)
    return phases, reason, actions


class PathTests(SynchronousTestCase):
    """Whole lives: any sequence of events."""

    @given(st.lists(st.sampled_from(list(Event)), max_size=30))
    def test_never_goes_back(self, events: list[Event]) -> None:
        """No sequence of events moves a connection back in its life."""
        phases, _, _ = run(events)
        ranks = [RANK[p] for p in phases]
        self.assertEqual(ranks, sorted(ranks))

    @given(st.lists(st.sampled_from(list(Event)), max_size=30))
    def test_closed_always_has_a_reason(self, events: list[Event]) -> None:
        """A connection that reaches CLOSED always has a close reason, and FINISH once."""
        phases, reason, actions = run([*events, E.LOST_CLEAN])
        if phases[-1] is P.CLOSED:
            self.assertIsNotNone(reason)
            self.assertEqual(actions.count(A.FINISH), 1)

    @given(st.lists(st.sampled_from(list(Event)), max_size=30))
    def test_failure_reason_is_final(self, events: list[Event]) -> None:
        """Once a reason that is not a clean claim is set, it stays to the end."""
        phase = P.ACCEPTED
        reason: CloseReason | None = None
        for event in events:
            outcome = step(phase, event)
            before = reason
            reason = next_reason(reason, outcome.reason)
            phase = outcome.phase
            if before is not None and before not in CLEAN_CLAIMS:
                self.assertEqual(reason, before)

    def test_echo_then_close_notify(self) -> None:
        """The usual life: handshake, lines, close_notify, the app closes, a clean end."""
        phases, reason, _ = run(
            [E.TLS_BYTES, E.HANDSHAKE_DONE, E.CLOSE_NOTIFY, E.APP_CLOSE, E.LOST_CLEAN]
        )
        self.assertEqual(
            phases,
            [P.ACCEPTED, P.HANDSHAKING, P.OPEN, P.INPUT_ENDED, P.CLOSING, P.CLOSED],
        )
        self.assertEqual(reason, R.EOF)

    def test_reset_during_final_flush(self) -> None:
        """close_notify, then a reset while output is held: reset, not eof."""
        _, reason, _ = run(
            [E.TLS_BYTES, E.HANDSHAKE_DONE, E.CLOSE_NOTIFY, E.APP_CLOSE, E.LOST_ERROR]
        )
        self.assertEqual(reason, R.RESET)

    def test_reset_after_everything_written(self) -> None:
        """A client that resets once the close went out with every byte written: eof."""
        _, reason, _ = run(
            [E.TLS_BYTES, E.HANDSHAKE_DONE, E.CLOSE_NOTIFY, E.APP_CLOSE, E.LOST_ERROR_FLUSHED]
        )
        self.assertEqual(reason, R.EOF)

    def test_drain_deadline(self) -> None:
        """A drained connection still open at the deadline is drain_timeout."""
        _, reason, _ = run(
            [E.TLS_BYTES, E.HANDSHAKE_DONE, E.DRAIN, E.DRAIN_DEADLINE, E.LOST_ERROR]
        )
        self.assertEqual(reason, R.DRAIN_TIMEOUT)

    def test_close_stalled(self) -> None:
        """A close that cannot flush is close_stalled, even after eof."""
        _, reason, _ = run(
            [
                E.TLS_BYTES,
                E.HANDSHAKE_DONE,
                E.CLOSE_NOTIFY,
                E.APP_CLOSE,
                E.WRITE_STALLED,
                E.LOST_ERROR,
            ]
        )
        self.assertEqual(reason, R.CLOSE_STALLED)

    def test_health_check(self) -> None:
        """Connect and close without a byte: no_data."""
        _, reason, actions = run([E.FIN, E.LOST_CLEAN])
        self.assertEqual(reason, R.NO_DATA)
        self.assertNotIn(A.LOG_HANDSHAKE_FAILED, actions)
