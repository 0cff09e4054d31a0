"""A tiny resumable training run, started as a subprocess by the robustness tests.

    python tests/helpers/train_worker.py METHOD CKPT_DIR OUT_DIR [--steps N] [--sleep S] [--nan-at K]
                                         [--fingerprint F]

Trains tiny_bert (tests/tiny.py) with FineTuner (checkpoint_every=2), prints the resume note as
``RESUME: <note>`` and, on success, writes ``OUT_DIR/adapters.safetensors`` (every adapter tensor,
primary and auxiliary, via bilora.checkpoint.adapter_state) and ``OUT_DIR/export`` (method.export).
``--sleep`` pauses after every optimizer step so a test can SIGKILL the process mid-run;
``--nan-at K`` makes the loss NaN from optimizer step K on (1-based), through a forward hook.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bilora import checkpoint, methods  # noqa: E402
from bilora.train import FineTuner, LoopConfig  # noqa: E402
from pipeline.terminal.user_error import cli  # noqa: E402
from tiny import cls_examples, collate, peft_bert  # noqa: E402

CFG = {"lora": {}, "bilora": {"rho": 0.05, "aux_rank": 4, "aux_alpha": 8.0}, "flat_lora": {"sigma": 0.05}, "lora_sam": {"rho": 0.01}}


@cli
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("ckpt_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--nan-at", type=int, default=0)
    ap.add_argument("--fingerprint", default="fixed-fp")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = peft_bert(seed=0)
    method = methods.build(a.method, CFG.get(a.method, {}), seed=0)
    loop = LoopConfig(batch_size=4, lr=5e-3, max_steps=a.steps, checkpoint_every=2, log_every=1, warmup_ratio=0.1)
    ft: FineTuner | None = None

    def on_step(step: int, total: int) -> None:
        print(f"STEP {step}", flush=True)
        if a.sleep:
            time.sleep(a.sleep)

    ft = FineTuner(
        model, method, cls_examples(40), collate, loop, seed=0, checkpoint_dir=a.ckpt_dir, fingerprint=a.fingerprint, on_step=on_step
    )
    if a.nan_at:

        def poison(module, args, output):  # NaN logits from optimizer step nan_at on
            if ft.step + 1 >= a.nan_at:
                output.logits = output.logits * float("nan")
            return output

        model.register_forward_hook(poison)
    ft.try_resume()
    print(f"RESUME: {ft.resume_note}", flush=True)
    if a.method == "bilora":  # the auxiliary adapter must be trainable, fresh or resumed
        from bilora import adapters

        aux = adapters.adapter_parameters(model, adapters.AUX)
        print(f"AUX_TRAINABLE: {bool(aux) and all(p.requires_grad for p in aux)}", flush=True)
    ft.train()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint.adapter_state(model), str(out / "adapters.safetensors"))
    method.export(model, out / "export")
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
