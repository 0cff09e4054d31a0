"""Flat-LoRA: noise law, schedule, seeding, exact one-matmul forward/backward, frozen base on fp32 and nf4."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from bilora import adapters
from bilora import layers as base_layers
from bilora.methods import build, flat_lora
from bilora.methods.flat_lora import effective_weight, flat_noise, layer_noise, noise_seed, schedule_factor
from bilora.train import FineTuner, LoopConfig
from tests.tiny import SPEC, cls_examples, collate, peft_bert
from tests.tiny import nf4_bert as tiny_nf4_bert


class OneLinear(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def one_layer_model(n_in: int = 48, n_out: int = 40, r: int = 4, alpha: float = 8.0, seed: int = 0):
    """A PEFT-wrapped single linear with a non-zero B, so W' = W0 + s·BA differs from W0."""
    torch.manual_seed(seed)
    model = get_peft_model(OneLinear(n_in, n_out), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.5)
    return model, layer


def hand_std(layer, sigma_t: float) -> torch.Tensor:
    """f·sigma/sqrt(n)·||W0_row + s·(BA)_row||, in float64, computed independently of the module."""
    w = layer.get_base_layer().weight.detach().double()
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    merged = w + layer.scaling["default"] * b @ a
    return sigma_t / math.sqrt(w.shape[1]) * merged.norm(dim=1)


def nf4_peft_bert(tmp_path, seed: int = 0):
    model = tiny_nf4_bert(tmp_path / "tiny", seed=seed)
    torch.manual_seed(seed + 1)
    return adapters.attach_lora(model, SPEC, "SEQ_CLS")


def train(model, method, steps: int = 4, grad_accum: int = 1, seed: int = 0) -> FineTuner:
    loop = LoopConfig(batch_size=8, grad_accum=grad_accum, max_steps=steps, lr=1e-2, warmup_ratio=0.0, log_every=100)
    tuner = FineTuner(model, method, cls_examples(32), collate, loop, seed=seed)
    tuner.train()
    return tuner


def frozen_snapshot(model) -> dict[str, torch.Tensor]:
    """Every frozen parameter and buffer, plus 4-bit quant states, cloned bit for bit."""
    snap = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    snap.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    for n, m in model.named_modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            snap[f"{n}:absmax"] = qs.absmax.clone()
            if qs.state2 is not None:
                snap[f"{n}:absmax2"] = qs.state2.absmax.clone()
    return snap


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- schedule, noise law, seeding ---------------------------------------------------------------
def test_schedule_factor_is_a_cosine_ramp():
    assert schedule_factor(0, 100) == 0.0
    # float64 libm cosine: cos(pi / 2) evaluates to 6e-17, not 0, so 0.5 comes out 1 ulp low (observed 5.6e-17);
    # abs 1e-15 ≈ 10 ulp
    assert schedule_factor(50, 100) == pytest.approx(0.5, abs=1e-15)
    assert schedule_factor(100, 100) == pytest.approx(1.0, abs=1e-15)
    values = [schedule_factor(t, 100) for t in range(101)]
    assert values == sorted(values)


def test_empirical_row_std_matches_formula_on_a_large_layer():
    model, layer = one_layer_model(n_in=4096, n_out=256)
    sigma_t = 0.6 * 0.05
    expected = hand_std(layer, sigma_t)
    with flat_noise(model, sigma_t, run_seed=3, step=7) as info:
        ((seed, std_rows),) = info
    eps = layer_noise(seed, std_rows, 4096).double()
    # float32 row norms of W0 + s·BA over 4096 columns (blocked sums: error ~log2(n)·2^-24 ≈ 1e-6, not n·2^-24) and
    # one float32 scaling, against float64 (observed 1.2e-7); rtol 1e-5 is 10x that
    torch.testing.assert_close(std_rows.double(), expected, rtol=1e-5, atol=0)
    # Sampling error, not rounding: a fixed seed (the same draw on AVX2 and AVX512 CPUs: torch uses one vectorised
    # normal sampler for both). Per row, the sample std of n = 4096 normals has relative sd 1/sqrt(2n) = 1.1 %: 0.05 is
    # 4.5 sd for the largest of 256 rows (observed 0.029, 2.7 sd). Pooled over N = 256 x 4096: the std has sd
    # 1/sqrt(2N) = 7e-4 and the mean sd 1/sqrt(N) = 1e-3, so 0.005 is 7 and 5 sd (observed 4.5e-4 and 6.5e-5).
    ratio = eps.std(dim=1) / expected
    assert (ratio - 1).abs().max() < 0.05
    assert abs(float((eps / expected[:, None]).std()) - 1) < 0.005  # pooled
    assert float((eps / expected[:, None]).mean().abs()) < 0.005


def test_same_seed_same_noise_other_step_or_layer_other_noise():
    std = torch.full((16,), 0.1)
    s = noise_seed(0, 5, 2)
    assert s == noise_seed(0, 5, 2)
    assert torch.equal(layer_noise(s, std, 32), layer_noise(noise_seed(0, 5, 2), std, 32))
    for other in (noise_seed(0, 6, 2), noise_seed(0, 5, 3), noise_seed(1, 5, 2)):
        assert other != s
        # independent draws differ by ~std = 0.1 almost everywhere, far beyond allclose's default rtol 1e-5
        assert not torch.allclose(layer_noise(other, std, 32), layer_noise(s, std, 32))


def test_global_rng_untouched_and_forward_restored():
    model, layer = one_layer_model()
    base = layer.get_base_layer()
    x = torch.randn(3, 48)
    clean = model(x)
    state = torch.get_rng_state()
    with flat_noise(model, 0.05, run_seed=0, step=1):
        assert "forward" in vars(base)
        noisy = model(x)
    assert "forward" not in vars(base)
    assert torch.equal(torch.get_rng_state(), state)
    # the noise moves the outputs by ~0.2 (observed), far beyond allclose's default rtol 1e-5
    assert not torch.allclose(clean, noisy)
    assert torch.equal(model(x), clean)


def test_existing_instance_forward_is_restored_not_deleted():
    model, layer = one_layer_model()
    base = layer.get_base_layer()
    wrapper = base.forward  # e.g. an accelerate-style wrapper stored on the instance
    base.forward = wrapper
    with flat_noise(model, 0.05, run_seed=0, step=1):
        assert vars(base)["forward"] is not wrapper
    assert vars(base)["forward"] is wrapper


def test_restored_even_on_error():
    model, layer = one_layer_model()
    with pytest.raises(RuntimeError, match="boom"):
        with flat_noise(model, 0.05, run_seed=0, step=1):
            raise RuntimeError("boom")
    assert "forward" not in vars(layer.get_base_layer())


# -- exact forward and gradients ----------------------------------------------------------------
def test_forward_and_gradients_match_an_explicit_reference():
    model, layer = one_layer_model()
    base = layer.get_base_layer()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(5, 7, 48, requires_grad=True)
    g = torch.randn(5, 7, 40)

    with flat_noise(model, 0.3, run_seed=1, step=4) as info:
        ((seed, std_rows),) = info
        out = model(x)
        (out * g).sum().backward()
    grads = {"x": x.grad.clone(), "A": a.grad.clone(), "B": b.grad.clone()}
    assert base.weight.grad is None and base.bias.grad is None

    # reference: W0 + eps built explicitly, plain autograd, float64
    eps = layer_noise(seed, std_rows, 48).double()
    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ref = F.linear(x64, base.weight.detach().double() + eps, base.bias.detach().double()) + s * (x64 @ a64.T) @ b64.T
    (ref * g.double()).sum().backward()

    # Float32 against float64. The rounding error of a float32 sum is bounded by n·2^-24 times the sum of its terms'
    # magnitudes, not by the size of the result: an entry of dL/dA of -0.88 is a sum of terms of total size 870, and its
    # float32 error of 1e-5 met an elementwise rtol / atol of 1e-5 within 2x. So each entry's error is bounded against
    # the same sums over absolute values ("terms"; every quantity is linear in each operand, so autograd of |.| gives
    # them): chains of n ≤ 80 terms (40 outputs, 35 positions, rank 4) give n·2^-24 ≤ 5e-6 (observed ≤ 7e-8 x terms on
    # AVX512 and AVX2).
    xa, aa, ba = (t.detach().double().abs().requires_grad_(True) for t in (x, a, b))
    terms = F.linear(xa, (base.weight.detach().double() + eps).abs(), base.bias.detach().double().abs()) + s * (xa @ aa.T) @ ba.T
    (terms * g.double().abs()).sum().backward()
    for name, got, want, bound in (
        ("out", out, ref, terms),
        ("x", grads["x"], x64.grad, xa.grad),
        ("A", grads["A"], a64.grad, aa.grad),
        ("B", grads["B"], b64.grad, ba.grad),
    ):
        err = (got.detach().double() - want.detach()).abs()
        assert bool((err <= 5e-6 * bound.detach()).all()), f"{name}: max error / terms {float((err / bound.detach()).max()):.2e}"
    assert not torch.allclose(eps, torch.zeros_like(eps))  # the noise is there (std ~0.3 x row norm / sqrt(48))


def test_nf4_layer_forward_and_input_grad_use_dequantized_weight_plus_noise(tmp_path):
    import bitsandbytes.functional as bnbf

    model = nf4_peft_bert(tmp_path)
    _, layer = adapters.lora_layers(model)[0]
    base = layer.get_base_layer()
    assert base_layers.is_4bit(base)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0.0, 0.5)
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    x = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 32)
    with flat_noise(model, 0.2, run_seed=0, step=3) as info:
        seed, std_rows = info[0]
        out = layer(x)
        (out * g).sum().backward()
    w0 = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    eps = layer_noise(seed, std_rows, 32).double()
    x64 = x.detach().double().requires_grad_(True)
    ref = F.linear(x64, w0 + eps, base.bias.detach().double()) + s * (x64 @ a.detach().double().T) @ b.detach().double().T
    (ref * g.double()).sum().backward()
    # float32 path (dequantized weight + eps, one matmul) vs float64: sums over 32 inputs / outputs and rank 4, outputs
    # and input gradients up to ~5, no large cancellation here (observed ≤ 6e-7 absolute, 3% of the tolerance)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    # row norms use dequant(W0) + s·BA: float32 norms over 32 columns and one scaling vs float64 (observed 1.1e-7
    # relative); atol 1e-7 for near-zero rows only
    merged = w0 + s * b.detach().double() @ a.detach().double()
    torch.testing.assert_close(std_rows.double(), 0.2 / math.sqrt(32) * merged.norm(dim=1), rtol=1e-5, atol=1e-7)


def test_effective_weight_is_temporary_and_base_untouched():
    model, layer = one_layer_model()
    base = layer.get_base_layer()
    before = base.weight.detach().clone()
    w_eff = effective_weight(base, torch.full((40,), 0.1), seed=11, dtype=torch.float32)
    assert w_eff.data_ptr() != base.weight.data_ptr()
    assert torch.equal(base.weight, before)
    # w_eff = fl(W0 + eps), so fl(w_eff - W0) - eps is two float32 roundings: ≤ 2^-24 (|W0 + eps| + |eps|) ≤ 5e-8 for
    # |W0| ≤ 0.15 (Linear(48, 40) init) and |eps| ≤ 0.5 (5 sd) (observed 3e-8); atol 1e-7, no relative part
    torch.testing.assert_close(w_eff - before, layer_noise(11, torch.full((40,), 0.1), 48), rtol=0, atol=1e-7)


# -- training runs ------------------------------------------------------------------------------
def test_fp32_training_keeps_base_bit_identical_one_pass_per_micro_batch():
    model = peft_bert()
    before = frozen_snapshot(model)
    adapters_before = adapter_state(model)
    tuner = train(model, build("flat_lora", {"sigma": 0.5}), steps=4, grad_accum=2)
    assert_bit_identical(before, frozen_snapshot(model))
    assert any(not torch.equal(adapters_before[k], v) for k, v in adapter_state(model).items())
    for h in tuner.history:
        assert h["forward_passes"] == 2 and h["backward_passes"] == 2  # one forward/backward per micro-batch
    # the loop logs schedule_factor itself: the same float64 formula (observed identical; pytest's default rel 1e-6)
    assert [h["noise_factor"] for h in tuner.history] == pytest.approx([schedule_factor(t, 4) for t in range(4)])
    assert flat_lora.FlatLoRA.passes_per_step == 1
    assert all("forward" not in vars(layer.get_base_layer()) for _, layer in adapters.lora_layers(model))


def test_nf4_training_keeps_base_bit_identical(tmp_path):
    model = nf4_peft_bert(tmp_path)
    before = frozen_snapshot(model)
    adapters_before = adapter_state(model)
    train(model, build("flat_lora", {"sigma": 0.5}), steps=3)
    assert_bit_identical(before, frozen_snapshot(model))
    assert any(not torch.equal(adapters_before[k], v) for k, v in adapter_state(model).items())


def test_same_micro_batch_noise_within_a_step(monkeypatch):
    seen: list[int] = []
    real = flat_lora.layer_noise

    def spy(seed, std_rows, n_in):
        seen.append(seed)
        return real(seed, std_rows, n_in)

    monkeypatch.setattr(flat_lora, "layer_noise", spy)
    model = peft_bert()
    n_layers = len(adapters.lora_layers(model))
    train(model, build("flat_lora", {"sigma": 0.5}), steps=2, grad_accum=2)
    step1 = {noise_seed(0, 1, i) for i in range(n_layers)}
    assert set(seen) == step1  # step 0 has f = 0: no noise at all; step 1: one seed per layer
    assert all(seen.count(s) >= 2 for s in step1)  # reused by both micro-batches (and in backward)


def test_same_seed_bit_identical_adapter_and_sigma_zero_is_lora():
    runs = []
    for seed in (0, 0, 1):
        model = peft_bert()
        train(model, build("flat_lora", {"sigma": 0.5}, seed=seed), steps=4)
        runs.append(adapter_state(model))
    assert_bit_identical(runs[0], runs[1])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])

    lora, flat0 = peft_bert(), peft_bert()
    train(lora, build("lora"), steps=4)
    train(flat0, build("flat_lora", {"sigma": 0.0}), steps=4)
    assert_bit_identical(adapter_state(lora), adapter_state(flat0))
    assert any(not torch.equal(runs[0][k], v) for k, v in adapter_state(lora).items())


def test_unsupported_base_is_refused():
    with pytest.raises(NotImplementedError):
        flat_lora.check_base(torch.nn.Embedding(10, 8))
    with pytest.raises(NotImplementedError):
        flat_lora.check_base(torch.nn.Conv1d(4, 4, 1))
    flat_lora.check_base(torch.nn.Linear(4, 4))
