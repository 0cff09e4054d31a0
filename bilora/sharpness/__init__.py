"""Sharpness of a trained adapter: random perturbations, a worst-case attack and 1-D loss curves.

Everything is measured on a fixed evaluation batch set (an :class:`Objective`) with the Bi-LoRA
auxiliary discarded (:func:`bilora.adapters.primary_only`), in eval mode, in two weight spaces
(docs/methods.md, "Sharpness"):

* ``"full"``: the merged weights W' = dequant(W0) + s·B@A of the adapted linear layers, one
  (out, in) tensor per layer in :func:`bilora.adapters.lora_layers` order. Embeddings, norms, biases
  and the head are excluded. A perturbation W' + t·d is applied by a temporary forward on each base
  layer computing ``F.linear(x, dequant(W0) + t·d, bias)``; PEFT adds the LoRA branch s·B@A·x on top.
  The frozen base (nn.Linear or bitsandbytes nf4/fp4 ``Linear4bit``) is never written.
* ``"lora"``: the primary adapter's factors only, [A_0 (r, in), B_0 (out, r), A_1, B_1, ...]. A
  perturbation is added to A, B in place and undone by copying the saved tensors back (bit exact).

Three measurements (the issue "sharpness"):

1. :func:`random_sharpness`: loss(W + t·d) − loss(W) over K random filter-normalised directions d
   at several radii t; mean, sample std (ddof=1), min, max and the values.
2. :func:`attack_curve`: loss and task metrics after θ ← θ + α·∇L/‖∇L‖ (the norm global over
   all tensors of the space) for a list of α.
3. :func:`loss_curve_1d`: loss(W + t·d) along one random filter-normalised direction
   (Li et al. 2018), t on a grid; it is the 1-D slice along random direction 0 of (1).

Filter normalisation (Li et al. 2018), one output row per filter: a Gaussian g is rescaled row by
row, d_i = g_i·‖W_i‖/‖g_i‖, so ‖d_i‖ = ‖W_i‖ for the tensor W it perturbs (W' in the full space, A
or B in the LoRA space); t = 0.01 moves every row by 1 % of its norm.

Determinism: every random direction comes from private generators seeded by a hash of (seed,
space, direction index, tensor index), never from the global RNG, so equal seeds give identical
numbers on the same device. Full-space random directions are never stored: only m row scales per
layer are kept and the Gaussian is regenerated from its seed inside the forward (as Flat-LoRA
does), so memory stays O(out) per layer. The gradient direction of the full space is a dense
(out, in) tensor per layer (the gradient is that big), in float32 (float64 for float64 bases).

Every function leaves the model bit-identical: parameters, buffers, 4-bit quant states, grads
(gradients are taken with ``torch.autograd.grad``, never accumulated into ``.grad``),
requires_grad flags, train/eval mode, active adapters and the global RNG. bitsandbytes' CPU
inference repacking of 4-bit weights (eval mode + no grad on AVX512-BF16 CPUs) is switched off for
the duration, as it would rewrite the weights.

Precision: by default (``dtype="float64"``) everything is measured on a float64 dense copy of the
model (:func:`bilora.layers.dense_copy`: dequant(W0) is exact, so it is the same function). In
float32 a loss difference at t = 0.01 is ~1e-3 and its spread over directions ~1e-5, so float32
summation noise (~1e-7 relative per loss, and dependent on the CPU's vector width) moves the
spread by percents; in float64 the figures are the same on every CPU class. ``dtype="model"``
measures the model as it is (float32 on the fp32 path), at ~half the time and no extra memory.

A perturbation with scale 0 installs nothing, so t = 0 / α = 0 is exactly the unperturbed model.

Cost: :func:`measure` reports wall-clock seconds and the number of loss evaluations (passes over
the batch set), gradient passes and metric evaluations per part and space.

Modules (none imports another's private names):

* :mod:`.config`: :class:`~.config.SharpnessConfig`, what :func:`~.measure.measure` computes (no torch);
* :mod:`.objective`: the loss on a fixed batch set (:class:`~.objective.Objective`) and a task-metric ``eval_fn``;
* :mod:`.space`: the two weight spaces, random directions, applying a perturbation, the measurement context;
* :mod:`.measure`: random sharpness, the gradient attack, 1-D curves, and :func:`~.measure.measure` (everything, with its cost);
* :mod:`.ball`: flatness in a global Frobenius ball (one-step and projected attacks, antithetic random directions);
* :mod:`.result`: the typed result and its headline figures (no torch: the report reads it).
"""
