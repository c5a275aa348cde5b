"""Shared test helpers: certificates made at test time, never committed."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from secure_echo.tools import certgen


@dataclass(frozen=True)
class PKI:
    """A test CA with a server and a client certificate, plus an unrelated CA."""

    directory: Path
    ca: certgen.Issued
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path


def make_pki(directory: str | Path, *, server_names: tuple[str, ...] = ()) -> PKI:
    """Write a fresh PKI into ``directory`` (created if needed)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ca = certgen.make_ca("test CA", days=2)
    names = server_names or ("localhost", "127.0.0.1", "::1")
    server = certgen.issue_server(ca, names, days=2)
    client = certgen.issue_client(ca, "test client", days=2)
    other_ca = certgen.make_ca("other CA", days=2)
    other_client = certgen.issue_client(other_ca, "stranger", days=2)
    certgen.write_public(root / "ca.pem", ca.cert_pem())
    certgen.write_pair(server, root / "server.pem", root / "server-key.pem")
    certgen.write_pair(client, root / "client.pem", root / "client-key.pem")
    certgen.write_public(root / "other-ca.pem", other_ca.cert_pem())
    certgen.write_pair(other_client, root / "stranger.pem", root / "stranger-key.pem")
    return PKI(
        directory=root,
        ca=ca,
        ca_cert=root / "ca.pem",
        server_cert=root / "server.pem",
        server_key=root / "server-key.pem",
        client_cert=root / "client.pem",
        client_key=root / "client-key.pem",
        other_ca_cert=root / "other-ca.pem",
        other_client_cert=root / "stranger.pem",
        other_client_key=root / "stranger-key.pem",
    )


def write_expired_server(directory: Path, ca: certgen.Issued) -> tuple[Path, Path]:
    """Write a server certificate that expired yesterday; return (cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    expired = certgen.issue_server(
        ca,
        ("localhost",),
        days=-1,
        now=now,
        not_before=now - datetime.timedelta(days=10),
    )
    cert, key = directory / "expired.pem", directory / "expired-key.pem"
    certgen.write_pair(expired, cert, key)
    return cert, key
