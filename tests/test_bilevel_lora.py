"""Bi-level BiLoRA (Qiang et al.): data split, level alternation, Λ export, R1, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from bilora import adapters
from bilora.methods import build
from bilora.methods.bilevel_lora import orthogonality_penalty, split_indices
from bilora.train import FineTuner, LoopConfig
from tests.tiny import cls_examples, collate, peft_bert, tiny_bert


def examples(n: int = 40) -> list[dict]:
    return [dict(e, id=i) for i, e in enumerate(cls_examples(n))]


class Recorder:
    """A collate that remembers which example ids each batch held, grouped by optimizer step."""

    def __init__(self) -> None:
        self.steps: list[list[list[int]]] = [[]]

    def __call__(self, exs: list[dict]) -> dict[str, torch.Tensor]:
        self.steps[-1].append([e["id"] for e in exs])
        return collate(exs)

    def next_step(self, step: int, total: int) -> None:
        self.steps.append([])


def make_tuner(model, cfg: dict, *, steps: int = 6, seed: int = 0, weight_decay: float = 0.0, recorder=None, **kw) -> FineTuner:
    loop = LoopConfig(
        batch_size=4,
        grad_accum=1,
        max_steps=steps,
        lr=2e-2,
        weight_decay=weight_decay,
        warmup_ratio=0.0,
        log_every=100,
        **kw.pop("loop", {}),
    )
    method = build("bilevel_lora", cfg, seed=seed)
    return FineTuner(model, method, examples(), recorder or collate, loop, seed=seed, **kw)


def trainable(model, method=None) -> dict[str, torch.Tensor]:
    """Trainable model tensors (P, Q, head) plus, given the method, every Λ under ``lambda:<layer>``."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if method is not None:
        out.update({f"lambda:{n}": lam.detach().clone() for n, lam in method.lambdas().items()})
    return out


CFG = {"lower_steps": 2, "upper_steps": 1, "gamma1": 0.1, "gamma2": 0.01, "upper_lr": 5e-2}


# -- split ---------------------------------------------------------------------------------------
def test_split_is_disjoint_covering_and_seeded():
    d1, d2 = split_indices(40, 0.8, seed=0)
    assert not set(d1) & set(d2) and sorted(d1 + d2) == list(range(40))
    assert (len(d1), len(d2)) == (32, 8)
    assert (d1, d2) == split_indices(40, 0.8, seed=0)
    assert d1 != split_indices(40, 0.8, seed=1)[0]
    assert [len(x) for x in split_indices(3, 0.99, seed=0)] == [2, 1]  # both sides non-empty
    with pytest.raises(ValueError):
        build("bilevel_lora", {"split_ratio": 1.0})


def test_lower_steps_read_d1_and_upper_steps_read_d2():
    rec = Recorder()
    tuner = make_tuner(peft_bert(), CFG, steps=9, recorder=rec, on_step=rec.next_step)
    method = tuner.method
    d1, d2 = set(method.train_indices()), set(method.upper_indices)
    assert tuner.n_train == len(d1) == 32
    tuner.train()
    upper_ids = []
    for step, batches in enumerate(rec.steps[:9]):
        # the loop always collates its D1 batch; an upper step then draws (and uses) a D2 batch of its own
        assert set(batches[0]) <= d1, step
        if method.is_lower(step):
            assert len(batches) == 1, step
        else:
            assert len(batches) == 2 and set(batches[1]) <= d2, step
            upper_ids += batches[1]
    assert len(upper_ids) == 12 and set(upper_ids) == d2  # 3 upper steps x 4: a full pass over |D2| = 8, then more


# -- alternation ---------------------------------------------------------------------------------
def test_lambda_moves_only_on_upper_steps_and_p_q_head_only_on_lower():
    model = peft_bert()
    snaps = []
    tuner = make_tuner(model, CFG, steps=6, weight_decay=0.1, on_step=lambda s, t: snaps.append(trainable(model, tuner.method)))
    snaps.insert(0, trainable(model, tuner.method))
    assert all(torch.equal(lam, torch.ones_like(lam)) for lam in tuner.method.lambdas().values())
    tuner.train()
    lam_keys = {k for k in snaps[0] if k.startswith("lambda:")}
    lower_keys = set(snaps[0]) - lam_keys
    assert lam_keys and any("classifier" in k for k in lower_keys) and any("lora_A" in k for k in lower_keys)
    for step in range(6):
        before, after = snaps[step], snaps[step + 1]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        if tuner.method.is_lower(step):
            assert not changed & lam_keys, step
            assert {k for k in lower_keys if "lora_B" in k or "classifier" in k} <= changed, step
        else:
            assert changed == lam_keys, step  # every Λ moves, nothing else (not even by weight decay)
    assert [h["upper"] for h in tuner.history] == [0, 0, 1, 0, 0, 1]
    assert all(h["forward_passes"] == 1 and h["backward_passes"] == 1 for h in tuner.history)
    assert tuner.method.state_dict()["upper_done"] == 2 and tuner.method.state_dict()["lower_done"] == 4


def test_hook_scales_the_rank_space_by_lambda():
    model = peft_bert()
    names = [n for n, _ in model.named_parameters()]
    method = build("bilevel_lora")
    method.prepare(model)
    assert [n for n, _ in model.named_parameters()] == names  # Λ is not registered on the model
    name, layer = adapters.lora_layers(model)[0]
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    lam = method.lambdas()[name]
    x = torch.randn(3, 32)
    with torch.no_grad():
        b.normal_()
        plain = layer(x)
        lam.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        expected = layer.get_base_layer()(x) + s * x @ (b @ torch.diag(lam) @ a).T
        # float32, the same products associated differently (hook: ((x Q^T) * Λ) P^T; reference: x (P diag(Λ) Q)^T).
        # The rank-space terms are ~5 (B ~ N(0, 1)), so each side carries ~1 ulp of 5 (2.4e-7 and 5.6e-7 against
        # float64, observed) on every entry, also on entries that cancel to ~0.05: the absolute floor belongs on that
        # scale, atol 5e-6 ≈ 10 ulp of 5 (observed max difference 3e-7 there); rtol 1e-5 for the rest.
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=5e-6)
        method.remove_hooks()
        assert torch.equal(layer(x), plain)


# -- regulariser -----------------------------------------------------------------------------------
def test_orthogonality_penalty_against_hand_computation():
    model = peft_bert()
    g = torch.Generator().manual_seed(3)
    expected = 0.0
    with torch.no_grad():
        for _, layer in adapters.lora_layers(model):
            q, p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            q.copy_(torch.randn(q.shape, generator=g))
            p.copy_(torch.randn(p.shape, generator=g))
            P, Q = p.double().numpy(), q.double().numpy()
            r = Q.shape[0]
            expected += sum((sum(P[k, i] * P[k, j] for k in range(P.shape[0])) - (i == j)) ** 2 for i in range(r) for j in range(r))
            expected += np.sum((Q @ Q.T - np.eye(r)) ** 2)
    value = orthogonality_penalty(model)
    assert value.requires_grad
    # float32 penalty vs the float64 hand sum: a sum of squares (no cancellation in the total) of r x r Gram entries,
    # each a float32 sum of up to 64 products: worst case ~64·2^-24 = 4e-6 per entry, doubled by squaring; rel 1e-5
    # is that bound (observed 6e-8).
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    # at PEFT's init (B = 0) the P-term is exactly r per layer
    fresh = peft_bert()
    layers = adapters.lora_layers(fresh)
    q_terms = sum(
        float(((l.lora_A["default"].weight.detach() @ l.lora_A["default"].weight.detach().T - torch.eye(4)) ** 2).sum()) for _, l in layers
    )
    # both sides float32, the Q-term summed in another order; the P-term is exactly r per layer: a few ulp of ~70
    # (observed 2e-8 relative); rel 1e-6 ≈ 16 ulp.
    assert float(orthogonality_penalty(fresh).detach()) == pytest.approx(4 * len(layers) + q_terms, rel=1e-6)


# -- export -------------------------------------------------------------------------------------
def test_export_folds_lambda_and_reloads_with_plain_peft(tmp_path):
    model = peft_bert()
    tuner = make_tuner(model, dict(CFG, upper_lr=0.3), steps=6)
    tuner.train()
    lam = torch.cat([l.detach() for l in tuner.method.lambdas().values()])
    assert (lam - 1).abs().max() > 0.1  # Λ really moved, so folding matters
    state_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuner.method.export(model, tmp_path)
    assert all(torch.equal(p, state_before[n]) for n, p in model.named_parameters())  # training model untouched

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) or "classifier" in k for k in saved)
    name, layer = adapters.lora_layers(model)[0]
    # exact: the export folds Λ with the same float32 elementwise product P * Λ[None, :] (fold_into_saved)
    torch.testing.assert_close(
        saved[f"{name}.lora_B.weight"],
        layer.lora_B["default"].weight.detach() * tuner.method.lambdas()[name].detach()[None, :],
        rtol=0,
        atol=0,
    )

    batch = collate(cls_examples(6, seed=9))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        loaded = PeftModel.from_pretrained(tiny_bert(seed=0), str(tmp_path)).eval()
        reloaded = loaded(**batch).logits
    # float32: Λ folded into B (export) vs applied between Q and P (training hook) rounds the rank-4 path differently;
    # logits ~0.1 differ by ~1 ulp (observed 9e-9); rtol 1e-6 / atol 1e-7 ≈ 25 ulp there.
    torch.testing.assert_close(reloaded, trained, rtol=1e-6, atol=1e-7)


# -- determinism and resume ------------------------------------------------------------------------
def test_same_seed_bit_identical():
    runs = []
    for seed in (0, 0, 1):
        model = peft_bert()
        tuner = make_tuner(model, CFG, steps=6, seed=seed)
        tuner.train()
        runs.append((trainable(model, tuner.method), tuner.method.state_dict()))
    (a, sa), (b, sb), (c, _) = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for i, st in sa["upper_optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], sb["upper_optimizer"]["state"][i]["exp_avg"])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_matches_uninterrupted_run(tmp_path):
    full_model = peft_bert()
    full = make_tuner(full_model, CFG, steps=6)
    full.train()

    class Stop(Exception):
        pass

    def stop_after_4(step, total):
        if step == 4:
            raise Stop

    model = peft_bert()
    tuner = make_tuner(model, CFG, steps=6, checkpoint_dir=tmp_path, fingerprint="x", on_step=stop_after_4, loop={"checkpoint_every": 3})
    with pytest.raises(Stop):
        tuner.train()

    resumed_model = peft_bert()
    resumed = make_tuner(resumed_model, CFG, steps=6, checkpoint_dir=tmp_path, fingerprint="x")
    assert resumed.try_resume() and resumed.step == 3
    assert resumed.method.upper_optimizer.state  # Λ's AdamW moments came back
    resumed.train()
    a, b = trainable(full_model, full.method), trainable(resumed_model, resumed.method)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
