"""The built-in tasks are ordinary entries of the format mechanism, and the default run's prepared data
did not change: SST-2 through pipeline/data/formats/classification.py gives byte-identical arrow files to the
hand-written reader + tokenize of the committed run (digests of /work/main artifacts/data/sst2 before
this change, the inputs behind the committed metrics/)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from pipeline.data import formats
from pipeline.data.catalog import get_task
from pipeline.config.load import load_params
from pipeline.data.builtin import TASKS

ROOT = Path(__file__).resolve().parents[1]

# md5 of artifacts/data/sst2/<split>/data-00000-of-00001.arrow written by the pre-formats prepare stage
SST2_ARROW_MD5 = {
    "train": "d205b3f167aeb5fa72c30b7b84ecf4dc",
    "validation": "ca827203c266810d68b005f0691eabc2",
    "test": "a59d5deb105020a55f93bc971a02d500",
}


def test_default_sst2_prepared_data_is_byte_identical(tmp_path):
    from bilora.base import resolve
    from pipeline.data.prepare import prepare_task, tokenizer_for

    p = load_params(ROOT / "params.yaml")
    assert p.data.tasks == ["sst2"]
    raw = ROOT / p.data.raw_dir
    data = p.data.model_copy(update={"raw_dir": str(raw)})
    tok = tokenizer_for(resolve(p.base.source, p.base.revision).path)
    dd, stats = prepare_task(get_task("sst2", data), data, tok)
    dd.save_to_disk(str(tmp_path / "sst2"))
    for split, digest in SST2_ARROW_MD5.items():
        got = hashlib.md5((tmp_path / "sst2" / split / "data-00000-of-00001.arrow").read_bytes()).hexdigest()
        assert got == digest, split
    assert stats["rows"] == {"train": 1620, "validation": 180, "test": 872}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_builtin_is_a_format_entry(name):
    task = TASKS[name]
    fmt = formats.get(task.format)
    assert fmt.kind == task.kind
    assert set(task.metrics) <= set(fmt.default_metrics(task.options | {"labels": task.options.get("labels", ["0", "1"])})) | {
        "mcc",
        "accuracy",
        "f1",
        "exact_match",
    }


def test_no_task_name_or_kind_branches_in_stages_or_library():
    """Stages and bilora/ never test a task's name or kind; the format decides."""
    names = "|".join(sorted(TASKS))
    for path in list((ROOT / "stages").glob("*.py")) + list((ROOT / "bilora").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"task(_name|\.name)?\s*==\s*['\"](%s)['\"]" % names, text), path
        if path.parent.name == "stages":  # (bilora.base.load_for_task dispatches on the head kind it is given)
            assert not re.search(r"(task|fmt)\.kind\s*[!=]=|\bkind\s*[!=]=\s*['\"](generation|classification|regression)", text), path
