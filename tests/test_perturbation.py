"""Perturbation diagnostics (bilora/perturbation.py) against float64 references computed from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from bilora import adapters, methods, perturbation
from bilora.methods.bilora import first_order_increase
from bilora.methods.method import StepContext
from bilora.train import FineTuner, LoopConfig, second_half_medians
from tests import tiny

PERTURBING = {
    "bilora": {"rho": 0.5, "aux_rank": 4, "aux_alpha": 8},
    "lora_sam": {"rho": 0.3},
    "flat_lora": {"sigma": 0.3},
    "eflat_lora": {"rho": 0.3},
}


def _trained(name: str, steps: int = 4, seed: int = 0):
    """A float64 tiny BERT after ``steps`` steps of ``name`` (B != 0, Bi-LoRA's aux and EFlat's E_ema set)."""
    model = tiny.peft_bert(seed).double()
    ft = FineTuner(
        model,
        methods.build(name, PERTURBING.get(name, {}), seed=seed),
        tiny.cls_examples(64),
        tiny.collate,
        LoopConfig(max_steps=steps + 4, batch_size=8, lr=5e-2, perturbation_every=0),
        seed=seed,
    )
    for _ in range(steps):  # train() would run to max_steps; step by hand and stop mid-way (Flat-LoRA's sigma_t > 0)
        ctx = _ctx(ft)
        ft.method.step(ctx)
        ft.step += 1
    return model, ft


def _ctx(ft: FineTuner) -> StepContext:
    return StepContext(
        model=ft.model,
        optimizer=ft.optimizer,
        scheduler=ft.scheduler,
        micro_batches=ft.micro_batches(ft.step),
        step=ft.step,
        max_steps=ft.max_steps,
        max_grad_norm=1.0,
    )


def _base_weights(model) -> dict[str, torch.nn.Parameter]:
    return {name: layer.get_base_layer().weight for name, layer in adapters.adapter_layers(model)}


def _dense_loss_and_grads(model, batch, deltas: dict[str, torch.Tensor] | None = None):
    """Independent reference: the eval-mode loss with ``deltas`` added to the dense float64 base weights,
    and dL/dW0 by autograd on those weights (equal to dL/dW of the merged weight)."""
    model.eval()
    weights = _base_weights(model)
    saved = {n: w.detach().clone() for n, w in weights.items()}
    with torch.no_grad():
        for n, d in (deltas or {}).items():
            weights[n].add_(d.double())
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    loss = model(**batch).loss
    loss.backward()
    grads = {n: w.grad.detach().clone() for n, w in weights.items()}
    with torch.no_grad():
        for n, w in weights.items():
            w.copy_(saved[n])
            w.requires_grad_(False)
            w.grad = None
    for p in model.parameters():
        p.grad = None
    return float(loss.detach()), grads


def test_full_weight_grads_equal_autograd_of_the_base_weight():
    model = tiny.peft_bert(0).double().eval()
    batch = tiny.collate(tiny.cls_examples(8))
    with torch.no_grad():
        for a, b, _ in adapters.lora_factors(model, adapters.PRIMARY):
            b.normal_(0, 0.1)  # B != 0: the LoRA branch carries part of the gradient's path
    _, ref = _dense_loss_and_grads(model, batch)
    with perturbation.full_weight_grads(model) as grads:
        model(**batch).loss.backward()
    assert set(grads) == set(ref) and len(ref) == 13  # q, k, v, 3 dense per layer x 2 layers, plus the pooler dense
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-10, atol=1e-14)


def test_bilora_free_estimate_is_the_directional_derivative_along_the_auxiliary():
    model, _ = _trained("bilora")
    batch = tiny.collate(tiny.cls_examples(8, seed=5))
    model.eval()
    factors = adapters.lora_factors(model, adapters.AUX)
    assert float(sum(b.detach().abs().sum() for _, b, _ in factors)) > 0
    loss = model(**batch).loss
    loss.backward()
    free_b = first_order_increase(factors)  # <dL/dB2, B2>
    free_a = float(sum((a.grad.double() * a.double()).sum() for a, _, _ in factors))  # <dL/dA2, A2>
    # d/dt L(W0 + s1 B1 A1 + t s2 B2 A2) at t = 1, by a central difference in float64
    layers = adapters.adapter_layers(model, adapters.AUX)
    s2 = float(layers[0][1].scaling[adapters.AUX])

    def loss_at(t: float) -> float:
        for _, layer in layers:
            layer.scaling[adapters.AUX] = s2 * t
        with torch.no_grad():
            out = float(model(**batch).loss)
        for _, layer in layers:
            layer.scaling[adapters.AUX] = s2
        return out

    h = 1e-4
    numeric = (loss_at(1 + h) - loss_at(1 - h)) / (2 * h)
    assert abs(free_b) > 1e-6
    assert free_b == pytest.approx(numeric, rel=1e-6)
    assert free_a == pytest.approx(free_b, rel=1e-9)


def _reference_deltas(name: str, model, ft, batch) -> tuple[dict[str, torch.Tensor], int | None]:
    """Each method's perturbation from its definition (docs/methods.md), not from its diagnostics code."""
    m = ft.method
    out = {}
    if name == "bilora":
        for n, layer in adapters.adapter_layers(model, adapters.AUX):
            a, b, s = layer.lora_A[adapters.AUX].weight, layer.lora_B[adapters.AUX].weight, layer.scaling[adapters.AUX]
            out[n] = s * b.detach() @ a.detach()
        return out, 4
    if name == "lora_sam":  # e = rho g / ||g|| from the clean eval-mode gradient of A and B
        with adapters.primary_only(model):
            model.eval()
            model(**batch).loss.backward()
        named = adapters.adapter_layers(model)
        gs = [(layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad) for _, layer in named]
        norm = math.sqrt(sum(float(ga.pow(2).sum() + gb.pow(2).sum()) for ga, gb in gs))
        for (n, layer), (ga, gb) in zip(named, gs):
            a, b, s = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), layer.scaling["default"]
            ea, eb = m.cfg.rho * ga / norm, m.cfg.rho * gb / norm
            out[n] = s * ((b + eb) @ (a + ea) - b @ a)
        for p in model.parameters():
            p.grad = None
        return out, 8
    if name == "flat_lora":  # eps[i, :] ~ N(0, std_i^2), std_i = f_t sigma / sqrt(n_in) ||W'[i, :]||, seeded per (seed, step, layer)
        from bilora.methods.flat_lora import noise_seed, schedule_factor

        f = schedule_factor(ft.step, ft.max_steps)
        for index, (n, layer) in enumerate(adapters.adapter_layers(model)):
            base = layer.get_base_layer()
            a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
            w = base.weight.detach() + s * b.detach() @ a.detach()
            std = f * m.cfg.sigma / math.sqrt(base.in_features) * w.norm(dim=1)
            g = torch.Generator().manual_seed(noise_seed(m.seed, ft.step, index))
            out[n] = torch.randn(w.shape, generator=g, dtype=torch.float32).double() * std.float().double()[:, None]
        return out, None
    # eflat_lora: B is perturbed by E_ema: delta = s E_ema A
    for n, layer in adapters.adapter_layers(model):
        a, s = layer.lora_A["default"].weight.detach(), layer.scaling["default"]
        out[n] = s * m.e_ema[n].double() @ a
    return out, 4


def _clean_state(name: str, model, ft):
    """Put the model at its unperturbed point by hand; returns an undo function."""
    if name == "bilora":
        ctx = adapters.primary_only(model)
        ctx.__enter__()
        return lambda: ctx.__exit__(None, None, None)
    if name == "eflat_lora":
        bs = {n: layer.lora_B["default"].weight for n, layer in adapters.adapter_layers(model)}
        perturbed = {n: b.detach().clone() for n, b in bs.items()}
        with torch.no_grad():
            for n, b in bs.items():
                b.copy_(ft.method.b_clean[n])

        def undo():
            with torch.no_grad():
                for n, b in bs.items():
                    b.copy_(perturbed[n])

        return undo
    return lambda: None


@pytest.mark.parametrize("name", sorted(PERTURBING))
def test_measure_matches_float64_reference(name):
    model, ft = _trained(name)
    ctx = _ctx(ft)
    batch = ctx.micro_batches[0]
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = perturbation.measure(ft.method, ctx)
    for n, p in model.named_parameters():  # the diagnostics leave the model exactly as they found it
        assert torch.equal(p, params_before[n]), n
    assert model.training

    undo = _clean_state(name, model, ft)
    deltas, rank = _reference_deltas(name, model, ft, batch)
    clean, grads = _dense_loss_and_grads(model, batch)
    perturbed, _ = _dense_loss_and_grads(model, batch, deltas)
    undo()
    g_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    d_norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    inner = sum(float((grads[n] * deltas[n]).sum()) for n in deltas)

    assert got["perturbation.clean_loss"] == pytest.approx(clean, rel=1e-10)
    assert got["perturbation.loss_increase"] == pytest.approx(perturbed - clean, rel=1e-6, abs=1e-12)
    assert got["perturbation.norm"] == pytest.approx(d_norm, rel=1e-6)
    assert got["perturbation.full_grad_norm"] == pytest.approx(g_norm, rel=1e-6)
    assert got["perturbation.alignment"] == pytest.approx(inner / (g_norm * d_norm), rel=1e-5, abs=1e-9)
    assert got["perturbation.vs_sam"] == pytest.approx((perturbed - clean) / (g_norm * d_norm), rel=1e-5)
    assert abs(perturbed - clean) > 1e-8  # the reference perturbation moves the loss: the comparison is not vacuous
    if rank is None:
        assert "perturbation.rank_ceiling" not in got
    else:
        top = sum(float(torch.linalg.svdvals(g)[:rank].pow(2).sum()) for g in grads.values())
        assert got["perturbation.rank_ceiling"] == pytest.approx(math.sqrt(top) / g_norm, rel=1e-5)
        assert abs(got["perturbation.alignment"]) <= got["perturbation.rank_ceiling"] + 1e-9


def test_rank_r_norm_is_the_sum_of_the_top_singular_values():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    sing = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    m = u[:, :5] @ torch.diag(sing) @ v.T  # (6, 5) with known singular values
    assert float(perturbation.rank_r_norm_sq(m, 2)) == pytest.approx(25 + 9)
    assert float(perturbation.rank_r_norm_sq(m, 9)) == pytest.approx(float(sing.pow(2).sum()))


def test_methods_that_perturb_nothing_measure_nothing():
    model, ft = _trained("lora", steps=1)
    assert not ft.method.perturbs
    assert perturbation.measure(ft.method, _ctx(ft)) == {}


@pytest.mark.parametrize("name", sorted(PERTURBING))
def test_diagnostics_leave_training_bit_identical(name):
    def run(every: int):
        model = tiny.peft_bert(0, adapters.LoraSpec(r=4, alpha=8, dropout=0.2, modules_to_save=("classifier",)))
        ft = FineTuner(
            model,
            methods.build(name, PERTURBING[name], seed=0),
            tiny.cls_examples(64),
            tiny.collate,
            LoopConfig(max_steps=6, batch_size=8, lr=1e-2, perturbation_every=every),
            seed=0,
        )
        ft.train()
        return model, ft.history

    m0, h0 = run(0)
    m2, h2 = run(2)
    assert [h["loss"] for h in h0] == [h["loss"] for h in h2]  # dropout on: the RNG stream is untouched too
    for (n, p), (_, q) in zip(m0.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    measured = [int(h["step"]) for h in h2 if "perturbation.loss_increase" in h]
    first_perturbed = {"bilora": 2, "lora_sam": 2, "flat_lora": 2, "eflat_lora": 2}[name]
    assert measured and measured[0] == first_perturbed and set(measured) <= {2, 4, 6}
    assert not any("perturbation.loss_increase" in h for h in h0)


def test_second_half_medians_by_hand():
    hist = [{"step": float(s), "perturbation.loss_increase": v} for s, v in [(2, 9.0), (4, 1.0), (6, 3.0), (8, 2.0), (10, 5.0)]]
    hist.append({"step": 7.0, "loss": 1.0})  # a step without diagnostics is ignored
    # steps > 10 / 2: 6, 8, 10 -> median(3, 2, 5) = 3
    assert second_half_medians(hist, 10) == {"perturbation.loss_increase": 3.0}
