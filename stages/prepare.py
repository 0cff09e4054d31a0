"""DVC stage ``prepare``: raw benchmark files -> seeded train/validation/test splits, tokenized, saved with ``datasets``."""

from __future__ import annotations

from bilora.sources import BaseModelError, resolve
from bilora.io import atomic_write_json
from pipeline.stage import layout
from pipeline.data.catalog import get_task
from pipeline.terminal.console import info
from pipeline.data.prepare import prepare_task, tokenizer_for
from pipeline.terminal.user_error import UserError, cli
from pipeline.stage.runner import Stage


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("prepare", __doc__, argv)
    p = stage.params
    stage.header(f"tasks={','.join(p.data.tasks)}" + (f" eval-only={','.join(p.data.eval_tasks)}" if p.data.eval_tasks else ""))
    try:
        tokenizer = tokenizer_for(resolve(p.base.source, p.base.revision).path)
    except (BaseModelError, OSError) as e:
        raise UserError(f"base.source: cannot load the tokenizer: {e}") from None
    tracker = stage.track({"data": p.data.model_dump(), "base": p.base.model_dump()})
    all_stats = {}
    with tracker, stage.output(layout.DATA) as tmp:
        for name in p.data.evaluated:  # eval-only datasets: a test split only (empty train and validation)
            dd, stats = prepare_task(get_task(name, p.data), p.data, tokenizer)
            # An empty split (val_fraction 0) needs an explicit shard, or load_from_disk cannot read it back.
            dd.save_to_disk(str(tmp / name), num_shards={k: 1 for k, v in dd.items() if len(v) == 0})
            all_stats[name] = stats
            info(f"{name}: " + ", ".join(f"{k}={v}" for k, v in stats["rows"].items()))
            if any(stats.get("target_truncated", {}).values()) or any(stats.get("dropped", {}).values()):
                info(
                    f"{name}: targets cut by data.max_length={p.data.max_length}: {stats['target_truncated']}; examples dropped (no target token left): {stats['dropped']}"
                )
            tracker.log_metrics({f"{name}.{k}_rows": v for k, v in stats["rows"].items()})
        atomic_write_json(tmp / "stats.json", all_stats)
        tracker.log_dict(all_stats, "data_stats.json")


if __name__ == "__main__":
    main()
