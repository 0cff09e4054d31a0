"""One real ``dvc repro`` (``python -m pipeline.run``) on user-declared JSONL datasets: a tiny Llama base
(local folder), two prompt_completion datasets under data/, lora, every stage; then editing one
dataset's file re-runs prepare and that dataset's finetune/evaluate only."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.test_causal_pipeline import causal_params, make_causal_repo, tiny_llama_folder
from tests.test_pipeline import dvc, repro, run_env

pytestmark = pytest.mark.slow


def rows(tag: str, n: int = 12) -> str:
    return "".join(json.dumps({"q": f"{tag} what is {i} plus 1?", "a": f" {i + 1}"}) + "\n" for i in range(n))


def test_dvc_repro_on_declared_jsonl_datasets(tmp_path):
    base = tiny_llama_folder(tmp_path / "tiny-llama")
    params = causal_params(base)
    decl = {
        "format": "prompt_completion",
        "test_fraction": 0.25,
        "columns": {"prompt": "q", "completion": "a"},
        "prompt_template": "Q: {prompt}\nA:",
        "extraction": "final_number",
        "stop": ["\nQ:"],
    }
    params["data"].update(
        tasks=["alpha", "beta"],
        datasets={"alpha": decl | {"train": "data/mine/alpha.jsonl"}, "beta": decl | {"train": "data/mine/beta.jsonl"}},
        test_subset=None,
    )
    params["train"].update(methods=["lora"])
    params["eval"]["sharpness"]["enabled"] = False
    params["eval"].update(max_new_tokens=4)
    params["merge"].update(task="alpha", method="lora")
    repo = make_causal_repo(tmp_path, params)
    (repo / "data" / "mine").mkdir(parents=True)
    (repo / "data" / "mine" / "alpha.jsonl").write_text(rows("alpha"))
    (repo / "data" / "mine" / "beta.jsonl").write_text(rows("beta"))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=run_env(repo))
    ran = repro(repo)
    assert set(ran) == {
        "prepare",
        "load_base",
        "configure",
        "finetune@alpha-lora-0",
        "finetune@beta-lora-0",
        "evaluate@alpha-lora-0",
        "evaluate@beta-lora-0",
        "merge",
        "report",
    }
    stats = json.loads((repo / "artifacts" / "data" / "stats.json").read_text())
    assert stats["alpha"]["rows"] == {"train": 9, "validation": 0, "test": 3} and stats["alpha"]["format"] == "prompt_completion"
    m = json.loads((repo / "metrics" / "alpha-lora-0.json").read_text())
    assert {"exact_match", "loss", "perplexity", "n"} <= set(m["test"]) and m["test"]["n"] == 3
    preds = json.loads((repo / "artifacts" / "eval" / "alpha-lora-0" / "predictions_test.json").read_text())
    assert len(preds) == 3 and {"generation", "prediction", "gold"} <= set(preds[0])
    summary = json.loads((repo / "reports" / "summary.json").read_text())
    assert summary["beta.lora"]["main_metric"] == "exact_match"

    # Editing one dataset's file: prepare re-runs, and then DVC's own staleness check (what `dvc repro`
    # would run next) names only that dataset's stages; alpha's prepared split is byte-identical.
    (repo / "data" / "mine" / "beta.jsonl").write_text(rows("beta", 16))
    dvc(repo, "repro", "prepare")
    stale = set(re.findall(r"^(\S+):\s*$", dvc(repo, "status"), re.M))
    assert stale == {"finetune@beta-lora-0", "evaluate@beta-lora-0"}

    # `dvc exp run -S` on a dataset field (the issue: "dvc exp run -S works on its fields"): the new value lands in
    # params.yaml, prepare re-splits that dataset only, and only its downstream stages become stale.
    out = dvc(repo, "exp", "run", "-S", "data.datasets.alpha.test_fraction=0.5", "prepare")
    assert "Running stage 'prepare'" in out
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["datasets"]["alpha"]["test_fraction"] == 0.5
    stats = json.loads((repo / "artifacts" / "data" / "stats.json").read_text())
    assert (
        stats["alpha"]["rows"] == {"train": 6, "validation": 0, "test": 6}
        and stats["beta"]["rows"]["train"] + stats["beta"]["rows"]["test"] == 16
    )
    stale = set(re.findall(r"^(\S+):\s*$", dvc(repo, "status"), re.M))
    # beta's two from the edit above; merge (merge.task: alpha) checks the merged model on alpha's prepared data
    assert stale == {"finetune@alpha-lora-0", "evaluate@alpha-lora-0", "merge", "finetune@beta-lora-0", "evaluate@beta-lora-0"}
