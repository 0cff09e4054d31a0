"""Plumbing shared by the DVC stages (``stages/``), cut by concern; the library (``bilora/``) never imports it.

* :mod:`.config`: params.yaml (schema, reading and validating, presets, each run's resolved settings);
* :mod:`.data`: tasks and their data (readers, built-in tasks, the catalog, prepare, the record formats);
* :mod:`.tracking`: MLflow (stage runs, parent runs, logged models);
* :mod:`.stage`: the stage runner, where stages read and write, the finetune and evaluate steps;
* :mod:`.report`: the report stage's tables and charts;
* :mod:`.terminal`: the console, silenced third-party noise, user errors (exit 2);
* :mod:`.science`: the pre-registered comparison (reports/science/).

The commands: ``python -m pipeline.run`` (validate, then ``dvc repro``), ``pipeline.validate``, ``pipeline.plots``
(offline ``dvc plots``), ``pipeline.server`` (a shared MLflow server), ``pipeline.deps`` (dvc.yaml's code deps),
``pipeline.params_doc`` (docs/params.md).
"""
