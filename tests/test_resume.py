"""Kill -9 mid-training, resume, and get a bit-identical adapter (CPU), for several methods.

Each run is tests/helpers/train_worker.py in a subprocess: tiny_bert, FineTuner with
checkpoint_every=2 and a fixed fingerprint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "train_worker.py"
STEPS = 10
pytestmark = pytest.mark.slow


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    return e


def run_worker(method: str, ckpt: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(WORKER), method, str(ckpt), str(out), "--steps", str(STEPS), *extra],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def kill_after_checkpoint(method: str, ckpt: Path, out: Path, k: int) -> int:
    """Start a slow worker, SIGKILL it once a checkpoint at step >= k exists; return that step."""
    p = subprocess.Popen(
        [sys.executable, str(WORKER), method, str(ckpt), str(out), "--steps", str(STEPS), "--sleep", "0.4"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    meta = ckpt / "last" / "meta.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                step = json.loads(meta.read_text())["step"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                step = 0
            if step >= k:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
                assert p.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
                return step
            assert p.poll() is None, f"worker exited early with {p.returncode}"
            time.sleep(0.02)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def same_files(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("method", ["lora", "bilora", "flat_lora"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, method):
    run_worker(method, tmp_path / "ck_ref", tmp_path / "ref")

    k = random.Random(f"resume-{method}").choice([2, 4, 6])
    ckpt = tmp_path / "ck"
    killed_at = kill_after_checkpoint(method, ckpt, tmp_path / "out", k)
    assert killed_at >= k and not (tmp_path / "out").exists()
    # The checkpoint holds every adapter (primary AND auxiliary), optimizer and RNG state.
    saved = load_file(str(ckpt / "last" / "adapters.safetensors"))
    state = torch.load(ckpt / "last" / "state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "method", "rng", "history"} <= set(state) and state["optimizer"]["state"]
    if method == "bilora":
        assert any("bilora_aux" in n for n in saved)
        assert len(state["optimizer"]["param_groups"]) >= 2  # the auxiliary's ascent group is saved too

    r = run_worker(method, ckpt, tmp_path / "out")
    step = json.loads((ckpt / "last" / "meta.json").read_text())["step"] if (ckpt / "last" / "meta.json").exists() else None
    assert f"RESUME: resumed from step {killed_at}/{STEPS}" in r.stdout, r.stdout
    assert f"STEP {killed_at + 1}" in r.stdout and f"STEP {killed_at}\n" not in r.stdout  # no step replayed
    if method == "bilora":
        assert "AUX_TRAINABLE: True" in r.stdout  # HF Trainer's bug: the aux comes back frozen
    assert step == 8
    same_files(tmp_path / "ref" / "adapters.safetensors", tmp_path / "out" / "adapters.safetensors")
    same_files(tmp_path / "ref" / "export" / "adapter_model.safetensors", tmp_path / "out" / "export" / "adapter_model.safetensors")


def test_checkpoint_of_another_run_is_ignored(tmp_path):
    run_worker("lora", tmp_path / "ck", tmp_path / "a", "--fingerprint", "run-A")
    assert (tmp_path / "ck" / "last" / "meta.json").exists()
    r = run_worker("lora", tmp_path / "ck", tmp_path / "b", "--fingerprint", "run-B")
    assert "RESUME: checkpoint belongs to a different run (params or data changed): starting fresh" in r.stdout
    assert "STEP 1\n" in r.stdout  # trained from step 0
    assert json.loads((tmp_path / "ck" / "last" / "meta.json").read_text())["fingerprint"] == "run-B"
    # Same data, seed and method: starting fresh gives the same adapter as run A.
    same_files(tmp_path / "a" / "adapters.safetensors", tmp_path / "b" / "adapters.safetensors")
