"""Bi-LoRA maths on tiny models, each against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from bilora import adapters, methods
from bilora.methods.bilora import aux_norm, project_to_ball
from bilora.methods.method import StepContext
from bilora.train import FineTuner, LoopConfig
from tests import tiny


def _dense_norm64(model) -> float:
    """Independent reference: materialise every s*B@A in float64 and take the global Frobenius norm."""
    total = 0.0
    for a, b, s in adapters.lora_factors(model, adapters.AUX):
        total += float(((s * b.detach().double() @ a.detach().double()) ** 2).sum())
    return total**0.5


def _bilora_model(rho=0.05, seed=0):
    model = tiny.peft_bert(seed)
    method = methods.build("bilora", {"rho": rho, "aux_rank": 4, "aux_alpha": 8}, seed=seed)
    method.prepare(model)
    return model, method


def _randomize_aux(model, scale=1.0, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b, _ in adapters.lora_factors(model, adapters.AUX):
            a.copy_(torch.randn(a.shape, generator=g) * scale)
            b.copy_(torch.randn(b.shape, generator=g) * scale)


def test_rr_norm_equals_dense_norm():
    model, _ = _bilora_model()
    _randomize_aux(model)
    # float32 r x r formula vs float64 dense norm: Gram entries are float32 sums of up to 64 products (worst case
    # ~64·2^-24 = 4e-6 relative each), summed over the 13 layers; rel 1e-5 is that bound (observed 3e-8).
    assert float(aux_norm(adapters.lora_factors(model, adapters.AUX))) == pytest.approx(_dense_norm64(model), rel=1e-5)


def test_projection_lands_on_rho_and_is_global():
    model, _ = _bilora_model()
    _randomize_aux(model)
    before = _dense_norm64(model)
    ratios_before = [float((b @ a).detach().norm()) for a, b, _ in adapters.lora_factors(model, adapters.AUX)]
    c, clipped = project_to_ball(adapters.lora_factors(model, adapters.AUX), 0.05)
    # c is the float32 aux_norm: the bound of the test above
    assert clipped and c == pytest.approx(before, rel=1e-5)
    # c's error (≤ 1e-5, above) plus one float32 rounding of each scaled A and B (1.2e-7) (observed 1.3e-7)
    assert _dense_norm64(model) == pytest.approx(0.05, rel=1e-5)
    # Global, not per-layer: every layer's product shrinks by the same factor rho / c.
    after = [float((b @ a).detach().norm()) for a, b, _ in adapters.lora_factors(model, adapters.AUX)]
    # float32 Frobenius norms of the (out, in) products, 1024-2048 squares each (worst case ~(n/2)·2^-24 = 6e-5),
    # before and after, plus c's error: rel 1e-4 (observed 2.6e-7)
    for x, y in zip(ratios_before, after):
        assert y == pytest.approx(x * 0.05 / before, rel=1e-4)


def test_projection_leaves_points_inside_the_ball_untouched():
    model, _ = _bilora_model()
    _randomize_aux(model, scale=1e-3)
    snap = [t.clone() for t in adapters.adapter_parameters(model, adapters.AUX)]
    c, clipped = project_to_ball(adapters.lora_factors(model, adapters.AUX), 10.0)
    assert not clipped and c < 10.0
    assert all(torch.equal(x, y) for x, y in zip(snap, adapters.adapter_parameters(model, adapters.AUX)))


def _one_step(model, method, batch, lr, groups_lr):
    """One Bi-LoRA step with per-group learning rates (0 freezes a group)."""
    groups = method.param_groups(model, lr, 0.0)
    for g in groups:
        g["lr"] = groups_lr[g["name"]]
    opt = torch.optim.SGD([{k: v for k, v in g.items()} for g in groups], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctx = StepContext(model=model, optimizer=opt, scheduler=sched, micro_batches=[batch], step=0, max_steps=1, max_grad_norm=None)
    return method.step(ctx), ctx


def _loss(model, batch):
    with torch.no_grad():
        return float(model(**batch).loss)


def test_aux_step_ascends_and_primary_step_descends():
    batch = tiny.collate(tiny.cls_examples(16))
    for which, sign in (("aux", +1), ("primary", -1)):
        model, method = _bilora_model(rho=1e9)  # no clipping: isolate the direction of the update
        _randomize_aux(model, scale=0.1)
        with torch.no_grad():  # non-zero primary B so both primary factors get gradients
            for a, b, _ in adapters.lora_factors(model, adapters.PRIMARY):
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        model.train()
        before = _loss(model, batch)
        lrs = {"primary": 0.0, "aux": 0.0, which: 1e-2}
        _one_step(model, method, batch, 1e-2, lrs)
        after = _loss(model, batch)
        assert sign * (after - before) > 0, (which, before, after)


def test_exactly_one_forward_and_one_backward_per_step():
    model = tiny.peft_bert(0)
    ft = FineTuner(
        model,
        methods.build("bilora", {"rho": 0.05}, seed=0),
        tiny.cls_examples(32),
        tiny.collate,
        LoopConfig(max_steps=3, batch_size=8),
        seed=0,
    )
    calls = {"fwd": 0, "bwd": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("fwd", calls["fwd"] + 1))
    model.base_model.model.classifier.register_full_backward_hook(lambda *a: calls.__setitem__("bwd", calls["bwd"] + 1))
    ft.train()
    assert calls == {"fwd": 3, "bwd": 3}
    assert all(h["forward_passes"] == 1 and h["backward_passes"] == 1 for h in ft.history)


def _train(name, cfg, seed=0, steps=12):
    model = tiny.peft_bert(seed)
    ft = FineTuner(
        model,
        methods.build(name, cfg, seed=seed),
        tiny.cls_examples(64),
        tiny.collate,
        LoopConfig(max_steps=steps, batch_size=8, lr=1e-2),
        seed=seed,
    )
    ft.train()
    return model, ft


def test_rho_zero_reproduces_lora_bit_for_bit():
    m_lora, _ = _train("lora", {})
    m_bi, ft = _train("bilora", {"rho": 0.0})
    lora_sd = {k: v for k, v in m_lora.state_dict().items() if "bilora_aux" not in k}
    bi_sd = {k: v for k, v in m_bi.state_dict().items() if "bilora_aux" not in k}
    assert lora_sd.keys() == bi_sd.keys()
    assert all(torch.equal(lora_sd[k], bi_sd[k]) for k in lora_sd)
    assert ft.history[0]["aux_grad_norm"] > 0  # the auxiliary is live (it gets a gradient) but is clipped to zero
    assert _dense_norm64(m_bi) == 0.0


def test_rho_positive_differs_from_lora_and_stays_in_ball():
    m_lora, _ = _train("lora", {})
    m_bi, ft = _train("bilora", {"rho": 0.05})
    a = dict(m_lora.named_parameters())
    b = dict(m_bi.named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_A.default" in k)
    # on the ball up to the float32 aux_norm's error (≤ 1e-5, test_rr_norm_equals_dense_norm) (observed 4e-8)
    assert _dense_norm64(m_bi) <= 0.05 * (1 + 1e-5)
    assert any(h["aux_clipped"] == 1.0 for h in ft.history)


def test_same_seed_bit_identical():
    m1, _ = _train("bilora", {"rho": 0.05}, seed=4)
    m2, _ = _train("bilora", {"rho": 0.05}, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_export_has_primary_only_and_loads_in_peft(tmp_path):
    model, ft = _train("bilora", {"rho": 0.05})
    ft.method.export(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and not any("bilora_aux" in k for k in keys)
    assert not (tmp_path / "adapter" / "bilora_aux").exists()
    fresh = PeftModel.from_pretrained(tiny.tiny_bert(seed=0), str(tmp_path / "adapter")).eval()
    assert list(fresh.peft_config) == ["default"]
    batch = tiny.collate(tiny.cls_examples(8, seed=9))
    batch.pop("labels")
    with torch.no_grad(), adapters.primary_only(model):
        model.eval()
        expected = model(**batch).logits
    # exact: the reloaded primary is the trained one bit for bit and primary_only runs only that adapter, so both
    # models run the same float32 operations on the same numbers
    assert torch.equal(fresh(**batch).logits, expected)


def test_primary_only_disables_aux_and_restores_it():
    model, _ = _bilora_model()
    _randomize_aux(model, scale=0.5)
    model.eval()
    batch = tiny.collate(tiny.cls_examples(4))
    batch.pop("labels")
    with torch.no_grad():
        both = model(**batch).logits
        with adapters.primary_only(model):
            prim = model(**batch).logits
        again = model(**batch).logits
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for a, b, _ in adapters.lora_factors(ref, adapters.AUX):
            b.zero_()
        zeroed = ref(**batch).logits
    # exact: with B2 = 0 the auxiliary adds exact zeros (x A2^T 0 = 0) to the same primary-only result
    assert torch.equal(prim, zeroed)
    # the auxiliary (entries ~0.5) moves the logits by ~0.1, far beyond float32 rounding (default rtol 1e-5)
    assert not torch.allclose(both, prim)
    assert torch.equal(both, again)
    assert all(p.requires_grad for p in adapters.adapter_parameters(model, adapters.AUX))


def test_bilora_trains_on_nf4_base(tmp_path):
    base = tiny.nf4_bert(tmp_path / "fp32")
    torch.manual_seed(1)
    model = adapters.attach_lora(base, tiny.SPEC, "SEQ_CLS")
    layer = dict(adapters.lora_layers(model))
    assert any("Linear4bit" in type(m.get_base_layer()).__name__ for m in layer.values())
    data = tiny.cls_examples(16)
    ft = FineTuner(
        model,
        methods.build("bilora", {"rho": 0.05, "aux_rank": 4, "aux_alpha": 8}, seed=0),
        data,
        tiny.collate,
        LoopConfig(max_steps=15, batch_size=16, lr=2e-2, warmup_ratio=0.0),
        seed=0,
    )
    batch = tiny.collate(data)
    model.train()
    before = _loss(model, batch)
    ft.train()
    model.train()
    with adapters.primary_only(model):
        after = _loss(model, batch)
    assert after < before
    # as in test_rho_positive_differs_from_lora_and_stays_in_ball (observed 2e-8 over)
    assert _dense_norm64(model) <= 0.05 * (1 + 1e-5)
