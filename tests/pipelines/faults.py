"""Fault injection for the Ray Train tests, attached to the engine from outside as a callback.

Workers cannot import this test folder, so a test registers this module with
``ray.cloudpickle.register_pickle_by_value`` and the class travels by value in the LoopConfig."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mtl.engine import Callback


class CrashOnce(Callback):
    """The last rank's process dies (``os._exit(1)``) once, after optimizer step ``step``;
    ``flag`` records that it did, so the restarted group does not die again. The pause lets Ray's
    controller register the checkpoint reported a moment ago (a death within the same poll as the
    report would restart from the checkpoint before)."""

    def __init__(self, step: int, flag: str, delay_s: float = 5.0):
        self.step, self.flag, self.delay_s = step, flag, delay_s

    def on_step_end(self, engine, step: int) -> None:
        if step == self.step and engine.rank == engine.world - 1 and not Path(self.flag).exists():
            Path(self.flag).write_text(str(step))
            time.sleep(self.delay_s)
            os._exit(1)


class RecordRows(Callback):
    """Appends ``epoch:idx`` of every training row this rank draws to ``<folder>/rank<r>-<task>.txt``
    (wraps each streamed task's epoch function when the fit starts)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_start(self, engine) -> None:
        for task, source in engine.train_batches.items():
            path = Path(self.folder) / f"rank{engine.rank}-{task}.txt"

            def epoch(e, inner=source.epoch, path=path):
                for batch in inner(e):
                    with open(path, "a") as f:
                        f.write(" ".join(f"{e}:{i}" for i in batch["idx"]) + "\n")
                    yield batch

            source.epoch = epoch


class RecordNode(Callback):
    """Writes the Ray node id this rank runs on to ``<folder>/node<r>.txt`` when the fit starts."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_start(self, engine) -> None:
        import ray

        (Path(self.folder) / f"node{engine.rank}.txt").write_text(ray.get_runtime_context().get_node_id())
