"""The benchmark's activation-memory probe counts exactly the tensors autograd saves (hand-derived bytes)."""

import torch

from bench.scaling import activation_bytes


def test_activation_bytes_counts_saved_inputs_and_outputs_not_parameters():
    lin = torch.nn.Linear(6, 5, bias=False)  # the weight is a parameter: excluded
    x = torch.randn(4, 6)

    def run():
        h = lin(x)  # saves x (4x6) for dL/dW; W is a parameter
        torch.relu(h).sum().backward()  # relu saves its output (4x5)

    assert activation_bytes(lin, run) == 4 * (4 * 6 + 4 * 5)


def test_activation_bytes_is_the_largest_forward_pass_not_the_sum():
    lin = torch.nn.Linear(6, 5, bias=False)
    small, big = torch.randn(2, 6), torch.randn(4, 6)

    def run():  # three passes, each freed by its backward before the next (like LoRA-SAM)
        lin(small).sum().backward()  # saves small (2x6)
        lin(big).sum().backward()  # saves big (4x6): the largest, neither first nor last
        lin(small).sum().backward()

    assert activation_bytes(lin, run) == 4 * 4 * 6


def test_activation_bytes_counts_a_shared_tensor_once():
    w = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3)
    holder = torch.nn.Module()
    holder.w = w

    def run():
        (x @ w).sum().backward()  # saves x once ...
        (x @ w * 2).sum().backward()  # ... and again: the same storage, counted once

    assert activation_bytes(holder, run) == 4 * 2 * 3
