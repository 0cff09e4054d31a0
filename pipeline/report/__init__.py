"""The report stage's parts: :mod:`.collect` reads the runs, :mod:`.tables` writes the Markdown and
terminal tables, :mod:`.plots` the figures; :func:`.write.write_report` puts them under ``reports/``."""
