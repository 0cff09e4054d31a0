"""DVC stage ``merge``: fold the chosen run's primary adapter into a full-precision copy of the base and verify it."""

from __future__ import annotations

from pipeline.stage import layout, merging
from pipeline.stage.runner import Stage
from pipeline.terminal.console import console
from pipeline.terminal.user_error import cli


@cli
def main(argv: list[str] | None = None) -> None:
    stage = Stage("merge", __doc__, argv)
    p = stage.params
    name = merging.name_of(p.merge)
    stage.header(f"{name} mode={p.merge.mode}")
    tracker = stage.track(merging.params(p), tags=merging.tags(p.merge), run_name=f"merge@{name}")
    with tracker, stage.output(layout.MERGED) as tmp:
        if p.merge.mode == "none":
            merging.skip(tmp, name)
            return
        target = merging.target(p)
        merged = merging.merged_model(p, target)
        tokenizer = merging.tokenizer()
        batch = merging.check_batch(target, tokenizer, p.merge.check_examples)  # held-out test inputs
        report = merging.agreement(tracker, p, target, merged, batch)
        merging.save(tmp, target, merged, tokenizer, batch, report)
        merging.log(tracker, p, target, merged, tokenizer, report)
    console.print(f"[green]merged[/] {name} -> {layout.MERGED / 'model'}")


if __name__ == "__main__":
    main()
