"""Issue 16 (QLoRA at LLM scale): gradient checkpointing, k-bit preparation, bf16 autocast,
memory-lean optimizers and length-grouped batches, each checked against an independent
reference on CPU (a plain run without the switch, or a hand computation)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bilora import adapters, causal, methods, scale
from bilora.train import FineTuner, LoopConfig
from tests.tiny import tiny_llama

warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")

SPEC = adapters.LoraSpec(r=4, alpha=8, target_modules=causal.LLAMA_TARGET_MODULES)
# every method, both Bi-LoRA paths, and bi-level with one lower and one upper step inside 3 steps
METHODS = [
    ("lora", {}),
    ("bilora", {"fused": True, "rho": 0.05}),
    ("bilora", {"fused": False, "rho": 0.05}),
    ("lora_sam", {"rho": 0.05}),
    ("flat_lora", {"sigma": 0.05}),
    ("eflat_lora", {"rho": 0.05}),
    ("bilevel_lora", {"lower_steps": 1, "upper_steps": 1, "gamma1": 0.1, "split_ratio": 0.5}),
]
IDS = ["lora", "bilora_fused", "bilora_unfused", "lora_sam", "flat_lora", "eflat_lora", "bilevel_lora"]


def lm_examples(n: int = 16, seed: int = 0, lengths: tuple[int, int] = (10, 10)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(1, 128, (length,), generator=g).tolist()})
    return out


def lm_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _record(opt: torch.optim.Optimizer, log: list[dict[str, torch.Tensor]], tag: str) -> None:
    """Record the gradients ``opt.step`` sees (the methods zero them right after), keyed by position."""

    def hook(o, args, kwargs):
        log.append(
            {
                f"{tag}{gi}.{pi}": p.grad.detach().clone()
                for gi, g in enumerate(o.param_groups)
                for pi, p in enumerate(g["params"])
                if p.grad is not None
            }
        )

    opt.register_step_pre_hook(hook)


def run(model_fn, method: str, cfg: dict, *, steps: int = 3, dtype=torch.float64, **loop_kw):
    torch.manual_seed(0)
    model = adapters.attach_lora(model_fn(), SPEC, "CAUSAL_LM")
    if dtype is not None:
        model = model.to(dtype)
    m = methods.build(method, cfg, seed=0)
    loop = LoopConfig(batch_size=4, grad_accum=2, lr=1e-2, max_steps=steps, checkpoint_every=0, warmup_ratio=0.0, **loop_kw)
    ft = FineTuner(model, m, lm_examples(), lm_collate, loop, seed=0)
    grads: list[dict[str, torch.Tensor]] = []
    _record(ft.optimizer, grads, "loop")
    if getattr(m, "upper_optimizer", None) is not None:
        _record(m.upper_optimizer, grads, "upper")
    ft.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    params |= {f"lambda{i}": lam.detach().clone() for i, lam in enumerate(getattr(m, "_lambdas", []))}
    return model, grads, params, ft


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float((a - b).norm())
    return 0.0 if d == 0.0 else d / float(b.norm())


def _assert_same(ref, got, tol: float) -> None:
    (_, g0, p0, _), (_, g1, p1, _) = ref, got
    assert len(g0) == len(g1) and len(g0) >= 3
    for s, (a, b) in enumerate(zip(g0, g1)):
        assert a.keys() == b.keys()
        for k in a:
            assert _rel(b[k], a[k]) <= tol, (s, k, _rel(b[k], a[k]))
    assert p0.keys() == p1.keys()
    for k in p0:
        assert _rel(p1[k], p0[k]) <= tol, (k, _rel(p1[k], p0[k]))


def _dense_llama():
    return tiny_llama(seed=0).train()


@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize(("method", "cfg"), METHODS, ids=IDS)
def test_checkpointing_equals_plain_float64(method, cfg, reentrant):
    """float64, plain nn.Linear tiny Llama: every optimizer step's gradients and the trained
    adapters with checkpointing equal those without, to 1e-10 relative (3 steps: Flat-LoRA's
    noise is on from step 2, EFlat's perturbation is applied from step 2, bi-level runs both levels)."""
    ref = run(_dense_llama, method, cfg)
    got = run(_dense_llama, method, cfg, gradient_checkpointing=True, checkpoint_reentrant=reentrant)
    model = got[0]
    assert all(p.dtype == torch.float64 for p in model.parameters())  # really float64, norms included
    inner = model.get_base_model()
    assert scale.checkpointing_on(inner)
    assert got[3].kbit["input_require_grads"] is reentrant
    _assert_same(ref, got, 1e-10)


def _nf4_llama(folder):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from bilora import layers

    path = folder / "llama"
    if not path.exists():
        tiny_llama(seed=0).save_pretrained(path)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head"],
    )
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.float32)
    layers.set_cpu_kernel(model, "fp32")
    return model.train()


NF4_TOL = 1e-5  # fp32: recomputation reorders nothing, but fp32 summation in sdpa/matmul may differ by a few ulps


@pytest.mark.parametrize(
    ("method", "cfg"), [METHODS[1], METHODS[3], METHODS[4], METHODS[6]], ids=["bilora_fused", "lora_sam", "flat_lora", "bilevel_lora"]
)
def test_checkpointing_on_nf4_base_fp32(tmp_path, method, cfg):
    """nf4 base, fp32 compute: with = without checkpointing to 1e-5 relative; the 4-bit weights
    get no gradient and are bit-identical before and after training."""

    def fn():
        return _nf4_llama(tmp_path)

    before = {n: p.detach().clone() for n, p in fn().named_parameters() if p.dtype == torch.uint8}
    assert before
    ref = run(fn, method, cfg, dtype=None)
    got = run(fn, method, cfg, dtype=None, gradient_checkpointing=True, checkpoint_reentrant=True)
    _assert_same(ref, got, NF4_TOL)
    model = got[0]
    after = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in model.named_parameters() if p.dtype == torch.uint8
    }
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert p.grad is None and not p.requires_grad
        assert torch.equal(p, before[n]), n


# -- k-bit preparation -------------------------------------------------------------------------
def test_prepare_kbit_dtypes(tmp_path):
    """bf16-stored nf4 Llama: norms become fp32, embeddings and lm_head stay bf16 (unlike
    peft.prepare_model_for_kbit_training, which upcasts them: the reference we deviate from),
    4-bit weights stay uint8, and reentrant checkpointing makes the embedding output require grad."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama(seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"]
    )

    def load():
        return LlamaForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, device_map="cpu", dtype=torch.bfloat16)

    model = load()
    assert model.model.norm.weight.dtype == torch.bfloat16  # as loaded
    done = scale.prepare_kbit(model, gradient_checkpointing=True, use_reentrant=True)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert done["norms_cast_fp32"] == len(norms)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert scale.checkpointing_on(model) and done["input_require_grads"]
    seen = {}
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.update(rg=o.requires_grad))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 norms feed a bf16 lm_head: bilora autocasts wherever compute is bf16
        model.train()(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen["rg"] is True
    # PEFT's version upcasts every non-quantized parameter, embeddings and lm_head included
    ref = prepare_model_for_kbit_training(load(), use_gradient_checkpointing=False)
    assert ref.model.embed_tokens.weight.dtype == torch.float32 and ref.model.norm.weight.dtype == torch.float32
    # non-reentrant needs no input grads
    assert scale.prepare_kbit(load(), gradient_checkpointing=True, use_reentrant=False)["input_require_grads"] is False


# -- bf16 autocast -----------------------------------------------------------------------------
def test_autocast_dtype_reuses_compute_dtype_param():
    assert scale.autocast_dtype("cuda", "auto") == torch.bfloat16
    assert scale.autocast_dtype("cuda", "bfloat16") == torch.bfloat16
    assert scale.autocast_dtype("cpu", "auto") is None  # CPU default: fp32, today's numbers
    assert scale.autocast_dtype("cpu", "float32") is None
    assert scale.autocast_dtype("cpu", "bfloat16") == torch.bfloat16
    assert scale.autocast_dtype("cuda", "float32") is None


def _autocast_run(method, cfg):
    torch.manual_seed(0)
    model = adapters.attach_lora(tiny_llama(seed=0).train(), SPEC, "CAUSAL_LM")
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    seen = []
    base.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    m = methods.build(method, cfg, seed=0)
    loop = LoopConfig(batch_size=4, lr=1e-2, max_steps=2, checkpoint_every=0, warmup_ratio=0.0)
    ft = FineTuner(model, m, lm_examples(), lm_collate, loop, seed=0, autocast_dtype=torch.bfloat16)
    ft.train()
    assert seen and set(seen) == {torch.bfloat16}  # the frozen base matmuls ran in bf16
    for n, p in model.named_parameters():
        if p.requires_grad or "norm" in n:
            assert p.dtype == torch.float32, n  # master weights and norms stay fp32
    for st in ft.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in st.values() if torch.is_tensor(v) and v.is_floating_point())
    return model, ft


def test_bilora_ball_projection_stays_fp32_under_autocast():
    rho = 1e-4  # small enough that the auxiliary is projected every step
    model, ft = _autocast_run("bilora", {"rho": rho, "fused": True})
    assert all(h["aux_clipped"] == 1.0 for h in ft.history)
    # independent reference: the dense perturbation s2 * B2 @ A2 in float64
    c = math.sqrt(
        sum(float(((s * b.detach().double() @ a.detach().double()) ** 2).sum()) for a, b, s in adapters.lora_factors(model, adapters.AUX))
    )
    assert abs(c - rho) / rho < 1e-6  # a bf16 norm would be off by ~1e-3


def test_lora_sam_perturbation_stays_fp32_under_autocast():
    rho = 0.05
    _, ft = _autocast_run("lora_sam", {"rho": rho})
    for h in ft.history:
        assert abs(h["perturbation_norm"] - rho) / rho < 1e-6  # ||e|| = rho in fp32 (bf16: ~1e-3)


# -- optimizers --------------------------------------------------------------------------------
def _bilora_one_step(optimizer: str):
    torch.manual_seed(0)
    model = adapters.attach_lora(tiny_llama(seed=0).train(), SPEC, "CAUSAL_LM")
    m = methods.build("bilora", {"rho": 1e3, "fused": True}, seed=0)  # rho large: no projection
    loop = LoopConfig(batch_size=4, lr=1e-3, max_steps=1, checkpoint_every=0, warmup_ratio=0.0, max_grad_norm=None, optimizer=optimizer)
    ft = FineTuner(model, m, lm_examples(), lm_collate, loop, seed=0, min_8bit_size=1)
    grads: list[dict[str, torch.Tensor]] = []
    _record(ft.optimizer, grads, "g")
    groups = [(g["name"], list(g["params"])) for g in ft.optimizer.param_groups]
    before = {id(p): p.detach().clone() for _, ps in groups for p in ps}
    ft.train()
    return ft, groups, before, grads[0]


@pytest.mark.parametrize("optimizer", scale.OPTIMIZERS)
def test_bilora_aux_ascends_primary_descends_with_every_optimizer(optimizer):
    ft, groups, before, g = _bilora_one_step(optimizer)
    for gi, (name, ps) in enumerate(groups):
        dot = 0.0
        agree = total = 0
        for pi, p in enumerate(ps):
            grad = g.get(f"g{gi}.{pi}")
            if grad is None:
                continue
            delta = p.detach() - before[id(p)]
            dot += float((delta * grad).sum())
            big = grad.abs() > 1e-7
            want = 1.0 if name == "aux" else -1.0
            agree += int((torch.sign(delta[big]) == want * torch.sign(grad[big])).sum())
            total += int(big.sum())
        assert total > 0
        assert (dot > 0) if name == "aux" else (dot < 0), (name, dot)
        assert agree / total > 0.98, (name, agree / total)  # first Adam step: delta = -/+ lr * sign(g)
    if optimizer != "adamw":
        st = [s for s in ft.optimizer.state.values() if "state1" in s]
        assert st
        want = torch.uint8 if "8bit" in optimizer else torch.float32
        assert all(s["state1"].dtype == want and s["state2"].dtype == want for s in st)


EIGHT_BIT_TOL = 0.03  # relative distance of the 8-bit total update from torch AdamW's after 6 steps (measured 0.009)


def _train_lora(optimizer: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], FineTuner]:
    torch.manual_seed(0)
    model = adapters.attach_lora(tiny_llama(seed=0).train(), SPEC, "CAUSAL_LM")
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loop = LoopConfig(batch_size=4, lr=1e-3, max_steps=6, checkpoint_every=0, warmup_ratio=0.0, optimizer=optimizer)
    ft = FineTuner(model, methods.build("lora", {}, seed=0), lm_examples(), lm_collate, loop, seed=0, min_8bit_size=1)
    ft.train()
    return init, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, ft


def test_8bit_adamw_close_to_32bit_and_paged_falls_back_on_cpu():
    init, ref, _ = _train_lora("adamw")
    _, p32, _ = _train_lora("paged_adamw_32bit")
    _, p8, ft8 = _train_lora("adamw_8bit")
    _, pp8, ftp8 = _train_lora("paged_adamw_8bit")

    def upd(p):
        return torch.cat([(p[n] - init[n]).flatten() for n in init])

    u_ref, u32, u8 = upd(ref), upd(p32), upd(p8)
    assert float((u32 - u_ref).norm() / u_ref.norm()) < 1e-5  # measured 8e-7: bitsandbytes' 32-bit AdamW = torch AdamW
    rel8 = float((u8 - u_ref).norm() / u_ref.norm())
    assert 0 < rel8 < EIGHT_BIT_TOL, rel8
    assert all(s["state1"].dtype == torch.uint8 for s in ft8.optimizer.state.values())
    # on CPU bitsandbytes pages nothing: paged 8-bit computes exactly what unpaged 8-bit does
    assert all(torch.equal(pp8[n], p8[n]) for n in p8)
    info = scale.optimizer_info(ftp8.optimizer)
    assert info["paged_fallback"] and not info["paged"]
    assert not scale.optimizer_info(ft8.optimizer)["paged_fallback"]


def test_adamw_default_is_unchanged_torch_adamw_on_cpu():
    opt = scale.build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(3))]}], "adamw", lr=1e-3)
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]


# -- length-grouped batches ---------------------------------------------------------------------
def test_length_grouped_order_and_padding_fraction():
    lengths = [5, 1, 4, 2, 8, 3, 7, 6]
    order = [0, 1, 2, 3, 4, 5, 6, 7]
    # by hand: batches [5,1],[4,2],[8,3],[7,6] pad to 5,4,8,7 -> 48 positions, 36 real
    assert scale.padding_fraction(order, lengths, 2) == pytest.approx(1 - 36 / 48)
    grouped = scale.length_grouped_order(order, lengths, 2, mega=50)
    assert sorted(grouped) == order
    assert [lengths[i] for i in grouped] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert scale.padding_fraction(grouped, lengths, 2) == pytest.approx(1 - 36 / 40)
    # mega-batches of 2 batches (4 positions): [5,1,4,2] -> 5,4 | 2,1 and [8,3,7,6] -> 8,7 | 6,3,
    # then the batch holding the longest example swaps with the first
    g2 = scale.length_grouped_order(order, lengths, 2, mega=2)
    assert [lengths[i] for i in g2] == [8, 7, 2, 1, 5, 4, 6, 3]


def test_length_grouped_batches_seeded_resumable_and_in_summary():
    ex = lm_examples(n=24, lengths=(3, 20))
    loop = LoopConfig(batch_size=4, lr=1e-3, max_steps=4, checkpoint_every=0, length_grouped=True)

    def tuner():
        torch.manual_seed(0)
        model = adapters.attach_lora(tiny_llama(seed=0), SPEC, "CAUSAL_LM")
        return FineTuner(model, methods.build("lora", {}, seed=0), ex, lm_collate, loop, seed=3)

    a, b = tuner(), tuner()
    for step in (0, 5, 7):  # a fresh tuner (a resumed run) sees the same batches, epoch 2 included
        for x, y in zip(a.micro_batches(step), b.micro_batches(step)):
            assert torch.equal(x["input_ids"], y["input_ids"])
    seen = sorted(
        i
        for s in range(6)
        for i in range(len(ex))
        if any(
            torch.equal(torch.tensor(ex[i]["input_ids"]), r[: len(ex[i]["input_ids"])])
            and int(mb["attention_mask"][k].sum()) == len(ex[i]["input_ids"])
            for mb in a.micro_batches(s)
            for k, r in enumerate(mb["input_ids"])
        )
    )
    assert sorted(set(seen)) == list(range(len(ex)))  # one epoch covers every example
    pf = a.padding_fractions()
    assert pf["length_grouped"] < pf["shuffled"]
    summary = a.train()
    assert summary["padding_fraction"] == pf
