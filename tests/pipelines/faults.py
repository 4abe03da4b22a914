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
