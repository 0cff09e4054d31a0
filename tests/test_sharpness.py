"""Sharpness measurements: known answers on a quadratic loss, filter normalisation, exact merged-weight
perturbation (fp32 and nf4), determinism, and a bit-identical model afterwards."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from bilora import adapters
from bilora import layers as base_layers
from bilora.sharpness.config import SharpnessConfig
from bilora.sharpness.measure import attack_curve, gradient_direction, loss_curve_1d, measure, random_sharpness
from bilora.sharpness.objective import Objective, task_eval
from bilora.sharpness.result import SharpnessResult
from bilora.sharpness.space import Direction, perturbation, random_direction, space_dim
from tests.tiny import SPEC, cls_examples, collate, peft_bert
from tests.tiny import nf4_bert as tiny_nf4_bert

P = adapters.PRIMARY


# -- a quadratic case: one adapted linear layer, MSE loss, float64 -------------------------------
# Tolerances in this section: everything is float64 (full-space directions are drawn in float32, but measurement and
# reference use the same drawn numbers), so a loss ~1 carries ~1e-16 absolute error and an analytic reference agrees
# to ~1e-15 relative (observed ≤ 3e-16). Sharpness values are loss *differences*: their error is absolute (~3e-16),
# hence abs 1e-13 for the small ones and rel 1e-12 elsewhere, ≥ 100x the observed errors; the loss curve is the
# exception (float32 scaling of the direction, see there).
class OneLinear(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def quadratic(n_in: int = 6, n_out: int = 5, seed: int = 0):
    """PEFT(OneLinear) in float64 with a non-zero B and an MSE objective over two unequal batches."""
    torch.manual_seed(seed)
    model = get_peft_model(OneLinear(n_in, n_out), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"])).double()
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B[P].weight.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, n_in, generator=g, dtype=torch.float64)
    y = torch.randn(8, n_out, generator=g, dtype=torch.float64)
    batches = [{"x": x[:5], "y": y[:5]}, {"x": x[5:], "y": y[5:]}]
    objective = Objective(batches, lambda m, b: F.mse_loss(m(b["x"]), b["y"]))
    return model, layer, objective, x, y


def factors(layer):
    a, b = layer.lora_A[P].weight.detach().double(), layer.lora_B[P].weight.detach().double()
    return a, b, float(layer.scaling[P])


def merged(layer) -> torch.Tensor:
    a, b, s = factors(layer)
    return layer.get_base_layer().weight.detach().double() + s * b @ a  # (out, in)


def mse(w: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w.T + bias - y) ** 2).mean())


def quad_delta(layer, x, y, delta: torch.Tensor) -> float:
    """Analytic L(W' + Δ) − L(W') = 2<R0, XΔᵀ>/(Nm) + ||XΔᵀ||²/(Nm) for L = mean((XW'ᵀ + b − Y)²)."""
    bias = layer.get_base_layer().bias.detach().double()
    r0 = x @ merged(layer).T + bias - y  # (N, m)
    xd = x @ delta.T  # (N, m)
    nm = r0.numel()
    return float(2 * (r0 * xd).sum() / nm + (xd**2).sum() / nm)


def quad_grad(layer, x, y) -> torch.Tensor:
    """dL/dW' = 2/(Nm) R0ᵀ X, (out, in)."""
    bias = layer.get_base_layer().bias.detach().double()
    r0 = x @ merged(layer).T + bias - y
    return 2.0 / r0.numel() * r0.T @ x


def test_objective_is_the_example_weighted_mean():
    model, layer, objective, x, y = quadratic()
    bias = layer.get_base_layer().bias.detach().double()
    assert objective.weights == [5 / 8, 3 / 8]
    # weighted mean of two batch means vs one mean over 40 squares: another summation order (observed identical)
    assert objective.value(model) == pytest.approx(mse(merged(layer), bias, x, y), rel=1e-12)


def test_full_space_random_sharpness_equals_the_quadratic_form():
    model, layer, objective, x, y = quadratic()
    radii = (0.01, 0.1, 0.5)
    res = random_sharpness(model, objective, "full", radii, n_directions=3, seed=4)
    assert res["base_loss"] == objective.value(model)
    for entry in res["radii"]:
        t = entry["radius"]
        expected = [quad_delta(layer, x, y, random_direction(model, "full", 4, k).parts[0].materialize(t).double()) for k in range(3)]
        # loss differences (see the section note; observed ≤ 3.4e-16 absolute); the mean and std of three of them
        # carry the same absolute error at most
        assert entry["values"] == pytest.approx(expected, rel=1e-12, abs=1e-13)
        assert entry["mean"] == pytest.approx(sum(expected) / 3, rel=1e-12, abs=1e-13)
        m = sum(expected) / 3
        assert entry["std"] == pytest.approx(math.sqrt(sum((e - m) ** 2 for e in expected) / 2), rel=1e-12, abs=1e-13)
        assert entry["min"] == min(entry["values"]) and entry["max"] == max(entry["values"])
    # quadratic growth: the second-order term dominates at large t and is positive
    assert res["radii"][-1]["mean"] > 0


def test_lora_space_random_sharpness_equals_explicit_factors():
    model, layer, objective, x, y = quadratic()
    a, b, s = factors(layer)
    w0 = layer.get_base_layer().weight.detach().double()
    bias = layer.get_base_layer().bias.detach().double()
    l0 = mse(merged(layer), bias, x, y)
    res = random_sharpness(model, objective, "lora", (0.05, 0.3), n_directions=2, seed=1)
    for entry in res["radii"]:
        t = entry["radius"]
        for k, value in enumerate(entry["values"]):
            da, db = (d.double() for d in random_direction(model, "lora", 1, k).parts)
            w_t = w0 + s * (b + t * db) @ (a + t * da)
            # loss differences, float64 (section note; observed ≤ 4.4e-16 absolute)
            assert value == pytest.approx(mse(w_t, bias, x, y) - l0, rel=1e-12, abs=1e-13)


def test_gradient_direction_and_attack_are_analytic_in_the_full_space():
    model, layer, objective, x, y = quadratic()
    g = quad_grad(layer, x, y)
    d, norm, loss = gradient_direction(model, "full", objective)
    # float64 autograd vs the analytic gradient (another association of the same products): observed ≤ 2e-16
    # relative; atol 1e-14 for entries near 0 of the unit direction
    assert norm == pytest.approx(float(g.norm()), rel=1e-12)
    torch.testing.assert_close(d.parts[0].double(), g / g.norm(), rtol=1e-12, atol=1e-14)
    assert d.norm() == pytest.approx(1.0, rel=1e-12)
    assert loss == pytest.approx(objective.value(model), rel=1e-12)  # the same float64 forward (observed identical)

    alphas = (0.0, 0.1, 1.0, 2.5)
    res = attack_curve(model, objective, "full", alphas)
    assert res["grad_norm"] == pytest.approx(norm, rel=1e-12)  # the same float64 computation again (observed identical)
    g_hat = g / g.norm()
    xd = x @ g_hat.T
    for point, alpha in zip(res["points"], alphas):
        # L(W' + αĜ) = L0 + α||G|| + α² ||XĜᵀ||²/(Nm)
        expected = res["base_loss"] + alpha * float(g.norm()) + alpha**2 * float((xd**2).sum()) / xd.numel()
        assert point["alpha"] == alpha and point["metrics"] == {}
        assert point["loss"] == pytest.approx(expected, rel=1e-12)  # float64 losses (observed ≤ 3e-16 relative)
    assert res["points"][0]["loss"] == res["base_loss"]  # α = 0 is the model itself
    assert [p["loss"] for p in res["points"]] == sorted(p["loss"] for p in res["points"])  # ascent


def test_gradient_direction_and_attack_in_the_lora_space():
    model, layer, objective, x, y = quadratic()
    a, b, s = factors(layer)
    g = quad_grad(layer, x, y)
    ga, gb = s * b.T @ g, s * g @ a.T  # dL/dA (r, in), dL/dB (out, r)
    norm = math.sqrt(float((ga**2).sum() + (gb**2).sum()))
    d, measured_norm, _ = gradient_direction(model, "lora", objective)
    # as in the full space: float64 autograd vs analytic factors (observed ≤ 5e-16 relative)
    assert measured_norm == pytest.approx(norm, rel=1e-12)
    torch.testing.assert_close(d.parts[0].double(), ga / norm, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d.parts[1].double(), gb / norm, rtol=1e-12, atol=1e-14)
    w0 = layer.get_base_layer().weight.detach().double()
    bias = layer.get_base_layer().bias.detach().double()
    res = attack_curve(model, objective, "lora", (0.0, 0.5))
    w_attacked = w0 + s * (b + 0.5 * gb / norm) @ (a + 0.5 * ga / norm)
    assert res["points"][1]["loss"] == pytest.approx(mse(w_attacked, bias, x, y), rel=1e-12)  # float64 (observed 3e-16)
    assert res["points"][1]["loss"] > res["points"][0]["loss"]


def test_loss_curve_is_the_analytic_parabola_and_the_slice_of_direction_zero():
    model, layer, objective, x, y = quadratic()
    points = (-0.2, -0.1, 0.0, 0.1, 0.2)
    curve = loss_curve_1d(model, objective, "full", points, seed=2)
    l0 = objective.value(model)
    assert [t for t, _ in curve] == list(points)
    assert curve[2][1] == l0  # t = 0: exactly the unperturbed loss
    d1 = random_direction(model, "full", 2, 0).parts[0].materialize(1.0).double()
    bias = layer.get_base_layer().bias.detach().double()
    r0 = x @ merged(layer).T + bias - y
    lin, quad = float(2 * (r0 * (x @ d1.T)).mean()), float(((x @ d1.T) ** 2).mean())
    # The curve perturbs by t·d materialised in float32 (noise x (t·row_scale)), the reference uses t x d(1.0): the
    # perturbation differs by float32 rounding (≤ 1.2e-7 relative), which reaches the loss through t·lin and t² quad:
    # ≲ 1.2e-7 (|t·lin| + 2 t² quad) absolute, small next to L here (observed 2e-9 relative); rel 1e-7 would hold
    # even with |t·lin| ~ L.
    for t, value in curve:
        assert value == pytest.approx(l0 + t * lin + t * t * quad, rel=1e-7)
    # symmetric part: L(t) + L(-t) - 2 L0 = 2 t² quad. Rounding is sign-symmetric, so the linear term's errors cancel
    # and the float32 rounding of the perturbation enters 2 t² quad only, twice (≤ 2.4e-7 relative; observed 9e-8)
    assert curve[4][1] + curve[0][1] - 2 * l0 == pytest.approx(2 * 0.04 * quad, rel=1e-6)
    # the curve is the slice along random direction 0 of random_sharpness, bit for bit
    rs = random_sharpness(model, objective, "full", (0.1, 0.2), n_directions=1, seed=2)
    assert [e["values"][0] for e in rs["radii"]] == [curve[3][1] - l0, curve[4][1] - l0]
    assert [e["std"] for e in rs["radii"]] == [0.0, 0.0]


# -- filter normalisation and exact perturbations -----------------------------------------------
def trained_like_bert(seed: int = 0):
    """The tiny PEFT BERT with non-zero B (as after training)."""
    model = peft_bert(seed)
    torch.manual_seed(seed + 7)
    with torch.no_grad():
        for _, b, _ in adapters.lora_factors(model, P):
            b.normal_(0.0, 0.2)
    return model


def test_filter_normalisation_rows_have_the_weight_row_norms():
    model = trained_like_bert()
    layers = [layer for _, layer in adapters.lora_layers(model)]
    full = random_direction(model, "full", seed=0)
    assert len(full.parts) == len(layers)
    # float32 direction rows (noise x ||W'_row|| / ||noise_row||: W' = W0 + s·BA formed in float32, two float32 norms
    # over 32-64 columns, a division and a product) against float64 row norms: the a-priori float32 bound for norms
    # of ≤ 64 terms is ~32·2^-24 = 2e-6 each, ~1e-5 altogether; rtol 2e-5 is that bound (observed 1.5e-7)
    for part, layer in zip(full.parts, layers):
        w_rows = merged(layer).norm(dim=1)
        torch.testing.assert_close(part.materialize().double().norm(dim=1), w_rows, rtol=2e-5, atol=0)
        torch.testing.assert_close(part.materialize(-0.03).double().norm(dim=1), 0.03 * w_rows, rtol=2e-5, atol=0)
    lora = random_direction(model, "lora", seed=0)
    params = adapters.adapter_parameters(model, P)
    assert len(lora.parts) == len(params) == 2 * len(layers)
    for part, p in zip(lora.parts, params):
        assert part.shape == p.shape
        # float32 both: the scaled noise row's norm vs the factor row's (three float32 norms of ≤ 64 terms, a
        # division, a product; a-priori bound ~1e-5) (observed 1e-7)
        torch.testing.assert_close(part.norm(dim=1), p.detach().norm(dim=1), rtol=1e-5, atol=0)
    other = random_direction(model, "lora", seed=0, index=1)
    assert not torch.allclose(other.parts[0], lora.parts[0])  # independent draws: O(1) apart, not rounding


def test_full_perturbation_equals_an_explicit_merged_weight_fp32():
    model = trained_like_bert()
    _, layer = adapters.lora_layers(model)[0]
    base = layer.get_base_layer()
    x = torch.randn(3, 4, 32)
    seeded = random_direction(model, "full", seed=5)
    dense = Direction("full", seeded.dense())
    for direction in (seeded, dense):
        with perturbation(model, direction, 0.07):
            out = layer(x)
        delta = 0.07 * direction.dense()[0].double()
        ref = F.linear(x.double(), merged(layer) + delta, base.bias.detach().double())
        # float32 layer (one matmul over 32 inputs, plus the LoRA path) vs float64, outputs ~1 (observed ≤ 2e-7
        # absolute, 1.4% of the tolerance)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(x), layer(x))  # and the clean forward is back
    clean = F.linear(x.double(), merged(layer), base.bias.detach().double())
    torch.testing.assert_close(layer(x).double(), clean, rtol=1e-5, atol=1e-5)  # as above (observed 1.8e-7)


def test_lora_perturbation_touches_only_the_primary_factors():
    model = trained_like_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = random_direction(model, "lora", seed=3)
    names = [n for n, p in model.named_parameters() if f".{P}." in n and "lora_" in n]
    with perturbation(model, direction, 0.1):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        params = dict(model.named_parameters())
        for n, d in zip(names, direction.parts):
            # fl(fl(p + 0.1 d) - p) vs fl(0.1 d): two float32 roundings, ≤ 2^-24 (|p + 0.1 d| + |0.1 d|) ≤ 7e-8 for
            # entries ≤ ~1 (observed 2.8e-8); atol 1e-7
            torch.testing.assert_close(params[n].detach() - before[n], 0.1 * d, rtol=1e-5, atol=1e-7)
    assert changed == set(names)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- determinism, nothing mutated ---------------------------------------------------------------
def state(model) -> dict[str, object]:
    """Everything a measurement could touch: tensors bit for bit, grads, flags, modes, forwards."""
    out: dict[str, object] = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    out.update({f"grad:{n}": None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    out.update({f"rg:{n}": p.requires_grad for n, p in model.named_parameters()})
    for n, m in model.named_modules():
        out[f"train:{n}"] = m.training
        out[f"fwd:{n}"] = "forward" in vars(m)
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            out[f"qs:{n}"] = (
                qs.absmax.clone(),
                None if qs.state2 is None else qs.state2.absmax.clone(),
                getattr(qs, "packing_format_for_cpu", False),
            )
    out["active"] = list(model.base_model.active_adapters)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), k
        elif isinstance(x, tuple):
            assert all((u is None and v is None) or (isinstance(u, torch.Tensor) and torch.equal(u, v)) or u == v for u, v in zip(x, y)), k
        else:
            assert x == y, k


# dtype="model": measured on the model itself, so its losses are exactly objective.value(model)
SMALL = SharpnessConfig(
    spaces=("full", "lora"), radii=(0.02, 0.05), n_directions=2, attack_alphas=(0.0, 1.0), curve_points=3, curve_radius=0.05, dtype="model"
)


def without_times(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    result.pop("cost")
    for res in result["spaces"].values():
        res["cost"] = {k: v for k, v in res["cost"].items() if not k.endswith("_s")}
    return result


def test_measure_deterministic_primary_only_and_nothing_mutated_fp32():
    model = trained_like_bert()
    adapters.add_auxiliary(model, r=2, alpha=4.0)
    with torch.no_grad():
        for _, b, _ in adapters.lora_factors(model, adapters.AUX):
            b.normal_(0.0, 0.5)  # a non-zero auxiliary that must be discarded
    model.train()
    data = cls_examples(12)
    objective = Objective.from_dataset(data, collate, batch_size=8)
    eval_fn = task_eval(data, collate, ["accuracy", "mcc"], batch_size=8)
    before = state(model)
    rng = torch.get_rng_state()

    result = measure(model, objective, SMALL, eval_fn)
    first = result.to_dict()
    assert_same(before, state(model))
    assert torch.equal(torch.get_rng_state(), rng)

    with adapters.primary_only(model):
        model.eval()
        assert first["base"]["loss"] == objective.value(model)
    model.train()
    assert first["base"]["loss"] != objective.value(model.eval())  # the auxiliary does change the loss
    model.train()

    second = measure(model, objective, SMALL, eval_fn).to_dict()
    assert without_times(first) == without_times(second)
    other = measure(model, objective, dataclasses.replace(SMALL, seed=1), eval_fn).to_dict()
    assert other["spaces"]["full"]["random"]["radii"][0]["values"] != first["spaces"]["full"]["random"]["radii"][0]["values"]
    assert other["spaces"]["full"]["attack"] == first["spaces"]["full"]["attack"]  # the attack is not random

    for space in ("full", "lora"):
        res = first["spaces"][space]
        assert res["dim"] == space_dim(model, space) > 0
        assert [p["alpha"] for p in res["attack"]["points"]] == [0.0, 1.0]
        assert set(res["attack"]["points"][0]["metrics"]) == {"accuracy", "mcc"}
        assert res["attack"]["points"][0]["metrics"] == first["base"]["metrics"]
        assert res["attack"]["points"][1]["loss"] > first["base"]["loss"]
        assert res["curve"][1] == [0.0, first["base"]["loss"]]
        # alpha = 0 and curve t = 0 reuse the base pass: the same numbers as evaluating them (no base given)
        fresh = attack_curve(model, objective, space, [0.0], eval_fn)["points"][0]
        assert res["attack"]["points"][0] == {"alpha": 0.0, "loss": fresh["loss"], "metrics": fresh["metrics"]}
        assert loss_curve_1d(model, objective, space, [0.0], SMALL.seed)[0][1] == res["curve"][1][1]
        # random 2 radii x 2 directions, attack alpha 1 (alpha 0 reused), curve t = +-r (t = 0 reused)
        assert res["cost"]["loss_evals"] == 2 * 2 + 1 + 2 and res["cost"]["grad_passes"] == 1 and res["cost"]["metric_evals"] == 1
        assert all(res["cost"][k] >= 0 for k in ("random_s", "attack_s", "curve_s"))
    assert first["spaces"]["full"]["dim"] == sum(l.get_base_layer().weight.numel() for _, l in adapters.lora_layers(model))
    assert first["cost"]["loss_evals"] == 1 + 2 * 7 and first["cost"]["total_s"] > 0

    # the typed result: its JSON form round-trips, and its headline holds the committed metrics/ keys
    as_json = json.dumps(first)
    assert json.dumps(SharpnessResult.from_dict(json.loads(as_json)).to_dict()) == as_json
    head = result.headline("accuracy")
    want = {}
    for space in ("full", "lora"):
        for r in first["spaces"][space]["random"]["radii"]:
            t = {0.02: "0.02", 0.05: "0.05"}[r["radius"]]
            want[f"{space}.random.r{t}.mean"], want[f"{space}.random.r{t}.std"] = r["mean"], r["std"]
        for pt, a in zip(first["spaces"][space]["attack"]["points"], ("0", "1")):
            want[f"{space}.attack.a{a}.accuracy"], want[f"{space}.attack.a{a}.loss"] = pt["metrics"]["accuracy"], pt["loss"]
    assert head == want
    assert not any(k.endswith(".mcc") for k in head) and "mcc" in first["base"]["metrics"]  # only the main metric
    assert result.spaces["full"].random.largest().radius == 0.05 and result.spaces["lora"].attack.largest().alpha == 1.0


def nf4_bert(tmp_path):
    model = tiny_nf4_bert(tmp_path / "tiny")
    torch.manual_seed(1)
    model = adapters.attach_lora(model, SPEC, "SEQ_CLS")
    with torch.no_grad():
        for _, b, _ in adapters.lora_factors(model, P):
            b.normal_(0.0, 0.2)
    return model


def test_nf4_base_exact_perturbation_and_nothing_mutated(tmp_path):
    import bitsandbytes.functional as bnbf

    model = nf4_bert(tmp_path)
    _, layer = adapters.lora_layers(model)[0]
    base = layer.get_base_layer()
    assert base_layers.is_4bit(base)
    a, b, s = factors(layer)
    w0 = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    x = torch.randn(2, 3, 32)
    direction = random_direction(model, "full", seed=0)
    # as in test_filter_normalisation_rows_have_the_weight_row_norms (observed 8e-8)
    torch.testing.assert_close(direction.parts[0].materialize().double().norm(dim=1), (w0 + s * b @ a).norm(dim=1), rtol=2e-5, atol=0)
    with perturbation(model, direction, 0.05):
        out = layer(x)
    ref = F.linear(x.double(), w0 + s * b @ a + 0.05 * direction.parts[0].materialize().double(), base.bias.detach().double())
    # float32 layer on the dequantized weight vs float64, as in the fp32 test above (observed 1.5e-7 absolute)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    # the full-space gradient on a 4-bit base is dL/dW' of the explicit dequantised merged weight
    data = cls_examples(8)
    objective = Objective.from_dataset(data, collate, batch_size=8)
    d, norm, _ = gradient_direction(model, "full", objective)
    grads = {}

    def hook(module, inputs, output):
        grads["x"], grads["out"] = inputs[0], output  # x (B, L, in), out (B, L, out) of the LoRA layer

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            model.eval()
            loss = model(**collate(data)).loss
            (go,) = torch.autograd.grad(loss, grads["out"])
    finally:
        handle.remove()
    g_ref = torch.einsum("...o,...i->oi", go.double(), grads["x"].detach().double())  # dL/dW' = Σ grad_out ⊗ x
    # float32 dL/dW' (a sum over 96 token positions) vs the float64 einsum of the same float32 activations: errors
    # ≤ 4e-7 of the terms' size (observed); entries ≤ 3.6e-4, so atol 1e-9 ≈ 3e-6 of the largest (observed max error
    # 7e-11 to 9e-11 on AVX512 and AVX2, 3% of the tolerance)
    torch.testing.assert_close(d.parts[0].double() * norm, g_ref, rtol=1e-5, atol=1e-9)
    model.zero_grad(set_to_none=True)

    # bitsandbytes' CPU inference repacking would rewrite the 4-bit weights: it is off during measure
    q4 = [m for m in model.modules() if base_layers.is_4bit(m)]
    flags = [m.support_avx512bf16_for_cpu for m in q4]
    before = state(model)
    try:
        for m in q4:
            m.support_avx512bf16_for_cpu = True
        result = measure(model, objective, SMALL, task_eval(data, collate, ["accuracy"])).to_dict()
        assert all(m.support_avx512bf16_for_cpu for m in q4)
    finally:
        for m, f in zip(q4, flags):
            m.support_avx512bf16_for_cpu = f
    assert_same(before, state(model))
    assert result["spaces"]["full"]["attack"]["points"][1]["loss"] > result["base"]["loss"]
    assert result["spaces"]["lora"]["curve"][1][1] == result["base"]["loss"]


def _dense_float64_by_hand(model):
    """The 4-bit model as float64 nn.Linear layers, built independently of bilora.layers.dense_copy:
    bitsandbytes' own dequantize_4bit, assigned into a deep copy by module name."""
    import bitsandbytes.functional as bnbf

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if base_layers.is_4bit(m):
            lin = torch.nn.Linear(m.in_features, m.out_features)
            with torch.no_grad():
                lin.weight.copy_(bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state))
                lin.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent), attr, lin)
    return ref.double()


def test_float64_measurement_is_the_dense_float64_model(tmp_path):
    model = nf4_bert(tmp_path)
    data = cls_examples(8)
    objective = Objective.from_dataset(data, collate, batch_size=8)
    before = state(model)
    cfg = dataclasses.replace(SMALL, dtype="float64")
    got = measure(model, objective, cfg, None).to_dict()
    assert_same(before, state(model))  # the copy is measured; the 4-bit model is untouched
    ref = _dense_float64_by_hand(model)
    assert not any(base_layers.is_4bit(m) for m in ref.modules())
    want = measure(ref, objective, dataclasses.replace(SMALL, dtype="model"), None).to_dict()
    # the same float64 function evaluated in the same order: equal up to float64 rounding (1e-16 relative)
    assert got["base"]["loss"] == pytest.approx(want["base"]["loss"], rel=1e-12, abs=0)
    for space in ("full", "lora"):
        g = [v for r in got["spaces"][space]["random"]["radii"] for v in r["values"]]
        w = [v for r in want["spaces"][space]["random"]["radii"] for v in r["values"]]
        # loss differences ~1e-3 computed from float64 losses ~0.7: absolute error ~1e-15
        assert g == pytest.approx(w, rel=0, abs=1e-12)
        assert got["spaces"][space]["attack"]["points"][1]["loss"] == pytest.approx(
            want["spaces"][space]["attack"]["points"][1]["loss"], rel=1e-12
        )
    # float32 on the 4-bit model computes the same function: the losses agree to float32 rounding
    # (~1e-7 relative of a mean over 8 examples), so 1e-5 bounds it and the float64 figure is a refinement
    f32 = measure(model, objective, SMALL, None).to_dict()
    assert f32["base"]["loss"] != got["base"]["loss"]
    assert f32["base"]["loss"] == pytest.approx(got["base"]["loss"], rel=1e-5)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"spaces\.0: must be one of \['full', 'lora'\]"):
        SharpnessConfig(spaces=("weights",))
    with pytest.raises(ValueError):
        SharpnessConfig(curve_radius=0.0)
    with pytest.raises(ValueError, match="dtype"):
        SharpnessConfig(dtype="float16")
    model, _, objective, _, _ = quadratic()
    with pytest.raises(ValueError, match="unknown space"):
        random_direction(model, "both")
    with pytest.raises(ValueError, match="parts"):
        with perturbation(model, Direction("lora", []), 0.1):
            pass
    with pytest.raises(ValueError, match="no LoRA layers"):
        space_dim(OneLinear(2, 2), "full")
