"""An asyncio TLS line echo on the stdlib ``ssl`` module: a well-written peer.

One ``write`` per received chunk that completes at least one line (everything up to
the chunk's last newline); the unterminated rest waits for the next chunk.  Reading
pauses when the transport says ``pause_writing`` and resumes on ``resume_writing``,
so a client that does not read cannot make the server buffer without bound.  The
server context allows TLS 1.3 only.

Usage: ``python asyncio_echo.py CERT KEY [--lifetime SECONDS]``.  Prints the bound
port on a line of its own, then serves on 127.0.0.1 until SIGTERM or the lifetime
(default 1800 s) is over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys

#: An unterminated line longer than this closes the connection (the daemon's default).
MAX_PENDING = 65536


class EchoProtocol(asyncio.Protocol):
    """Echo complete lines, one write per chunk."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Write back everything up to the last newline."""
        assert self.transport is not None
        if self.pending:
            data = self.pending + data
        end = data.rfind(b"\n") + 1
        if end == 0:
            self.pending = data
            if len(data) > MAX_PENDING:
                self.transport.close()
            return
        self.pending = data[end:]
        self.transport.write(data[:end] if self.pending else data)

    def pause_writing(self) -> None:
        """The peer is not reading: stop reading from it."""
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The output drained: read again."""
        assert self.transport is not None
        self.transport.resume_reading()


async def serve(cert: str, key: str, lifetime: float) -> None:
    """Listen on 127.0.0.1, print the port, serve until SIGTERM or the lifetime ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), lifetime)


def main(argv: list[str]) -> int:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("--lifetime", type=float, default=1800.0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.cert, args.key, args.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
