"""The load step: from checked settings to what the daemon runs with.

Parsing (:mod:`secure_echo.daemon.options`) and validation
(:mod:`secure_echo.daemon.settings`) deal in plain values.  :func:`load` is the one
place, after parsing and before the reactor runs, that touches the filesystem for
TLS: it makes (or reuses) the development certificate when no ``--cert`` was given,
reads and checks the whole TLS set (:func:`secure_echo.tls.material.load_tls`: every
certificate and key, the client CAs, the CRLs, the test certificates), and builds
the first TLS contexts.  Its errors are the same one-line ``usage.UsageError`` as
the options', worded for the config file when the option came from there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from OpenSSL import SSL
from twisted.python import usage

from secure_echo.daemon.configfile import reword_for_file
from secure_echo.daemon.settings import Settings
from secure_echo.tls.material import load_tls
from secure_echo.tls.policy import ContextHolder, LoadedTLS, TLSConfigError
from secure_echo.tools import devcerts


@dataclass(frozen=True, kw_only=True)
class Config(Settings):
    """:class:`Settings` plus what the load step read and built."""

    #: The validated certificates and keys, client CAs, CRLs and test certificates.
    tls: LoadedTLS
    #: The context every new connection is made from (swapped by a reload).
    contexts: ContextHolder
    #: The development CA and certificate, when no ``--cert`` was given.
    dev_certs: devcerts.DevCerts | None = None


def load(settings: Settings) -> Config:
    """Make the dev certificate if needed, read the TLS files and build the context.

    Raises ``usage.UsageError`` (one line: option, problem, fix).
    """
    try:
        return _load(settings)
    except usage.UsageError as error:
        raise reword_for_file(error, settings.config_file, settings.sources) from None


def _load(settings: Settings) -> Config:
    dev = None
    if settings.dev_state_dir is not None:
        try:
            dev = devcerts.ensure_dev_certs(settings.dev_state_dir)
        except devcerts.DevCertsError as error:
            raise usage.UsageError(f"--state-dir: {error}") from None
    try:
        tls = load_tls(settings.tls_settings)
    except TLSConfigError as error:
        raise usage.UsageError(str(error)) from None
    try:
        contexts = ContextHolder(tls)
    except (SSL.Error, RuntimeError) as error:
        which = (
            "a certificate or key (of --cert or --test-certs)"
            if tls.test
            else "the certificate or key"
        )
        raise usage.UsageError(
            f"--cert: OpenSSL refused {which} ({error}); "
            "check that each is a PEM certificate chain and its key"
        ) from None
    values = {f.name: getattr(settings, f.name) for f in fields(Settings)}
    return Config(**values, tls=tls, contexts=contexts, dev_certs=dev)
