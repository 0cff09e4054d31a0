"""DVC stage ``configure``: one resolved settings file per fine-tuning run (``artifacts/runs/``).

Cheap (no model, no data): it validates params.yaml and writes ``<task>-<method>-<seed>.json``
for each run of the matrix (pipeline/config/runs.py). ``finetune@<run>`` depends on its own file, not on
the ``train`` sections, so a change to one method's settings re-trains only that method's runs.
"""

from __future__ import annotations

# Each run's resolved settings come from the library's settings classes. The schema's imports of them are
# not followed for DVC deps (pipeline/deps.py EXCLUDED): importing them here makes them this stage's deps.
import bilora.config  # noqa: F401
from pipeline.stage import layout
from pipeline.config import runs
from pipeline.terminal.console import info
from pipeline.terminal.user_error import cli
from pipeline.stage.runner import Stage


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("configure", __doc__, argv)
    p = stage.params
    stage.header(f"{len(p.data.tasks)} task(s) x {len(p.train.methods)} method(s) x {len(p.train.seeds)} seed(s)")
    with stage.output(layout.RUNS) as tmp:  # no tracker: no run_info.json
        names = runs.write_all(p, tmp)
    info(f"{len(names)} run settings file(s) in {layout.RUNS}")


if __name__ == "__main__":
    main()
