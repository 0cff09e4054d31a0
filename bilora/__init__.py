"""bilora: sharpness-aware LoRA (Bi-LoRA and its peers) on PEFT, usable without DVC or MLflow.

The library never imports ``pipeline`` or ``stages``; those packages are the DVC/MLflow plumbing.
"""

__version__ = "0.1.0"
