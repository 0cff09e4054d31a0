"""Predicted peak training memory of a (4-bit) Llama-family model, split into its parts.

:func:`predict` counts bytes from the model's shape and the run's switches:

* ``weights``: nf4 linears at 0.5 B/param plus their quantization constants (one absmax per
  64 weights: 1 B with double quantization + 1/256 of fp32 second-level constants, 4 B without),
  embeddings, ``lm_head`` (unless tied) and norms in ``param_bytes`` (4 on the CPU pipeline,
  2 for a bf16 GPU load).
* ``adapters``: the primary LoRA factors, fp32 master weights plus their fp32 gradients.
* ``optimizer``: Adam moments of the primary: 8 B/param (torch AdamW, paged_adamw_32bit), 2 B
  (+ one fp32 absmax per 256 per moment) for bitsandbytes 8-bit on tensors of at least
  ``min_8bit_size`` elements (smaller tensors keep 32-bit state).
* ``activations``: what autograd saves per token and decoder layer, counted tensor by tensor for
  the Llama block with LoRA on its linears (and checked against autograd's saved-tensor hooks,
  tests/test_memory_model.py): norm inputs and outputs (4h), q, attention output (2h), k, v
  (2 kv), gate, up, silu(gate), their product (4i), every LoRA ``A x`` (r per adapted module),
  sdpa's log-sum-exp (n_heads) and the norms' rsqrt (2), in the activation dtype; plus the loss
  head: the fp32 logits and their saved log-softmax and, at the start of backward, the gradients
  of both (4 x B·L·V fp32 at peak, measured); plus the largest transient of backward, one
  dequantized base weight. With gradient checkpointing only each layer's input (h per token) is
  kept, and one layer's activations are rebuilt at a time.
* ``method_extras``: Bi-LoRA's auxiliary (weights + grads + Adam state, and the fused path's
  per-forward concatenated factors), LoRA-SAM's saved copy of A/B and its perturbation, EFlat's EMA
  of E_B and the clean B, Flat-LoRA's two full-size fp32 temporaries of one layer (dequant(W0)+eps
  and the merged weight for row norms), bi-level's Lambda.

``peak = weights + adapters + optimizer + activations + method_extras`` (plus framework overhead,
which is not modelled: CUDA context ~0.5 GiB, allocator fragmentation). It is a *prediction*; the
test validates it against measured CPU peaks and bench/gpu_check.py against CUDA peaks.

:func:`rss_peak_bytes` / :func:`reset_rss_peak` measure CPU peaks honestly (Linux): the kernel's
resident high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``. Run the measured
code with ``MALLOC_MMAP_THRESHOLD_`` set low (e.g. 65536) so glibc returns freed tensors to the
kernel at once; otherwise freed-but-cached heap memory is counted as live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 1024**3


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> LlamaShape:
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(
            vocab=get("vocab_size"),
            hidden=get("hidden_size"),
            inter=get("intermediate_size"),
            layers=get("num_hidden_layers"),
            heads=get("num_attention_heads"),
            kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            tied=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim"),
        )

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer."""
        h, i, q, kv = self.hidden, self.inter, self.heads * self.hd, self.kv_heads * self.hd
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def n_params(self) -> int:
        per = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden
        return self.layers * per + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


#: Shapes of the paper's model classes (config.json of each family; random init needs only these).
SHAPES = {
    "smollm2-135m": LlamaShape(vocab=49152, hidden=576, inter=1536, layers=30, heads=9, kv_heads=3, tied=True),
    "llama-1b": LlamaShape(vocab=128256, hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, tied=True),  # Llama-3.2-1B
    "llama-8b": LlamaShape(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8),  # Llama-3.1-8B
    "qwen2.5-14b": LlamaShape(vocab=152064, hidden=5120, inter=13824, layers=48, heads=40, kv_heads=8),  # Qwen2.5-14B (qkv bias ignored)
}


@dataclass(frozen=True)
class RunShape:
    """What besides the model decides memory: batch, length, ranks, method and the switches."""

    seq: int = 1024
    batch: int = 1
    r: int = 8
    targets: tuple[str, ...] = LLAMA_TARGETS
    method: str = "lora"
    aux_rank: int = 8
    fused: bool = True
    quantized: bool = True
    double_quant: bool = True
    param_bytes: int = 2  # non-quantized weights (bf16 on GPU; 4 for the fp32 CPU pipeline)
    act_bytes: int = 2  # activation dtype (2 under bf16 autocast, 4 in fp32)
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    min_8bit_size: int = 4096


def _adam_bytes(sizes: Iterable[int], optimizer: str, min_8bit: int) -> int:
    total = 0
    for n in sizes:
        if "8bit" in optimizer and n >= min_8bit:
            total += 2 * n + 2 * 4 * -(-n // 256)  # two uint8 moments + fp32 absmax per 256-block
        else:
            total += 8 * n
    return total


def _factor_sizes(shape: LlamaShape, run: RunShape, r: int) -> list[int]:
    sizes = []
    for name, (fin, fout) in shape.linears().items():
        if name in run.targets:
            sizes += [r * fin, fout * r]
    return sizes * shape.layers


def predict(shape: LlamaShape, run: RunShape) -> dict[str, int]:
    """Predicted peak training memory in bytes, by part (see the module docstring) and ``total``."""
    s, h = shape, shape.hidden
    lin = s.linears()
    n_lin = sum(a * b for a, b in lin.values()) * s.layers
    if run.quantized:
        absmax = (n_lin // 64) * (1 if run.double_quant else 4) + (n_lin // 64 // 256) * 4 * run.double_quant
        weights = n_lin // 2 + absmax
    else:
        weights = n_lin * run.param_bytes
    weights += (s.vocab * h * (1 if s.tied else 2) + (2 * s.layers + 1) * h) * run.param_bytes

    prim = _factor_sizes(s, run, run.r)
    adapters = 8 * sum(prim)  # fp32 weight + fp32 grad
    optimizer = _adam_bytes(prim, run.optimizer, run.min_8bit_size)

    tokens = run.batch * run.seq
    kv = s.kv_heads * s.hd
    q = s.heads * s.hd
    n_targets = sum(1 for t in lin if t in run.targets)
    r_tok = run.r + (run.aux_rank if run.method == "bilora" else 0)
    per_tok_layer = 4 * h + 2 * q + 2 * kv + 4 * s.inter + n_targets * r_tok + s.heads + 2  # elements saved per token
    layer_acts = per_tok_layer * tokens * run.act_bytes
    if run.gradient_checkpointing:
        acts = s.layers * tokens * h * run.act_bytes + layer_acts
    else:
        acts = s.layers * layer_acts
    # at the start of backward: the fp32 logits, their saved log-softmax, and the gradients of both
    # (4 x B·L·V fp32; under bf16 autocast the bf16 logits and their bf16 gradient come on top)
    logits = 4 * tokens * s.vocab * 4 + (2 * tokens * s.vocab * run.act_bytes if run.act_bytes != 4 else 0)
    biggest = max(a * b for a, b in lin.values())
    transient = biggest * (run.act_bytes if run.quantized else 0)  # one dequantized weight in backward
    activations = acts + logits + transient

    extras = 0
    if run.method == "bilora":
        aux = _factor_sizes(s, run, run.aux_rank)
        extras += 8 * sum(aux) + _adam_bytes(aux, run.optimizer, run.min_8bit_size)
        if run.fused:  # A_cat, B_cat per layer, saved for backward in each forward
            extras += 4 * sum((run.r + run.aux_rank) * (fin + fout) for t, (fin, fout) in lin.items() if t in run.targets) * s.layers
    elif run.method == "lora_sam":
        extras += 4 * sum(prim) * 2  # saved originals + the fp32 perturbation e of each tensor (transient)
    elif run.method == "eflat_lora":
        extras += 4 * sum(fout * run.r for t, (_, fout) in lin.items() if t in run.targets) * s.layers * 2  # EMA of E_B + clean B
    elif run.method == "flat_lora":
        extras += 2 * biggest * 4  # W0 + eps and the merged weight, one layer at a time, fp32
    elif run.method == "bilevel_lora":
        extras += 4 * 4 * run.r * n_targets * s.layers  # Lambda + grad + Adam moments
    out = {"weights": weights, "adapters": adapters, "optimizer": optimizer, "activations": activations, "method_extras": extras}
    out["total"] = sum(out.values())
    return out


def table(shapes: dict[str, LlamaShape], runs: dict[str, RunShape]) -> list[dict[str, Any]]:
    """One row per (shape, run): the predicted parts and total in GiB."""
    rows = []
    for sname, shape in shapes.items():
        for rname, run in runs.items():
            p = predict(shape, run)
            rows.append({"model": sname, "run": rname, **{k: round(v / GIB, 2) for k, v in p.items()}})
    return rows


def with_(run: RunShape, **kw: Any) -> RunShape:
    return dataclasses.replace(run, **kw)


# -- measuring CPU peaks ----------------------------------------------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_bytes() -> int:
    """Resident set size now (Linux)."""
    return _status("VmRSS")


def reset_rss_peak() -> None:
    """Reset the kernel's resident high-water mark of this process (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_peak_bytes() -> int:
    """Peak resident set size since the last :func:`reset_rss_peak` (or process start)."""
    return _status("VmHWM")
