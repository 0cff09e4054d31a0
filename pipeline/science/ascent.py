"""Exploratory (issue "Does the perturbation bite?", item 4): on ONE fixed batch, how adversarial does Bi-LoRA's
auxiliary become under today's AdamW-maximize ascent versus plain gradient ascent (the paper's Eq. 9), at the
same norm?

    python -m pipeline.science.ascent [--task mrpc] [--rho 0.05] [--steps 15] [--warm 40]

The primary LoRA is trained ``--warm`` steps in the pilot's regime (pipeline/science/pilot.py), then frozen.
The auxiliary starts from Bi-LoRA's init (A2 Kaiming-uniform, B2 = 0) and takes ``--steps`` ascent steps on
the fixed batch (eval mode: no dropout), each followed by a rescale of every (A2, B2) by sqrt(rho / c) so
that the global norm c of s2·B2A2 is exactly rho (the same norm for every optimizer; Bi-LoRA's projection
only shrinks). Optimizers: ``adamw`` = torch AdamW(maximize=True, weight_decay=0), Bi-LoRA's today;
``sgd`` = plain ascent B2 += lr·dL/dB2, A2 += lr·dL/dA2 (Eq. 9). After every step the diagnostics
(bilora/perturbation.py) measure the loss increase and the alignment on the same batch.
Writes reports/science/pilot/ascent-<task>-rho<rho>.json and prints a table.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pipeline.terminal.quiet import quiet

quiet()

import torch  # noqa: E402

from bilora.io import atomic_write_json  # noqa: E402
from pipeline.science import pilot  # noqa: E402

OPTIMIZERS = {
    "adamw lr=eta": ("adamw", 1.0),
    "adamw lr=10eta": ("adamw", 10.0),
    "sgd lr=100eta": ("sgd", 100.0),
    "sgd lr=1e4eta": ("sgd", 1e4),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.science.ascent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warm", type=int, default=40)
    ap.add_argument("--cache", default="~/.cache/bilora/pilot")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bilora import adapters, methods, perturbation
    from bilora.methods.bilora import aux_norm
    from bilora.methods.method import StepContext

    t0 = time.perf_counter()
    ft = pilot.fine_tuner(args.task, "lora", {}, args.warm, 0, pilot.base_dir(Path(args.cache).expanduser()))
    ft.train()  # the primary, trained then frozen
    model = ft.model
    batch = ft.micro_batches(0)[0]  # (32, L): the fixed batch
    bilora = methods.build("bilora", {"rho": args.rho}, seed=0)
    bilora.prepare(model)  # adds the auxiliary (private RNG: same init every time it is reset below)
    aux = adapters.adapter_parameters(model, adapters.AUX)
    init = [p.detach().clone() for p in aux]
    for p in adapters.primary_parameters(model):
        p.requires_grad_(False)
    factors = adapters.lora_factors(model, adapters.AUX)
    ctx = StepContext(
        model=model, optimizer=ft.optimizer, scheduler=ft.scheduler, micro_batches=[batch], step=0, max_steps=1, max_grad_norm=None
    )
    results = {}
    for label, (kind, mult) in OPTIMIZERS.items():
        with torch.no_grad():
            for p, p0 in zip(aux, init):
                p.copy_(p0)
        lr = mult * pilot.LR
        opt = (
            torch.optim.AdamW(aux, lr=lr, weight_decay=0.0, maximize=True)
            if kind == "adamw"
            else torch.optim.SGD(aux, lr=lr, maximize=True)
        )
        rows = []
        for step in range(1, args.steps + 1):
            model.eval()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                c = float(aux_norm(factors))
                if c > 0:
                    k = math.sqrt(args.rho / c)
                    for a, b, _ in factors:
                        a.mul_(k)
                        b.mul_(k)
            m = perturbation.measure(bilora, ctx)
            rows.append({"step": step, "norm_before_rescale": c, **m})
        results[label] = rows
        last = rows[-1]
        print(
            f"{label}: relative increase {100 * last['perturbation.relative_increase']:.2f} %, alignment {last.get('perturbation.alignment', float('nan')):.3f}, "
            f"rank ceiling {last.get('perturbation.rank_ceiling', float('nan')):.3f}",
            flush=True,
        )
    out = pilot.ROOT / f"ascent-{args.task}-rho{args.rho}.json"
    atomic_write_json(
        out,
        {
            "task": args.task,
            "rho": args.rho,
            "warm_steps": args.warm,
            "ascent_steps": args.steps,
            "eta": pilot.LR,
            "results": results,
            "wall_s": time.perf_counter() - t0,
            "machine": pilot.machine(),
            "code_rev": pilot.CODE_REV,
        },
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
