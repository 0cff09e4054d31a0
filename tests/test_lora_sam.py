"""LoRA-SAM (bilora/methods/lora_sam.py) against independent computations on tiny models."""

from __future__ import annotations

import copy
import tempfile
import types

import pytest
import torch
from peft import PeftModel

from bilora import adapters, checkpoint
from bilora.methods import StepContext, build
from bilora.methods.lora_sam import LoRASAM
from bilora.train import FineTuner, LoopConfig
from tests.tiny import SPEC, cls_examples, collate, peft_bert, tiny_bert
from tests.tiny import nf4_bert as tiny_nf4_bert

RHO = 0.05
LR = 1e-2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and 2 busy shared cores make OpenMP spin (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_b(model: torch.nn.Module, seed: int = 3) -> None:
    """Give B a non-zero value so that A gets a gradient too (with B = 0, dL/dA = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b, _ in adapters.lora_factors(model, adapters.PRIMARY):
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _ctx(model, optimizer, batches, *, step: int = 0, max_steps: int = 10) -> StepContext:
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return StepContext(
        model=model, optimizer=optimizer, scheduler=sched, micro_batches=batches, step=step, max_steps=max_steps, max_grad_norm=None
    )


def _record_optimizer(model, optimizer) -> dict:
    """Patch optimizer.step to record parameters and gradients exactly as the optimizer receives them."""
    seen: dict = {}
    inner = optimizer.step

    def step(self, *args, **kwargs):  # a bound method, so an LR scheduler can still wrap it
        named = adapters.trainable_named_parameters(model)
        seen["params"] = {n: p.detach().clone() for n, p in named}
        seen["grads"] = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}
        return inner(*args, **kwargs)

    optimizer.step = types.MethodType(step, optimizer)
    return seen


def _manual_sam_grads(twin, batches, rho):
    """Textbook SAM on the LoRA A/B of ``twin``: returns (loss1, loss2, {name: grad at the perturbed point})."""
    params = dict(adapters.trainable_named_parameters(twin))
    lora_names = [n for n in params if ".lora_A." in n or ".lora_B." in n]
    assert lora_names and any("classifier" in n for n in params)
    loss1 = sum(twin(**b).loss for b in batches) / len(batches)
    g = torch.autograd.grad(loss1, [params[n] for n in lora_names])
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
    with torch.no_grad():
        for n, x in zip(lora_names, g):
            params[n].add_(rho * x / (norm + 1e-12))
    loss2 = sum(twin(**b).loss for b in batches) / len(batches)
    g2 = torch.autograd.grad(loss2, list(params.values()))
    return loss1.item(), loss2.item(), dict(zip(params, g2))


@pytest.mark.parametrize("n_micro", [1, 2])
def test_step_equals_manual_sam(n_micro):
    model = peft_bert()
    _randomise_b(model)
    model.train()
    twin = copy.deepcopy(model)
    examples = cls_examples(8)
    batches = [collate(examples[4 * k : 4 * k + 4]) for k in range(n_micro)]
    method = LoRASAM(rho=RHO)
    opt = torch.optim.SGD(method.param_groups(model, LR, 0.0), lr=LR)
    seen = _record_optimizer(model, opt)
    before = {n: p.detach().clone() for n, p in adapters.trainable_named_parameters(model)}

    # Watch the head and the LoRA tensors at every forward: the head must never move.
    head = {n: p for n, p in adapters.trainable_named_parameters(model) if "classifier" in n}
    lora = {n: p for n, p in adapters.trainable_named_parameters(model) if ".lora_" in n}
    calls: list[tuple[bool, bool]] = []
    hook = model.register_forward_pre_hook(
        lambda *_: calls.append(
            (all(torch.equal(p, before[n]) for n, p in head.items()), all(torch.equal(p, before[n]) for n, p in lora.items()))
        )
    )
    ctx = _ctx(model, opt, batches)
    metrics = method.step(ctx)
    hook.remove()

    # Two forward/backward passes per micro-batch.
    assert ctx.passes == {"forward": 2 * n_micro, "backward": 2 * n_micro}
    assert calls == [(True, True)] * n_micro + [(True, False)] * n_micro  # pass 2: LoRA perturbed, head not

    # The optimizer saw the original parameters, bit for bit, and the gradient at the perturbed point.
    for n, p in before.items():
        assert torch.equal(seen["params"][n], p), n
    loss1, loss2, g2 = _manual_sam_grads(twin, batches, RHO)
    assert set(seen["grads"]) == set(g2)
    for n, g in g2.items():
        torch.testing.assert_close(seen["grads"][n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert metrics["loss"] == pytest.approx(loss1, rel=1e-6)
    assert metrics["perturbed_loss"] == pytest.approx(loss2, rel=1e-6)
    assert metrics["perturbed_loss"] > metrics["loss"]
    assert metrics["perturbation_norm"] == pytest.approx(RHO, rel=1e-5)

    # The update is the optimizer's step on the SAM gradient, taken at the original point. The
    # optimizer here is SGD (no momentum): its update -lr * g is linear in g, so the gradient
    # agreement above (rtol 1e-5, atol 1e-7: float32 sums over 4-example batches in another order)
    # carries over to the update with the factor lr. AdamW would be ill-conditioned for this check:
    # its first step is lr * g / (|g| + eps), which maps gradients that agree to 1e-7 in absolute
    # terms onto updates that differ by up to lr where |g| ~ eps.
    # Bound per element: lr * (gradient tolerance) + one float32 rounding of each of the two results.
    ulp = torch.finfo(torch.float32).eps
    for n, p in adapters.trainable_named_parameters(model):
        expected = before[n].double() - LR * g2[n].double()
        bound = LR * (1e-5 * g2[n].double().abs() + 1e-7) + 2 * ulp * expected.abs()
        err = (p.detach().double() - expected).abs()
        assert bool((err <= bound).all()), f"{n}: max excess {float((err - bound).max()):.3e}"
        assert not torch.equal(p, before[n]) or not g2[n].any(), n  # it really moved


def test_accumulated_gradient_sets_the_perturbation():
    """With 2 micro-batches, e comes from the accumulated gradient, not from each micro-batch (docs/methods.md, "LoRA-SAM")."""
    model = peft_bert()
    _randomise_b(model)
    twin = copy.deepcopy(model)
    examples = cls_examples(8)
    batches = [collate(examples[:4]), collate(examples[4:])]
    method = LoRASAM(rho=0.5)
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0), lr=1e-2)
    seen = _record_optimizer(model, opt)
    method.step(_ctx(model, opt, batches))
    # Per-micro-batch SAM (m-SAM) gives a different gradient: the test can tell the semantics apart.
    per_micro = [_manual_sam_grads(copy.deepcopy(twin), [b], 0.5)[2] for b in batches]
    _, _, accumulated = _manual_sam_grads(twin, batches, 0.5)
    name = next(n for n in accumulated if ".lora_A." in n)
    # as in test_step_equals_manual_sam: float32 sums over 4-example batches in another order, rtol 1e-5; but these
    # A gradients are small (≤ 6.5e-6, B ~ 0.05), so the absolute floor is set on their scale: atol 1e-10 ≈ 1.5e-5 x
    # max|g| (observed error 1.6e-12, 1.3% of the tolerance, AVX512 and AVX2)
    torch.testing.assert_close(seen["grads"][name], accumulated[name], rtol=1e-5, atol=1e-10)
    m_sam = (per_micro[0][name] + per_micro[1][name]) / 2
    # m-SAM's gradient differs by up to 2.7e-6 (observed; 40% of the largest entry), 2.7x outside even rtol 1e-3 /
    # atol 1e-6 (and 2e4x outside the agreement tolerance above): the semantics are told apart
    assert not torch.allclose(seen["grads"][name], m_sam, rtol=1e-3, atol=1e-6)


def _train(seed: int = 0, steps: int = 3, grad_accum: int = 1):
    model = peft_bert()
    method = build("lora_sam", {"rho": RHO}, seed=seed)
    loop = LoopConfig(batch_size=4, grad_accum=grad_accum, max_steps=steps, lr=1e-2, warmup_ratio=0.0)
    ft = FineTuner(model, method, cls_examples(16), collate, loop, seed=seed)
    ft.train()
    return model, method, ft


def test_passes_in_history_with_grad_accum():
    _, method, ft = _train(steps=2, grad_accum=2)
    assert method.passes_per_step == 2
    assert [h["forward_passes"] for h in ft.history] == [4.0, 4.0]
    assert [h["backward_passes"] for h in ft.history] == [4.0, 4.0]
    assert all(h["perturbed_loss"] >= h["loss"] for h in ft.history)


def test_same_seed_bit_identical():
    a, _, _ = _train(seed=1)
    b, _, _ = _train(seed=1)
    sa, sb = checkpoint.adapter_state(a), checkpoint.adapter_state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[next(k for k in sa if ".lora_B." in k)], torch.zeros(1))


def test_export_loads_in_peft_and_reproduces_outputs(tmp_path):
    model, method, _ = _train()
    method.export(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0), str(tmp_path)).eval()
    batch = collate(cls_examples(6, seed=5))
    model.eval()
    with torch.no_grad():
        # exact: the exported adapter reloads bit for bit, so both models run the same float32 operations on the
        # same numbers
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
        # training moved the logits by ~3e-2 (observed), far beyond float32 rounding (default rtol 1e-5)
        assert not torch.allclose(tiny_bert(seed=0)(**batch).logits, model(**batch).logits)


def _nf4_bert(tmp: str):
    base = tiny_nf4_bert(tmp)
    torch.manual_seed(1)
    return adapters.attach_lora(base, SPEC, "SEQ_CLS")


def test_nf4_base_loss_falls():
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora.bnb import Linear4bit

    with tempfile.TemporaryDirectory() as tmp:
        model = _nf4_bert(tmp)
    layers = adapters.lora_layers(model)
    assert layers and all(isinstance(m, Linear4bit) for _, m in layers)
    assert all(p.dtype == torch.float32 for p in adapters.adapter_parameters(model, adapters.PRIMARY))
    model.train()
    method = LoRASAM(rho=0.01)
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0), lr=1e-2)
    batch = collate(cls_examples(8))
    losses = []
    for step in range(6):
        ctx = _ctx(model, opt, [batch], step=step, max_steps=6)
        m = method.step(ctx)
        assert ctx.passes == {"forward": 2, "backward": 2}
        # e = rho g / ||g|| in float32: one or two roundings per entry (≤ 1.2e-7), and ||g||^2 and ||e||^2 are float32
        # blocked sums of ~4e3 squares (≲ log2(n)·2^-24 ≈ 7e-7 each, halved by the square roots): ≲ 8e-7 worst case
        # (observed 1.2e-7); rel 1e-6
        assert m["perturbation_norm"] == pytest.approx(0.01, rel=1e-6)
        losses.append(m["loss"])
    assert losses[-1] < losses[0] - 0.05, losses
