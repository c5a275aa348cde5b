"""A TLS connection's life as one phase and a transition table, free of I/O.

The Twisted glue (:mod:`secure_echo.tls.connection`) turns what happens to a
connection into an :class:`Event`, asks :func:`step` what follows, and performs
the step's :class:`Action`\\ s in order; it keeps no other state about where the
connection is in its life.  Everything that decides that lives here, as a table
(the model is h11's ``_state_machine.py``): it can be read whole, and the tests
check every phase against every event.

The per-read hot path does not come through here: while a connection is
:attr:`Phase.OPEN` the glue decrypts and hands data over directly, and only the
events below (a handful per connection) take a step.

Phases, in the usual order::

    ACCEPTED ──TLS bytes──▶ HANDSHAKING ──done──▶ OPEN ──close_notify/FIN──▶ INPUT_ENDED
        │                        │                 │ ╲                            │
        │ plaintext, FIN         │ failure         │  drain, max age ──▶ DRAINING │
        ▼                        ▼                 ▼                     │        │
    CLOSING ◀───────────────────────────────── app closes ◀──────────────┴────────┘
        │ input left unread              any deadline that drops the connection
        ▼                                              ▼
    LINGERING ──client done──▶ (stream closes) ──▶ CLOSED ◀── ABORTING

The rules the table encodes:

1. Accept: the connection starts in ``ACCEPTED`` with its handshake deadline
   armed.  A stream that ends or breaks before the first byte is ``no_data``
   (a load balancer's TCP check), logged without a warning.
2. First bytes: a TLS handshake record moves to ``HANDSHAKING``; anything else is
   a plaintext client, answered with one hint line and closed
   (``plaintext_client``).
3. Handshake: success starts the application (``OPEN``) and swaps the handshake
   deadline for the idle and age deadlines.  A failure sends OpenSSL's alert and
   closes (``handshake_failed``); the deadline aborts (``handshake_timeout``).
4. End of input (close_notify: ``eof``; a bare FIN: ``client_closed``): the
   application answers what it read (``INPUT_ENDED``), then closes.
5. Drain (shutdown) and the age limit stop reading for good and let the
   application finish (``DRAINING``); before the handshake there is nothing to
   finish, so the connection is aborted.  The drain deadline aborts what is left
   (``drain_timeout``).
6. Close: close_notify goes out after every reply, and the stream closes once
   its buffer is written (``CLOSING``).  While client input is left unread, or
   replies are not yet acknowledged by the client's TCP, the close lingers
   (``LINGERING``): FIN after the replies, input read and dropped, until the
   client closes too or has acknowledged every reply, so that a reset cannot
   destroy replies unnoticed.  A lingering close that makes no progress within
   the write-stall timeout is aborted (``close_stalled``); a close that does not
   linger has nothing left to send.  Before the close, a client that stops
   reading is ``slow_reader``.
7. The record never claims more than happened.  ``eof``, ``client_closed``,
   ``server_shutdown``, ``idle_timeout``, ``max_connection_age`` and
   ``server_closed`` claim a clean end (every reply written to the socket); they
   hold only if the stream then closes cleanly.  Any later reason replaces them,
   and a stream that breaks first makes the reason ``reset``: while the
   connection is still at work, or while a reply is still held or not yet
   acknowledged.  A stream that breaks after every reply arrived (a client that
   closes without waiting for our close_notify, which TLS allows) keeps its
   reason.  Every other reason says what went wrong and is never replaced.
8. Once ``ABORTING`` or ``CLOSED`` nothing changes but the final close.  An event
   that cannot happen in a phase (a handshake result after the handshake, a
   deadline whose timer a close cancelled) is ignored: it takes no action.
9. A step's actions run in the order listed.  An action that causes another event
   (the application closing when told its input ended, a close that finds unread
   input) ends the step: the nested step's actions take the place of the rest.
   That is why closing the stream is a step's last action, and the lingering
   step arms the stall watch itself.
"""

from __future__ import annotations

from enum import Enum, unique
from types import MappingProxyType
from typing import Final, NamedTuple

from secure_echo.tls.record import CloseReason


@unique
class Phase(Enum):
    """Where a connection is in its life."""

    # Members are singletons compared by identity: hash them so too, in C, not by
    # Enum's hash of the name in Python (each step hashes several of them).
    __hash__ = object.__hash__

    #: TCP accepted; no byte yet.
    ACCEPTED = "accepted"
    #: TLS bytes arrived; the handshake is under way.
    HANDSHAKING = "handshaking"
    #: Handshake done; lines are read and answered.
    OPEN = "open"
    #: The client ended its input (close_notify or FIN); replies still go out.
    INPUT_ENDED = "input_ended"
    #: The server stopped reading (shutdown, age limit); the application finishes.
    DRAINING = "draining"
    #: close_notify sent (after the handshake); the stream closes once written.
    CLOSING = "closing"
    #: FIN sent; input is read and dropped until the client has our data.
    LINGERING = "lingering"
    #: Dropped on purpose; waiting for the stream to report it gone.
    ABORTING = "aborting"
    #: The stream is gone; the record is written.
    CLOSED = "closed"


@unique
class Event(Enum):
    """What can happen to a connection (besides data on the hot path)."""

    # Members are singletons compared by identity: hash them so too, in C, not by
    # Enum's hash of the name in Python (each step hashes several of them).
    __hash__ = object.__hash__

    #: The first bytes start a TLS handshake record (0x16).
    TLS_BYTES = "tls_bytes"
    #: The first bytes are not TLS.
    PLAINTEXT_BYTES = "plaintext_bytes"
    HANDSHAKE_DONE = "handshake_done"
    HANDSHAKE_ERROR = "handshake_error"
    HANDSHAKE_DEADLINE = "handshake_deadline"
    #: The client's TLS close_notify was read.
    CLOSE_NOTIFY = "close_notify"
    #: The client's TCP stream ended (FIN).
    FIN = "fin"
    #: A TLS error after the handshake (a corrupt record, an unexpected message).
    TLS_ERROR = "tls_error"
    IDLE_DEADLINE = "idle_deadline"
    AGE_DEADLINE = "age_deadline"
    #: The server is shutting down.
    DRAIN = "drain"
    #: The server's drain deadline passed.
    DRAIN_DEADLINE = "drain_deadline"
    #: The application asked for an orderly close (``loseConnection``).
    APP_CLOSE = "app_close"
    #: The application dropped the connection (``abortConnection``).
    APP_ABORT = "app_abort"
    #: Unsent output made no progress for the write-stall timeout.
    WRITE_STALLED = "write_stalled"
    #: The stream close found client input still unread (see rule 6).
    UNREAD_INPUT = "unread_input"
    #: A lingering close found every byte of ours acknowledged.
    LINGER_DONE = "linger_done"
    #: The stream transport reported the connection closed cleanly.
    LOST_CLEAN = "lost_clean"
    #: The stream transport reported the connection lost with an error while
    #: replies were still held, or not yet acknowledged by the client.
    LOST_ERROR = "lost_error"
    #: Lost with an error after every reply arrived (see rule 7).
    LOST_ERROR_FLUSHED = "lost_error_flushed"


@unique
class Action(Enum):
    """What the glue does for a step, in the order the step lists them."""

    # Members are singletons compared by identity: hash them so too, in C, not by
    # Enum's hash of the name in Python (each step hashes several of them).
    __hash__ = object.__hash__

    #: Stop the handshake, idle and age deadlines.
    CANCEL_DEADLINES = "cancel_deadlines"
    #: Arm the idle and age deadlines (the handshake is done).
    ARM_ESTABLISHED = "arm_established"
    #: Write the one-line plaintext hint.
    SEND_HINT = "send_hint"
    #: Send whatever TLS output is pending (an alert, a ticket).
    FLUSH_TLS = "flush_tls"
    #: Read the TLS facts into the record; build and connect the application.
    START_APP = "start_app"
    #: Tell the application its input ended (it answers the rest, then closes).
    END_APP_INPUT = "end_app_input"
    #: Stop reading for good; ask the application to finish and close.
    DRAIN_APP = "drain_app"
    #: Send what the application wrote, then close_notify.
    SEND_CLOSE_NOTIFY = "send_close_notify"
    #: Close the stream once written; the glue reports ``UNREAD_INPUT`` instead
    #: when input is left unread or replies are not yet acknowledged.
    CLOSE_STREAM = "close_stream"
    #: Half-close, read and drop input, poll until our data is acknowledged.
    LINGER = "linger"
    #: Close a lingering stream now.
    LOSE_STREAM = "lose_stream"
    #: Watch the lingering close: it must make progress within the write-stall
    #: timeout.  A close that did not linger has nothing left to send.
    WATCH_CLOSE = "watch_close"
    #: Drop the stream at once.
    ABORT_STREAM = "abort_stream"
    #: Warn: the handshake failed.
    LOG_HANDSHAKE_FAILED = "log_handshake_failed"
    #: Warn: a TLS error after the handshake.
    LOG_TLS_ERROR = "log_tls_error"
    #: Note: the client stopped reading.
    LOG_SLOW_READER = "log_slow_reader"
    #: The stream is gone: stop every timer, tell the application, write the record.
    FINISH = "finish"


class Step(NamedTuple):
    """The outcome of one event in one phase."""

    phase: Phase
    actions: tuple[Action, ...] = ()
    #: The close reason this step stands for, applied by :func:`next_reason`.
    reason: CloseReason | None = None


#: Reasons that claim a clean end: they hold only if nothing says otherwise (rule 7).
CLEAN_CLAIMS: Final = frozenset(
    {
        CloseReason.EOF,
        CloseReason.CLIENT_CLOSED,
        CloseReason.SERVER_SHUTDOWN,
        CloseReason.IDLE_TIMEOUT,
        CloseReason.MAX_CONNECTION_AGE,
        CloseReason.SERVER_CLOSED,
    }
)

_A = Action
_P = Phase
_E = Event
_R = CloseReason

_CLOSE = (_A.CANCEL_DEADLINES, _A.SEND_CLOSE_NOTIFY, _A.CLOSE_STREAM)
_ABORT = (_A.CANCEL_DEADLINES, _A.ABORT_STREAM)
_FAIL_HANDSHAKE = (
    _A.CANCEL_DEADLINES,
    _A.LOG_HANDSHAKE_FAILED,
    _A.FLUSH_TLS,
    _A.CLOSE_STREAM,
)
_TLS_FAILED = (
    _A.CANCEL_DEADLINES,
    _A.LOG_TLS_ERROR,
    _A.FLUSH_TLS,
    _A.CLOSE_STREAM,
)
_STALLED = (_A.LOG_SLOW_READER, _A.CANCEL_DEADLINES, _A.ABORT_STREAM)
_GONE = (_A.FINISH,)


def _after_handshake(app_close: CloseReason | None) -> dict[Event, Step]:
    """What OPEN, INPUT_ENDED and DRAINING share; ``app_close``: the reason of a close."""
    return {
        _E.TLS_ERROR: Step(_P.CLOSING, _TLS_FAILED, _R.TLS_ERROR),
        _E.DRAIN_DEADLINE: Step(_P.ABORTING, _ABORT, _R.DRAIN_TIMEOUT),
        _E.APP_ABORT: Step(_P.ABORTING, _ABORT, _R.ABORTED),
        _E.WRITE_STALLED: Step(_P.ABORTING, _STALLED, _R.SLOW_READER),
        _E.LOST_CLEAN: Step(_P.CLOSED, _GONE, _R.CONNECTION_LOST),
        _E.LOST_ERROR: Step(_P.CLOSED, _GONE, _R.RESET),
        _E.LOST_ERROR_FLUSHED: Step(_P.CLOSED, _GONE, _R.RESET),
        # The close itself: from OPEN the server closed; after the input ended or
        # a drain began, the reason was set on the way in (rule 7).
        _E.APP_CLOSE: Step(_P.CLOSING, _CLOSE, app_close),
    }


def _closing(phase: Phase) -> dict[Event, Step]:
    """What CLOSING and LINGERING share: waiting for the stream to close."""
    return {
        _E.DRAIN_DEADLINE: Step(_P.ABORTING, _ABORT, _R.DRAIN_TIMEOUT),
        _E.APP_ABORT: Step(_P.ABORTING, _ABORT, _R.ABORTED),
        _E.WRITE_STALLED: Step(
            _P.ABORTING, (_A.LOG_SLOW_READER, _A.ABORT_STREAM), _R.CLOSE_STALLED
        ),
        _E.LOST_CLEAN: Step(_P.CLOSED, _GONE),
        _E.LOST_ERROR: Step(_P.CLOSED, _GONE, _R.RESET),
        _E.LOST_ERROR_FLUSHED: Step(_P.CLOSED, _GONE),
        # Lingering: the client read everything and closed, or acknowledged it all.
        **(
            {
                _E.FIN: Step(_P.LINGERING, (_A.LOSE_STREAM,)),
                _E.LINGER_DONE: Step(_P.LINGERING, (_A.LOSE_STREAM,)),
            }
            if phase is _P.LINGERING
            else {_E.UNREAD_INPUT: Step(_P.LINGERING, (_A.LINGER, _A.WATCH_CLOSE))}
        ),
    }


_TABLE: dict[tuple[Phase, Event], Step] = {}


def _add(phase: Phase, steps: dict[Event, Step]) -> None:
    for event, outcome in steps.items():
        _TABLE[phase, event] = outcome


_add(
    _P.ACCEPTED,
    {
        _E.TLS_BYTES: Step(_P.HANDSHAKING),
        _E.PLAINTEXT_BYTES: Step(
            _P.CLOSING,
            (_A.CANCEL_DEADLINES, _A.SEND_HINT, _A.CLOSE_STREAM),
            _R.PLAINTEXT_CLIENT,
        ),
        _E.HANDSHAKE_DEADLINE: Step(_P.ABORTING, _ABORT, _R.HANDSHAKE_TIMEOUT),
        _E.FIN: Step(_P.CLOSING, (_A.CANCEL_DEADLINES, _A.CLOSE_STREAM), _R.NO_DATA),
        _E.DRAIN: Step(_P.ABORTING, _ABORT, _R.SERVER_SHUTDOWN),
        _E.APP_ABORT: Step(_P.ABORTING, _ABORT, _R.ABORTED),
        _E.LOST_CLEAN: Step(_P.CLOSED, _GONE, _R.NO_DATA),
        _E.LOST_ERROR: Step(_P.CLOSED, _GONE, _R.NO_DATA),
        _E.LOST_ERROR_FLUSHED: Step(_P.CLOSED, _GONE, _R.NO_DATA),
    },
)
_add(
    _P.HANDSHAKING,
    {
        _E.HANDSHAKE_DONE: Step(_P.OPEN, (_A.CANCEL_DEADLINES, _A.ARM_ESTABLISHED, _A.START_APP)),
        _E.HANDSHAKE_ERROR: Step(_P.CLOSING, _FAIL_HANDSHAKE, _R.HANDSHAKE_FAILED),
        # The client gave up mid-handshake: a failed handshake, told as such.
        _E.FIN: Step(_P.CLOSING, _FAIL_HANDSHAKE, _R.HANDSHAKE_FAILED),
        _E.HANDSHAKE_DEADLINE: Step(_P.ABORTING, _ABORT, _R.HANDSHAKE_TIMEOUT),
        _E.DRAIN: Step(_P.ABORTING, _ABORT, _R.SERVER_SHUTDOWN),
        _E.DRAIN_DEADLINE: Step(_P.ABORTING, _ABORT, _R.DRAIN_TIMEOUT),
        _E.APP_ABORT: Step(_P.ABORTING, _ABORT, _R.ABORTED),
        _E.WRITE_STALLED: Step(_P.ABORTING, _STALLED, _R.SLOW_READER),
        _E.LOST_CLEAN: Step(_P.CLOSED, _GONE, _R.HANDSHAKE_FAILED),
        _E.LOST_ERROR: Step(_P.CLOSED, _GONE, _R.HANDSHAKE_FAILED),
        _E.LOST_ERROR_FLUSHED: Step(_P.CLOSED, _GONE, _R.HANDSHAKE_FAILED),
    },
)
_add(
    _P.OPEN,
    {
        **_after_handshake(_R.SERVER_CLOSED),
        _E.CLOSE_NOTIFY: Step(_P.INPUT_ENDED, (_A.END_APP_INPUT,), _R.EOF),
        _E.FIN: Step(_P.INPUT_ENDED, (_A.END_APP_INPUT,), _R.CLIENT_CLOSED),
        _E.IDLE_DEADLINE: Step(_P.CLOSING, _CLOSE, _R.IDLE_TIMEOUT),
        _E.AGE_DEADLINE: Step(
            _P.DRAINING, (_A.CANCEL_DEADLINES, _A.DRAIN_APP), _R.MAX_CONNECTION_AGE
        ),
        _E.DRAIN: Step(_P.DRAINING, (_A.CANCEL_DEADLINES, _A.DRAIN_APP), _R.SERVER_SHUTDOWN),
    },
)
# The client is done sending; the application finishes.  A drain or deadline now
# changes nothing: the replies are what is left either way.
_add(_P.INPUT_ENDED, _after_handshake(None))
_add(_P.DRAINING, _after_handshake(None))
_add(_P.CLOSING, _closing(_P.CLOSING))
_add(_P.LINGERING, _closing(_P.LINGERING))
_add(
    _P.ABORTING,
    {
        # The loss is the abort we asked for: the reason stays.
        _E.LOST_CLEAN: Step(_P.CLOSED, _GONE),
        _E.LOST_ERROR: Step(_P.CLOSED, _GONE),
        _E.LOST_ERROR_FLUSHED: Step(_P.CLOSED, _GONE),
    },
)

#: Every (phase, event) pair with a step of its own; :func:`step` ignores the rest.
TABLE: Final = MappingProxyType(_TABLE)


def step(phase: Phase, event: Event) -> Step:
    """What ``event`` does in ``phase``: the table's step, or nothing (rule 8)."""
    found = _TABLE.get((phase, event))
    if found is None:
        return Step(phase)
    return found


def next_reason(current: CloseReason | None, proposed: CloseReason | None) -> CloseReason | None:
    """The close reason after a step proposing ``proposed`` (rule 7)."""
    if proposed is None:
        return current
    if current is None or current in CLEAN_CLAIMS:
        return proposed
    return current
