"""Tiny data-parallel training run for the scale-out tests.

    python tests/helpers/ddp_worker.py METHODS OUT_DIR                       # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/helpers/ddp_worker.py METHODS OUT_DIR

METHODS is a comma-separated list, trained one after the other in the same processes (one launch
for all: the launch, not the training, is what costs). For each method: tiny_bert (dropout 0)
trained with FineTuner on 32 examples, global micro-batch 8, 2 micro-batches per step, 4 steps,
from the same seeds; every rank writes ``OUT_DIR/<method>/rank<r>.safetensors`` (all adapter
tensors, auxiliary included) and ``OUT_DIR/<method>/rank<r>.json`` (the loss history).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bilora import checkpoint, distributed, methods  # noqa: E402
from bilora.train import FineTuner, LoopConfig  # noqa: E402
from tiny import cls_examples, collate, peft_bert  # noqa: E402

CFG = {"lora": {}, "bilora": {"rho": 0.05, "aux_rank": 4, "aux_alpha": 8.0}, "flat_lora": {"sigma": 0.05}, "lora_sam": {"rho": 0.05}}


def train(method_name: str, out: Path) -> None:
    model = peft_bert(seed=0)
    method = methods.build(method_name, CFG.get(method_name, {}), seed=0)
    loop = LoopConfig(batch_size=8, grad_accum=2, lr=5e-3, max_steps=4, checkpoint_every=0, log_every=1, warmup_ratio=0.1)
    ft = FineTuner(model, method, cls_examples(32), collate, loop, seed=0)
    ft.train()
    out.mkdir(parents=True, exist_ok=True)
    r = distributed.rank()
    save_file({k: v.contiguous() for k, v in checkpoint.adapter_state(model).items()}, str(out / f"rank{r}.safetensors"))
    (out / f"rank{r}.json").write_text(json.dumps({"world": distributed.world_size(), "loss": [h["loss"] for h in ft.history]}))


def main() -> None:
    names, out = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    distributed.init_from_env("gloo")
    for name in names:
        train(name, out / name)
    distributed.shutdown()


if __name__ == "__main__":
    main()
