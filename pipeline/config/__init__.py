"""``params.yaml``: its schema, reading and validating it, presets, and each run's resolved settings.

* :mod:`.schema`: the pydantic schema of every section (sections derived from the library's settings
  dataclasses come from :mod:`.sections`, a dataset split's source from :mod:`.split_source`; the record
  formats are the registry's, :mod:`pipeline.data.formats`);
* :mod:`.load`: read a params (or preset) file and validate it, every problem at once by dotted path;
* :mod:`.presets`: ``pipeline/presets/<name>.yaml`` deltas merged over params.yaml;
* :mod:`.runs`: :class:`~.runs.RunConfig`, one resolved fine-tuning run: what ``configure`` writes to
  ``artifacts/runs/<run>.json``, what ``finetune`` trains from, and its MLflow params.
"""
