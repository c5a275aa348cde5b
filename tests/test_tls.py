"""Tests for :mod:`secure_echo.tls.policy`: validation of the files and the policy on the wire.

The policy is checked by real handshakes in memory: the server is a pyOpenSSL
``Connection`` built from :func:`build_context`, the client is usually the stdlib
``ssl.SSLObject`` (an independent view of what the server offers), sometimes a
pyOpenSSL client where the stdlib cannot express the offer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import ssl
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from unittest import SkipTest

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from secure_echo.tls.policy import (
    GROUPS,
    TLS12_CIPHERS,
    TLS13_CIPHERS,
    ClientAuth,
    ContextHolder,
    LoadedTLS,
    TLSConfigError,
    TLSProfile,
    TLSSettings,
    build_context,
    fingerprint_sha256,
    load_and_validate,
    set_groups,
)
from secure_echo.tls.verify import describe, verify_error_text
from secure_echo.tools import certgen
from tests.helpers import NO_EKU, make_pki, write_expired_server, write_server_with

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from OpenSSL.crypto import X509

    from tests.helpers import PKI


class HandshakeFailedError(Exception):
    """One side of an in-memory handshake failed; ``str()`` is the reason."""


class _Peer:
    """One end of an in-memory TLS handshake."""

    def step(self) -> bool:
        """Advance the handshake; return whether it is complete."""
        raise NotImplementedError

    def take(self) -> bytes:
        """Return the bytes this end wants to send (possibly none)."""
        raise NotImplementedError

    def give(self, data: bytes) -> None:
        """Deliver bytes from the other end."""
        raise NotImplementedError


class _StdlibClient(_Peer):
    """A stdlib ``ssl.SSLObject`` over a pair of ``MemoryBIO``."""

    def __init__(self, context: ssl.SSLContext, hostname: str = "localhost") -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)

    def step(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as error:
            raise HandshakeFailedError(str(error)) from error
        return True

    def take(self) -> bytes:
        return self.outgoing.read()

    def give(self, data: bytes) -> None:
        self.incoming.write(data)


class _OpenSSLPeer(_Peer):
    """A pyOpenSSL ``Connection`` over its own memory BIOs."""

    def __init__(self, connection: SSL.Connection) -> None:
        self.tls = connection

    def step(self) -> bool:
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as error:
            raise HandshakeFailedError(str(error)) from error
        return True

    def take(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self.tls.bio_read(65536))
            except SSL.WantReadError:
                return b"".join(chunks)

    def give(self, data: bytes) -> None:
        self.tls.bio_write(data)


@dataclass
class Outcome:
    """How an in-memory handshake ended on each side."""

    server: SSL.Connection
    server_done: bool = False
    client_done: bool = False
    server_error: str | None = None
    client_error: str | None = None

    @property
    def completed(self) -> bool:
        """Both sides finished the handshake without an error."""
        return (
            self.server_done
            and self.client_done
            and self.server_error is None
            and self.client_error is None
        )


def pump(server: SSL.Connection, client: _Peer, rounds: int = 30) -> Outcome:
    """Run the handshake, moving bytes both ways until neither side has any to send.

    A side that fails stops stepping, but its alert is still delivered, so the other
    side sees the failure too when it has a chance to (TLS 1.3 clients finish before
    the server has checked their certificate, so they may not).
    """
    outcome = Outcome(server)
    server_peer = _OpenSSLPeer(server)
    for _ in range(rounds):
        if not outcome.client_done and outcome.client_error is None:
            try:
                outcome.client_done = client.step()
            except HandshakeFailedError as error:
                outcome.client_error = str(error)
        if not outcome.server_done and outcome.server_error is None:
            try:
                outcome.server_done = server_peer.step()
            except HandshakeFailedError as error:
                outcome.server_error = str(error)
        to_server = client.take()
        to_client = server_peer.take()
        if to_server:
            server_peer.give(to_server)
        if to_client:
            client.give(to_client)
        if not to_server and not to_client:
            return outcome
    msg = f"handshake still moving bytes after {rounds} rounds"
    raise AssertionError(msg)


def server_connection(context: SSL.Context, app_data: object = None) -> SSL.Connection:
    """A server-side connection over memory BIOs, optionally with app data set."""
    connection = SSL.Connection(context, None)
    connection.set_accept_state()
    if app_data is not None:
        connection.set_app_data(app_data)
    return connection


def stdlib_client(
    pki: PKI, configure: Callable[[ssl.SSLContext], None] | None = None
) -> _StdlibClient:
    """A verifying stdlib client that trusts the test CA, adjusted by ``configure``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca_cert))
    if configure is not None:
        configure(context)
    return _StdlibClient(context)


def openssl_client(pki: PKI, groups: tuple[str, ...]) -> _OpenSSLPeer:
    """A verifying pyOpenSSL client that offers only ``groups``."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.load_verify_locations(str(pki.ca_cert))
    context.set_verify(SSL.VERIFY_PEER)
    set_groups(context, groups)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"localhost")
    return _OpenSSLPeer(connection)


def only_group(group: str) -> Callable[[ssl.SSLContext], None]:
    """Configure a stdlib client to offer ``group`` alone."""

    def configure(context: ssl.SSLContext) -> None:
        context.set_ecdh_curve(group)

    return configure


@dataclass
class VerifyNotes:
    """App data for a server connection: collects what the verify callback reports."""

    notes: list[str] = field(default_factory=list)
    presented: list[tuple[str, str, str]] = field(default_factory=list)
    codes: list[int | None] = field(default_factory=list)

    def note_presented(self, cert: X509) -> None:
        """Record the presented certificate."""
        self.presented.append(describe(cert))

    def note_verify_error(self, reason: str, code: int | None = None) -> None:
        """Record one verification error."""
        self.notes.append(reason)
        self.codes.append(code)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class LoadAndValidateTests(SynchronousTestCase):
    """Every file problem is a one-line TLSConfigError naming the option."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.dir = self.pki.directory

    def settings(self, **changes: object) -> TLSSettings:
        values: dict[str, object] = {"cert": self.pki.server_cert, "key": self.pki.server_key}
        values.update(changes)
        return TLSSettings(**values)  # type: ignore[arg-type]

    def assert_refused(self, settings: TLSSettings, option: str, *words: str) -> TLSConfigError:
        error: TLSConfigError = self.assertRaises(TLSConfigError, load_and_validate, settings)
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith(f"{option}: "), text)
        self.assertEqual(error.option, option)
        for word in words:
            self.assertIn(word, text)
        return error

    def test_success(self) -> None:
        """A valid set loads: the chain, the leaf's subject and expiry, the key PEM."""
        loaded = load_and_validate(self.settings())
        self.assertEqual(len(loaded.chain), 1)
        self.assertEqual(loaded.leaf, loaded.chain[0])
        self.assertEqual(loaded.subject, "CN=localhost")
        self.assertEqual(loaded.not_after, loaded.leaf.not_valid_after_utc)
        self.assertGreater(loaded.not_after, dt.datetime.now(dt.UTC))
        self.assertEqual(loaded.key_pem, self.pki.server_key.read_bytes())
        self.assertEqual(loaded.client_cas, ())

    def test_chain_and_client_cas(self) -> None:
        """A chain file keeps every certificate in order; client CAs are loaded."""
        chain = _write(
            self.dir / "chain.pem",
            self.pki.server_cert.read_bytes() + self.pki.ca_cert.read_bytes(),
        )
        loaded = load_and_validate(
            self.settings(cert=chain, client_ca=self.pki.ca_cert, client_auth=ClientAuth.REQUIRED)
        )
        self.assertEqual(len(loaded.chain), 2)
        self.assertEqual(loaded.chain[1], self.pki.ca.certificate)
        self.assertEqual(loaded.client_cas, (self.pki.ca.certificate,))

    def test_missing_cert(self) -> None:
        """A missing certificate file names --cert and says it does not exist."""
        self.assert_refused(self.settings(cert=self.dir / "nope.pem"), "--cert", "does not exist")

    def test_cert_is_directory(self) -> None:
        """A directory given as the certificate names --cert and says so."""
        self.assert_refused(self.settings(cert=self.dir), "--cert", "is a directory")

    def test_unreadable_cert(self) -> None:
        """An unreadable certificate file names --cert and says permission denied."""
        if os.geteuid() == 0:
            raise SkipTest("root can read files whatever their mode")
        self.pki.server_cert.chmod(0o000)
        self.addCleanup(self.pki.server_cert.chmod, 0o644)
        self.assert_refused(self.settings(), "--cert", "permission denied")

    def test_cert_not_pem(self) -> None:
        """A certificate file without a PEM certificate names --cert and the fix."""
        bad = _write(self.dir / "bad.pem", b"this is not a certificate\n")
        self.assert_refused(self.settings(cert=bad), "--cert", "no PEM certificate", "BEGIN")

    def test_key_file_as_cert(self) -> None:
        """A private key given as the certificate is refused as holding no certificate."""
        self.assert_refused(self.settings(cert=self.pki.server_key), "--cert", "no PEM")

    def test_missing_key(self) -> None:
        """A missing key file names --key."""
        self.assert_refused(self.settings(key=self.dir / "nope-key.pem"), "--key", "not exist")

    def test_garbage_key(self) -> None:
        """A key file without a private key names --key."""
        # A PEM header with garbage after it (spelled in two parts: no key here).
        bad = _write(self.dir / "bad-key.pem", b"-----BEGIN PRIVATE" + b" KEY-----\nxx\n")
        self.assert_refused(self.settings(key=bad), "--key", "no usable PEM private key")

    def test_encrypted_key(self) -> None:
        """A passphrase-protected key names --key and says it is encrypted."""
        plain = serialization.load_pem_private_key(self.pki.server_key.read_bytes(), None)
        encrypted = _write(
            self.dir / "encrypted-key.pem",
            plain.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        self.assert_refused(self.settings(key=encrypted), "--key", "encrypted")

    def test_unsupported_key_type(self) -> None:
        """A key that cannot sign (X25519) names --key and the key type."""
        key = _write(
            self.dir / "x25519-key.pem",
            x25519.X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self.assert_refused(self.settings(key=key), "--key", "X25519PrivateKey")

    def test_key_does_not_match(self) -> None:
        """Another certificate's key names --key and says it does not match."""
        self.assert_refused(
            self.settings(key=self.pki.client_key), "--key", "does not match", "CN=localhost"
        )

    def test_expired_cert(self) -> None:
        """An expired certificate names --cert, says expired and how to renew."""
        cert, key = write_expired_server(self.dir, self.pki.ca)
        self.assert_refused(self.settings(cert=cert, key=key), "--cert", "expired", "renew")

    def test_not_yet_valid_cert(self) -> None:
        """A certificate whose validity starts tomorrow names --cert and the clock."""
        now = dt.datetime.now(dt.UTC)
        future = certgen.issue_server(
            self.pki.ca, ("localhost",), days=5, now=now, not_before=now + dt.timedelta(days=1)
        )
        cert, key = self.dir / "future.pem", self.dir / "future-key.pem"
        certgen.write_pair(future, cert, key)
        self.assert_refused(
            self.settings(cert=cert, key=key), "--cert", "not valid until", "clock"
        )

    def test_client_only_certificate_refused(self) -> None:
        """A certificate whose EKU lacks serverAuth names --cert, the usages and the fix."""
        client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
        cert, key = write_server_with(self.dir, self.pki.ca, "client-only", usages=client)
        error = self.assert_refused(
            self.settings(cert=cert, key=key), "--cert", str(cert), "clientAuth", "serverAuth"
        )
        self.assertIn("CN=localhost", error.problem)
        self.assertIn("server", error.fix)

    def test_eku_with_server_auth_accepted(self) -> None:
        """An EKU listing serverAuth among other usages is enough."""
        usages = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
        cert, key = write_server_with(self.dir, self.pki.ca, "both", usages=usages)
        self.assertEqual(
            load_and_validate(self.settings(cert=cert, key=key)).subject, "CN=localhost"
        )

    def test_any_extended_key_usage_accepted(self) -> None:
        """An EKU of anyExtendedKeyUsage allows serving TLS."""
        usages = (ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,)
        cert, key = write_server_with(self.dir, self.pki.ca, "any", usages=usages)
        load_and_validate(self.settings(cert=cert, key=key))

    def test_no_eku_extension_accepted(self) -> None:
        """A certificate without an EKU extension may be used for any purpose."""
        cert, key = write_server_with(self.dir, self.pki.ca, "no-eku", usages=NO_EKU)
        load_and_validate(self.settings(cert=cert, key=key))

    def test_no_basic_constraints_accepted(self) -> None:
        """A leaf without basicConstraints is not a CA and is accepted."""
        cert, key = write_server_with(self.dir, self.pki.ca, "no-bc", ca_flag=None)
        load_and_validate(self.settings(cert=cert, key=key))

    def test_ca_certificate_refused(self) -> None:
        """A CA certificate (basicConstraints CA:TRUE) as --cert is refused, naming it."""
        ca = certgen.make_ca("test CA", days=2)
        cert, key = self.dir / "ca-as-server.pem", self.dir / "ca-as-server-key.pem"
        certgen.write_pair(ca, cert, key)
        error = self.assert_refused(
            self.settings(cert=cert, key=key), "--cert", "CA certificate", str(cert)
        )
        self.assertIn("leaf", error.fix)

    def test_ca_flag_refused_even_with_server_auth(self) -> None:
        """CA:TRUE is refused even when the EKU says serverAuth."""
        usages = (ExtendedKeyUsageOID.SERVER_AUTH,)
        cert, key = write_server_with(self.dir, self.pki.ca, "ca-eku", usages=usages, ca_flag=True)
        self.assert_refused(self.settings(cert=cert, key=key), "--cert", "CA certificate")

    def test_unparsable_extensions_refused(self) -> None:
        """A certificate whose extensions cannot be parsed (one given twice) names --cert."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
        first, second = x509.ObjectIdentifier("1.2.3.4"), x509.ObjectIdentifier("1.2.3.5")
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(first, b"\x05\x00"), critical=False)
            .add_extension(x509.UnrecognizedExtension(second, b"\x05\x00"), critical=False)
        )
        der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        # Rename the second extension to the first: the same extension twice.
        der = der.replace(bytes.fromhex("06032a0305"), bytes.fromhex("06032a0304"))
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        cert = _write(self.dir / "twice.pem", pem)
        self.assert_refused(self.settings(cert=cert), "--cert", "cannot be parsed")

    def test_chain_checks_only_the_leaf(self) -> None:
        """The CA certificates after the leaf in a chain file are not refused as CAs."""
        chain = _write(
            self.dir / "chain2.pem",
            self.pki.server_cert.read_bytes() + self.pki.ca_cert.read_bytes(),
        )
        self.assertEqual(len(load_and_validate(self.settings(cert=chain)).chain), 2)

    def test_now_is_injected(self) -> None:
        """Validity is judged at ``now``: a valid certificate is refused a year later."""
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
        error = self.assertRaises(TLSConfigError, load_and_validate, self.settings(), now=later)
        self.assertEqual(error.option, "--cert")
        self.assertIn("expired", str(error))

    def test_bad_client_ca(self) -> None:
        """A client CA file without certificates names --client-ca."""
        bad = _write(self.dir / "bad-ca.pem", b"nothing here\n")
        self.assert_refused(
            self.settings(client_ca=bad, client_auth=ClientAuth.REQUIRED),
            "--client-ca",
            "no PEM certificate",
        )

    def test_missing_client_ca(self) -> None:
        """A missing client CA file names --client-ca."""
        self.assert_refused(
            self.settings(client_ca=self.dir / "nope-ca.pem", client_auth=ClientAuth.REQUIRED),
            "--client-ca",
            "does not exist",
        )

    def test_problem_and_fix_attributes(self) -> None:
        """The error keeps option, problem and fix apart; str() joins them on one line."""
        error = TLSConfigError("--cert", "it broke", "fix it")
        self.assertEqual(str(error), "--cert: it broke; fix it")
        self.assertEqual(
            (error.option, error.problem, error.fix), ("--cert", "it broke", "fix it")
        )


class PolicyTests(SynchronousTestCase):
    """The context's policy, seen by real clients over memory BIOs."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())

    def context(
        self,
        profile: TLSProfile = TLSProfile.INTERMEDIATE,
        client_auth: ClientAuth = ClientAuth.NONE,
    ) -> SSL.Context:
        client_ca = self.pki.ca_cert if client_auth is not ClientAuth.NONE else None
        settings = TLSSettings(
            self.pki.server_cert, self.pki.server_key, client_ca, client_auth, profile
        )
        return build_context(load_and_validate(settings))

    def handshake(
        self,
        configure: Callable[[ssl.SSLContext], None] | None = None,
        *,
        context: SSL.Context | None = None,
        app_data: object = None,
    ) -> tuple[Outcome, _StdlibClient]:
        client = stdlib_client(self.pki, configure)
        server = server_connection(context or self.context(), app_data)
        return pump(server, client), client

    def test_tls13_default(self) -> None:
        """A default client gets TLS 1.3 with one of the three standard suites."""
        outcome, client = self.handshake()
        self.assertTrue(outcome.completed, outcome)
        self.assertEqual(outcome.server.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(client.tls.version(), "TLSv1.3")
        self.assertIn(outcome.server.get_cipher_name(), TLS13_CIPHERS)

    def test_tls12_aead(self) -> None:
        """A TLS 1.2 client offering only ECDHE-ECDSA-AES128-GCM-SHA256 gets it."""

        def configure(context: ssl.SSLContext) -> None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")

        outcome, client = self.handshake(configure)
        self.assertTrue(outcome.completed, outcome)
        self.assertEqual(outcome.server.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(outcome.server.get_cipher_name(), "ECDHE-ECDSA-AES128-GCM-SHA256")
        cipher = client.tls.cipher()
        assert cipher is not None
        self.assertEqual(cipher[0], "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_tls12_every_policy_suite_for_ecdsa(self) -> None:
        """Each ECDSA suite of the TLS 1.2 list is accepted on its own."""
        for suite in (s for s in TLS12_CIPHERS if "ECDSA" in s):

            def configure(context: ssl.SSLContext, suite: str = suite) -> None:
                context.maximum_version = ssl.TLSVersion.TLSv1_2
                context.set_ciphers(suite)

            outcome, _ = self.handshake(configure)
            self.assertTrue(outcome.completed, (suite, outcome))
            self.assertEqual(outcome.server.get_cipher_name(), suite)

    def test_tls12_cbc_refused(self) -> None:
        """A TLS 1.2 client offering only CBC suites is refused: no shared cipher."""

        def configure(context: ssl.SSLContext) -> None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")

        outcome, _ = self.handshake(configure)
        self.assertFalse(outcome.completed)
        self.assertIn("no shared cipher", str(outcome.server_error))
        self.assertIsNotNone(outcome.client_error)

    def test_tls11_refused(self) -> None:
        """A TLS 1.1 client (which really sends its hello) is refused by the server."""

        def configure(context: ssl.SSLContext) -> None:
            # Let the stdlib client offer TLS 1.1 at all, so the server is what refuses.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            outcome, _ = self.handshake(configure)
        self.assertFalse(outcome.completed)
        self.assertIn("unsupported protocol", str(outcome.server_error))
        self.assertIn("PROTOCOL_VERSION", str(outcome.client_error))

    def test_modern_refuses_tls12(self) -> None:
        """The modern profile refuses a TLS 1.2 client."""

        def configure(context: ssl.SSLContext) -> None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2

        outcome, _ = self.handshake(configure, context=self.context(TLSProfile.MODERN))
        self.assertFalse(outcome.completed)
        self.assertIn("unsupported protocol", str(outcome.server_error))

    def test_modern_accepts_tls13(self) -> None:
        """The modern profile builds and serves TLS 1.3."""
        outcome, _ = self.handshake(context=self.context(TLSProfile.MODERN))
        self.assertTrue(outcome.completed, outcome)
        self.assertEqual(outcome.server.get_protocol_version_name(), "TLSv1.3")

    def test_alpn_offered_none_selected(self) -> None:
        """A client offering ALPN h2 and http/1.1 completes with no protocol selected."""

        def configure(context: ssl.SSLContext) -> None:
            context.set_alpn_protocols(["h2", "http/1.1"])

        outcome, client = self.handshake(configure)
        self.assertTrue(outcome.completed, outcome)
        self.assertIsNone(client.tls.selected_alpn_protocol())
        self.assertEqual(outcome.server.get_alpn_proto_negotiated(), b"")

    def test_groups_outside_policy_refused(self) -> None:
        """A TLS 1.3 client offering only X448, ffdhe2048 or P-521 is refused."""
        for group in ("X448", "ffdhe2048", "secp521r1"):
            outcome, _ = self.handshake(only_group(group))
            self.assertFalse(outcome.completed, group)
            self.assertIn("no suitable key share", str(outcome.server_error), group)

    def test_groups_in_policy_accepted(self) -> None:
        """A TLS 1.3 client offering only X25519, P-256 or P-384 gets that group."""
        for group, reported in (
            ("X25519", "x25519"),
            ("prime256v1", "secp256r1"),
            ("secp384r1", "secp384r1"),
        ):
            outcome, _ = self.handshake(only_group(group))
            self.assertTrue(outcome.completed, (group, outcome))
            self.assertEqual(outcome.server.get_group_name(), reported)

    def test_hybrid_group_preferred(self) -> None:
        """A client offering X25519MLKEM768 first gets the hybrid post-quantum group."""
        client = openssl_client(self.pki, ("X25519MLKEM768", "X25519"))
        outcome = pump(server_connection(self.context()), client)
        self.assertTrue(outcome.completed, outcome)
        self.assertEqual(outcome.server.get_group_name(), "X25519MLKEM768")

    def test_openssl_client_x448_refused(self) -> None:
        """A pyOpenSSL client whose group list is only X448 or ffdhe is refused too."""
        for groups in (("X448",), ("ffdhe2048", "ffdhe3072")):
            outcome = pump(server_connection(self.context()), openssl_client(self.pki, groups))
            self.assertFalse(outcome.completed, groups)
            self.assertIn("no suitable key share", str(outcome.server_error), groups)

    def test_set_groups_refuses_unknown(self) -> None:
        """set_groups fails loudly when OpenSSL refuses the list."""
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.assertRaises(RuntimeError, set_groups, context, ("no-such-group",))

    def test_policy_groups(self) -> None:
        """The policy's groups are the Mozilla ones plus the hybrid, most preferred first."""
        self.assertEqual(GROUPS, ("X25519MLKEM768", "X25519", "P-256", "P-384"))

    def test_compression_and_renegotiation_options(self) -> None:
        """The context has compression off and renegotiation refused explicitly."""
        options = self.context().set_options(0)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)

    def test_renegotiation_refused(self) -> None:
        """A TLS 1.2 client asking to renegotiate gets a no_renegotiation alert."""
        client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        client_context.set_max_proto_version(SSL.TLS1_2_VERSION)
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        outcome = pump(server_connection(self.context()), _OpenSSLPeer(client))
        self.assertTrue(outcome.completed, outcome)
        self.assertTrue(client.renegotiate())
        server = outcome.server
        error: SSL.Error | None = None
        for _ in range(5):
            try:
                client.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as caught:
                error = caught
                break
            server.bio_write(client.bio_read(65536))
            self.assertRaises(SSL.WantReadError, server.recv, 1)
            try:
                client.bio_write(server.bio_read(65536))
            except SSL.WantReadError:
                continue
        self.assertIn("no renegotiation", str(error))
        self.assertEqual(server.total_renegotiations(), 0)

    def test_client_auth_required_without_cert(self) -> None:
        """With client auth required, a client without a certificate is refused."""
        outcome, _ = self.handshake(context=self.context(client_auth=ClientAuth.REQUIRED))
        self.assertFalse(outcome.server_done)
        self.assertIn("peer did not return a certificate", str(outcome.server_error))

    def test_client_auth_required_with_cert(self) -> None:
        """With client auth required, a client with a certificate from the CA completes."""
        notes = VerifyNotes()

        def configure(context: ssl.SSLContext) -> None:
            context.load_cert_chain(self.pki.client_cert, self.pki.client_key)

        outcome, _ = self.handshake(
            configure, context=self.context(client_auth=ClientAuth.REQUIRED), app_data=notes
        )
        self.assertTrue(outcome.completed, outcome)
        peer = outcome.server.get_peer_certificate()
        assert peer is not None
        self.assertEqual(peer.to_cryptography().subject.rfc4514_string(), "CN=test client")
        self.assertEqual(notes.notes, [])

    def test_client_auth_unknown_issuer_noted(self) -> None:
        """A client certificate from another CA is refused and the reason noted."""
        notes = VerifyNotes()

        def configure(context: ssl.SSLContext) -> None:
            context.load_cert_chain(self.pki.other_client_cert, self.pki.other_client_key)

        outcome, _ = self.handshake(
            configure, context=self.context(client_auth=ClientAuth.REQUIRED), app_data=notes
        )
        self.assertFalse(outcome.server_done)
        self.assertIn("certificate verify failed", str(outcome.server_error))
        self.assertEqual(notes.notes, ["unable to get local issuer certificate (depth 0)"])
        self.assertEqual(notes.codes, [20])  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        (presented,) = notes.presented
        leaf = x509.load_pem_x509_certificate(self.pki.other_client_cert.read_bytes())
        self.assertEqual(
            presented,
            (
                leaf.subject.rfc4514_string(),
                leaf.issuer.rfc4514_string(),
                fingerprint_sha256(leaf),
            ),
        )

    def test_client_auth_refusal_without_app_data(self) -> None:
        """Without app data to note on, a refused client certificate still just fails."""

        def configure(context: ssl.SSLContext) -> None:
            context.load_cert_chain(self.pki.other_client_cert, self.pki.other_client_key)

        outcome, _ = self.handshake(
            configure, context=self.context(client_auth=ClientAuth.REQUIRED)
        )
        self.assertIn("certificate verify failed", str(outcome.server_error))

    def test_client_auth_optional(self) -> None:
        """With client auth optional, a client without a certificate completes."""
        outcome, _ = self.handshake(context=self.context(client_auth=ClientAuth.OPTIONAL))
        self.assertTrue(outcome.completed, outcome)
        self.assertIsNone(outcome.server.get_peer_certificate())

    def test_no_client_auth_asks_for_nothing(self) -> None:
        """Without client auth a client with a certificate is not asked for it."""

        def configure(context: ssl.SSLContext) -> None:
            context.load_cert_chain(self.pki.client_cert, self.pki.client_key)

        outcome, _ = self.handshake(configure)
        self.assertTrue(outcome.completed, outcome)
        self.assertIsNone(outcome.server.get_peer_certificate())


class ContextHolderTests(SynchronousTestCase):
    """The swappable context."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.loaded = load_and_validate(TLSSettings(self.pki.server_cert, self.pki.server_key))

    def test_replace(self) -> None:
        """A good replacement becomes the current context and material."""
        holder = ContextHolder(self.loaded)
        first = holder.context
        other = make_pki(self.mktemp())
        loaded = load_and_validate(TLSSettings(other.server_cert, other.server_key))
        holder.replace(loaded)
        self.assertIs(holder.loaded, loaded)
        self.assertIsNot(holder.context, first)

    def test_replace_keeps_old_on_failure(self) -> None:
        """If the new context cannot be built, the old context and material stay."""
        holder = ContextHolder(self.loaded)
        context, loaded = holder.context, holder.loaded
        broken = LoadedTLS(self.loaded.settings, self.loaded.chain, b"not a key")
        self.assertRaises(ValueError, holder.replace, broken)
        self.assertIs(holder.context, context)
        self.assertIs(holder.loaded, loaded)

    def test_replace_keeps_old_on_openssl_refusal(self) -> None:
        """A key that OpenSSL finds does not match the certificate leaves the old context."""
        holder = ContextHolder(self.loaded)
        context = holder.context
        mismatched = LoadedTLS(
            self.loaded.settings, self.loaded.chain, self.pki.client_key.read_bytes()
        )
        self.assertRaises(SSL.Error, holder.replace, mismatched)
        self.assertIs(holder.context, context)


class HelperTests(SynchronousTestCase):
    """verify_error_text and fingerprint_sha256."""

    def test_verify_error_text(self) -> None:
        """Code 10 is OpenSSL's 'certificate has expired'."""
        self.assertIn("expired", verify_error_text(10))

    def test_verify_error_text_unknown_code(self) -> None:
        """An unknown code still gives a one-line text."""
        text = verify_error_text(99999)
        self.assertTrue(text)
        self.assertNotIn("\n", text)

    def test_fingerprint(self) -> None:
        """The fingerprint is 64 lowercase hex digits: SHA-256 of the DER certificate."""
        pki = make_pki(self.mktemp())
        cert = pki.ca.certificate
        fingerprint = fingerprint_sha256(cert)
        self.assertEqual(len(fingerprint), 64)
        self.assertEqual(fingerprint.strip("0123456789abcdef"), "")
        der = cert.public_bytes(serialization.Encoding.DER)
        self.assertEqual(fingerprint, hashlib.sha256(der).hexdigest())
