"""MLflow "models from code" definition of a fine-tuned adapter, logged by :mod:`pipeline.tracking.logged_models`.

MLflow copies this file into the logged model and runs it when the model is loaded. The model
carries the adapter (``artifacts["adapter"]``: the PEFT folder finetune wrote) and references the
saved 4-bit base by path (``model_config["base_dir"]``), which is not copied. It loads both through
:func:`bilora.base.load_adapted`, the loader evaluate uses, so the 4-bit CPU kernel and the task head
are the ones the stage scored. Loading needs the ``bilora`` package (this repository) installed.

    model = mlflow.pyfunc.load_model("models:/<model_id>")
    model = mlflow.pyfunc.load_model("models:/<model_id>", model_config={"base_dir": "<clone>/artifacts/base/model"})
    logits = model.predict({"input_ids": ids, "attention_mask": mask})  # int64 (B, L) -> (B, num_labels), or (B, L, V) for generation

Inputs are token ids from the base's tokenizer (saved beside the base); the signature names them.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class AdapterModel(PythonModel):
    # The logged tensor signature (token ids) validates inputs; this is MLflow's own opt-out of its
    # type-hint wrapping of predict (mlflow/pyfunc/model.py), which would warn on every log and load.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from bilora.base import load_adapted

        cfg = context.model_config
        self.model = load_adapted(cfg["base_dir"], cfg["kind"], int(cfg["num_labels"]), context.artifacts["adapter"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        device = next(self.model.parameters()).device
        batch = {k: torch.as_tensor(np.asarray(v), device=device) for k, v in model_input.items()}  # each (B, L)
        with torch.no_grad():
            return self.model(**batch).logits.float().cpu().numpy()


mlflow.models.set_model(AdapterModel())
