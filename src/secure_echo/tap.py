"""``twistd secure-echo``: the options and the service maker that the plugin names.

``Options`` is :class:`secure_echo.daemon.options.Options` with one change for
twistd: a usage error is printed as a single line and the process exits, instead
of twistd printing its whole help page above it.  ``makeService`` builds either
the single-process daemon (:mod:`secure_echo.daemon.maker`) or, for
``--workers N``, the supervisor of N workers (:mod:`secure_echo.pool.maker`).
It only builds services; the reactor is passed in (or imported when called),
never at module level.

This module is the top of the layers: it alone may import both the daemon and
the pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python import usage
from typing_extensions import override

from secure_echo.daemon import options as _config
from secure_echo.daemon.load import Config, load
from secure_echo.daemon.maker import make_service
from secure_echo.daemon.printconfig import print_effective_settings
from secure_echo.pool.maker import make_supervisor

if TYPE_CHECKING:
    from collections.abc import Sequence

    from twisted.application.service import MultiService


class Options(_config.Options):
    """Twistd's view of :class:`secure_echo.daemon.options.Options`.

    A usage error is one stderr line and exit status 2; ``--print-config`` prints
    the validated settings as JSON and exits 0, so twistd never starts.
    """

    @override
    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            _config.one_line_exit(error)
        if self["print-config"]:
            print_effective_settings(load_or_exit(self))
            raise SystemExit(0)


def load_or_exit(options: _config.Options) -> Config:
    """The load step (:func:`secure_echo.daemon.load.load`) for twistd.

    Its one-line error goes to stderr and the process exits with status 2, like an
    error in the options themselves: twistd calls ``makeService`` before it starts
    logging or daemonizes, so the operator sees the line on the terminal.
    """
    try:
        return load(options.settings)
    except usage.UsageError as error:
        _config.one_line_exit(error)
        raise  # pragma: no cover - one_line_exit always raises SystemExit


def makeService(options: _config.Options, reactor: Any = None) -> MultiService:
    """Build the daemon's services from validated options."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor  # noqa: PLC0415

        reactor = default_reactor
    cfg = load_or_exit(options)
    if cfg.workers > 1:
        # --workers N: this process binds and supervises, N worker processes serve.
        return make_supervisor(options, cfg, reactor)
    return make_service(cfg, reactor)
