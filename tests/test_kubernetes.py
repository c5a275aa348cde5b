"""Tests for ``contrib/kubernetes/``: valid manifests, and what they ask of the daemon holds.

Three kinds of check:

* Schema: the core objects (Deployment, Service, PodDisruptionBudget) against the
  Kubernetes OpenAPI schemas that ``kubernetes-validate`` bundles (offline), in
  strict mode, so a misspelt field fails.  cert-manager's kinds are CRDs, absent
  from those schemas; they are checked against :data:`CERT_MANAGER_SCHEMAS`,
  written for the fields the example uses from the ``cert-manager.io/v1`` CRDs.
* Meaning: the Deployment's arguments go through the daemon's real option parser
  (with the Secret's mount replaced by a directory of test certificates), and the
  ports, probes, grace period, mounts and security settings are checked against
  what the parser made of them.
* Behaviour: a Secret volume laid out and updated the way the kubelet does it (a
  new ``..data`` directory swapped in by one rename) is reloaded by the daemon's
  file polling; and one real ``twistd`` runs with the Deployment's arguments,
  answers its probes, reloads a swapped Secret and stops on SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import yaml  # type: ignore[import-untyped]
from cryptography import x509
from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from secure_echo import tap
from secure_echo.daemon.options import reload_tls_settings
from secure_echo.daemon.reload import ReloadService, TLSReloader
from secure_echo.tools import certgen
from tests.daemon import POLL_INTERVAL, child_env, read_events, twistd_command

if TYPE_CHECKING:
    from collections.abc import Iterator

    from secure_echo.daemon.load import Config

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "contrib" / "kubernetes"
#: The manifests kustomization.yaml applies, each with the kinds it holds.
MANIFESTS = {
    "deployment.yaml": ["Deployment"],
    "service.yaml": ["Service"],
    "poddisruptionbudget.yaml": ["PodDisruptionBudget"],
    "cert-manager.yaml": ["Issuer", "Certificate", "Issuer", "Certificate"],
}
#: The oldest Kubernetes release the manifests are written for; the newest one
#: kubernetes-validate knows is checked too.
OLDEST_KUBERNETES = "1.29"
#: What one daemon process needs, measured on 0.1.0 (see the comment on
#: --max-connections in deployment.yaml): resident memory when idle, and per
#: connection at worst (152 KiB measured for a client that pipelines and never
#: reads, 130 KiB for one holding an unfinished 64 KiB line), rounded up.
IDLE_MIB = 57
WORST_KIB_PER_CONNECTION = 160
#: The keys of a kubernetes.io/tls Secret.
TLS_SECRET_KEYS = ("tls.crt", "tls.key")
#: The address the pod's endpoints bind: every interface of the pod.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the value expected in the manifest
#: Bounds, in seconds, for the real daemon below.
DAEMON_TIMEOUT = 20.0


# --- reading the files ---------------------------------------------------------


def documents(name: str) -> list[dict[str, Any]]:
    """The YAML documents of ``contrib/kubernetes/NAME``, empty ones left out."""
    text = (KUBE / name).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def only(name: str, kind: str) -> dict[str, Any]:
    """The one object of ``kind`` in ``name``."""
    (found,) = [doc for doc in documents(name) if doc["kind"] == kind]
    return found


def server_certificate() -> dict[str, Any]:
    """The cert-manager Certificate of the server (the one that is not a CA)."""
    (found,) = [
        doc
        for doc in documents("cert-manager.yaml")
        if doc["kind"] == "Certificate" and not doc["spec"].get("isCA")
    ]
    return found


def deployment() -> dict[str, Any]:
    """The Deployment."""
    return only("deployment.yaml", "Deployment")


def pod_spec() -> dict[str, Any]:
    """The Deployment's pod template spec."""
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    """The secure-echo container (the pod's only one)."""
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    (found,) = containers
    return found


def option_value(args: list[str], name: str) -> str:
    """The value that follows ``--name`` in ``args`` (given once)."""
    positions = [i for i, arg in enumerate(args) if arg == name]
    if len(positions) != 1:
        raise AssertionError(f"{name} appears {len(positions)} times in {args}")
    return args[positions[0] + 1]


def tls_mount() -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume mount and the volume of the Secret that holds the certificate."""
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = [m for m in container()["volumeMounts"] if "secret" in volumes[m["name"]]]
    (mount,) = mounts
    return mount, volumes[mount["name"]]


def quantity_mib(value: str) -> float:
    """A Kubernetes memory quantity (``512Mi``, ``1Gi``) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", value)
    if match is None:
        raise AssertionError(f"unexpected memory quantity {value!r}")
    return int(match.group(1)) * units[match.group(2)]


def quantity_cores(value: str | int) -> float:
    """A Kubernetes CPU quantity (``250m``, ``1``) in cores."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def port_number(ports: list[dict[str, Any]], port: int | str) -> int:
    """A probe's or Service's ``port``, by number or by container port name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in ports if p.get("name") == port]
    return int(number)


def bound_tcp(description: str) -> tuple[int, str]:
    """The (port, interface) that an endpoint string binds, from Twisted's own parser."""
    reactor = MemoryReactor()
    endpoints.serverFromString(reactor, description).listen(Factory.forProtocol(Protocol))
    port, _factory, _backlog, interface = reactor.tcpServers[-1]
    return int(port), str(interface)


# --- a Secret volume as the kubelet writes it ---------------------------------


class SecretVolume:
    """A directory laid out and updated like a Secret volume by the kubelet.

    The kubelet's atomic writer (``pkg/volume/util/atomic_writer.go``) keeps the
    files in a hidden timestamped directory; ``..data`` is a symlink to it and each
    visible name is a symlink ``NAME -> ..data/NAME``.  An update writes a new
    timestamped directory, points a ``..data_tmp`` symlink at it, renames that over
    ``..data`` (one atomic step for every file) and removes the old directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)

    def write(self, payload: dict[str, bytes], mode: int = 0o440) -> None:
        """Project ``payload`` (name to content) into the volume, atomically."""
        data = self.root / "..data"
        old = data.readlink() if data.is_symlink() else None
        stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        # The writer's os.MkdirTemp: the stamp plus a random suffix.
        timestamped = Path(tempfile.mkdtemp(prefix=stamp, dir=self.root))
        for name, content in payload.items():
            path = timestamped / name
            path.write_bytes(content)
            path.chmod(mode)
        for name in payload:
            visible = self.root / name
            if not visible.is_symlink():
                visible.symlink_to(PurePosixPath("..data") / name)
        swap = self.root / "..data_tmp"
        swap.symlink_to(timestamped.name)
        swap.replace(data)
        if old is not None:
            shutil.rmtree(self.root / old)


@dataclass
class Issued:
    """A server certificate as PEM, and its serial number."""

    cert_pem: bytes
    key_pem: bytes
    serial: int


def issue(ca: certgen.Issued) -> Issued:
    """A fresh server certificate for localhost from ``ca``."""
    server = certgen.issue_server(ca, ("localhost", "127.0.0.1"), days=2)
    return Issued(server.cert_pem(), server.key_pem(), server.certificate.serial_number)


def secret_payload(server: Issued, ca: certgen.Issued) -> dict[str, bytes]:
    """The files of a kubernetes.io/tls Secret written by cert-manager."""
    return {"tls.crt": server.cert_pem, "tls.key": server.key_pem, "ca.crt": ca.cert_pem()}


def localised_args(args: list[str], mount_path: str, directory: Path) -> list[str]:
    """``args`` with paths under the Secret's mount moved to ``directory``."""
    prefix = mount_path.rstrip("/") + "/"
    return [str(directory / arg[len(prefix) :]) if arg.startswith(prefix) else arg for arg in args]


def parse_args(args: list[str]) -> Config:
    """Parse and load ``args`` as ``twistd secure-echo`` does; fail with its message.

    Both steps run: the option parser and the load step that reads the TLS files
    (what ``makeService`` does before the reactor starts).
    """
    options = tap.Options()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            options.parseOptions(args)
            return tap.load_or_exit(options)
    except SystemExit as stop:
        message = f"twistd secure-echo refused {args} (exit {stop.code}): {errors.getvalue()}"
        raise AssertionError(message) from None


class PodFiles:
    """A test CA, and the Deployment's Secret mount laid out in a temporary directory."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.ca = certgen.make_ca("test CA", days=2)
        self.server = issue(self.ca)
        mount, _volume = tls_mount()
        self.mount_path = str(mount["mountPath"])
        # Absolute: the real daemon runs in a directory of its own.
        self.volume = SecretVolume(Path(case.mktemp()).absolute() / "tls")
        self.volume.write(secret_payload(self.server, self.ca))
        self.ca_file = Path(case.mktemp())
        self.ca_file.write_bytes(self.ca.cert_pem())

    def args(self) -> list[str]:
        """The Deployment's arguments, reading the certificate from the test volume."""
        return localised_args(list(container()["args"]), self.mount_path, self.volume.root)

    def renew(self) -> Issued:
        """Write a new certificate and key into the volume, as a renewal does."""
        self.server = issue(self.ca)
        self.volume.write(secret_payload(self.server, self.ca))
        return self.server


# --- cert-manager --------------------------------------------------------------

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": _NAME,
        "namespace": _NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
#: A Go duration as cert-manager parses ``duration`` and ``renewBefore``.
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
    "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
    "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip
#: The fields of cert-manager.io/v1 Certificate and Issuer that cert-manager.yaml
#: uses, with the types, enums and required fields of cert-manager's CRDs
#: (v1.18+).  Anything else is refused: a new field is added here after checking
#: it in the CRD, so a misspelt one cannot slip through.
CERT_MANAGER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Certificate": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "additionalProperties": False,
                "properties": {
                    "secretName": _NAME,
                    "commonName": {"type": "string", "maxLength": 64},
                    "isCA": {"type": "boolean"},
                    "dnsNames": {"type": "array", "items": {"type": "string"}},
                    "duration": _DURATION,
                    "renewBefore": _DURATION,
                    "usages": {"type": "array", "items": {"enum": _USAGES}},
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                    "issuerRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": _NAME,
                            "kind": {"type": "string"},
                            "group": {"type": "string"},
                        },
                    },
                },
            },
        },
    },
    "Issuer": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Issuer"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {
                    "selfSigned": {"type": "object", "additionalProperties": False},
                    "ca": {
                        "type": "object",
                        "required": ["secretName"],
                        "additionalProperties": False,
                        "properties": {"secretName": _NAME},
                    },
                },
            },
        },
    },
}


def go_duration_hours(value: str) -> float:
    """A Go duration of hours, minutes and seconds (``2160h``, ``1h30m``) in hours."""
    scale = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600}
    parts = re.findall(r"([0-9.]+)(h|m|s)", value)
    if "".join(number + unit for number, unit in parts) != value:
        raise AssertionError(f"unexpected duration {value!r}")
    return sum(float(number) * scale[unit] for number, unit in parts)


# --- the tests -----------------------------------------------------------------


class KustomizationTests(SynchronousTestCase):
    """kustomization.yaml ties exactly these files together."""

    def test_lists_every_manifest(self) -> None:
        """Every YAML file in the directory is a resource, and every resource exists."""
        kustomization = documents("kustomization.yaml")[0]
        self.assertEqual(kustomization["kind"], "Kustomization")
        on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
        self.assertEqual(sorted(kustomization["resources"]), sorted(on_disk))
        self.assertEqual(sorted(MANIFESTS), sorted(on_disk))

    def test_files_hold_the_expected_kinds(self) -> None:
        """Each manifest holds the objects this module checks, and nothing else."""
        for name, kinds in MANIFESTS.items():
            self.assertEqual([doc["kind"] for doc in documents(name)], kinds, name)

    def test_image_placeholder_is_the_one_replaced(self) -> None:
        """The ``images:`` entry names the container's image, so it really replaces it."""
        (entry,) = documents("kustomization.yaml")[0]["images"]
        self.assertEqual(container()["image"], entry["name"])
        self.assertTrue(entry["newName"])
        self.assertTrue(entry["newTag"])


class SchemaTests(SynchronousTestCase):
    """The objects validate against the schemas of the API that will receive them."""

    def versions(self) -> list[str]:
        """The Kubernetes releases to check against."""
        newest = kubernetes_validate.utils.latest_version()
        return [OLDEST_KUBERNETES, newest]

    def core_objects(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(file, object) for every object of a built-in kind."""
        for name in MANIFESTS:
            for doc in documents(name):
                if doc["apiVersion"] != "cert-manager.io/v1":
                    yield name, doc

    def test_core_objects_are_valid(self) -> None:
        """Deployment, Service and PodDisruptionBudget pass strict validation."""
        checked = 0
        for version in self.versions():
            for name, doc in self.core_objects():
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    path = ".".join(str(part) for part in error.path)
                    self.fail(f"{name}: {doc['kind']} at {path}: {error.message} ({version})")
                checked += 1
        self.assertEqual(checked, 3 * len(self.versions()))

    def test_validator_refuses_a_misspelt_field(self) -> None:
        """Strict validation is on: a probe with a misspelt field fails."""
        doc = deployment()
        probe = doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, OLDEST_KUBERNETES, strict=True)

    def test_cert_manager_objects_are_valid(self) -> None:
        """The Issuers and Certificates fit cert-manager's CRD fields and enums."""
        for doc in documents("cert-manager.yaml"):
            schema = CERT_MANAGER_SCHEMAS[doc["kind"]]
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
            self.assertEqual(
                [f"{list(e.path)}: {e.message}" for e in errors], [], doc["metadata"]["name"]
            )

    def test_cert_manager_schema_refuses_a_misspelt_field(self) -> None:
        """A misspelt Certificate field or enum value fails the cert-manager check."""
        certificate = server_certificate()
        schema = jsonschema.Draft202012Validator(CERT_MANAGER_SCHEMAS["Certificate"])
        misspelt = json.loads(json.dumps(certificate))
        misspelt["spec"]["secretname"] = misspelt["spec"].pop("secretName")
        self.assertFalse(schema.is_valid(misspelt))
        wrong_enum = json.loads(json.dumps(certificate))
        wrong_enum["spec"]["privateKey"]["algorithm"] = "EC"
        self.assertFalse(schema.is_valid(wrong_enum))


class CertManagerTests(SynchronousTestCase):
    """The cert-manager example produces the Secret the Deployment mounts."""

    def server_certificate(self) -> dict[str, Any]:
        """The server's Certificate."""
        return server_certificate()

    def test_secret_is_the_mounted_one(self) -> None:
        """The server Certificate writes the Secret that the Deployment's volume names."""
        _mount, volume = tls_mount()
        secret = volume["secret"]["secretName"]
        self.assertEqual(self.server_certificate()["spec"]["secretName"], secret)

    def test_issuers_chain_up(self) -> None:
        """Each issuerRef names an Issuer in the file; the CA Issuer signs with the CA's Secret."""
        docs = documents("cert-manager.yaml")
        issuers = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Issuer"}
        certificates = [doc for doc in docs if doc["kind"] == "Certificate"]
        for certificate in certificates:
            ref = certificate["spec"]["issuerRef"]
            self.assertEqual((ref["kind"], ref["group"]), ("Issuer", "cert-manager.io"))
            self.assertIn(ref["name"], issuers)
        server_issuer = issuers[self.server_certificate()["spec"]["issuerRef"]["name"]]
        (ca,) = [c for c in certificates if c["spec"].get("isCA")]
        self.assertEqual(server_issuer["spec"]["ca"]["secretName"], ca["spec"]["secretName"])

    def test_server_certificate_names_and_usage(self) -> None:
        """The certificate is for server authentication and carries the Service's name."""
        spec = self.server_certificate()["spec"]
        self.assertIn("server auth", spec["usages"])
        service = only("service.yaml", "Service")["metadata"]["name"]
        self.assertIn(service, spec["dnsNames"])

    def test_renewal_comes_before_the_daemon_warns(self) -> None:
        """Renewal starts before --expiry-warning-days, so the daemon's warning means it failed."""
        spec = self.server_certificate()["spec"]
        renew_hours = go_duration_hours(spec["renewBefore"])
        self.assertLess(renew_hours, go_duration_hours(spec["duration"]))
        config = parse_args(PodFiles(self).args())
        self.assertGreater(renew_hours, config.expiry_warning_days * 24)


class DeploymentArgsTests(SynchronousTestCase):
    """The Deployment's command line, as the daemon's own parser reads it."""

    def setUp(self) -> None:
        self.files = PodFiles(self)
        self.config = parse_args(self.files.args())
        self.container = container()

    def test_runs_twistd_in_the_foreground(self) -> None:
        """``twistd -n --pidfile= --reactor=secure-echo-epoll secure-echo``: in the foreground."""
        self.assertEqual(
            self.container["command"],
            ["twistd", "-n", "--pidfile=", "--reactor=secure-echo-epoll", "secure-echo"],
        )

    def test_args_are_accepted(self) -> None:
        """The parser takes the args: one process, JSON on stdout, reload polling, no dev certs."""
        self.assertEqual(self.config.workers, 1)
        self.assertEqual(self.config.log_stdout, "json")
        self.assertIsNone(self.config.log_file)
        self.assertGreater(self.config.reload_interval, 0)
        # --cert is given, so no development certificate and no --state-dir.
        self.assertIsNone(self.config.dev_state_dir)
        self.assertIsNone(self.config.dev_certs)
        self.assertNotIn("--state-dir", self.container["args"])
        self.assertEqual(self.config.tls.leaf.serial_number, self.files.server.serial)

    def test_parser_would_refuse_a_bad_arg(self) -> None:
        """The same check fails for an option the daemon does not know."""
        with self.assertRaises(AssertionError):
            parse_args([*self.files.args(), "--reload-intervall", "60"])

    def test_container_ports_match_listen_and_metrics(self) -> None:
        """The named container ports are those --listen and --metrics bind, on all interfaces."""
        ports = self.container["ports"]
        (listen,) = self.config.listens
        self.assertEqual(
            bound_tcp(listen.description), (port_number(ports, "tls"), ALL_INTERFACES)
        )
        assert self.config.metrics is not None
        self.assertEqual(
            bound_tcp(self.config.metrics), (port_number(ports, "metrics"), ALL_INTERFACES)
        )
        annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(int(annotations["prometheus.io/port"]), port_number(ports, "metrics"))

    def test_probes_use_the_metrics_endpoint(self) -> None:
        """Readiness asks /readyz and liveness /healthz, both on the --metrics port."""
        assert self.config.metrics is not None
        metrics_port, _ = bound_tcp(self.config.metrics)
        ports = self.container["ports"]
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = self.container[probe]["httpGet"]
            self.assertEqual(get["path"], path, probe)
            self.assertEqual(port_number(ports, get["port"]), metrics_port, probe)
            self.assertEqual(get.get("scheme", "HTTP"), "HTTP", probe)

    def test_drain_fits_in_the_grace_period(self) -> None:
        """The preStop sleep plus --drain-timeout stays below terminationGracePeriodSeconds."""
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[0], "sleep")
        sleep = float(command[1])
        grace = pod_spec()["terminationGracePeriodSeconds"]
        # The sleep covers the endpoints' removal: a few seconds at least.
        self.assertGreaterEqual(sleep, 5)
        self.assertLess(sleep + self.config.drain_timeout, grace)

    def test_secret_mount_holds_cert_and_key(self) -> None:
        """--cert and --key are the tls.crt and tls.key of the mounted Secret, mounted whole."""
        mount, volume = tls_mount()
        args = self.container["args"]
        for option, key in zip(("--cert", "--key"), TLS_SECRET_KEYS, strict=True):
            self.assertEqual(option_value(args, option), f"{mount['mountPath']}/{key}")
        # A subPath mount never sees an updated Secret; items would rename the keys.
        self.assertNotIn("subPath", mount)
        self.assertNotIn("items", volume["secret"])
        self.assertIs(mount["readOnly"], True)
        self.assertEqual(self.config.tls_settings.cert, self.files.volume.root / "tls.crt")
        self.assertEqual(self.config.tls_settings.key, self.files.volume.root / "tls.key")

    def test_key_is_readable_by_the_daemon_only(self) -> None:
        """The Secret's mode lets the pod's group read the key (fsGroup), and not others."""
        _mount, volume = tls_mount()
        mode = volume["secret"]["defaultMode"]
        security = pod_spec()["securityContext"]
        self.assertEqual(mode & 0o007, 0, f"defaultMode {mode:o} lets every user read the key")
        self.assertTrue(mode & 0o040, f"defaultMode {mode:o} gives the group no read access")
        self.assertIn("fsGroup", security)
        self.assertEqual(security["fsGroup"], security["runAsGroup"])

    def test_security_context_is_non_root_and_locked_down(self) -> None:
        """Non-root, read-only root, no capabilities or escalation, RuntimeDefault seccomp."""
        pod = pod_spec()["securityContext"]
        own = self.container["securityContext"]
        # The container's own settings win over the pod's.
        self.assertIs(own.get("runAsNonRoot", pod["runAsNonRoot"]), True)
        self.assertGreater(own.get("runAsUser", pod["runAsUser"]), 0)
        self.assertGreater(own.get("runAsGroup", pod["runAsGroup"]), 0)
        self.assertEqual(pod["seccompProfile"], {"type": "RuntimeDefault"})
        self.assertIs(own["allowPrivilegeEscalation"], False)
        self.assertIs(own["readOnlyRootFilesystem"], True)
        self.assertEqual(own["capabilities"], {"drop": ["ALL"]})
        self.assertNotIn("add", own["capabilities"])
        self.assertNotIn("privileged", own)
        self.assertIs(pod_spec()["automountServiceAccountToken"], False)
        # Unprivileged ports only: nothing may bind below 1024 without a capability.
        for listen in self.config.listens:
            self.assertGreaterEqual(bound_tcp(listen.description)[0], 1024)

    def test_resources_fit_the_connection_limit(self) -> None:
        """Requests and limits are set; --max-connections at its worst fits the memory limit."""
        resources = self.container["resources"]
        limit_mib = quantity_mib(resources["limits"]["memory"])
        self.assertLessEqual(quantity_mib(resources["requests"]["memory"]), limit_mib)
        self.assertGreater(self.config.max_connections, 0, "the default follows the fd limit")
        worst_mib = IDLE_MIB + self.config.max_connections * WORST_KIB_PER_CONNECTION / 1024
        self.assertLessEqual(worst_mib, limit_mib)
        # Each process uses one core at most; the limit must allow every worker one.
        cores = quantity_cores(resources["limits"]["cpu"])
        self.assertGreaterEqual(cores, self.config.workers)
        self.assertLessEqual(quantity_cores(resources["requests"]["cpu"]), cores)


class SelectorTests(SynchronousTestCase):
    """The Deployment, Service and budget all find the same pods."""

    def test_selectors_match_the_pod_labels(self) -> None:
        """Every selector is a subset of the pod template's labels."""
        labels = deployment()["spec"]["template"]["metadata"]["labels"]
        budget = only("poddisruptionbudget.yaml", "PodDisruptionBudget")
        selectors = {
            "Deployment": deployment()["spec"]["selector"]["matchLabels"],
            "Service": only("service.yaml", "Service")["spec"]["selector"],
            "PodDisruptionBudget": budget["spec"]["selector"]["matchLabels"],
        }
        for spread in pod_spec()["topologySpreadConstraints"]:
            selectors["topologySpreadConstraints"] = spread["labelSelector"]["matchLabels"]
        for owner, selector in selectors.items():
            self.assertTrue(selector, owner)
            self.assertLessEqual(selector.items(), labels.items(), owner)

    def test_service_reaches_the_tls_port_only(self) -> None:
        """The Service forwards to the --listen port and leaves the metrics port out."""
        files = PodFiles(self)
        config = parse_args(files.args())
        (listen,) = config.listens
        assert config.metrics is not None
        ports = container()["ports"]
        service_ports = only("service.yaml", "Service")["spec"]["ports"]
        targets = [port_number(ports, p["targetPort"]) for p in service_ports]
        self.assertEqual(targets, [bound_tcp(listen.description)[0]])
        self.assertNotIn(bound_tcp(config.metrics)[0], [p["port"] for p in service_ports])

    def test_budget_leaves_replicas_serving(self) -> None:
        """The budget lets one pod go at a time while the others serve."""
        budget = only("poddisruptionbudget.yaml", "PodDisruptionBudget")["spec"]
        self.assertEqual(budget["maxUnavailable"], 1)
        self.assertGreater(deployment()["spec"]["replicas"], budget["maxUnavailable"])
        strategy = deployment()["spec"]["strategy"]["rollingUpdate"]
        self.assertEqual(strategy["maxUnavailable"], 0)


class ContainerfileTests(SynchronousTestCase):
    """The Containerfile builds what the Deployment runs."""

    def setUp(self) -> None:
        self.instructions = self.parse((KUBE / "Containerfile").read_text(encoding="utf-8"))

    @staticmethod
    def parse(text: str) -> list[tuple[str, str]]:
        """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
        found: list[tuple[str, str]] = []
        logical = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not logical and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical += line
            word, _, rest = logical.partition(" ")
            found.append((word.upper(), rest.strip()))
            logical = ""
        return found

    def build_stage_copies(self) -> list[str]:
        """Sources of the COPY instructions in the stage that builds the package."""
        sources: list[str] = []
        stage = None
        for word, rest in self.instructions:
            if word == "FROM":
                stage = rest.split()[-1] if " AS " in rest.upper() else None
            elif word == "COPY" and stage == "build" and not rest.startswith("--from"):
                sources.extend(shlex.split(rest)[:-1])
        return sources

    def test_copies_what_the_build_reads(self) -> None:
        """The build stage copies pyproject.toml, its readme and every package directory."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        needed = ["pyproject.toml", project["project"]["readme"]]
        needed += project["tool"]["setuptools"]["package-dir"].values()
        needed += project["project"].get("license-files", [])
        copied = [PurePosixPath(source) for source in self.build_stage_copies()]
        for path in needed:
            wanted = PurePosixPath(path or ".")
            self.assertTrue(
                any(wanted == c or c in wanted.parents for c in copied),
                f"{path} is not copied into the build stage ({copied})",
            )
            self.assertTrue((ROOT / wanted).exists(), path)

    def test_entrypoint_is_the_deployment_command(self) -> None:
        """The image's ENTRYPOINT is the command the Deployment gives."""
        (entrypoint,) = [rest for word, rest in self.instructions if word == "ENTRYPOINT"]
        self.assertEqual(json.loads(entrypoint), container()["command"])

    def test_runs_as_the_deployment_user(self) -> None:
        """USER is numeric and non-root, the same UID and GID as the pod's securityContext."""
        (user,) = [rest for word, rest in self.instructions if word == "USER"]
        uid, gid = (int(part) for part in user.split(":"))
        security = pod_spec()["securityContext"]
        self.assertGreater(uid, 0)
        self.assertEqual((uid, gid), (security["runAsUser"], security["runAsGroup"]))

    def test_stages_share_the_base(self) -> None:
        """Both stages start from the same base: the copied virtualenv links to its python."""
        bases = [rest.split()[0] for word, rest in self.instructions if word == "FROM"]
        self.assertEqual(len(bases), 2)
        self.assertEqual(bases[0], bases[1])


class SecretRotationTests(SynchronousTestCase):
    """A renewed Secret reaches the daemon through --reload-interval polling alone."""

    def setUp(self) -> None:
        self.files = PodFiles(self)
        self.config = parse_args(self.files.args())
        clock = Clock()
        # Certificates are checked against the clock's time: start it now.
        clock.advance(time.time())
        self.clock = clock
        self.reloader = TLSReloader(
            self.config.contexts, lambda: reload_tls_settings(self.config), clock
        )
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        self.service = ReloadService(self.reloader, clock, self.config.reload_interval)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def serial_in_use(self) -> int:
        """The serial number of the certificate new connections get."""
        return int(self.config.contexts.loaded.leaf.serial_number)

    def test_atomic_swap_is_reloaded(self) -> None:
        """The kubelet's ..data swap is seen at the next poll and the new certificate used."""
        first = self.files.server.serial
        renewed = self.files.renew()
        self.clock.advance(self.config.reload_interval - 0.1)
        self.assertEqual(self.serial_in_use(), first)
        self.clock.advance(0.1)
        self.assertEqual(self.serial_in_use(), renewed.serial)
        self.assertEqual((self.reloader.reloads, self.reloader.failures), (1, 0))
        # The old timestamped directory is gone: the daemon keeps the symlink
        # path, not the file it pointed to at start.
        (data_dir,) = [p for p in self.files.volume.root.iterdir() if p.name.startswith("..2")]
        self.assertEqual((self.files.volume.root / "..data").readlink().name, data_dir.name)

    def test_second_renewal_is_reloaded_too(self) -> None:
        """Every renewal is seen, not only the first."""
        self.files.renew()
        self.clock.advance(self.config.reload_interval)
        third = self.files.renew()
        self.clock.advance(self.config.reload_interval)
        self.assertEqual(self.serial_in_use(), third.serial)
        self.assertEqual((self.reloader.reloads, self.reloader.failures), (2, 0))

    def test_unchanged_secret_is_not_reloaded(self) -> None:
        """Polls that find the same volume reload nothing."""
        for _ in range(5):
            self.clock.advance(self.config.reload_interval)
        self.assertEqual((self.reloader.reloads, self.reloader.failures), (0, 0))


class DeployedDaemonTests(SynchronousTestCase):
    """One real ``twistd`` with the Deployment's arguments, on loopback."""

    def test_probes_reload_and_stop(self) -> None:
        """It answers both probes, reloads a swapped Secret, logs pure JSON and stops on SIGTERM.

        Changed from the Deployment for the test only: the mount path (a
        temporary directory), both endpoints (port 0 on 127.0.0.1) and the reload
        interval (0.2 s instead of a minute).
        """
        files = PodFiles(self)
        args = files.args()
        listen = args.index("--listen") + 1
        args[listen] = "tcp:0:interface=127.0.0.1"
        args[args.index("--metrics") + 1] = "tcp:0:interface=127.0.0.1"
        args[args.index("--reload-interval") + 1] = "0.2"
        directory = Path(self.mktemp())
        directory.mkdir()
        stdout_path, stderr_path = directory / "stdout.jsonl", directory / "stderr.txt"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                twistd_command(*args),
                cwd=directory,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        self.addCleanup(stop, process)

        def event(name: str) -> dict[str, Any]:
            return wait_for_record(process, stdout_path, stderr_path, name)

        tls_port = int(event("listening")["port"])
        metrics_port = int(event("metrics_listening")["port"])
        for probe in ("livenessProbe", "readinessProbe"):
            path = container()[probe]["httpGet"]["path"]
            self.assertEqual(http_get(metrics_port, path), 200, path)
        self.assertEqual(peer_serial(tls_port, files.ca_file), files.server.serial)

        renewed = files.renew()
        reloaded = event("tls_reloaded")
        self.assertEqual(reloaded["trigger"], "file-change")
        self.assertEqual(peer_serial(tls_port, files.ca_file), renewed.serial)

        process.send_signal(signal.SIGTERM)
        drain_timeout = float(option_value(args, "--drain-timeout"))
        code = process.wait(timeout=drain_timeout + 5)
        # twistd ends a SIGTERM'd run by re-raising the signal (status 143 in a pod).
        self.assertIn(code, (0, -signal.SIGTERM))
        events = [record["event"] for record in read_events(stdout_path)]
        self.assertIn("drain_finished", events)
        self.assertEqual(stderr_path.read_text(), "")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a daemon still running, SIGKILL it if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=DAEMON_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=DAEMON_TIMEOUT)


def wait_for_record(
    process: subprocess.Popen[bytes], stdout: Path, stderr: Path, name: str
) -> dict[str, Any]:
    """The first JSON record called ``name`` on the daemon's stdout (every line must parse)."""
    deadline = time.monotonic() + DAEMON_TIMEOUT
    while True:
        for record in read_events(stdout):
            if record.get("event") == name:
                return record
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"no {name} record; exit {process.poll()}\nstderr: {stderr.read_text()}\n"
                f"stdout: {stdout.read_text()[-4000:]}"
            )
        time.sleep(POLL_INTERVAL)


def http_get(port: int, path: str) -> int:
    """The status code of GET ``path`` on 127.0.0.1:``port``."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=DAEMON_TIMEOUT
        ) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def peer_serial(port: int, ca_file: Path) -> int:
    """The serial number of the certificate the daemon presents on ``port``."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DAEMON_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)
