"""Reloading the TLS material without a restart: SIGHUP and file watching.

A reload is one transaction: every certificate chain and key, the client CA, the
CRLs, the test certificates and the allow-lists are read and validated together
(:func:`secure_echo.tls.material.load_tls`), new contexts are built from them, and
only then swapped in for new connections.  If any step fails the old contexts stay
in use and ``tls_reload_failed`` is logged; open connections always keep the context
they started with.

Triggers:

* SIGHUP.  twistd installs no handler for it (without one, SIGHUP kills the
  process), so :class:`ReloadService` installs one while running.  The handler
  only hops into the reactor (``callFromThread``); the reload runs there.
* ``--reload-interval SECONDS``: the files' identity (inode, size, mtime) is polled
  and a change triggers a reload.  The files are every ``--cert`` and ``--key``, the
  client CA, the CRLs, and the ``--test-certs`` directory with the files in it.
  Polling is cheap, needs no inotify, and sees ``mv new.pem cert.pem`` renames as
  well as in-place writes; a half-written file fails validation and is retried at
  the next change.

After each load (at start too, then every 12 hours) each real certificate (every
``--cert``, not the test certificates, which may be expired on purpose) that
expires within ``--expiry-warning-days`` logs ``certificate_expiring``.

Other settings of the ``--config`` file are not reloaded; after each reload the
single process names those that changed (:mod:`secure_echo.daemon.restart`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from typing_extensions import override

from secure_echo.daemon.certificates import describe, served, test_names
from secure_echo.tls.material import load_tls
from secure_echo.tls.policy import ContextHolder, LoadedTLS, TLSConfigError, TLSSettings

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from types import FrameType

_FileId = tuple[int, int, int, int] | None

#: Seconds between two checks of the certificate's expiry.
EXPIRY_CHECK_INTERVAL = 12 * 3600.0


def _identity(path: Path | None) -> _FileId:
    if path is None:
        return None
    try:
        info = os.stat(path)  # noqa: PTH116 - one stat call for all fields
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def files_of(settings: TLSSettings) -> tuple[Path | None, ...]:
    """The files a reload reads (the test-certificate directory and its files as now)."""
    files: list[Path | None] = [settings.cert, settings.key]
    for cert, key in settings.extra_certs:
        files += [cert, key]
    files += [settings.client_ca, *settings.crls]
    if settings.test_certs is not None:
        # The directory itself too: adding or removing a pair changes its mtime.
        files.append(settings.test_certs)
        with contextlib.suppress(OSError):  # gone or unreadable: the reload says so
            files += sorted(settings.test_certs.iterdir())
    return tuple(files)


class TLSReloader:
    """Validates and swaps TLS material; logs what happened."""

    log = Logger()

    def __init__(
        self,
        holder: ContextHolder,
        settings: Callable[[], TLSSettings],
        clock: Any,
        *,
        expiry_warning_days: float = 14.0,
        restart_check: Callable[[str], object] | None = None,
    ) -> None:
        self.holder = holder
        self._settings = settings
        self._clock = clock
        #: Called with the trigger after each reload, to name the settings a reload
        #: does not apply (:class:`secure_echo.daemon.restart.RestartCheck`).
        self._restart_check = restart_check
        self.expiry_warning = datetime.timedelta(days=expiry_warning_days)
        self.reloads = 0
        self.failures = 0
        #: Called before each reload (systemd's RELOADING=1).
        self.before: list[Callable[[], object]] = []
        #: Called after each reload with its outcome, success or not (READY=1).
        self.after: list[Callable[[bool], object]] = []

    def now(self) -> datetime.datetime:
        """The current time, from the injected clock."""
        return datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)

    def reload(self, trigger: str) -> bool:
        """Reload everything as one transaction; True if the new set is in use."""
        for hook in self.before:
            hook()
        outcome = self._reload(trigger)
        if self._restart_check is not None:
            self._restart_check(trigger)
        for done in self.after:
            done(outcome)
        return outcome

    def _reload(self, trigger: str) -> bool:
        try:
            settings = self._settings()
            loaded = load_tls(settings, self.now())
            self.holder.replace(loaded)
        except (TLSConfigError, ValueError) as error:
            self.failures += 1
            self.log.error(
                "TLS reload ({trigger}) failed, keeping the current certificate: {error}",
                event="tls_reload_failed",
                trigger=trigger,
                error=str(error),
                subject=self.holder.loaded.subject,
                not_after=self.holder.loaded.not_after.isoformat(),
            )
            return False
        except Exception as error:  # an OpenSSL refusal while building the context
            self.failures += 1
            self.log.error(
                "TLS reload ({trigger}) failed, keeping the current certificate: {error}",
                event="tls_reload_failed",
                trigger=trigger,
                error=f"{type(error).__name__}: {error}",
                subject=self.holder.loaded.subject,
                not_after=self.holder.loaded.not_after.isoformat(),
            )
            return False
        self.reloads += 1
        self.log.info(
            "TLS material reloaded ({trigger}): {subject}, valid until {not_after}",
            event="tls_reloaded",
            trigger=trigger,
            # The default certificate, as before several could be served.
            subject=loaded.subject,
            not_after=loaded.not_after.isoformat(),
            cert=str(settings.cert),
            client_ca=str(settings.client_ca) if settings.client_ca else None,
            certificates=describe(loaded),
            test_certificates=test_names(loaded),
            crls=[str(crl) for crl in settings.crls],
        )
        self.warn_if_expiring(loaded)
        return True

    def warn_if_expiring(self, loaded: LoadedTLS) -> None:
        """Log ``certificate_expiring`` for each real certificate that expires soon.

        Test certificates are left out: expired or about to be is what some are for.
        """
        now = self.now()
        for each in served(loaded):
            left = each.not_after - now
            if left <= self.expiry_warning:
                self.log.warn(
                    "the server certificate {subject} expires in {days:.1f} days ({not_after})",
                    event="certificate_expiring",
                    subject=each.subject,
                    not_after=each.not_after.isoformat(),
                    days=left.total_seconds() / 86400.0,
                    cert=str(each.settings.cert),
                    default=each is loaded,
                )


class ReloadService(Service):
    """Installs the SIGHUP handler and, optionally, the file watcher."""

    def __init__(
        self,
        reloader: TLSReloader,
        reactor: Any,
        interval: float = 0.0,
        extra_files: tuple[Path | None, ...] = (),
    ) -> None:
        self.reloader = reloader
        self._reactor = reactor
        self._interval = interval
        #: Watched too (the --config file, whose TLS keys a reload re-reads).
        self._extra_files = extra_files
        self._watch: LoopingCall | None = None
        self._expiry: LoopingCall | None = None
        self._seen: tuple[_FileId, ...] = ()
        self._previous_handler: Any = None

    @override
    def privilegedStartService(self) -> None:
        # Before the listening service binds (it comes later in the tree): from the
        # first ``listening`` record on, SIGHUP reloads rather than kills.  A reload
        # asked for now runs once the reactor does.
        self._take_sighup()
        super().privilegedStartService()

    def _take_sighup(self) -> None:
        if self._previous_handler is None:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    @override
    def startService(self) -> None:
        super().startService()
        self._take_sighup()
        # At start, then twice a day: a long-running daemon warns before expiry
        # even if nothing is ever reloaded.
        self._expiry = LoopingCall(
            lambda: self.reloader.warn_if_expiring(self.reloader.holder.loaded)
        )
        self._expiry.clock = self._reactor
        self._expiry.start(EXPIRY_CHECK_INTERVAL, now=True)
        if self._interval > 0:
            self._seen = self._identities()
            self._watch = LoopingCall(self._poll)
            self._watch.clock = self._reactor
            self._watch.start(self._interval, now=False)

    @override
    def stopService(self) -> None:
        super().stopService()
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._expiry = None
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_sighup(self, _signum: int, _frame: FrameType | None) -> None:
        """Signal context: only schedule the reload in the reactor."""
        self._reactor.callFromThread(self.reloader.reload, "SIGHUP")

    def _identities(self) -> tuple[_FileId, ...]:
        files = (*files_of(self.reloader.holder.loaded.settings), *self._extra_files)
        return tuple(_identity(path) for path in files)

    def _poll(self) -> None:
        current = self._identities()
        if current != self._seen:
            self._seen = current
            self.reloader.reload("file-change")
