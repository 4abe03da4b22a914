"""Calibration of a trained model: per task, the temperature fitted on validation, test ECE before
and after, the floor (what a perfectly calibrated model with the same confidences shows on a test
set this size), the best temperature for the test set itself (an oracle: what no fit on validation
can beat) and a bootstrap interval of the after/before ratio.
    python -m benchmarks.calibration --model runs/x/train-y/model
    python -m benchmarks.calibration --quick        # test and validation cut to 200 rows per task
    python -m benchmarks.calibration                # newest trained model under runs/
The model and its config are found as ``benchmarks.quantization`` finds them; with no trained model
under runs/ (``--quick``) an untrained MiniLM artifact is used and the figures say nothing about
calibration (marked). Target: test ECE after ≤ 0.5 × before on every sequence-classification task.
The temperatures are fitted here, in memory: the artifact is not changed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import QUICK_CONFIG, load_cfg, parser, phase, target, threads, write_result

NAME = "calibration"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--model", help="artifact directory (default: newest runs/**/model)")
    p.add_argument("--config", help="the config the model was trained with (default: found from the run)")
    p.add_argument("--rows", type=int, default=None, help="cap per task and split (quick 200, full: all)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (quick 50, full 300)")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from benchmarks.quantization import config_for, find_model, untrained_artifact
    from mtl.calibration import (
        CALIBRATED_KINDS,
        confidences,
        ece,
        ece_floor,
        fit_temperature,
        task_events,
    )
    from mtl.model import MultiTaskModel
    from pipelines.data import read_tasks

    torch.set_num_threads(threads(args))
    rows = args.rows or (200 if args.quick else None)
    draws = args.bootstrap or (50 if args.quick else 300)
    tmp = tempfile.TemporaryDirectory(prefix="bench-calibration-")
    model_dir, source = (Path(args.model), "--model") if args.model else find_model()
    trained = model_dir is not None
    cfg = config_for(model_dir, args.config) if trained else None
    if cfg is None:
        cfg = load_cfg(QUICK_CONFIG)
    data = read_tasks(cfg)
    if not trained:
        model_dir = untrained_artifact(cfg, data, Path(tmp.name))
        source = "untrained MiniLM + quick config heads (no trained model under runs/)"
    print(f"model: {model_dir} ({source})", flush=True)
    model, tokenizer = MultiTaskModel.load(model_dir, "cpu")
    rng = np.random.default_rng(0)
    figures: dict = {"model": str(model_dir), "model_source": source, "trained": trained, "config": cfg.name,
                     "bins": 15, "bootstrap": draws, "tasks": {}}
    ratios = {}
    for name, td in data.items():
        info = model.tasks.get(name)
        if info is None or info.kind not in CALIBRATED_KINDS:
            continue
        with phase(f"{name}: logits on validation and test"):
            val = task_events(model, tokenizer, name, td.splits["validation"][:rows])
            test = task_events(model, tokenizer, name, td.splits["test"][:rows])
        t = fit_temperature(val)
        c0, k0 = confidences(test)
        c1, k1 = confidences(test, t)
        before, after = ece(c0, k0), ece(c1, k1)
        grid = np.round(np.arange(0.5, 4.001, 0.01), 2)
        oracle = [ece(*confidences(test, float(g))) for g in grid]
        best = int(np.argmin(oracle))
        boot = []
        for _ in range(draws):
            idx = rng.integers(0, len(c0), len(c0))
            b = ece(c0[idx], k0[idx])
            if b > 0:
                boot.append(ece(c1[idx], k1[idx]) / b)
        res = {
            "kind": info.kind, "validation_n": len(val.logits), "test_n": len(test.logits),
            "test_errors": int((~k0).sum()), "temperature": round(t, 4),
            "test_ece_before": round(before, 5), "test_ece_after": round(after, 5),
            "ratio": round(after / before, 3) if before else None,
            "test_ece_floor": round(ece_floor(c1), 5),
            "oracle_temperature": float(grid[best]), "oracle_ece": round(oracle[best], 5),
            "oracle_ratio": round(oracle[best] / before, 3) if before else None,
            "ratio_bootstrap_5_95": [round(float(np.percentile(boot, q)), 3) for q in (5, 95)] if boot else None,
        }
        figures["tasks"][name] = res
        if info.kind == "sequence_classification" and before:
            ratios[name] = after / before
        print(f"{name}: T {t:.2f}; test ECE {before:.4f} -> {after:.4f} ({res['ratio']}x); floor "
              f"{res['test_ece_floor']:.4f}; oracle T {grid[best]:.2f} -> {oracle[best]:.4f}; "
              f"bootstrap ratio {res['ratio_bootstrap_5_95']}", flush=True)
    worst = max(ratios, key=ratios.get) if ratios else None
    why_not = None if trained else "untrained model: calibration of random heads says nothing"
    return write_result(NAME, "Calibration: temperature scaling per task (validation-fitted, test ECE, 15 bins)",
                        args, figures, [
        target("worst_sequence_task_ece_ratio", ratios[worst] if worst and trained else None, 0.5, "<=", "×",
               note=why_not or f"{worst}: test ECE after / before (each sequence task's ratio in the figures)"),
    ], notes=[
        "floor = mean ECE of outcomes drawn right with probability their calibrated confidence "
        "(mtl.calibration.ece_floor): an ECE at or under it is as calibrated as the test set can show.",
        "oracle = the temperature that minimises test ECE itself, on a 0.01 grid over 0.5-4: a bound, not a method.",
        "Token tasks: one event per word (first subword), as tags and entity scores are read.",
    ])


if __name__ == "__main__":
    main()
