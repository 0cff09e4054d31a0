"""Thin entry points, one per DVC stage (``python -m stages.<name>``)."""

from pipeline.quiet import quiet

quiet()  # before any stage module imports torch / peft / bitsandbytes (see pipeline/quiet.py)
