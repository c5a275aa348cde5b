"""TLS files for workers that cannot read them: ``twistd --uid`` with a root-only key.

twistd reads the configuration and binds as root, then drops to ``--uid``/``--gid``
before the services start, and the supervisor starts its workers after that: as the
unprivileged user, they cannot read a key that only root may read, and every worker
(a restarted one too) would fail to start.

So the supervisor reads the TLS files while it is still root (:func:`read_tls_files`,
at ``makeService``), keeps their bytes, and gives each worker it starts a sealed,
read-only memory file per TLS file (:func:`share_copies`), named in its spec.  The
worker loads each file from its path when it can read it, as one process does, so
a restarted worker serves what the files hold now; only a file it cannot read (it
exists, but permission is denied) is loaded from the supervisor's copy
(:func:`readable_settings`).  The records name the real paths, and the worker says
which files came from the copies (``tls_files_from_supervisor``).

A reload still reads the files themselves, as the unprivileged user, exactly as one
process under ``--uid`` does: it fails (``tls_reload_failed``, permission denied)
and the workers keep serving what they loaded.  Make the files readable by that
user for reloads (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from secure_echo.pool.contract import TLSFileCopy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from secure_echo.daemon.load import Config
    from secure_echo.tls.policy import TLSSettings

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def tls_paths(settings: TLSSettings) -> list[Path]:
    """Every file ``settings`` names (certificates, keys, client CAs, CRLs), once each."""
    paths = [settings.cert, settings.key]
    if settings.client_ca is not None:
        paths.append(settings.client_ca)
    for cert, key in settings.extra_certs:
        paths += [cert, key]
    paths += settings.crls
    unique: dict[str, Path] = {}
    for path in paths:
        # abspath, not resolve(): a symlink (a certbot live/ path) keeps its name.
        unique.setdefault(os.path.abspath(path), path)  # noqa: PTH100
    return [Path(p) for p in unique]


def read_tls_files(settings: TLSSettings) -> dict[str, bytes]:
    """The bytes of every file of ``settings`` this process can read, by absolute path.

    A file it cannot read is left out: the load step already refused start-up if
    one it needs is unreadable.
    """
    files = {}
    for path in tls_paths(settings):
        with contextlib.suppress(OSError):
            files[str(path)] = path.read_bytes()
    return files


def share_copies(files: Mapping[str, bytes]) -> tuple[tuple[TLSFileCopy, ...], list[int]]:
    """A sealed memory file per entry of ``files``; their descriptors, to close after use.

    Nothing is shared where the system has no memory files (``os.memfd_create``).
    """
    create = getattr(os, "memfd_create", None)
    if create is None:  # pragma: no cover - Linux has it
        return (), []
    copies: list[TLSFileCopy] = []
    held: list[int] = []
    try:
        for path, data in files.items():
            fd = create("secure-echo-tls", os.MFD_ALLOW_SEALING)
            held.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            copies.append(TLSFileCopy(path, fd))
    except OSError:
        close_all(held)
        raise
    return tuple(copies), held


def close_all(fds: Iterable[int]) -> None:
    """Close each descriptor, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unreadable(path: Path) -> bool:
    """True if ``path`` exists (as far as we can tell) but this process may not read it.

    A missing file is not unreadable: loading it reports that it does not exist.
    """
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return not os.access(path, os.R_OK)


def readable_settings(
    settings: TLSSettings, copies: Sequence[TLSFileCopy]
) -> tuple[TLSSettings, list[str]]:
    """``settings`` with each unreadable file that has a copy replaced by that copy.

    Returns the settings to load and the paths that were replaced.
    """
    by_path = {c.path: Path(f"/proc/self/fd/{c.fd}") for c in copies}
    replaced: list[str] = []

    def pick(path: Path) -> Path:
        key = os.path.abspath(path)  # noqa: PTH100 - as tls_paths names it
        copy = by_path.get(key)
        if copy is None or not _unreadable(path):
            return path
        if key not in replaced:
            replaced.append(key)
        return copy

    changed = replace(
        settings,
        cert=pick(settings.cert),
        key=pick(settings.key),
        client_ca=pick(settings.client_ca) if settings.client_ca is not None else None,
        extra_certs=tuple((pick(c), pick(k)) for c, k in settings.extra_certs),
        crls=tuple(pick(p) for p in settings.crls),
    )
    return changed, replaced


def with_real_paths(cfg: Config, settings: TLSSettings) -> Config:
    """``cfg`` loaded from copies, with ``settings`` (the real paths) put back.

    The records then name the real files, and a reload reads (and ``--reload-interval``
    watches) the real files.
    """
    loaded = replace(cfg.tls, settings=settings)
    cfg.contexts.loaded = loaded
    return replace(cfg, tls_settings=settings, tls=loaded)
