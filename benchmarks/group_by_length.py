"""Training steps with and without ``train.group_by_length``: seconds per step, tokens computed.

    python -m benchmarks.group_by_length --quick                        # quick config, 24 steps a side
    python -m benchmarks.group_by_length --config configs/atis_sentiment_news_tweets.yaml --steps 150

Both sides are the trainer's engine in this process (``benchmarks.common.PlainLoop``, built from
the config as a Ray worker builds it: MiniLM, the config's tasks, sampling, batch size and seed),
on the same tokenized training arrays and the same seeded task sequence; the only difference is
``group_by_length``, which batches rows of similar length (``mtl.sampling.length_batches``: the
same rows each epoch, sorted within windows of 50 batches). Reported per side: seconds per step
(forward, backward and optimizer; no validation), token positions computed after each batch is
trimmed to its longest row, and real tokens; and the ratio. No target: how much it saves depends
on how varied the texts' lengths are (a task whose texts all reach ``max_length`` saves nothing).
"""

from __future__ import annotations

from benchmarks.common import (
    QUICK_CONFIG,
    PlainLoop,
    Timer,
    load_cfg,
    parser,
    phase,
    threads,
    tokenize_arrays,
    write_result,
)

NAME = "group_by_length"


def run_side(cfg, data, arrays, steps: int, warmup: int) -> dict:
    from mtl.packages import resolve_encoder
    from pipelines.data import task_infos

    loop = PlainLoop(cfg, task_infos(cfg, data), arrays, str(resolve_encoder(cfg.model.encoder)))
    loop.module.train()
    for _ in range(warmup):
        loop.step()
    loop.tokens = loop.real_tokens = 0
    timings: dict[str, float] = {}
    with Timer() as t:
        for _ in range(steps):
            loop.step(timings)
    return {"steps": steps, "s_per_step": round(t.s / steps, 4), "tokens_computed": loop.tokens,
            "real_tokens": loop.real_tokens, "padding_frac": round(1 - loop.real_tokens / max(1, loop.tokens), 4),
            "forward_backward_s": round(timings.get("forward_backward", 0.0), 2),
            "optimizer_s": round(timings.get("optimizer", 0.0), 2)}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--config", default=None, help="run config (default: the quick config)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (quick 24, full 150)")
    args = p.parse_args(argv)
    import torch

    from pipelines.data import read_tasks

    torch.set_num_threads(threads(args))
    steps = args.steps or (24 if args.quick else 150)
    warmup = 2
    path = args.config or QUICK_CONFIG
    base = load_cfg(path)
    with phase("reading and tokenizing the training splits"):
        data = read_tasks(base)
        arrays = tokenize_arrays(base, data, ("train",))
    figures: dict = {"config": base.name, "tasks": base.task_names, "batch_size": base.train.batch_size,
                     "sampling": base.train.sampling, "threads": torch.get_num_threads(), "warmup_steps": warmup}
    for grouped in (False, True):
        cfg = load_cfg(path, [f"train.group_by_length={str(grouped).lower()}"])
        key = "grouped" if grouped else "plain"
        with phase(f"{steps} steps, group_by_length={grouped}"):
            figures[key] = run_side(cfg, data, arrays, steps, warmup)
        print(f"  {key}: {figures[key]}", flush=True)
    plain, grouped = figures["plain"], figures["grouped"]
    figures["step_speedup"] = round(plain["s_per_step"] / grouped["s_per_step"], 3)
    figures["tokens_ratio"] = round(plain["tokens_computed"] / max(1, grouped["tokens_computed"]), 3)
    print(f"group_by_length: {figures['step_speedup']}x faster steps, {figures['tokens_ratio']}x fewer tokens computed")
    return write_result(NAME, "Training steps grouped by length vs not (engine in-process)", args, figures, [])


if __name__ == "__main__":
    main()
