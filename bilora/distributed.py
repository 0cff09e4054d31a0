"""Data-parallel training without DDP wrapping: explicit gradient all-reduce at the step boundary.

Under ``torchrun`` (``torch.distributed`` initialised, world size W > 1):

* :class:`bilora.train.FineTuner` gives rank r the r-th contiguous slice of every *global*
  micro-batch (``train.loop.batch_size`` examples, which must be divisible by W), so the global
  batch, data order and step count are those of a single-process run.
* :meth:`bilora.methods.method.StepContext.forward_backward` averages the ``.grad`` of every
  trainable parameter that has one, and the loss, over the ranks (one flat all-reduce) after
  its micro-batches. Every method's update therefore sees the same (all-reduced) gradient on
  every rank, and the parameters stay identical on every rank without broadcasting them:
  Bi-LoRA's auxiliary ascends along the all-reduced gradient and its global rho-ball clip runs on
  identical parameters, so every rank clips identically; LoRA-SAM perturbs with the all-reduced
  gradient (its global norm is the norm of the full-batch gradient); Flat-LoRA's noise is seeded
  by (seed, optimizer step, layer), hence identical on every rank, and its schedule counts
  optimizer steps; the gradient-norm clip is the same on every rank.

Why not ``DistributedDataParallel``: DDP all-reduces inside ``backward`` once per backward, which
is wrong for two-pass methods (LoRA-SAM's pass 1 must be reduced before the perturbation, its
pass 2 after) unless every method knows about ``no_sync``; reducing once per ``forward_backward``
call is correct for all of them and costs one collective per pass.

Equal per-rank slice sizes make the average of per-rank mean losses the global mean loss. The
last, partial micro-batch of an epoch (``n_train % batch_size != 0``) is split as evenly as
possible; its ranks' means are then averaged with equal weights (a slightly different weighting
than one process). Set ``train_subset`` to a multiple of ``batch_size`` for exact equivalence.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def active() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes checkpoints, outputs and MLflow."""
    return rank() == 0


def launched() -> bool:
    """This process was started by torchrun / torch.distributed.run with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str = "auto") -> str | None:
    """Initialise the default process group from torchrun's environment (no-op when not launched).

    ``backend``: ``auto`` (nccl when CUDA is available, else gloo), ``gloo`` or ``nccl``.
    Returns the backend used, or None when not launched.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("train.distributed.backend: nccl needs CUDA; use gloo (or auto) on CPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return backend


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(n: int) -> slice:
    """The part of a global micro-batch of ``n`` examples that this rank trains on (contiguous)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def all_reduce_mean_(params: Iterable[torch.nn.Parameter], loss: torch.Tensor | None) -> torch.Tensor | None:
    """Average ``.grad`` of ``params`` (those that have one) and ``loss`` over ranks, in place; one collective.

    Gradients are packed into one flat buffer per dtype-device (normally a single fp32 buffer).
    The parameter order is the model's, identical on every rank.
    """
    grads = [p.grad for p in params if p.grad is not None]
    w = world_size()
    device = grads[0].device if grads else (loss.device if loss is not None else torch.device("cpu"))
    extra = loss.detach().float().reshape(1).to(device) if loss is not None else torch.zeros(1, device=device)
    flat = torch.cat([g.detach().float().reshape(-1) for g in grads] + [extra])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(w)
    offset = 0
    with torch.no_grad():
        for g in grads:
            k = g.numel()
            g.copy_(flat[offset : offset + k].view_as(g).to(g.dtype))
            offset += k
    return flat[-1] if loss is not None else None
