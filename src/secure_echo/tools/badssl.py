"""Certificates that a verifying TLS client must refuse, and one it must accept.

``secure-echo-certs badssl DIR`` writes these for a server to present by SNI (the daemon's
``--test-certs DIR``), in the manner of badssl.com but local and for any TLS client.
Each case is served for the SNI name ``CASE.localhost`` from ``CASE.localhost.pem`` and
``CASE.localhost.key``; ``ca.pem`` is the CA the client under test is told to trust.

Contract of every case (checked in ``tests/test_badssl.py`` with Python's ``ssl`` as the
verifying client, which uses OpenSSL's verifier):

* Exactly one thing is wrong with each bad certificate, so a client that reports
  another reason has a bug worth reading about.  Apart from that one thing each is an
  ordinary server certificate: ECDSA P-256, serverAuth, its SAN ``CASE.localhost``.
* ``valid`` has nothing wrong: a client that trusts ``ca.pem`` and asks for
  ``valid.localhost`` accepts it.  It is the control that proves the set-up works.
* :attr:`Case.verify_code` and :attr:`Case.verdict` are what OpenSSL reports
  (``X509_V_ERR_*`` and its text, as in ``openssl s_client -verify_return_error``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.x509.oid import ExtendedKeyUsageOID

from secure_echo.tools import certgen

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The DNS suffix every case is served under: ``expired.localhost``.
SUFFIX = "localhost"
#: Lifetime of the badssl CA.
CA_DAYS = 365
#: Lifetime of the certificates that are meant to be current.
LEAF_DAYS = 30
#: How long ago ``expired`` expired, and how far ahead ``not-yet-valid`` begins.
OUT_OF_RANGE = datetime.timedelta(days=30)
#: The name in the ``wrong-host`` certificate: not the one it is served for.
WRONG_HOST_NAME = f"other-host.{SUFFIX}"
#: Common names of the two CAs (each made distinct by the date and a random tag).
CA_NAME = "secure-echo badssl CA"
UNTRUSTED_CA_NAME = "secure-echo untrusted root (not in ca.pem)"


@dataclass(frozen=True)
class Case:
    """One test certificate: its name, what is wrong with it, what a client must say."""

    name: str
    problem: str
    verify_code: int | None
    verdict: str

    @property
    def server_name(self) -> str:
        """The SNI name the case is served for, also its file stem."""
        return f"{self.name}.{SUFFIX}"

    @property
    def expectation(self) -> str:
        """What a verifying client that trusts ``ca.pem`` must do, in one phrase."""
        if self.verify_code is None:
            return "accept it"
        return f"refuse it: {self.verdict} (OpenSSL verify error {self.verify_code})"


#: The standard set, in the order they are listed.
CASES: tuple[Case, ...] = (
    Case("valid", "nothing wrong: the control", None, "ok"),
    Case("expired", "its validity ended 30 days ago", 10, "certificate has expired"),
    Case("not-yet-valid", "its validity starts in 30 days", 9, "certificate is not yet valid"),
    Case(
        "wrong-host",
        f"issued by the CA for {WRONG_HOST_NAME}, not for the name served",
        62,
        "hostname mismatch",
    ),
    Case("self-signed", "signed by its own key, no CA", 18, "self-signed certificate"),
    Case(
        "untrusted-root",
        "issued by another CA, which ca.pem does not hold",
        20,
        "unable to get local issuer certificate",
    ),
    Case(
        "no-server-auth",
        "its extended key usage is clientAuth only",
        26,
        "unsuitable certificate purpose",
    ),
)


@dataclass(frozen=True)
class BadsslSet:
    """The CA to trust and one certificate per case name."""

    ca: certgen.Issued
    certificates: Mapping[str, certgen.Issued]


def make_set(*, now: datetime.datetime | None = None) -> BadsslSet:
    """Make a fresh CA and every case of :data:`CASES`, judged at ``now``."""
    moment = now if now is not None else datetime.datetime.now(datetime.UTC)
    ca = certgen.make_ca(certgen.distinct_ca_name(CA_NAME, now=moment), days=CA_DAYS, now=moment)
    untrusted = certgen.make_ca(
        certgen.distinct_ca_name(UNTRUSTED_CA_NAME, now=moment), days=CA_DAYS, now=moment
    )

    def name(case: str) -> list[str]:
        return [f"{case}.{SUFFIX}"]

    certificates = {
        "valid": certgen.issue_server(ca, name("valid"), days=LEAF_DAYS, now=moment),
        "expired": certgen.issue_server(
            ca,
            name("expired"),
            now=moment - OUT_OF_RANGE,
            days=0,
            not_before=moment - 2 * OUT_OF_RANGE,
        ),
        "not-yet-valid": certgen.issue_server(
            ca,
            name("not-yet-valid"),
            now=moment + OUT_OF_RANGE,
            days=LEAF_DAYS,
            not_before=moment + OUT_OF_RANGE,
        ),
        "wrong-host": certgen.issue_server(ca, [WRONG_HOST_NAME], days=LEAF_DAYS, now=moment),
        "self-signed": certgen.make_self_signed_server(
            name("self-signed"), days=LEAF_DAYS, now=moment
        ),
        "untrusted-root": certgen.issue_server(
            untrusted, name("untrusted-root"), days=LEAF_DAYS, now=moment
        ),
        "no-server-auth": certgen.issue_client(
            ca,
            f"no-server-auth.{SUFFIX}",
            dns=name("no-server-auth"),
            days=LEAF_DAYS,
            now=moment,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
    }
    return BadsslSet(ca=ca, certificates=certificates)


def index_text(made: datetime.datetime, directory: str) -> str:
    """The ``README.txt`` written next to the certificates: each case and its verdict."""
    width = max(len(case.server_name) for case in CASES) + 2
    lines = [
        f"Test certificates made by secure-echo-certs badssl on {made:%Y-%m-%d %H:%M} UTC.",
        "For testing TLS clients only.  Trust ca.pem in the client under test, never in a",
        "system trust store.  Serve each CASE.localhost.pem + CASE.localhost.key for the SNI",
        "name CASE.localhost, e.g. with",
        f"  twistd -n --pidfile= secure-echo --test-certs {directory}",
        "and connect asking for that name (see docs/testing-clients.md).",
        "",
        f"{'SNI name':<{width}}what is wrong / what a verifying client trusting ca.pem must do",
    ]
    for case in CASES:
        lines.append(f"{case.server_name:<{width}}{case.problem}")
        lines.append(f"{'':<{width}}-> {case.expectation}")
    return "\n".join(lines) + "\n"
