"""What a reload cannot apply: settings that changed in the config file but need a restart.

A reload (SIGHUP, ``--reload-interval``) applies the TLS keys of the ``--config`` file
only (:data:`RELOADED_KEYS`; :func:`secure_echo.daemon.options.reload_tls_settings`).
Every other key (listen addresses, limits, timeouts, logging, metrics, PROXY
protocol, workers) is read at start.  So that an edit does not silently wait for the
next restart, :class:`RestartCheck` re-reads the file after each reload, checks every
option as a start would, and compares the result with the settings the process
started with, key by key (:func:`secure_echo.daemon.settings.option_values`, so
``10`` and ``10.0`` seconds are the same value):

* keys whose value differs: ``reload_needs_restart`` (warn), naming each key with
  its old and new value;
* a file a start would refuse for a key the reload does not check:
  ``reload_config_invalid`` (error) with the one-line error.  Errors in the TLS keys
  or in the file as a whole are the reload's own ``tls_reload_failed``, not repeated.

A key the command line gave at start is never a change: the command line wins over
the file at a restart too.

Who checks: the single process after each of its reloads; with ``--workers N`` the
supervisor (whose settings are the ones that started), once per SIGHUP it forwards,
and once per new content of the file when the workers report a file-change reload
(:meth:`RestartCheck.check` with ``only_if_changed``), never each worker.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from twisted.logger import Logger
from twisted.python import usage

from secure_echo.daemon.configfile import ConfigFileError, fingerprint
from secure_echo.daemon.options import reread_settings
from secure_echo.daemon.settings import ALLOW_OPTIONS, option_values

if TYPE_CHECKING:
    from collections.abc import Callable

    from secure_echo.daemon.settings import Settings

#: The config-file keys a reload applies; every other key needs a restart.
RELOADED_KEYS: Final = frozenset(
    {
        "cert",
        "key",
        "client-ca",
        "client-auth",
        "tls-profile",
        *ALLOW_OPTIONS,
        "crl",
        "test-certs",
        "alpn",
        "strict-sni",
    }
)

_OPTION: Final = re.compile(r"--([a-z0-9-]+)")


def restart_changes(start: Settings, now: Settings) -> dict[str, tuple[object, object]]:
    """Keys outside :data:`RELOADED_KEYS` whose value differs: key to (old, new).

    Keys given on the command line at start are left out: the file cannot change them.
    """
    old, new = option_values(start), option_values(now)
    return {
        key: (old[key], new[key])
        for key in sorted(old)
        if key not in RELOADED_KEYS and key not in start.command_line and old[key] != new.get(key)
    }


def _error_key(error: usage.UsageError) -> str | None:
    """The option an error is about, or None if it is about the file as a whole."""
    if isinstance(error, ConfigFileError):
        return error.key
    match = _OPTION.match(str(error))
    return match[1] if match else None


class RestartCheck:
    """Compares the config file as it is now with the settings the process started with."""

    log = Logger()

    def __init__(
        self,
        start: Settings,
        reread: Callable[[Settings], Settings] = reread_settings,
    ) -> None:
        self.start = start
        self._reread = reread
        #: SHA-256 of the file's bytes at the last check (at first: at start).
        self._checked = start.config_sha256

    def check(self, trigger: str, *, only_if_changed: bool = False) -> list[str]:
        """Log what changed since start and needs a restart; return those keys.

        ``only_if_changed``: do nothing if the file's bytes are what the last check
        saw (several workers reporting one file change).
        """
        path = self.start.config_file
        if path is None:
            return []
        if only_if_changed:
            try:
                current = fingerprint(path.read_bytes())
            except OSError:
                current = None  # the reload reports an unreadable file
            if current == self._checked:
                return []
        try:
            now = self._reread(self.start)
        except usage.UsageError as error:
            self._checked = None
            key = _error_key(error)
            if key is not None and key not in RELOADED_KEYS:
                self.log.error(
                    "the config file would stop the next start: {error}",
                    event="reload_config_invalid",
                    trigger=trigger,
                    config_file=str(path),
                    key=key,
                    error=str(error),
                )
            return []
        self._checked = now.config_sha256
        changes = restart_changes(self.start, now)
        if changes:
            self.log.warn(
                "the config file changed {keys}: not applied by a reload, "
                "they take effect at the next restart",
                event="reload_needs_restart",
                trigger=trigger,
                config_file=str(path),
                keys=list(changes),
                changes={key: {"old": old, "new": new} for key, (old, new) in changes.items()},
            )
        return list(changes)
