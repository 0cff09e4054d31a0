"""BiLoRA, bi-level (Qiang, Zhang, Xie, arXiv 2403.13037): ΔW = P·Λ·Q trained on two data splits.

Not to be confused with Bi-LoRA (``bilora``, an ascending auxiliary adapter): this method is about
overfitting, not sharpness. Each adapted layer carries an AdaLoRA-style pseudo-SVD

    h = W0 x + s · P diag(Λ) Q x,   P = lora_B (m, r),  Q = lora_A (r, n),  Λ ∈ R^r (real-valued)

On PEFT, P and Q are the primary adapter's ``lora_B`` / ``lora_A``; Λ is one extra parameter per
layer (initialised to ones, so at init the model equals standard LoRA) applied by a forward pre-hook
on ``lora_B["default"]`` that multiplies its input (the r-dim output of A) by Λ. The Λ parameters are
owned by the method, not registered on the model: PEFT (0.21) saves *every* tensor on a LoRA layer,
so a registered Λ would leak into the adapter file. Consequences: Λ is checkpointed through the
method's ``state_dict`` (with its AdamW state), ``model.to(device)`` after ``prepare`` does not move Λ,
and an adapter written with plain ``save_pretrained`` instead of :meth:`BilevelLoRA.export` lacks Λ.

Training set: split once into disjoint D1 (fraction ``split_ratio``) and D2 by a permutation from a
private generator seeded by the run seed. The loop draws its batches from D1 (``train_indices``,
so an "epoch" of the loop is a pass over D1); the method draws D2 batches itself (``batch_size ×
grad_accum`` examples per upper step, a seeded stream over D2) through the ``bind_data`` hook of
:class:`bilora.train.FineTuner`. On an upper step the loop's D1 micro-batches for that step are not
used, so the lower level sees T1/(T1+T2) of the loop's D1 batches (a different subset each epoch).
The logged ``loss`` is the step's own level loss (D1 on lower, D2 on upper steps; ``upper`` flags which).

Alternation, one loop optimizer step = one level step, by ``t % (T1 + T2) < T1``:

* lower (T1 = ``lower_steps``): update P, Q and the task head (the loop's AdamW, its schedule, its
  gradient clipping) on a D1 batch with L(D1) + gamma1·R1, Λ frozen (no gradient computed);
  R1 = Σ_l ||PᵀP − I||_F² + ||QQᵀ − I||_F² (AdaLoRA form, docs/methods.md, "Bi-level BiLoRA").
* upper (T2 = ``upper_steps``): update Λ only, on a D2 batch, with L(D2) + gamma2·R2, R2 = Σ_l ||Λ_l||²
  (our choice: the paper does not give R2's form). Λ has its own AdamW (lr ``upper_lr``, constant,
  weight decay 0) whose state lives in this method's ``state_dict``. The hypergradient is
  **first-order** (DARTS first-order: ∂L(D2)/∂Λ at the current P, Q), not the one-step unroll of
  docs/methods.md, "Bi-level BiLoRA"; P, Q, the head, their AdamW moments and weight decay are untouched on upper
  steps. The loop's LR scheduler still advances every step, so the lower lr stays a function of the
  global step.

Every setting is explicit and our choice; the paper publishes no split ratio, T1/T2, gamma or lr,
so results with this method are an **unverified protocol** (docs/methods.md, "Bi-level BiLoRA").

Export: a plain PEFT LoRA adapter with B = P·diag(Λ), A = Q, written by PEFT's ``save_pretrained``
and then folded in the written file; the training model is never modified. PEFT's own merge of the
*training* model (``merge_and_unload``) would ignore Λ: merge the exported adapter instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bilora import adapters
from bilora import layers
from bilora.methods.method import Method, NonFiniteError, StepContext, register
from bilora.config import BilevelLoraConfig


def lambda_layers(model: torch.nn.Module, adapter: str = adapters.PRIMARY) -> list[tuple[str, torch.nn.Module]]:
    """(module name, LoRA layer) for every layer of ``adapter``, in the fixed registration order."""
    return adapters.adapter_layers(model, adapter)


def orthogonality_penalty(model: torch.nn.Module, adapter: str = adapters.PRIMARY) -> torch.Tensor:
    """R1 = Σ_l ||PᵀP − I_r||_F² + ||QQᵀ − I_r||_F² with P = lora_B (m, r), Q = lora_A (r, n); differentiable."""
    total = None
    for _, layer in lambda_layers(model, adapter):
        q = layer.lora_A[adapter].weight  # (r, n)
        p = layer.lora_B[adapter].weight  # (m, r)
        eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
        term = (p.T @ p - eye).pow(2).sum() + (q @ q.T - eye).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("bilevel_lora: the model has no LoRA layers")
    return total


def split_indices(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint (D1, D2) covering range(n), |D1| = round(ratio·n) clamped to [1, n−1]; sorted lists."""
    if n < 2:
        raise ValueError(f"bilevel_lora: need at least 2 training examples to split, got {n}")
    gen = torch.Generator().manual_seed(seed * 1000003 + 424242)
    perm = torch.randperm(n, generator=gen).tolist()
    n1 = min(max(int(round(ratio * n)), 1), n - 1)
    return sorted(perm[:n1]), sorted(perm[n1:])


@register("bilevel_lora", config=BilevelLoraConfig)
class BilevelLoRA(Method):
    """Bi-level BiLoRA: P, Q (and head) on D1 at the lower level, Λ on D2 at the upper level (first-order)."""

    passes_per_step = 1
    notes = {
        "lambda_form": "real",
        "r2": "gamma2 * sum ||lambda||^2",
        "hypergradient": "first_order",
        "protocol": "unverified (paper publishes no split ratio, T1/T2, gamma or lr)",
        "export": "B = P diag(lambda), A = Q",
    }
    cfg: BilevelLoraConfig
    split_ratio: float
    lower_steps: int
    upper_steps: int
    gamma1: float
    gamma2: float
    upper_lr: float

    def __init__(self, cfg: BilevelLoraConfig | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(cfg, seed=seed, **overrides)
        self.d1: list[int] | None = None  # D1: the loop's pool (train_indices)
        self.upper_indices: list[int] = []  # D2
        self.lower_done = 0
        self.upper_done = 0
        self.upper_optimizer: torch.optim.Optimizer | None = None
        self._lambdas: list[torch.nn.Parameter] = []
        self._lambda_names: list[str] = []  # module name of each Λ's LoRA layer
        self._hooks: list[Any] = []
        self._fetch: Callable[[list[int]], dict[str, torch.Tensor]] | None = None
        self._batch_size = 0
        self._grad_accum = 1
        self._perm_cache: tuple[int, list[int]] | None = None

    # -- data -------------------------------------------------------------------------------
    def split_train(self, n: int) -> None:
        self.d1, self.upper_indices = split_indices(n, self.cfg.split_ratio, self.seed)

    def train_indices(self) -> Sequence[int] | None:
        return self.d1

    def bind_data(self, fetch: Callable[[list[int]], dict[str, torch.Tensor]], loop: Any) -> None:
        """Called by the loop: ``fetch(dataset_indices)`` returns a collated batch; ``loop`` gives sizes."""
        self._fetch = fetch
        self._batch_size = int(loop.batch_size)
        self._grad_accum = int(loop.grad_accum)

    def _d2_order(self, epoch: int) -> list[int]:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1000003 + epoch) * 7 + 5)
            self._perm_cache = (epoch, torch.randperm(len(self.upper_indices), generator=gen).tolist())
        return self._perm_cache[1]

    def upper_batch_indices(self, u: int) -> list[list[int]]:
        """Dataset indices of the D2 micro-batches of upper step ``u`` (0-based): a pure function of (seed, u).

        D2 is read as an endless stream of seeded per-epoch permutations, ``batch_size × grad_accum``
        examples per upper step (an example may repeat within a step when D2 is smaller than that).
        """
        n2, per = len(self.upper_indices), self._batch_size * self._grad_accum
        flat = []
        for j in range(u * per, (u + 1) * per):
            epoch, pos = divmod(j, n2)
            flat.append(self.upper_indices[self._d2_order(epoch)[pos]])
        return [flat[k : k + self._batch_size] for k in range(0, per, self._batch_size)]

    # -- schedule ---------------------------------------------------------------------------
    def is_lower(self, step: int) -> bool:
        return step % (self.cfg.lower_steps + self.cfg.upper_steps) < self.cfg.lower_steps

    def counts_before(self, step: int) -> tuple[int, int]:
        """(lower steps, upper steps) taken before loop step ``step``."""
        period = self.cfg.lower_steps + self.cfg.upper_steps
        cycles, within = divmod(step, period)
        return cycles * self.cfg.lower_steps + min(within, self.cfg.lower_steps), cycles * self.cfg.upper_steps + max(
            0, within - self.cfg.lower_steps
        )

    # -- model ------------------------------------------------------------------------------
    def prepare(self, model: PeftModel) -> None:
        layers = lambda_layers(model)
        if not layers:
            raise ValueError("bilevel_lora: the model has no LoRA layers")
        if self._lambdas:
            raise RuntimeError("bilevel_lora: prepare(model) called twice")
        for name, layer in layers:
            b = layer.lora_B[adapters.PRIMARY].weight
            lam = torch.nn.Parameter(torch.ones(b.shape[1], dtype=b.dtype, device=b.device))
            self._hooks.append(layer.lora_B[adapters.PRIMARY].register_forward_pre_hook(_scale_by(lam)))
            self._lambdas.append(lam)
            self._lambda_names.append(name)
        self.upper_optimizer = torch.optim.AdamW(self._lambdas, lr=self.cfg.upper_lr, weight_decay=0.0)

    def lambdas(self) -> dict[str, torch.nn.Parameter]:
        """Λ per adapted layer (module name -> (r,) parameter), in layer order."""
        return dict(zip(self._lambda_names, self._lambdas))

    def remove_hooks(self) -> None:
        """Detach Λ from the model (the model then computes plain P·Q again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def lower_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """P, Q and the trainable head: everything trainable except Λ (and any Bi-LoRA auxiliary)."""
        lam_ids = {id(p) for p in self._lambdas}
        return [p for p in adapters.primary_parameters(model) if id(p) not in lam_ids]

    def param_groups(self, model: PeftModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": self.lower_parameters(model), "lr": lr, "weight_decay": weight_decay, "name": "lower"}]

    # -- steps ------------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> dict[str, float]:
        if self.upper_optimizer is None:
            raise RuntimeError("bilevel_lora: prepare(model) was not called")
        self.lower_done, self.upper_done = self.counts_before(ctx.step)
        if self.is_lower(ctx.step):
            return self._lower_step(ctx)
        return self._upper_step(ctx)

    def _lower_step(self, ctx: StepContext) -> dict[str, float]:
        for lam in self._lambdas:
            lam.requires_grad_(False)  # Λ frozen: no gradient computed for it
        try:
            loss = ctx.forward_backward()
            r1 = 0.0
            if self.cfg.gamma1:
                reg = orthogonality_penalty(ctx.model)
                (self.cfg.gamma1 * reg).backward()
                r1 = float(reg.detach())
        finally:
            for lam in self._lambdas:
                lam.requires_grad_(True)
        grad_norm = ctx.clip_and_step(self.lower_parameters(ctx.model), loss + self.cfg.gamma1 * r1)
        self.lower_done += 1
        return {"loss": loss, "grad_norm": grad_norm, "reg_r1": r1, "upper": 0.0}

    def _upper_step(self, ctx: StepContext) -> dict[str, float]:
        if self._fetch is None:
            raise RuntimeError("bilevel_lora: no D2 data; the training loop must call bind_data(fetch, loop)")
        batches = [self._fetch(idx) for idx in self.upper_batch_indices(self.upper_done)]
        frozen = [p for p in self.lower_parameters(ctx.model) if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)  # P, Q, head: no gradient, so the loop optimizer sees nothing
        try:
            loss = ctx.forward_backward(batches)
            r2 = 0.0
            if self.cfg.gamma2:
                reg = torch.stack([lam.pow(2).sum() for lam in self._lambdas]).sum()
                (self.cfg.gamma2 * reg).backward()
                r2 = float(reg.detach())
        finally:
            for p in frozen:
                p.requires_grad_(True)
        norm = layers.grad_norm(self._lambdas)
        total = loss + self.cfg.gamma2 * r2
        if not (math.isfinite(total) and torch.isfinite(norm)):
            raise NonFiniteError(f"non-finite value at optimizer step {ctx.step + 1} (upper level): loss={total}, grad_norm={norm.item()}")
        if ctx.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._lambdas, ctx.max_grad_norm)
        self.upper_optimizer.step()
        self.upper_optimizer.zero_grad(set_to_none=True)
        ctx.scheduler.step()  # keep the lower level's lr a function of the global step
        self.upper_done += 1
        lam_all = torch.cat([lam.detach().float() for lam in self._lambdas])
        return {
            "loss": loss,
            "grad_norm": float(norm),
            "reg_r2": r2,
            "upper": 1.0,
            "lambda_mean": float(lam_all.mean()),
            "lambda_min": float(lam_all.min()),
        }

    # -- state, config, export --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "lambdas": [lam.detach().clone() for lam in self._lambdas],
            "upper_optimizer": self.upper_optimizer.state_dict() if self.upper_optimizer is not None else {},
            "lower_done": self.lower_done,
            "upper_done": self.upper_done,
            "n_d1": len(self.d1 or []),
            "n_d2": len(self.upper_indices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if (int(state["n_d1"]), int(state["n_d2"])) != (len(self.d1 or []), len(self.upper_indices)):
            raise ValueError("bilevel_lora: checkpoint was made with a different D1/D2 split")
        saved = state["lambdas"]
        if [tuple(t.shape) for t in saved] != [tuple(lam.shape) for lam in self._lambdas]:
            raise ValueError("bilevel_lora: checkpoint Λ shapes do not match the model's LoRA layers")
        with torch.no_grad():
            for lam, value in zip(self._lambdas, saved):
                lam.copy_(value)
        if self.upper_optimizer is not None and state.get("upper_optimizer"):
            self.upper_optimizer.load_state_dict(state["upper_optimizer"])
        self.lower_done = int(state["lower_done"])
        self.upper_done = int(state["upper_done"])

    def config(self) -> dict[str, Any]:
        return super().config() | {"seed": self.seed}

    def export(self, model: PeftModel, out_dir: str | Path) -> None:
        """Plain PEFT LoRA with Λ folded into B (B ← P·diag(Λ)); the model itself is not modified."""
        adapters.save_primary(model, out_dir)
        fold_into_saved(self.lambdas(), Path(out_dir) / "adapter_model.safetensors")


def _scale_by(lam: torch.nn.Parameter) -> Callable[..., tuple[torch.Tensor, ...]]:
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] * lam, *args[1:])  # (..., r) * (r,): P·diag(Λ) applied to Q x

    return hook


@torch.no_grad()
def fold_into_saved(lambdas_by_layer: dict[str, torch.Tensor], path: Path) -> None:
    """Rewrite the saved ``lora_B`` tensors of ``path`` as P·diag(Λ) (computed in float32, stored in the saved dtype).

    ``lambdas_by_layer`` maps a LoRA layer's module name (as in ``model.named_modules()``) to its Λ;
    PEFT saves that layer's B under ``<name>.lora_B.weight``. Every Λ must find its tensor.
    """
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    for name, lam in lambdas_by_layer.items():
        key = f"{name}.lora_B.weight"
        if key not in tensors:
            raise KeyError(f"bilevel_lora: {key} not in the saved adapter {path}")
        b = tensors[key]
        lam = lam.detach().to(device=b.device, dtype=torch.float32)
        tensors[key] = (b.to(torch.float32) * lam[None, :]).to(b.dtype).contiguous()
    save_file(tensors, str(path), metadata=metadata)
