"""The ``--config`` file: every option of ``twistd secure-echo`` in one TOML file.

Format (``contrib/secure-echo.toml`` documents every key with its default):

* Keys are the long option names, dashes included: ``max-line-length = 65536``
  (TOML allows dashes in bare keys).  This is the only spelling: ``max_line_length``
  is refused with a suggestion, so one file cannot hold an option twice.
* Keys are top-level; there are no ``[tables]``.
* Values have TOML types (:class:`Kind`): whole numbers are integers, durations are
  integers or floats (``"off"`` too where 0 switches a feature off), names and paths
  are strings, repeatable options are arrays of strings, flags are booleans.  A
  repeatable path (``cert``, ``key``, ``crl``) is a string or an array of strings.
* A relative path (``cert``, ``key``, ``crl``, ``client-ca``, ``test-certs``,
  ``log-file``, ``state-dir``) is relative to the directory holding the file, not to
  the working directory.
  Endpoint strings (``listen``, ``metrics``) are used as written.
* ``config`` and ``print-config`` are command-line only.

Precedence: defaults < file < command line.  A repeatable option given on the command
line replaces the file's array; it does not extend it.

Errors: this module checks the file itself (readable, UTF-8, TOML syntax, known keys,
value types).  Values are then validated by :class:`secure_echo.daemon.options.Options` like
command-line values, and an error about a value from the file is reworded to name
the file and the key.  Every error is one line::

    --config /etc/secure-echo.toml: unknown key "max-line-lenght"; did you mean "max-line-length"?

Reload: :func:`secure_echo.daemon.options.reload_tls_settings` re-reads the file and
rebuilds the TLS settings (certificates, keys, client CA, client-auth, profile,
allow-lists, CRLs, test certificates, ALPN, strict SNI) as one set, with the
command-line values captured at start still taking precedence.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final

from twisted.python import usage

if TYPE_CHECKING:
    from collections.abc import Mapping


#: A value ready for :class:`usage.Options`: a string for a parameter, a tuple of
#: strings for a repeatable option, a bool for a flag.
OptionValue = str | tuple[str, ...] | bool

#: Options that make no sense inside the file, and why.
COMMAND_LINE_ONLY: Final = {
    "config": "a config file cannot name another one",
    "print-config": "it would stop every start of the daemon",
    "help": "it is a command-line action",
    "version": "it is a command-line action",
}

_TOML_POSITION: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


class Kind(StrEnum):
    """The TOML type a key takes."""

    INTEGER = "integer"
    NUMBER = "number"
    NUMBER_OR_OFF = "number-or-off"
    STRING = "string"
    PATH = "path"
    STRINGS = "strings"
    #: A path, or an array of paths (a repeatable path option).
    PATHS = "paths"
    FLAG = "flag"


_KIND_TEXT: Final = {
    Kind.INTEGER: "a whole number",
    Kind.NUMBER: "a number",
    Kind.NUMBER_OR_OFF: 'a number or "off"',
    Kind.STRING: "a string",
    Kind.PATH: "a path string",
    Kind.STRINGS: "an array of strings",
    Kind.PATHS: "a path string or an array of path strings",
    Kind.FLAG: "true or false",
}


@dataclass(frozen=True)
class Key:
    """How one option is written in the file: its kind and an example (TOML text)."""

    kind: Kind
    example: str


class ConfigFileError(usage.UsageError):
    """A problem with the ``--config`` file; ``str()`` is one line naming the file."""

    def __init__(self, path: Path, message: str, key: str | None = None) -> None:
        super().__init__(f"--config {path}: {message}")
        self.path = path
        self.key = key


@dataclass(frozen=True)
class ConfigFile:
    """A read and type-checked config file."""

    path: Path
    #: Hex SHA-256 of the file's bytes, to tell whether it changed.
    sha256: str
    #: Option name to value, in the form the command line would give it.
    values: Mapping[str, OptionValue]


def _type_name(value: object) -> str:
    names = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    )
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return "a date or time"


def _shown(value: object) -> str:
    """A short TOML-ish rendering of ``value`` for a message."""
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."  # noqa: PLR2004 - one-line messages


def _read_bytes(path: Path) -> bytes:
    fix = "give --config the path of a readable TOML file"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(path, f"no such file; {fix}") from None
    except PermissionError:
        raise ConfigFileError(
            path, "cannot read it: permission denied; make it readable by this user"
        ) from None
    except IsADirectoryError:
        raise ConfigFileError(path, f"is a directory; {fix}") from None
    except OSError as error:
        raise ConfigFileError(path, f"cannot read it ({error.strerror}); {fix}") from None


def _parse(path: Path, data: bytes) -> dict[str, object]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigFileError(
            path, f"line {line} is not UTF-8 text; save the file as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        problem = str(error)
        position = _TOML_POSITION.search(problem)
        if position is not None:
            problem = problem[: position.start()]
            where = f"line {position[1]}, column {position[2]}"
        else:
            where = f"line {text.count(chr(10)) + 1}"
        raise ConfigFileError(
            path,
            f"TOML syntax error at {where}: {problem}; "
            'fix that line (keys are option names: max-line-length = 65536, cert = "x.pem")',
        ) from None


def _unknown_key(path: Path, key: str, value: object, known: Mapping[str, Key]) -> ConfigFileError:
    if key in COMMAND_LINE_ONLY:
        return ConfigFileError(
            path,
            f'key "{key}" is command-line only ({COMMAND_LINE_ONLY[key]}); '
            f"remove it from the file and give --{key} on the command line",
            key,
        )
    dashed = key.replace("_", "-").lower()
    if dashed in known:
        match = dashed
    elif isinstance(value, dict):
        return ConfigFileError(
            path,
            f"unknown table [{key}]; write options as top-level keys, "
            "above any [table] header (e.g. max-line-length = 65536)",
            key,
        )
    else:
        matches = difflib.get_close_matches(key, list(known), n=1)
        if not matches:
            return ConfigFileError(
                path,
                f'unknown key "{key}"; keys are the long option names that '
                "`twistd secure-echo --help` lists, without the dashes in front",
                key,
            )
        match = matches[0]
    return ConfigFileError(path, f'unknown key "{key}"; did you mean "{match}"?', key)


def _fits(kind: Kind, value: object) -> bool:
    """True if ``value`` has the TOML type ``kind`` asks for."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    checks = {
        Kind.INTEGER: isinstance(value, int) and not isinstance(value, bool),
        Kind.NUMBER: number,
        Kind.NUMBER_OR_OFF: number or value == "off",
        Kind.STRING: isinstance(value, str),
        Kind.PATH: isinstance(value, str),
        Kind.STRINGS: isinstance(value, list) and all(isinstance(i, str) for i in value),
        Kind.PATHS: isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(i, str) for i in value)),
        Kind.FLAG: isinstance(value, bool),
    }
    return checks[kind]


def _convert(path: Path, key: str, value: object, spec: Key) -> OptionValue:
    """Check the TOML type of ``value`` and turn it into what the command line gives."""
    kind = spec.kind
    if not _fits(kind, value):
        if kind in {Kind.STRINGS, Kind.PATHS} and isinstance(value, list):
            problem = "must be an array of strings, and not every item is a string"
        else:
            problem = f"must be {_KIND_TEXT[kind]}, not {_type_name(value)} ({_shown(value)})"
        raise ConfigFileError(
            path, f'key "{key}" {problem}; write e.g. {key} = {spec.example}', key
        )
    if kind is Kind.PATHS:
        # One path or several; each relative to the file, as for a single path.
        items = [value] if isinstance(value, str) else value
        assert isinstance(items, list)  # _fits checked it
        return tuple(_beside(path, str(item)) if item else "" for item in items)
    if isinstance(value, bool | str):
        if kind is Kind.PATH and value:
            return _beside(path, str(value))
        return value
    if isinstance(value, list):
        return tuple(value)
    return str(value)


def _beside(config_file: Path, value: str) -> str:
    """``value`` as a path relative to the config file's directory (absolute stays).

    So a path means the same from any working directory.
    """
    return str(config_file.parent / Path(value).expanduser())


def fingerprint(data: bytes) -> str:
    """Hex SHA-256 of a config file's bytes."""
    return hashlib.sha256(data).hexdigest()


def read(path: Path, keys: Mapping[str, Key]) -> ConfigFile:
    """Read, parse and type-check the config file at ``path`` (absolute).

    ``keys`` is every key the file may hold.  Raises :class:`ConfigFileError`.
    """
    data = _read_bytes(path)
    document = _parse(path, data)
    values: dict[str, OptionValue] = {}
    for key, value in document.items():
        spec = keys.get(key)
        if spec is None:
            raise _unknown_key(path, key, value, keys)
        values[key] = _convert(path, key, value, spec)
    return ConfigFile(path, fingerprint(data), values)


_OPTION_IN_ERROR: Final = re.compile(r"--([a-z0-9-]+)")


def reword_for_file(
    error: usage.UsageError, config_file: Path | None, sources: Mapping[str, str]
) -> usage.UsageError:
    """``error`` reworded to name the file and key if its option came from the file.

    ``sources`` maps option names to where their value came from (``file`` among
    them); an error about any other option, or one that already names the file,
    is returned as it is.
    """
    match = _OPTION_IN_ERROR.match(str(error))
    if (
        config_file is None
        or isinstance(error, ConfigFileError)
        or match is None
        or sources.get(match[1]) != "file"
    ):
        return error
    return in_file_terms(error, config_file, match[1])


def in_file_terms(error: usage.UsageError, path: Path, key: str) -> ConfigFileError:
    """Reword an option's error (``--KEY...: problem; fix``) to name the file and key."""
    text = str(error)
    rest = text.removeprefix(f"--{key}").removeprefix(":").lstrip()
    return ConfigFileError(path, f'key "{key}": {rest}', key)
