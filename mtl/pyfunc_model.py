"""The registered model as an MLflow ``pyfunc`` (models from code: nothing is pickled).

Input: a DataFrame with a ``text`` column (or a list of strings); output: one row per text with a
JSON column per task holding the same answer the Serve endpoint gives, and an ``error`` column:
``None``, or why that row got no answer (its task columns are then ``None``). A bad row never
fails the others.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class MultiTaskPyfunc(PythonModel):
    def load_context(self, context):
        from mtl.predictor import Predictor
        from mtl.registry import find_manifest_dir

        self.predictor = Predictor.load(find_manifest_dir(__import__("pathlib").Path(context.artifacts["mtl_model"])))

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            texts = [str(t) for t in model_input["text"]]
        else:
            texts = [str(t) for t in model_input]
        tasks = (params or {}).get("tasks")
        from mtl.predictor import RowError

        names = tasks.split(",") if isinstance(tasks, str) else (tasks or self.predictor.task_names)
        answers = self.predictor.predict(texts, tasks=names, errors="return")
        rows = [{t: None for t in names} | {"error": str(a)} if isinstance(a, RowError)
                else {t: json.dumps(v) for t, v in a.items()} | {"error": None} for a in answers]
        return pd.DataFrame(rows, columns=[*names, "error"])


mlflow.models.set_model(MultiTaskPyfunc())
