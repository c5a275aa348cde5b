"""TLS policy, certificate validation and the swappable server context.

Policy (Mozilla server-side TLS v6.0):

* ``intermediate`` (default): TLS 1.2 and 1.3.  For TLS 1.2 only the six ECDHE AEAD
  suites (forward secrecy, no CBC, no static RSA); the three TLS 1.3 suites.
* ``modern``: TLS 1.3 only.
* Both: key-exchange groups X25519MLKEM768, X25519, P-256, P-384; no compression;
  renegotiation refused explicitly (``OP_NO_RENEGOTIATION``, not OpenSSL's default).
  ALPN: with ``--alpn`` the first of the server's protocols that the client offers
  is selected; with no overlap (or no ``--alpn``) the handshake goes on without a
  protocol, so a client offering h2 or http/1.1 always completes.
* With ``--crl``, client certificates are also checked against the revocation
  lists of their CA; a revoked one gets the ``certificate_revoked`` alert.

Validation happens before any context is built: every problem becomes a
:class:`TLSConfigError` whose message names the option, the problem and the fix, so
start-up (and, later, reload) can refuse a bad set as a whole.

:class:`ContextHolder` is what the transport asks for a context at each accept, so a
reload (swapping in a new, validated context) touches new connections only.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from OpenSSL.crypto import X509, X509StoreFlags

from secure_echo.tls.allowlist import AllowList
from secure_echo.tls.sni import Chooser, dns_names, install_sni
from secure_echo.tls.verify import install_verify

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path


#: The private key types a server certificate may have (checked before building).
SUPPORTED_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class TLSProfile(StrEnum):
    """The named TLS policies."""

    INTERMEDIATE = "intermediate"
    MODERN = "modern"


class ClientAuth(StrEnum):
    """Whether clients must present a certificate."""

    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


#: TLS 1.2 suites of the intermediate profile: ECDHE + AEAD only.
TLS12_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)
#: TLS 1.3 suites of both profiles.
TLS13_CIPHERS: Final = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
)
#: Key-exchange groups, most preferred first.
GROUPS: Final = ("X25519MLKEM768", "X25519", "P-256", "P-384")


class TLSConfigError(Exception):
    """A TLS option is unusable; ``str()`` is one line: option, problem, fix."""

    def __init__(self, option: str, problem: str, fix: str) -> None:
        super().__init__(f"{option}: {problem}; {fix}")
        self.option = option
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class TLSSettings:
    """What the operator asked for.

    ``cert``/``key`` are the default certificate; ``extra_certs`` more (cert, key)
    pairs, chosen by the client's SNI (:mod:`secure_echo.tls.sni`).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None
    client_auth: ClientAuth = ClientAuth.NONE
    profile: TLSProfile = TLSProfile.INTERMEDIATE
    allow: AllowList = field(default_factory=AllowList)
    extra_certs: tuple[tuple[Path, Path], ...] = ()
    #: ``--crl``: revocation lists checked for client certificates.
    crls: tuple[Path, ...] = ()
    #: ``--alpn``: protocols the server selects from, most preferred first.
    alpn: tuple[bytes, ...] = ()
    #: ``--test-certs``: a directory of NAME.pem + NAME.key served as they are.
    test_certs: Path | None = None
    #: ``--strict-sni``: refuse a server name that no certificate carries.
    strict_sni: bool = False


@dataclass(frozen=True)
class TestCert:
    """A certificate of ``--test-certs``: served for SNI ``name``, never checked."""

    name: str
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes


@dataclass(frozen=True)
class LoadedTLS:
    """A validated set of TLS material, ready to become a context."""

    settings: TLSSettings
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes
    client_cas: tuple[x509.Certificate, ...] = field(default=())
    #: The ``extra_certs``, each loaded and checked as the default one is.
    extra: tuple[LoadedTLS, ...] = ()
    #: The ``--test-certs``, loaded without checks.
    test: tuple[TestCert, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        """The server certificate (first in the chain file)."""
        return self.chain[0]

    @property
    def subject(self) -> str:
        """The server certificate's subject, RFC 4514."""
        return self.leaf.subject.rfc4514_string()

    @property
    def not_after(self) -> datetime.datetime:
        """When the server certificate expires (UTC)."""
        return self.leaf.not_valid_after_utc


def read_file(path: Path, option: str, what: str) -> bytes:
    """Read a file, turning every OS error into a one-line TLSConfigError."""
    fix = f"point {option} at a readable {what}"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(option, f"{path} does not exist", fix) from None
    except PermissionError:
        raise TLSConfigError(
            option,
            f"cannot read {path}: permission denied (running as uid {os.getuid()})",
            f"{fix}, or make it readable by this user",
        ) from None
    except IsADirectoryError:
        raise TLSConfigError(option, f"{path} is a directory", fix) from None
    except OSError as error:
        raise TLSConfigError(option, f"cannot read {path}: {error.strerror}", fix) from None


def _load_certs(path: Path, option: str) -> tuple[x509.Certificate, ...]:
    data = read_file(path, option, "PEM certificate file")
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        certs = ()
    if not certs:
        raise TLSConfigError(
            option,
            f"{path} holds no PEM certificate",
            f"point {option} at a PEM file starting with -----BEGIN CERTIFICATE-----",
        )
    return certs


def _check_dates(cert: x509.Certificate, path: Path, option: str, now: datetime.datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise TLSConfigError(
            option,
            f"certificate in {path} ({cert.subject.rfc4514_string()}) expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
            "renew it (secure-echo-certs init makes a fresh set for testing)",
        )
    if now < cert.not_valid_before_utc:
        raise TLSConfigError(
            option,
            f"certificate in {path} is not valid until "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}",
            "check this host's clock or the certificate's dates",
        )


#: Names of the extended key usages an operator may meet, for messages.
_EKU_NAMES: Final = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
#: Extended key usages that allow serving TLS.
_SERVING_USAGES: Final = frozenset(
    {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)


def _check_server_purpose(cert: x509.Certificate, path: Path, option: str) -> None:
    """Refuse a CA certificate, or one whose extended key usage excludes TLS servers.

    Clients refuse both at every handshake (a verifier checks the leaf's EKU for
    serverAuth and will not take a CA certificate as the end entity), so starting
    with one would only serve failed handshakes.  No EKU extension means any usage;
    ``anyExtendedKeyUsage`` counts as serverAuth.  Only the leaf is checked: the
    certificates after it in a chain file are CAs by design.
    """
    what = f"certificate in {path} ({cert.subject.rfc4514_string()})"
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension) as error:
        raise TLSConfigError(
            option,
            f"{what} has extensions that cannot be parsed ({error})",
            "reissue it with well-formed extensions",
        ) from None
    try:
        is_ca = extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise TLSConfigError(
            option,
            f"{what} is a CA certificate (basicConstraints CA:TRUE), not a server certificate",
            f"give the server (leaf) certificate that CA issued, first in {option}'s file",
        )
    try:
        usages = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not _SERVING_USAGES.intersection(usages):
        names = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usages) or "empty"
        raise TLSConfigError(
            option,
            f"{what} is not for TLS servers: its extended key usage is {names}, "
            "without serverAuth",
            "use a certificate issued for server authentication (EKU serverAuth; "
            "secure-echo-certs init makes one for testing)",
        )


def load_and_validate(settings: TLSSettings, now: datetime.datetime | None = None) -> LoadedTLS:
    """Read and check every file of ``settings``; raise :class:`TLSConfigError`.

    Checks: each file exists and is readable; the chain file holds certificates, the
    first of which is valid now, is not a CA certificate and may serve TLS (its
    extended key usage, if it has one, includes serverAuth); the key parses and
    matches that certificate; the client CA file (if any) holds certificates.  The
    whole set is checked before anything is built so that a reload can be all or
    nothing.
    """
    when = now or datetime.datetime.now(datetime.UTC)
    chain = _load_certs(settings.cert, "--cert")
    _check_dates(chain[0], settings.cert, "--cert", when)
    _check_server_purpose(chain[0], settings.cert, "--cert")

    key_pem = read_file(settings.key, "--key", "PEM private key file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSConfigError(
            "--key",
            f"{settings.key} is encrypted with a passphrase",
            "give an unencrypted key (e.g. openssl pkey -in KEY -out KEY.plain)",
        ) from None
    except (ValueError, Exception):
        raise TLSConfigError(
            "--key",
            f"{settings.key} holds no usable PEM private key",
            "point --key at the PEM private key of the --cert certificate",
        ) from None
    if not isinstance(key, SUPPORTED_KEYS):
        raise TLSConfigError(
            "--key",
            f"{settings.key} holds a {type(key).__name__}, not an RSA, EC or EdDSA key",
            "use an ECDSA P-256 or RSA key",
        )
    if key.public_key() != chain[0].public_key():
        raise TLSConfigError(
            "--key",
            f"{settings.key} does not match the certificate in {settings.cert} "
            f"({chain[0].subject.rfc4514_string()})",
            "give the key that was issued with that certificate",
        )

    client_cas: tuple[x509.Certificate, ...] = ()
    if settings.client_ca is not None:
        client_cas = _load_certs(settings.client_ca, "--client-ca")
    return LoadedTLS(settings, chain, key_pem, client_cas)


def set_groups(context: SSL.Context, groups: Sequence[str]) -> None:
    """Restrict the key-exchange groups of ``context``.

    pyOpenSSL has no public setter; its binding exposes ``SSL_CTX_set1_curves_list``.
    This is the only use of that private API: if it disappears or refuses the list,
    start-up fails loudly instead of silently offering OpenSSL's wider default set.
    """
    setter = _binding("SSL_CTX_set1_curves_list")
    if setter is None:  # pragma: no cover - depends on the installed pyOpenSSL
        msg = "pyOpenSSL no longer exposes SSL_CTX_set1_curves_list; cannot restrict groups"
        raise RuntimeError(msg)
    if setter(context._context, ":".join(groups).encode("ascii")) != 1:
        msg = f"OpenSSL refused the group list {':'.join(groups)}"
        raise RuntimeError(msg)


def build_context(
    loaded: LoadedTLS,
    chain: Sequence[x509.Certificate] | None = None,
    key_pem: bytes | None = None,
) -> SSL.Context:
    """Build a server context from validated material, following the policy.

    ``chain`` and ``key_pem`` serve another certificate with the same policy (one
    chosen by SNI); by default, ``loaded``'s own.
    """
    settings = loaded.settings
    chain = loaded.chain if chain is None else chain
    key_pem = loaded.key_pem if key_pem is None else key_pem
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    if settings.profile is TLSProfile.MODERN:
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
    else:
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
    # The modern profile keeps the AEAD list too: OpenSSL refuses a TLS 1.2 list that
    # matches nothing ("no cipher match"), and this one stays safe should the floor move.
    context.set_cipher_list(":".join(TLS12_CIPHERS).encode("ascii"))
    context.set_tls13_ciphersuites(":".join(TLS13_CIPHERS).encode("ascii"))
    set_groups(context, GROUPS)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_SINGLE_ECDH_USE)
    context.use_certificate(chain[0])
    for extra in chain[1:]:
        context.add_extra_chain_cert(extra)
    private_key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(private_key, SUPPORTED_KEYS)  # checked by the loader
    context.use_privatekey(private_key)
    context.check_privatekey()
    if settings.alpn:
        context.set_alpn_select_callback(_alpn_chooser(settings.alpn))
    # Session resumption works across the contexts of one process generation.
    context.set_session_id(b"secure-echo")
    # Free OpenSSL's ~34 KiB of record buffers while a connection is idle: most of
    # an idle connection's memory otherwise.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if settings.client_ca is not None and settings.client_auth is not ClientAuth.NONE:
        store = context.get_cert_store()
        assert store is not None  # a fresh context always has a store
        for ca in loaded.client_cas:
            store.add_cert(X509.from_cryptography(ca))
            context.add_client_ca(X509.from_cryptography(ca))
        if loaded.crls:
            for crl in loaded.crls:
                store.add_crl(crl)
            # The client's certificate is checked; its CA's own status is the CA's.
            store.set_flags(X509StoreFlags.CRL_CHECK)
        mode = SSL.VERIFY_PEER
        if settings.client_auth is ClientAuth.REQUIRED:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        install_verify(context, mode, settings.allow)
    return context


def _alpn_chooser(
    ours: tuple[bytes, ...],
) -> Callable[[SSL.Connection, list[bytes]], bytes | SSL._NoOverlappingProtocols]:
    """The ALPN select callback: our first protocol the client offers, else none.

    Answering "no overlapping protocols" lets the handshake go on without ALPN;
    an empty answer would make OpenSSL end it with a fatal alert.
    """

    def choose(
        _connection: SSL.Connection, offered: list[bytes]
    ) -> bytes | SSL._NoOverlappingProtocols:
        for protocol in ours:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return choose


def _binding(name: str) -> Callable[..., Any] | None:
    """A function of pyOpenSSL's private OpenSSL binding, None if it has gone."""
    from OpenSSL._util import lib  # noqa: PLC0415 - private API, confined here

    found: Callable[..., Any] | None = getattr(lib, name, None)
    return found


#: Looked up once: the call runs once per connection, the lookup is not free.
_SSL_SESSION_REUSED: Final = _binding("SSL_session_reused")


def session_reused(connection: SSL.Connection) -> bool | None:
    """Whether the handshake resumed a session (pyOpenSSL has no public call)."""
    if _SSL_SESSION_REUSED is None:  # pragma: no cover - depends on the installed pyOpenSSL
        return None
    return bool(_SSL_SESSION_REUSED(connection._ssl))


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The SANs as ``DNS:name``, ``IP:addr``, ``URI:uri``, ``email:addr`` strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [f"DNS:{name}" for name in san.get_values_for_type(x509.DNSName)]
    names += [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
    names += [f"URI:{uri}" for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]
    names += [f"email:{mail}" for mail in san.get_values_for_type(x509.RFC822Name)]
    return names


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate (the usual pinning fingerprint)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class ContextHolder:
    """The server context in use for new connections, and what it was built from.

    With more than one certificate (``--cert`` again, ``--test-certs``) or with
    ``--strict-sni``, :attr:`context` chooses among contexts by the client's
    server name (:mod:`secure_echo.tls.sni`); each is built with the same policy.
    """

    def __init__(self, loaded: LoadedTLS) -> None:
        self.loaded = loaded
        self.context = build_contexts(loaded)
        #: Whether a context of this holder ever selected ALPN protocols: without
        #: ``--alpn`` none is negotiated, and a connection need not ask.
        self.alpn = bool(loaded.settings.alpn)

    def replace(self, loaded: LoadedTLS) -> None:
        """Build the contexts of ``loaded`` and use them for connections from now on.

        Building happens first; if it raises, the current contexts stay.
        """
        context = build_contexts(loaded)
        self.loaded = loaded
        self.context = context
        # Connections of the contexts before may still negotiate with their list.
        self.alpn = self.alpn or bool(loaded.settings.alpn)


def build_contexts(loaded: LoadedTLS) -> SSL.Context:
    """The default context of ``loaded``, choosing the others by SNI where there are some."""
    default = build_context(loaded)
    settings = loaded.settings
    if not (loaded.extra or loaded.test or settings.strict_sni):
        return default
    served = [(dns_names(loaded.leaf), default)]
    served += [(dns_names(extra.leaf), build_context(extra)) for extra in loaded.extra]
    test = [(cert.name, build_context(loaded, cert.chain, cert.key_pem)) for cert in loaded.test]
    install_sni(default, Chooser(served, test, strict=settings.strict_sni))
    return default
