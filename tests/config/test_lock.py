"""Installs are reproducible: every dependency pyproject.toml names is pinned with its hashes in
the lock files, the environment the tests run in is exactly the lock, and make install and the
Dockerfile install from the locks with hash checking."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked(path: Path) -> dict[str, str]:
    """{name: version} of a pip-compile lock, checking that each pin carries a sha256 hash."""
    pins: dict[str, str] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = PIN.match(line)
        if not m:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        assert line.rstrip().endswith("\\") and "--hash=sha256:" in following, (
            f"{path.name}: {line} has no hash"
        )
        pins[_canonical(m.group(1))] = m.group(2)
    return pins


def _requirement_names(specs: list[str]) -> set[str]:
    return {_canonical(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in specs}


def test_every_dependency_of_pyproject_is_pinned_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirement_names(project["dependencies"]) - {"torch"}
    dev = _requirement_names(project["optional-dependencies"]["dev"])
    assert runtime <= set(_locked(ROOT / "requirements.lock"))
    assert runtime | dev <= set(_locked(ROOT / "requirements-dev.lock"))
    assert "torch" not in _locked(ROOT / "requirements-dev.lock")  # locked apart: CPU or CUDA
    assert set(_locked(ROOT / "requirements-torch-cpu.lock")) == {"torch"}


def test_the_environment_is_exactly_the_lock():
    locked = _locked(ROOT / "requirements-dev.lock") | _locked(ROOT / "requirements-torch-cpu.lock")
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    if "+" not in installed.get("torch", "+"):  # a GPU machine's CUDA build of the same release
        locked["torch"] = locked["torch"].split("+")[0]
    wrong = {
        name: (version, installed.get(name))
        for name, version in locked.items()
        if installed.get(name) != version
    }
    assert not wrong, f"installed versions differ from the lock (locked, installed): {wrong}"


def test_make_install_and_the_image_install_from_the_locks_with_hash_checking():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r requirements-dev.lock" in makefile
    assert "-r requirements-torch-cpu.lock" in makefile and "pip check" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "pip check" in dockerfile
