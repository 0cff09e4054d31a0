"""Thin entry points, one per DVC stage (``python -m stages.<name>``)."""

from pipeline.terminal.quiet import quiet

quiet()  # before any stage module imports torch / peft / bitsandbytes (see pipeline/terminal/quiet.py)
