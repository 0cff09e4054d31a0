"""A science run's hash and resolved settings, computed by the pinned revision's own code.

The hash of a run (:func:`pipeline.science.sweep.run_hash`) covers its resolved settings and the data,
base and eval sections of its params, each with every default filled in. Resolving those with this
checkout's schema would tie the hash to today's schema: a setting added later with a default (or a
renamed module) changes every resolved run although nothing that runs at the revision changed. So the
sweep resolves them with the revision's ``pipeline`` and ``bilora``: it extracts the revision's
packages into a temporary directory and runs this file there as a script::

    python -c "<this file's source>" OUT.json < request.json     (cwd and PYTHONPATH: the revision's tree)

``request.json`` is ``{"tree": <code digest>, "runs": [{"task", "method", "seed", "params", "source"}]}``,
``params`` the raw params.yaml mapping a run's workspace gets (the revision's params.yaml with the preset
merged over it); ``OUT.json`` receives ``[{"hash", "settings"}]`` in the same order, or ``{"error"}``.
This file therefore imports only the standard library at the top and the revision's packages inside
:func:`main`, never this checkout's. The key below is the sweep's (this file is not part of the code
digest, like the rest of ``pipeline/science/``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any

# Where a revision keeps the functions the hash needs, newest layout first: the params validator (raw
# mapping -> params model) and the resolved settings of one run. A revision with neither is reported.
VALIDATE = (("pipeline.config.load", "validate_dict"), ("pipeline.config", "validate_dict"))
# The newest layout has no run_settings function: a run's resolved settings are its RunConfig's dict.
SETTINGS = (("pipeline.config.runs", "RunConfig"), ("pipeline.config.runs", "run_settings"), ("pipeline.runs", "run_settings"))


def settings_of(found: Any) -> Any:
    """``(params, task, method, seed) -> dict`` from what :func:`find` found (a function, or the RunConfig class)."""
    if isinstance(found, type):
        return lambda params, task, method, seed: found.from_params(params, task, method, seed).to_dict()
    return found


def find(candidates: tuple[tuple[str, str], ...]) -> Any:
    for module, name in candidates:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue  # the module is not in this revision's layout
            raise
        if hasattr(mod, name):
            return getattr(mod, name)
    raise LookupError(
        f"none of {', '.join(f'{m}.{n}' for m, n in candidates)} in this revision: add its location to pipeline/science/pinned.py"
    )


def key(settings: dict[str, Any], params: Any, tree: str) -> str:
    """sha256 of what determines a run's numbers: its resolved settings, data/base/eval sections, the code."""
    data = params.data.model_dump(mode="json")
    data.pop("tasks", None), data.pop("eval_tasks", None)  # which tasks run is the run's own task
    return hashlib.sha256(
        json.dumps(
            {
                "run": settings,
                "data": data,
                "base": params.base.model_dump(mode="json"),
                "eval": params.eval.model_dump(mode="json"),
                "code_tree": tree,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    try:
        request = json.load(sys.stdin)
        root = Path.cwd().resolve()
        validate, run_settings = find(VALIDATE), settings_of(find(SETTINGS))
        for pkg in ("pipeline", "bilora"):
            where = Path(importlib.import_module(pkg).__file__ or "").resolve()
            if root not in where.parents:
                raise ImportError(f"{pkg} was imported from {where}, not from the revision's tree {root}")
        resolved = []
        for r in request["runs"]:
            params = validate(r["params"], r["source"])
            settings = run_settings(params, r["task"], r["method"], r["seed"])
            resolved.append({"hash": key(settings, params, request["tree"]), "settings": settings})
    except Exception as e:  # the revision's own UserError among them: its message is what the user needs
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}), encoding="utf-8")
        sys.exit(1)
    out.write_text(json.dumps(resolved), encoding="utf-8")


if __name__ == "__main__":
    main()
