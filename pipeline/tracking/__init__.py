"""MLflow: the stage runs, the pipeline's parent runs, the logged models.

* :mod:`.experiment`: where runs go (tracking URI, experiment kind), the code revision, params as MLflow scalars;
* :mod:`.tracker`: :class:`~.tracker.Tracker`, one outage-tolerant run per stage execution;
* :mod:`.parent`: the parent run of ``python -m pipeline.run`` / ``dvc exp run`` that stage runs nest under;
* :mod:`.logged_models`: the adapter and merged models (:mod:`.adapter_model` is the adapter's MLflow code).

The shared tracking server is the command ``python -m pipeline.server``.
"""
