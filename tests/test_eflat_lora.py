"""EFlat-LoRA / EFMLoRA (bilora/methods/eflat_lora.py) against independent computations on tiny models."""

from __future__ import annotations

import copy
import io
import math
import types

import pytest
import torch
from peft import PeftModel

from bilora import adapters, checkpoint
from bilora.methods import StepContext, build
from bilora.methods.eflat_lora import EFlatLoRA, factored_estimate, full_grad_estimate
from bilora.train import FineTuner, LoopConfig
from tests.tiny import cls_examples, collate, peft_bert, tiny_bert

RHO, BETA, LR = 0.05, 0.9, 1e-2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and 2 busy shared cores make OpenMP spin (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the pseudo-inverse estimate -------------------------------------------------------------------
def _toy_grads(m: int, n: int, r: int, *, zero_b: bool = False, seed: int = 0):
    """A LoRA linear layer in float64 with a nonlinear loss: (A, B, gA, gB, true G = dL/dW at W0 + sBA, s)."""
    g = torch.Generator().manual_seed(seed)
    s = 2.0
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.zeros(m, r, dtype=torch.float64) if zero_b else torch.randn(m, r, generator=g, dtype=torch.float64)
    x = torch.randn(7, n, generator=g, dtype=torch.float64)
    y = torch.randn(7, m, generator=g, dtype=torch.float64)

    def loss(W):
        return ((torch.tanh(x @ W.T) - y) ** 2).sum()

    W = (W0 + s * B @ A).requires_grad_(True)
    (G,) = torch.autograd.grad(loss(W), W)
    A_, B_ = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    gA, gB = torch.autograd.grad(loss(W0 + s * B_ @ A_), (A_, B_))
    return A, B, gA, gB, G, s


def test_estimate_recovers_true_gradient_when_exact():
    # Everything here is float64. The (pseudo-)inverses of these random factors (condition numbers 2.7 to 71) lose at
    # most ~2 digits: errors ≲ κ·n·2^-53 ≈ 1e-13 relative on entries |G| ≤ 11 (observed ≤ 1e-14); rtol and atol
    # 1e-12 (absolute, for entries near 0) leave 10x over that bound.
    # r = n = m with full-rank A and B: both pseudo-inverses are inverses, G_hat = G.
    A, B, gA, gB, G, s = _toy_grads(5, 5, 5)
    torch.testing.assert_close(full_grad_estimate(A, B, gA, gB, s), G, rtol=1e-12, atol=1e-12)
    sq, g_pinv_a = factored_estimate(A, B, gA, gB, s)
    assert float(sq.sqrt()) == pytest.approx(float(G.norm()), rel=1e-12)
    torch.testing.assert_close(g_pinv_a, G @ torch.linalg.inv(A), rtol=1e-12, atol=1e-12)
    # B = 0 (as at step 1) and r = n < m: only the first term, which is then exact.
    A, B, gA, gB, G, s = _toy_grads(8, 4, 4, zero_b=True)
    torch.testing.assert_close(full_grad_estimate(A, B, gA, gB, s, second_term=False), G, rtol=1e-12, atol=1e-12)
    sq, _ = factored_estimate(A, B, gA, gB, s, second_term=False)
    assert float(sq.sqrt()) == pytest.approx(float(G.norm()), rel=1e-12)
    # r = m < n: the second term alone is exact, the first is the projection G P_row(A).
    A, B, gA, gB, G, s = _toy_grads(4, 9, 4)
    second = 2 * full_grad_estimate(A, B, gA, gB, s) - full_grad_estimate(A, B, gA, gB, s, second_term=False)
    torch.testing.assert_close(second, G, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("second", [True, False])
def test_factored_estimate_matches_dense(second):
    """The r x r formulas equal ||G_hat||_F^2 and G_hat pinv(A) of the dense (m, n) estimate, low rank."""
    A, B, gA, gB, _, s = _toy_grads(11, 9, 3, seed=4)
    dense = full_grad_estimate(A, B, gA, gB, s, second_term=second)
    sq, g_pinv_a = factored_estimate(A, B, gA, gB, s, second_term=second)
    # float64 both ways (QR / r x r products vs the dense matrix), A and B well conditioned (κ 2.0 and 1.8): errors
    # ~n·2^-53 ≈ 1e-14 (observed 9e-16); 1e-12 leaves 100x.
    assert float(sq) == pytest.approx(float((dense**2).sum()), rel=1e-12)
    torch.testing.assert_close(g_pinv_a, dense @ torch.linalg.pinv(A), rtol=1e-12, atol=1e-12)
    # fp32 inputs are computed in fp32 and agree with the float64 result: backward-stable pinv and QR of these
    # well-conditioned 11 x 3 / 9 x 3 factors give ≲ κ·n·2^-24 ≈ 1.3e-6 (observed 1.2e-7); rel 1e-5 ≈ 8x that.
    sq32, gpa32 = factored_estimate(A.float(), B.float(), gA.float(), gB.float(), s, second_term=second)
    assert gpa32.dtype == torch.float32
    assert float(sq32) == pytest.approx(float(sq), rel=1e-5)


# -- one step against an independent computation ------------------------------------------------------
def _ctx(model, optimizer, batches, *, step: int, max_steps: int) -> StepContext:
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return StepContext(
        model=model, optimizer=optimizer, scheduler=sched, micro_batches=batches, step=step, max_steps=max_steps, max_grad_norm=None
    )


def _record_optimizer(model, optimizer) -> dict:
    """Patch optimizer.step to record parameters and gradients before it, and parameters after it."""
    seen: dict = {}
    inner = optimizer.step

    def step(self, *args, **kwargs):  # a bound method, so an LR scheduler can still wrap it
        named = adapters.trainable_named_parameters(model)
        seen["before"] = {n: p.detach().clone() for n, p in named}
        seen["grads"] = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
        out = inner(*args, **kwargs)
        seen["after"] = {n: p.detach().clone() for n, p in named}
        return out

    optimizer.step = types.MethodType(step, optimizer)
    return seen


def _layers(model):
    """{layer name: (A param name, B param name, s)} for the primary adapter."""
    out = {}
    for name, layer in adapters.lora_layers(model):
        out[name] = (f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight", float(layer.scaling["default"]))
    return out


def _manual_e_b(layers, params, grads, b_at_grad, rho_t, *, two_terms: bool):
    """E_B per layer by explicit float64 inverses: pinv(A^T) = (AA^T)^-1 A, pinv(B^T) = B (B^T B)^-1, pinv(A) = A^T (AA^T)^-1."""
    g_hat = {}
    for name, (an, bn, s) in layers.items():
        A, gA, gB = params[an].double(), grads[an].double(), grads[bn].double()
        aat_inv = torch.linalg.inv(A @ A.T)
        g = gB @ (aat_inv @ A) / s
        if two_terms:
            Bp = b_at_grad[name].double()
            g = 0.5 * (g + Bp @ torch.linalg.inv(Bp.T @ Bp) @ gA / s)
        g_hat[name] = g
    norm = math.sqrt(sum(float((g**2).sum()) for g in g_hat.values()))
    return {
        name: (rho_t * g_hat[name] / norm) @ (params[an].double().T @ torch.linalg.inv(params[an].double() @ params[an].double().T)) / s
        for name, (an, _, s) in layers.items()
    }


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def test_steps_match_manual_computation():
    # float64 model: at t = 2 the second term inverts B' = B + E_ema, and B after the first AdamW step is
    # lr·sign(g_B), nearly rank one (κ(B'^T B') up to 1e6 here). In float32 that alone costs ~κ(B')·2^-24 ≈ 6e-5
    # (observed 4e-5) and left this check within 2.4x of its old 1e-4 bound; in float64 it costs ~1e-13 and the
    # comparison is well conditioned. The float32 numerics of the estimate are test_factored_estimate_matches_dense's.
    model = peft_bert().double()
    model.train()
    layers = _layers(model)
    batches = [collate(cls_examples(8)[:4]), collate(cls_examples(8)[4:])]
    method = EFlatLoRA(rho=RHO, beta=BETA)
    opt = torch.optim.AdamW(method.param_groups(model, LR, 0.0), lr=LR)
    seen = _record_optimizer(model, opt)
    params = lambda: {n: p.detach().clone() for n, p in adapters.trainable_named_parameters(model)}  # noqa: E731

    # t = 1: B = 0, unperturbed, first term only; E_ema = E_B.
    p0 = params()
    assert all(float(p0[bn].norm()) == 0 for _, bn, _ in layers.values())
    ctx = _ctx(model, opt, batches, step=0, max_steps=3)
    m1 = method.step(ctx)
    assert ctx.passes == {"forward": 2, "backward": 2}  # one forward/backward per micro-batch
    assert m1["two_term_layers"] == 0 and m1["rho_t"] == RHO
    assert all(torch.equal(seen["before"][n], p) for n, p in p0.items())
    e_b1 = _manual_e_b(layers, seen["before"], seen["grads"], None, RHO, two_terms=False)
    now = params()
    for name, (an, bn, _) in layers.items():
        # E_ema is stored in float32 (one rounding, 6e-8) of the float64 estimate (error ~1e-14) (observed 3e-8)
        assert _rel_err(method.e_ema[name], e_b1[name]) < 1e-6, name
        assert torch.equal(now[an], seen["after"][an]), "the perturbation must not touch A"
        assert torch.equal(now[bn], seen["after"][bn] + method.e_ema[name]), "the model sits at B + E_ema"
        assert torch.equal(method.b_clean[name], seen["after"][bn])
    e_ema1 = {k: v.clone() for k, v in method.e_ema.items()}
    clean1 = seen["after"]

    # t = 2: the gradient is taken at (B + E_ema, A); the optimizer sees the exact unperturbed B.
    twin = copy.deepcopy(model)
    b_at_grad = {name: now[bn] for name, (_, bn, _) in layers.items()}
    ctx = _ctx(model, opt, batches, step=1, max_steps=3)
    m2 = method.step(ctx)
    assert ctx.passes == {"forward": 2, "backward": 2}
    # rho_t = rho / sqrt(t) in float64, the same formula (pytest's default rel 1e-6 is ample; observed identical)
    assert m2["two_term_layers"] == len(layers) and m2["rho_t"] == pytest.approx(RHO / math.sqrt(2))
    assert all(torch.equal(seen["before"][n], p) for n, p in clean1.items()), "B restored bit for bit before the update"
    twin_params = dict(adapters.trainable_named_parameters(twin))
    loss = sum(twin(**b).loss for b in batches) / len(batches)
    for n, g in zip(twin_params, torch.autograd.grad(loss, list(twin_params.values()))):
        # gradient at the perturbed point: float64, one backward per micro-batch accumulated into .grad vs one
        # backward through the mean, the same terms in at most another order (observed identical); rtol 1e-12 ≈ 5000 ulp
        torch.testing.assert_close(seen["grads"][n], g, rtol=1e-12, atol=1e-15)
    e_b2 = _manual_e_b(layers, seen["before"], seen["grads"], b_at_grad, RHO / math.sqrt(2), two_terms=True)
    now = params()
    for name, (an, bn, _) in layers.items():
        expected = (1 - BETA) * e_ema1[name].double() + BETA * e_b2[name]
        # the float64 estimate (≤ ~κ(B')·2^-53 ≈ 1e-13) mixed into E_ema in float32: ~3 roundings (observed 6e-8)
        assert _rel_err(method.e_ema[name], expected) < 1e-6, name
        assert torch.equal(now[an], seen["after"][an])
        assert torch.equal(now[bn], seen["after"][bn] + method.e_ema[name])
    # Global normalisation: sqrt(sum_l ||E_W_l||^2) = rho_t with E_W = s E_B A at t = 1 (rows of G_hat lie in Row(A)).
    total = math.sqrt(sum(float(((s * e_b1[name] @ p0[an].double()) ** 2).sum()) for name, (an, _, s) in layers.items()))
    # float64 manual E_B: (A A^T)^-1 with κ(A A^T) ≤ 3.2, and sums of ~1e3 squares: ≲ 1e-14 (observed 1e-16)
    assert total == pytest.approx(RHO, rel=1e-12)

    # Final step: the model ends at the unperturbed B.
    method.step(_ctx(model, opt, batches, step=2, max_steps=3))
    assert not method.applied and not method.b_clean
    assert all(torch.equal(p, seen["after"][n]) for n, p in params().items())


def test_per_layer_normalisation():
    """At t = 1 (first term only) every layer's E_W = s E_B A has norm exactly rho_1 = rho."""
    model = peft_bert()
    model.train()
    method = EFlatLoRA(rho=RHO, normalize="per_layer", rho_schedule="constant")
    opt = torch.optim.AdamW(method.param_groups(model, LR, 0.0), lr=LR)
    a_before = {name: layer.lora_A["default"].weight.detach().clone() for name, layer in adapters.lora_layers(model)}
    method.step(_ctx(model, opt, [collate(cls_examples(4))], step=0, max_steps=5))
    for name, (_, _, s) in _layers(model).items():
        e_w = s * method.e_ema[name].double() @ a_before[name].double()
        # float32 E normalised to rho per layer: pinv and QR of A with κ(A A^T) ≤ 3.2 over ≤ 64 columns, worst case
        # ~κ·n·2^-24 ≈ 1e-5, the tolerance (observed ≤ 1.1e-6)
        assert float(e_w.norm()) == pytest.approx(RHO, rel=1e-5), name
    assert method.rho_at(4) == RHO


def test_bad_settings_rejected():
    with pytest.raises(ValueError):
        EFlatLoRA(normalize="layer")
    with pytest.raises(ValueError):
        EFlatLoRA(rho_schedule="cosine")


# -- the training loop: passes, determinism, state, export ------------------------------------------
def _tuner(seed: int = 0, steps: int = 4, grad_accum: int = 1, **kw) -> FineTuner:
    model = peft_bert()
    method = build("eflat_lora", {"rho": RHO}, seed=seed)
    loop = LoopConfig(
        batch_size=4, grad_accum=grad_accum, max_steps=steps, lr=LR, warmup_ratio=0.0, checkpoint_every=kw.pop("checkpoint_every", 0)
    )
    return FineTuner(model, method, cls_examples(16), collate, loop, seed=seed, **kw)


def _same(a, b) -> bool:
    sa, sb = checkpoint.adapter_state(a), checkpoint.adapter_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_one_pass_per_micro_batch_and_same_seed_bit_identical():
    a, b = _tuner(seed=2, grad_accum=2), _tuner(seed=2, grad_accum=2)
    a.train()
    b.train()
    assert a.method.passes_per_step == 1
    assert [h["forward_passes"] for h in a.history] == [2.0] * 4
    assert [h["backward_passes"] for h in a.history] == [2.0] * 4
    assert _same(a.model, b.model)
    assert all(torch.equal(a.method.e_ema[k], b.method.e_ema[k]) for k in a.method.e_ema)


class _Stop(Exception):
    pass


def _interrupt_at(k: int):
    def on_step(step, _total):
        if step == k:
            raise _Stop

    return on_step


def test_state_round_trips_and_resume_is_bit_identical(tmp_path):
    full = _tuner()
    full.train()
    # A run interrupted after its step-2 checkpoint, resumed by a fresh process-like FineTuner.
    first = _tuner(checkpoint_dir=tmp_path, fingerprint="x", checkpoint_every=2, on_step=_interrupt_at(3))
    with pytest.raises(_Stop):
        first.train()
    resumed = _tuner(checkpoint_dir=tmp_path, fingerprint="x", checkpoint_every=2)
    assert resumed.try_resume() and resumed.step == 2 and resumed.method.applied
    resumed.train()
    assert _same(resumed.model, full.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]

    # state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict is exact.
    buf = io.BytesIO()
    torch.save(first.method.state_dict(), buf)
    buf.seek(0)
    other = EFlatLoRA()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.applied == first.method.applied
    for attr in ("e_ema", "b_clean"):
        mine, theirs = getattr(first.method, attr), getattr(other, attr)
        assert mine and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_export_writes_unperturbed_b_and_loads_in_peft(tmp_path):
    batch = collate(cls_examples(6, seed=5))
    # Mid-training (the model sits at B + E_ema): the export holds the exact unperturbed B.
    ft = _tuner(steps=5, on_step=_interrupt_at(2))
    with pytest.raises(_Stop):
        ft.train()
    method, model = ft.method, ft.model
    assert method.applied
    perturbed = {n: p.detach().clone() for n, p in adapters.trainable_named_parameters(model)}
    method.export(model, tmp_path / "mid")
    assert all(torch.equal(p, perturbed[n]) for n, p in adapters.trainable_named_parameters(model)), "export must not move the model"
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0), str(tmp_path / "mid"))
    for name, layer in adapters.lora_layers(loaded):
        assert torch.equal(layer.lora_B["default"].weight, method.b_clean[name])
    with method.unperturbed(model):
        clean_out = _outputs(model, batch)
    # exact: the export holds b_clean bit for bit (checked above) and unperturbed() puts the same B back, so both
    # models run the same float32 operations on the same numbers
    torch.testing.assert_close(_outputs(loaded, batch), clean_out, rtol=0, atol=0)
    # the perturbation is real: E_ema moves logits by ~3e-3 (observed), not by rounding
    assert not torch.allclose(_outputs(model, batch), clean_out, rtol=0, atol=1e-7)

    # After a full run the model itself is unperturbed and the export reproduces it.
    ft = _tuner(steps=3)
    ft.train()
    assert not ft.method.applied
    ft.method.export(ft.model, tmp_path / "end")
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0), str(tmp_path / "end"))
    # exact for the same reason: the trained B and A, saved and loaded bit for bit, run through the same operations
    torch.testing.assert_close(_outputs(loaded, batch), _outputs(ft.model, batch), rtol=0, atol=0)
    # training moved the logits by ~4e-2 (observed), far beyond float32 rounding (default rtol 1e-5)
    assert not torch.allclose(_outputs(tiny_bert(seed=0), batch), _outputs(ft.model, batch))
