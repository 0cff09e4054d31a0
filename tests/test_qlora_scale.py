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
        log.append({f"{tag}{gi}.{pi}": p.grad.detach().clone() for gi, g in enumerate(o.param_groups) for pi, p in enumerate(g["params"]) if p.grad is not None})

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
    inner = model.get_base_model()
    assert inner.is_gradient_checkpointing
    assert got[3].kbit["input_require_grads"] is reentrant
    _assert_same(ref, got, 1e-10)


def _nf4_llama(folder):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from bilora import layers

    path = folder / "llama"
    if not path.exists():
        tiny_llama(seed=0).save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"])
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.float32)
    layers.set_cpu_kernel(model, "fp32")
    return model.train()


NF4_TOL = 1e-5  # fp32: recomputation reorders nothing, but fp32 summation in sdpa/matmul may differ by a few ulps


@pytest.mark.parametrize(("method", "cfg"), [METHODS[1], METHODS[3], METHODS[4], METHODS[6]], ids=["bilora_fused", "lora_sam", "flat_lora", "bilevel_lora"])
def test_checkpointing_on_nf4_base_fp32(tmp_path, method, cfg):
    """nf4 base, fp32 compute: with = without checkpointing to 1e-5 relative; the 4-bit weights
    get no gradient and are bit-identical before and after training."""
    fn = lambda: _nf4_llama(tmp_path)  # noqa: E731
    before = {n: p.detach().clone() for n, p in fn().named_parameters() if p.dtype == torch.uint8}
    assert before
    ref = run(fn, method, cfg, dtype=None)
    got = run(fn, method, cfg, dtype=None, gradient_checkpointing=True, checkpoint_reentrant=True)
    _assert_same(ref, got, NF4_TOL)
    model = got[0]
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert p.grad is None and not p.requires_grad
        assert torch.equal(p, before[n]), n
