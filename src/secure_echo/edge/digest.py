"""Warnings a flood cannot flood: the first of each reason now, the rest summed up.

A port scan, a misconfigured client in a retry loop or a refusal storm would
otherwise write one warning per connection.  A :class:`Digest` says, for each
occurrence, whether it is the first of its reason in the current window (log it
in full, at once) or one to count; at the end of a window with counted ones it
hands the counts per reason and the busiest peers to its ``summary`` callable,
and keeps summing window by window until a window passes quietly.  Every
occurrence is counted exactly once: in full, or in a summary.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Summary(Protocol):
    """Logs one window's counted occurrences."""

    def __call__(self, counts: dict[str, int], top_peers: dict[str, int], window: float) -> None:
        """``counts`` per reason and the ``top_peers`` of the window just ended."""


class Digest:
    """Which occurrences to log in full, and the summaries of the rest."""

    def __init__(
        self, clock: IReactorTime, summary: Summary, window: float = 10.0, top: int = 5
    ) -> None:
        self._clock = clock
        self._summary = summary
        self._window = window
        self._top = top
        self._logged: set[str] = set()
        self._counted: Counter[str] = Counter()
        self._peers: Counter[str] = Counter()
        self._timer: IDelayedCall | None = None
        #: Every occurrence, by reason, since the start.
        self.total: Counter[str] = Counter()

    def first(self, reason: str, peer: str) -> bool:
        """Note one occurrence; True if it is to be logged in full now."""
        self.total[reason] += 1
        if self._timer is None:
            self._timer = self._clock.callLater(self._window, self._flush)
        if reason not in self._logged:
            self._logged.add(reason)
            return True
        self._counted[reason] += 1
        self._peers[peer] += 1
        return False

    def _flush(self) -> None:
        self._timer = None
        if self._counted:
            self._summary(
                dict(self._counted), dict(self._peers.most_common(self._top)), self._window
            )
            # Occurrences continue: keep summarising instead of logging one at once.
            self._timer = self._clock.callLater(self._window, self._flush)
        else:
            self._logged.clear()
        self._counted.clear()
        self._peers.clear()

    def stop(self) -> None:
        """Cancel the pending summary (at shutdown)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
