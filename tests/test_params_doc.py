"""docs/params.md is generated from the params schema, lists every key of params.yaml, and is not stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline import params_doc

ROOT = Path(__file__).resolve().parents[1]


def test_docs_params_md_is_what_the_generator_writes():
    page = ROOT / "docs" / "params.md"
    assert page.read_text(encoding="utf-8") == params_doc.render(), f"docs/params.md is stale; run: {params_doc.COMMAND}"


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("variants", "datasets"):  # those two map names chosen by the user
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def test_every_key_of_params_yaml_has_a_row_with_type_default_bounds_and_help():
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `([^`]+)` \|(.*)\|$", (ROOT / "docs" / "params.md").read_text(encoding="utf-8"), re.M)
    }
    keys = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    assert len(keys) > 50
    missing = [k for k in keys if k not in rows]
    assert not missing, f"params.yaml keys without a row in docs/params.md: {missing}"
    for k in keys:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[k])]
        assert len(cells) == 4 and all(cells), (k, cells)  # type, default, bounds ('–' for none), help text
    assert "| `train.bilora.rho` | `float` | `0.05` | ≥ 0 |" in (ROOT / "docs" / "params.md").read_text(encoding="utf-8")


def test_every_declared_dataset_key_is_documented():
    text = (ROOT / "docs" / "params.md").read_text(encoding="utf-8")
    from pipeline.config.schema import DatasetConfig
    from pipeline.config.split_source import SourceConfig

    assert all(f"| `data.datasets.<name>.{k}` |" in text for k in DatasetConfig.model_fields)
    assert all(f"| `data.datasets.<name>.train.{k}` |" in text for k in SourceConfig.model_fields)


def test_check_fails_on_a_stale_page_and_write_fixes_it(tmp_path, capsys):
    page = tmp_path / "params.md"
    page.write_text(params_doc.render().replace("| `train.bilora.rho` |", "| `train.bilora.radius` |"), encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        params_doc.main(["--check", "--path", str(page)])
    assert e.value.code == 1 and params_doc.COMMAND in capsys.readouterr().err
    params_doc.main(["--write", "--path", str(page)])
    params_doc.main(["--check", "--path", str(page)])  # no exit: up to date
