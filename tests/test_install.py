"""Pinned installs: the README commands and CI install from constraints.txt, which pins every
dependency, and the environment running the tests is the pinned one."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _direct_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group(0)).lower() for r in reqs]


def test_every_direct_dependency_but_torch_is_pinned():
    pins = _pins()
    missing = [d for d in _direct_dependencies() if d != "torch" and d not in pins]
    assert not missing, f"constraints.txt lacks {missing}; refresh it (command in its header)"
    assert "torch" not in pins  # installed first, CPU or CUDA build by the user's choice


def test_readme_commands_and_ci_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert '-c constraints.txt -e ".[test]"' in ci
    setups = [line for line in readme.splitlines() if "python3 -m venv .venv" in line]
    assert len(setups) >= 2 and all("-c constraints.txt" in line for line in setups)


def test_install_page_repeats_the_readme_commands_exactly():
    def commands(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.startswith("python3 -m venv .venv")]

    assert commands(ROOT / "docs" / "install.md") == commands(ROOT / "README.md")


def test_this_environment_is_the_pinned_one():
    pins = _pins()
    wrong = {}
    for name in (
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "accelerate",
        "dvc",
        "mlflow",
        "pydantic",
        "tokenizers",
        "huggingface-hub",
        "numpy",
        "safetensors",
    ):
        got = importlib.metadata.version(name)
        if got != pins[name]:
            wrong[name] = (got, pins[name])
    assert not wrong, f"installed != constraints.txt (installed, pinned): {wrong}; install with -c constraints.txt"


def test_readme_test_command_and_ci_install_chromium_or_fail():
    # one line each; apt-get's failure (no apt, no root and no sudo) stops the && chain before pytest
    step = "&& { command -v chromium >/dev/null || { $(command -v sudo) apt-get update -qq && $(command -v sudo) apt-get install -y -qq chromium; }; } && .venv/bin/python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    readme = [line for line in (ROOT / "README.md").read_text().splitlines() if line.endswith("python -m pytest")]
    assert (
        len(readme) == 1
        and readme[0].startswith("python3 -m venv .venv")
        and readme[0].endswith(step)
        and step in ci
        and "export CI=1" in ci
    )
    assert readme[0] in ci  # CI runs the README's test command
