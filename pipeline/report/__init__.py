"""The report stage's parts: :mod:`.collect` reads the runs, :mod:`.tables` writes the Markdown and
terminal tables, :mod:`.charts` the figures; :func:`.write.write_report` puts them under ``reports/``;
:mod:`.precision` is the precision every committed figure is recorded at (``metrics/`` and ``reports/``)."""
