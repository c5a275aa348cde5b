"""Whether a connection reads: the application, the send buffer and a drain each may say no.

Reading pauses while any of three objects: the application (its pending replies
passed their bound), the stream's send buffer (a client that does not read what
we send), or a drain (reading stops for good).  It resumes only when none does.
The gate remembers what it last told the stream transport, so each change costs
one call and repeats cost none.
"""

from __future__ import annotations

from typing import Any


class ReadGate:
    """Pauses and resumes the stream transport's reading (see the module docstring)."""

    __slots__ = ("_paused", "_transport", "app_paused", "stopped", "stream_full")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        #: The application asked to stop reading.
        self.app_paused = False
        #: The stream's send buffer is full.
        self.stream_full = False
        #: Reading is off for good (a drain).
        self.stopped = False
        self._paused = False

    def update(self) -> None:
        """Tell the transport to pause or resume if the answer changed."""
        want = self.app_paused or self.stream_full or self.stopped
        if want == self._paused:
            return
        self._paused = want
        if want:
            self._transport.pauseProducing()
        else:
            self._transport.resumeProducing()

    def released(self) -> None:
        """The stream reads on its own now (a lingering close): forget the pause."""
        self._paused = False
