"""Old tasks unchanged after ``mtl-ray add-task``, on the real test sets: every test text of the base
model's tasks, answered by the base artifact and by the grown one (the old tasks alone, and beside
the new tasks), must give the same labels, tags and float scores (top-2, compared with ``==``).
    python -m benchmarks.add_task_unchanged --base runs/a/train-x/model --grown runs/b/train-y/model
    python -m benchmarks.add_task_unchanged --base ... --grown ... --rows 100    # a quick look
The base's config is found as ``benchmarks.quantization`` finds it (or ``--config``). One thread, torch
fp32 on CPU: the comparison is exact, so both artifacts must run the same kernels.
Target: 0 differing answers.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import parser, phase, target, write_result

NAME = "add_task_unchanged"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--base", required=True, help="the base model's artifact directory")
    p.add_argument("--grown", required=True, help="the artifact add-task published from it")
    p.add_argument("--config", help="the base model's config (default: found from the run)")
    p.add_argument("--rows", type=int, default=None, help="test rows per task (default: all)")
    args = p.parse_args(argv)
    import torch

    from benchmarks.quantization import config_for
    from mtl.predictor import Predictor
    from pipelines.data import read_tasks

    torch.set_num_threads(1)
    base_dir, grown_dir = Path(args.base), Path(args.grown)
    cfg = config_for(base_dir, args.config)
    if cfg is None:
        p.error(f"no config found for {base_dir}; pass --config")
    base, grown = Predictor.load(base_dir, device="cpu"), Predictor.load(grown_dir, device="cpu")
    old = base.task_names
    new = [t for t in grown.task_names if t not in old]
    if [t for t in grown.task_names if t in old] != old:
        p.error(f"{grown_dir} does not hold every task of {base_dir} ({old})")
    data = read_tasks(cfg)
    texts = list(dict.fromkeys(r["text"] for td in data.values() for r in td.splits["test"][:args.rows]))
    with phase(f"{len(texts)} distinct test texts, base"):
        want = base.predict(texts, old, top_k=2)
    with phase("grown, old tasks alone"):
        alone = grown.predict(texts, old, top_k=2)
    with phase(f"grown, old tasks beside {new}"):
        beside = [{t: a[t] for t in old} for a in grown.predict(texts, old + new, top_k=2)]
    differ = {"alone": sum(a != w for a, w in zip(alone, want, strict=True)),
              "beside_new_tasks": sum(b != w for b, w in zip(beside, want, strict=True))}
    figures = {"base": str(base_dir), "grown": str(grown_dir), "old_tasks": old, "new_tasks": new,
               "texts": len(texts), "differing_answers": differ}
    print(f"old tasks {old}, new {new}: {len(texts)} texts; differing answers: {differ}")
    targets = [target("differing_answers", differ["alone"] + differ["beside_new_tasks"], 0, op="<=")]
    write_result(NAME, "Old tasks unchanged after add-task (real test sets)", args, figures, targets)
    return figures


if __name__ == "__main__":
    main()
