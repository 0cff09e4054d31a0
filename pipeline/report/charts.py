"""The report's figures (PNG) and the per-run loss histories for ``dvc plots``."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bilora.io import atomic_dir, atomic_write_json  # noqa: E402
from bilora.sharpness.result import SharpnessResult  # noqa: E402
from pipeline.stage import layout  # noqa: E402
from pipeline.config.schema import Params  # noqa: E402
from pipeline.report.collect import Collected  # noqa: E402
from pipeline.data.catalog import get_task  # noqa: E402

SHARPNESS_FILES = ("attack_curves.png", "landscape_1d.png", "metric_vs_sharpness.png")


def save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_losses(p: Params, histories: dict, path: Path) -> None:
    """Training loss (moving average over ~4% of the run), mean over seeds with the min-max band (trained tasks: eval-only ones train nothing)."""
    tasks = p.data.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in p.train.methods:
            curves = []
            for seed in p.train.seeds:
                h = histories[layout.run_name(task, method, seed)]
                loss = [x["loss"] for x in h]
                k = max(1, len(loss) // 25)
                curves.append(([x["step"] for x in h], [statistics.fmean(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]))
            n = min(len(c[1]) for c in curves)
            steps = curves[0][0][:n]
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
            line = ax.plot(steps, mean, label=f"{method} (mean of {len(curves)} seed(s))")[0]
            if len(curves) > 1:
                ax.fill_between(
                    steps,
                    [min(c[1][i] for c in curves) for i in range(n)],
                    [max(c[1][i] for c in curves) for i in range(n)],
                    color=line.get_color(),
                    alpha=0.15,
                )
        ax.set_title(f"{task}: training loss (moving average)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    save(fig, path)


PERTURBATION_FILE = "perturbation.png"


def _sig(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits: the figure must not change with the CPU class (the diagnostics
    are differences of nearly equal losses, so their last committed digits are not shared across classes)."""
    return float(f"{x:.{digits - 1}e}")


def _series(histories: dict, name: str, key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    h = [x for x in histories.get(name, []) if key in x]
    return [x["step"] for x in h], [_sig(scale * x[key]) for x in h]


def plot_perturbation(p: Params, histories: dict, path: Path) -> bool:
    """Per task: how much each method's perturbation raises the same-batch loss (%) and its alignment with the
    full-weight gradient, over training, one line per method (seed: the first); Bi-LoRA's free first-order
    estimate dashed. False (a placeholder figure) when no run measured a perturbation (docs/perturbation.md)."""
    tasks = p.data.tasks
    seed = p.train.seeds[0]
    measured = [
        m for m in p.train.methods for t in tasks if _series(histories, layout.run_name(t, m, seed), "perturbation.loss_increase")[0]
    ]
    if not measured:  # still write the declared output, saying why it is empty
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no perturbation measured (no perturbing method, or train.loop.perturbation_every: 0)", ha="center", va="center")
        save(fig, path)
        return False
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for method in dict.fromkeys(measured):
            name = layout.run_name(task, method, seed)
            line = row[0].plot(*_series(histories, name, "perturbation.relative_increase", 100), marker="o", ms=3, label=method)[0]
            free = _series(histories, name, "aux.relative_first_order_increase", 100)
            if free[0]:
                row[0].plot(*free, ls="--", lw=0.8, color=line.get_color(), label=f"{method}: first-order, every step")
            row[1].plot(*_series(histories, name, "perturbation.alignment"), marker="o", ms=3, color=line.get_color(), label=method)
        row[0].set_title(f"{task}: same-batch loss increase from the perturbation (seed {seed})")
        row[0].set_ylabel("% of the clean loss")
        row[1].set_title(f"{task}: alignment with the full-weight gradient (1 = SAM's direction)")
        row[1].set_ylabel("cosine")
        for ax in row:
            ax.set_xlabel("optimizer step")
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=8)
    save(fig, path)
    return True


def write_histories(histories: dict, out_dir: Path) -> None:
    """One JSON per run ([{step, loss}, ...]) for ``dvc plots show`` (dvc.yaml ``plots:``)."""
    with atomic_dir(out_dir) as tmp:
        for name, h in histories.items():
            atomic_write_json(tmp / f"{name}.json", [{"step": int(x["step"]), "loss": x["loss"]} for x in h])


def _grid(p: Params, spaces: list[str]):
    return plt.subplots(len(p.data.evaluated), len(spaces), figsize=(6 * len(spaces), 4 * len(p.data.evaluated)), squeeze=False)


def _runs(p: Params, sharpness: dict[str, SharpnessResult], task: str, method: str) -> list[SharpnessResult]:
    return [r for s in p.train.seeds if (r := sharpness.get(layout.run_name(task, method, s)))]


def _attack_curves(p: Params, sharpness: dict[str, SharpnessResult], spaces: list[str], path: Path) -> None:
    """Task metric vs alpha, mean over seeds."""
    fig, axes = _grid(p, spaces)
    for i, task in enumerate(p.data.evaluated):
        main = get_task(task, p.data).main_metric
        for j, space in enumerate(spaces):
            ax = axes[i][j]
            for method in p.train.methods:
                runs = [r for r in _runs(p, sharpness, task, method) if r.spaces[space].attack]
                if not runs:
                    continue
                alphas = [pt.alpha for pt in runs[0].spaces[space].attack.points]
                vals = [
                    statistics.fmean(r.spaces[space].attack.points[k].metrics.get(main, float("nan")) for r in runs)
                    for k in range(len(alphas))
                ]
                ax.plot(alphas, vals, marker="o", label=method)
            ax.set_title(f"{task}: worst-case attack, {space} space")
            ax.set_xlabel("alpha (step along grad/||grad||)")
            ax.set_ylabel(main)
            ax.legend(fontsize=8)
    save(fig, path)


def _landscapes(p: Params, sharpness: dict[str, SharpnessResult], spaces: list[str], path: Path) -> None:
    """1-D loss landscape along a random filter-normalised direction, mean over seeds."""
    fig, axes = _grid(p, spaces)
    for i, task in enumerate(p.data.evaluated):
        for j, space in enumerate(spaces):
            ax = axes[i][j]
            for method in p.train.methods:
                runs = [r for r in _runs(p, sharpness, task, method) if r.spaces[space].curve]
                if not runs:
                    continue
                ts = [c[0] for c in runs[0].spaces[space].curve]
                ls = [statistics.fmean(r.spaces[space].curve[k][1] for r in runs) for k in range(len(ts))]
                ax.plot(ts, ls, marker=".", label=method)
            ax.set_title(f"{task}: 1-D loss landscape, {space} space")
            ax.set_xlabel("t (fraction of each row norm)")
            ax.set_ylabel("loss")
            ax.legend(fontsize=8)
    save(fig, path)


def _metric_vs_sharpness(p: Params, data: Collected, space: str, path: Path) -> None:
    """Test metric vs random sharpness at the largest radius, one point per run."""
    fig, axes = plt.subplots(1, len(p.data.evaluated), figsize=(6 * len(p.data.evaluated), 4), squeeze=False)
    for ax, task in zip(axes[0], p.data.evaluated):
        main = get_task(task, p.data).main_metric
        for method in p.train.methods:
            xs, ys = [], []
            test = data.groups[(task, method)].test[main]  # seed order
            for s, y in zip(p.train.seeds, test):
                r = data.sharpness.get(layout.run_name(task, method, s))
                if not r or not r.spaces[space].random.radii:
                    continue
                xs.append(r.spaces[space].random.radii[-1].mean)
                ys.append(y)
            ax.scatter(xs, ys, label=method)
        ax.set_title(f"{task}: test metric vs random sharpness ({space})")
        ax.set_xlabel("mean loss increase at the largest radius")
        ax.set_ylabel(main)
        ax.legend(fontsize=8)
    save(fig, path)


def plot_sharpness(p: Params, data: Collected, out_dir: Path) -> list[str]:
    """Attack curves, 1-D landscape curves and metric-vs-sharpness scatter; returns the file names written."""
    if not data.sharpness:  # measurement disabled: still write the declared outputs, saying why they are empty
        for f in SHARPNESS_FILES:
            fig, ax = plt.subplots(figsize=(6, 2))
            ax.axis("off")
            ax.text(0.5, 0.5, "no sharpness measured (eval.sharpness.enabled: false)", ha="center", va="center")
            save(fig, out_dir / f)
        return []
    spaces = list(next(iter(data.sharpness.values())).spaces)
    _attack_curves(p, data.sharpness, spaces, out_dir / SHARPNESS_FILES[0])
    _landscapes(p, data.sharpness, spaces, out_dir / SHARPNESS_FILES[1])
    _metric_vs_sharpness(p, data, "full" if "full" in spaces else spaces[0], out_dir / SHARPNESS_FILES[2])
    return list(SHARPNESS_FILES)
