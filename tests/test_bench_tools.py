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


def test_compare_workspaces_rounds_committed_figures_and_measures_artifact_drift(tmp_path):
    import json

    from safetensors.torch import save_file

    from bench.compare_workspaces import compare

    for name, loss, std, w in (("a", 0.5, 7.153e-6, 1.0), ("b", 0.5000001, 7.156e-6, 1.0 + 2e-6)):
        ws = tmp_path / name
        (ws / "metrics").mkdir(parents=True)
        (ws / "reports").mkdir()
        (ws / "metrics" / "run.json").write_text(json.dumps({"r.mean": 0.00017, "r.std": std, "step_time": 1.0 if name == "a" else 9.0}))
        (ws / "reports" / "summary.json").write_text(json.dumps({"loss": loss}))
        hist = ws / "artifacts" / "finetune" / "run"
        (hist / "adapter").mkdir(parents=True)
        (hist / "history.json").write_text(json.dumps([{"loss": loss, "step_time": 3.0 if name == "a" else 1.0}]))
        save_file({"w": torch.tensor([w, 0.0])}, str(hist / "adapter" / "adapter_model.safetensors"))
    res = compare(tmp_path / "a", tmp_path / "b")
    # 7.153e-6 and 7.156e-6 next to a mean of 1.7e-4 both round to 0.0000070; timings are left out.
    assert res["committed_identical"] == {"metrics/run.json": True, "reports/summary.json": True}
    drift = res["artifacts_max_rel_diff"]
    assert abs(drift["artifacts/finetune/run/history.json"]["max_rel"] - 1e-7 / 0.5000001) < 1e-12
    w32 = float(torch.tensor(1.0 + 2e-6))  # as stored (float32): ||b - a|| / ||a||, with ||a|| = 1
    assert abs(drift["artifacts/finetune/run/adapter/adapter_model.safetensors"]["max_rel"] - (w32 - 1.0)) < 1e-12
