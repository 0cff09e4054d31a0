"""``python -m pipeline.plots [-o reports/plots]``: render ``dvc plots show`` as HTML that works offline.

The page uses a local template whose ``<script src>`` tags point at vega, vega-lite and vega-embed
copied beside it (``pipeline/vega/``), instead of DVC's default CDN links.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.terminal.console import console
from pipeline.terminal.user_error import UserError, cli

VEGA = Path(__file__).parent / "vega"
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")


def render(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    r = subprocess.run(
        [dvc, "plots", "show", "--html-template", str(VEGA / "offline_template.html"), "-o", str(out)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise UserError(f"dvc plots show failed: {(r.stderr or r.stdout).strip()[:500]} (run the pipeline first: python -m pipeline.run)")
    for f in SCRIPTS:
        shutil.copy(VEGA / f, out / f)
    return out / "index.html"


@cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--out", default="reports/plots")
    args = ap.parse_args(argv)
    page = render(Path(args.out))
    console.print(f"[green]offline plots[/] -> {page}")


if __name__ == "__main__":
    main()
