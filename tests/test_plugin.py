"""Tests for the twistd plugin: found in place, and found in an installed wheel."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from unittest import SkipTest

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from secure_echo import tap

ROOT = Path(__file__).resolve().parent.parent
#: Upper bounds for the slow steps of the wheel test, in seconds.
BUILD_TIMEOUT = 180
STEP_TIMEOUT = 120

_LIST_PLUGINS = """
import sys
import secure_echo
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
for maker in getPlugins(IServiceMaker):
    print("plugin", maker.tapname)
print("module", secure_echo.__file__)
plugin = sys.modules.get("twisted.plugins.secure_echo_plugin")
print("dropin", plugin.__file__ if plugin else "-")
"""


def _unmet_build_requirements() -> list[str]:
    """The build-system requirements this interpreter does not satisfy."""
    try:
        from packaging.requirements import Requirement  # noqa: PLC0415 - optional
    except ImportError:
        return ["packaging (to check the build requirements)"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    unmet: list[str] = []
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{text} (not installed)")
            continue
        if installed not in requirement.specifier:
            unmet.append(f"{text} (found {installed})")
    return unmet


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command with a clean environment: no PYTHONPATH, no user site."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


#: Modules the installed package needs at import time; each is found where it is now.
_DEPENDENCIES = ("twisted", "OpenSSL", "cryptography", "zope.interface", "typing_extensions")


def _dependency_dirs() -> list[str]:
    """The directories this interpreter imports secure-echo's dependencies from."""
    found: list[str] = []
    for name in _DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None
        assert spec.origin is not None
        depth = len(name.split(".")) - (spec.submodule_search_locations is None)
        directory = str(Path(spec.origin).parents[depth])
        # The source tree itself must not be on the path (it holds secure_echo);
        # a virtualenv that happens to live inside the checkout is fine: the new
        # venv's own site-packages comes first, so its secure_echo wins.
        if directory not in found and Path(directory) not in {ROOT, ROOT / "src"}:
            found.append(directory)
    return found


def _without_secure_echo(directories: list[str], overlay_root: Path) -> list[str]:
    """``directories``, with any that hold an installed secure-echo replaced.

    Where the dependencies live next to an installed secure-echo (a virtualenv
    made by ``pip install .``), Twisted's own ``twisted/plugins`` directory would
    hold that install's plugin file and shadow the wheel under test.  Such a
    directory is replaced by an overlay of symbolic links to everything in it but
    secure-echo's files.
    """
    result: list[str] = []
    for index, directory in enumerate(directories):
        source = Path(directory)
        if (
            not (source / "secure_echo").exists()
            and not (source / "twisted" / "plugins" / "secure_echo_plugin.py").exists()
        ):
            result.append(directory)
            continue
        overlay = overlay_root / str(index)
        overlay.mkdir(parents=True)
        for entry in source.iterdir():
            if entry.name == "secure_echo" or entry.name.startswith("secure_echo-"):
                continue
            if entry.name != "twisted":
                (overlay / entry.name).symlink_to(entry)
                continue
            twisted_dir = overlay / "twisted"
            twisted_dir.mkdir()
            for part in entry.iterdir():
                if part.name != "plugins":
                    (twisted_dir / part.name).symlink_to(part)
                    continue
                plugins = twisted_dir / "plugins"
                plugins.mkdir()
                for plugin in part.iterdir():
                    if plugin.name not in {"secure_echo_plugin.py", "dropin.cache"}:
                        (plugins / plugin.name).symlink_to(plugin)
        result.append(str(overlay))
    return result


def _purelib(python: Path, cwd: Path) -> str:
    """The pure-Python site-packages directory of ``python``'s environment."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    found = _run([str(python), "-c", code], cwd, STEP_TIMEOUT)
    if found.returncode != 0:
        raise AssertionError(found.stderr)
    return found.stdout.strip()


class PluginTests(SynchronousTestCase):
    """The plugin as seen from this environment."""

    def test_listed(self) -> None:
        """The plugin system lists one 'secure-echo' maker whose options are tap.Options."""
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "secure-echo"]
        self.assertEqual(len(makers), 1)
        [maker] = makers
        self.assertIs(maker.options, tap.Options)
        self.assertTrue(maker.description)
        self.assertIs(maker.makeService, tap.makeService)


class WheelTests(SynchronousTestCase):
    """A non-editable install of the built wheel lists the plugin."""

    def test_installed_wheel_lists_plugin(self) -> None:
        """Build the wheel, install it into a fresh venv, and find the plugin there."""
        if not (ROOT / "pyproject.toml").is_file():
            raise SkipTest(f"no pyproject.toml in {ROOT}: not running from a source tree")
        unmet = _unmet_build_requirements()
        if unmet:
            raise SkipTest(
                "cannot build the wheel without build isolation here; unmet build "
                "requirements: " + ", ".join(unmet)
            )
        work = Path(tempfile.mkdtemp(prefix="secure-echo-wheel-"))
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        # Build from a copy so that the build leaves nothing in the source tree.
        source = work / "source"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (ROOT / name).is_file():
                shutil.copy2(ROOT / name, source / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "*.egg-info")
        shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
        shutil.copytree(ROOT / "twisted", source / "twisted", ignore=ignore)

        dist = work / "dist"
        built = _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-w",
                str(dist),
                str(source),
            ],
            work,
            BUILD_TIMEOUT,
        )
        self.assertEqual(built.returncode, 0, built.stdout + built.stderr)
        wheels = sorted(dist.glob("secure_echo-*.whl"))
        self.assertEqual(len(wheels), 1, wheels)

        # A venv of its own for secure-echo; its dependencies come from this
        # environment through a .pth file, which puts them after the venv's own
        # site-packages, so the installed wheel is what gets imported.
        venv = work / "venv"
        made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, STEP_TIMEOUT)
        self.assertEqual(made.returncode, 0, made.stderr)
        python = venv / "bin" / "python"
        purelib = Path(_purelib(python, work)).resolve()
        (purelib / "secure_echo_test_deps.pth").write_text(
            "".join(f"{d}\n" for d in _without_secure_echo(_dependency_dirs(), work / "deps"))
        )
        installed = _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--no-deps",
                "--no-index",
                # The dependency directories may hold an installed secure-echo of
                # the same version; it must not count as "already satisfied".
                "--ignore-installed",
                str(wheels[0]),
            ],
            work,
            STEP_TIMEOUT,
        )
        self.assertEqual(installed.returncode, 0, installed.stdout + installed.stderr)

        listed = _run([str(python), "-c", _LIST_PLUGINS], work, STEP_TIMEOUT)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        lines = listed.stdout.splitlines()
        self.assertIn("plugin secure-echo", lines, f"the installed wheel lists: {lines}")
        found = dict(line.split(" ", 1) for line in lines if not line.startswith("plugin "))
        for what in ("module", "dropin"):
            self.assertTrue(
                Path(found[what]).resolve().is_relative_to(purelib),
                f"{what} imported from {found[what]}, not from the venv's {purelib}",
            )
        self.assertTrue((purelib / "twisted" / "plugins" / "secure_echo_plugin.py").is_file())
        self.assertFalse((purelib / "twisted" / "plugins" / "__init__.py").exists())
