"""Where one split of a declared dataset comes from (``data.datasets.<name>.train`` / ``.test``): a local
file or folder, or a Hugging Face dataset. Its own module so that the readers (:mod:`pipeline.data.records`)
and the schema both import it without the schema's imports (the formats registry) coming along."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.sections import Section, SectionProblems

FileType = Literal["jsonl", "json", "csv", "tsv", "parquet"]


class SourceConfig(Section):
    """Where one split's records come from: a local file or folder, or a Hugging Face dataset."""

    path: str | None = Field(
        None,
        description="Local file (JSONL, JSON list of records, CSV, TSV, Parquet) or a folder of such files, relative to the repository root. Keep user data under data/ (prepare's DVC dep).",
    )
    hf: str | None = Field(None, description="Hugging Face dataset id (needs network access: HF_HUB_OFFLINE unset). Exclusive with path.")
    config: str | None = Field(None, description="Hugging Face dataset config (subset) name.")
    split: str = Field("train", description="Hugging Face split to read.")
    revision: str | None = Field(None, description="Hugging Face dataset revision (commit, tag or branch).")
    type: FileType | None = Field(None, description="File type; null: taken from the extension (.jsonl, .json, .csv, .tsv, .parquet).")

    @model_validator(mode="after")
    def _one_source(self) -> "SourceConfig":
        if (self.path is None) == (self.hf is None):
            raise SectionProblems([("path", "give exactly one of path (a local file or folder) or hf (a Hugging Face dataset id)")])
        return self
