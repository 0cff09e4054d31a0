"""The shared backend helpers of bilora.layers, checked against independent computations."""

from __future__ import annotations

import hashlib
import math

import torch

from bilora import layers


def _params(shapes, scale=3.0):
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=gen) * scale
        out.append(p)
    return out


def test_stream_seed_is_blake2b_of_the_joined_key():
    # the seeds of Flat-LoRA's noise and of sharpness directions must not move: recompute them from the hash
    for key in (("flat_lora", 0, 5, 2), ("sharpness", 3, "full", 1, 7)):
        text = ":".join(str(k) for k in key)
        expected = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % 2**63
        assert layers.stream_seed(*key) == expected
    assert layers.stream_seed("flat_lora", 0, 5, 2) != layers.stream_seed("sharpness", 0, 5, 2)


def test_grad_norms_match_a_float64_sum_and_the_per_tensor_loop():
    params = _params([(7, 5), (3,), (11, 2)])
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: ignored
    exact = math.sqrt(math.fsum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
    # float32 accumulation of ~80 squares: relative error well under 1e-6
    assert abs(float(layers.grad_norm(params)) - exact) <= 1e-6 * exact
    assert abs(float(layers.grad_norm_sumsq(params)) - exact) <= 1e-6 * exact
    # grad_norm is bit for bit the norm of the per-tensor norms (what Method.clip_and_step always used)
    loop = torch.stack([p.grad.float().norm() for p in params if p.grad is not None]).norm()
    assert torch.equal(layers.grad_norm(params), loop)
    assert float(layers.grad_norm([torch.nn.Parameter(torch.zeros(2))])) == 0.0


def test_forwards_replaced_restores_the_class_forward_also_on_error():
    lin = torch.nn.Linear(3, 2)
    x = torch.ones(1, 3)
    before = lin(x)
    try:
        with layers.forwards_replaced([(lin, lambda inp: torch.zeros(1, 2))]):
            assert torch.equal(lin(x), torch.zeros(1, 2))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert "forward" not in vars(lin) and torch.equal(lin(x), before)


def test_work_dtype_widens_to_float32_only():
    assert layers.work_dtype(torch.bfloat16) == torch.float32
    assert layers.work_dtype(torch.float32) == torch.float32
    assert layers.work_dtype(torch.float64) == torch.float64


def test_base_linear_runs_in_the_base_dtype_and_returns_the_input_dtype():
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 3).to(torch.bfloat16)  # an nn.Linear computes in its weight's dtype
    x = torch.randn(2, 4, 5)  # (B, L, in) float32
    w = torch.randn(3, 5)  # a temporary float32 weight, e.g. dequant(W0) + delta
    out = layers.base_linear(base, x, w, base.bias)
    want = torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), base.bias).float()  # the same bf16 matmul, written out
    assert out.dtype == torch.float32 and out.shape == (2, 4, 3) and torch.equal(out, want)
