"""Run a real stage entry point with one fault injected, for the robustness tests.

    python tests/helpers/run_patched.py FAULT STAGE [stage args...]

FAULT is one of:
  nan:K            the training loss becomes NaN from optimizer step K on (1-based)
  kill-in-atomic   SIGKILL this process inside bilora.io.atomic_dir, after part of the output
                   (everything but stats.json / summary.json / quant_report.json) is written
The stage then runs exactly as ``python -m stages.STAGE`` would (runpy, ``__main__``).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    fault, stage, *rest = sys.argv[1:]
    if fault.startswith("nan:"):
        k = int(fault.split(":")[1])
        from bilora.methods.method import StepContext

        orig = StepContext.loss

        def loss(self, batch):
            out = orig(self, batch)
            return out * float("nan") if self.step + 1 >= k else out

        StepContext.loss = loss
    elif fault == "kill-in-atomic":
        import bilora.io

        orig_write = bilora.io.atomic_write_json

        def write(path, obj):
            path = Path(path)
            if path.name in ("stats.json", "summary.json", "quant_report.json") and ".tmp-" in path.parent.name:
                os.kill(os.getpid(), signal.SIGKILL)
            orig_write(path, obj)

        bilora.io.atomic_write_json = write  # the stages import it by name, after this
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    sys.argv = [f"stages.{stage}", *rest]
    runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
