"""DDP gradient communication with and without the fp16 compression hook (2 workers, gloo, loopback).

    python -m benchmarks.comm_hook --quick     # 3 timed steps per mode
    python -m benchmarks.comm_hook             # 12 timed steps per mode

Two processes (torch.multiprocessing, gloo on 127.0.0.1) train MiniLM with the trainer's engine
(``mtl.engine.Engine``) under ``DistributedDataParallel`` on the quick config's four tasks (round_robin, global batch 16, each rank
its half of the global batch, as the Ray Train workers do), once with the plain all-reduce hook and
once with ``fp16_compress_hook`` (what ``train.comm_hook: fp16`` registers). A wrapper hook counts
the bytes each rank hands to all-reduce per step: the bucket's nbytes for fp32, half of it for fp16
(the compressed copy). Step time is the slower rank's median over the timed steps (after warm-up).
A bare ``all_reduce`` of a tensor the size of all gradients, fp32 vs fp16, isolates the wire time.
No target: the figures say what compression buys on this transport.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.common import (
    QUICK_CONFIG,
    free_port,
    load_cfg,
    parser,
    phase,
    tokenize_arrays,
    write_result,
)

NAME = "comm_hook"


def _worker(rank: int, world: int, port: int, mode: str, job: dict, queue) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from mtl.distributed import wrap_ddp
    from mtl.engine import Engine, EngineConfig
    from mtl.model import MultiTaskModel, TaskInfo

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(job["threads"])
    infos = [TaskInfo(**t) for t in job["tasks"]]
    names = [i.name for i in infos]
    model = MultiTaskModel.from_encoder(job["encoder_dir"], infos, seed=13)
    counter = {"bytes": 0, "buckets": 0}

    def counting_hook(state, bucket):
        buf = bucket.buffer()
        counter["buckets"] += 1
        if mode == "fp16":
            counter["bytes"] += buf.numel() * 2
            return default_hooks.fp16_compress_hook(state, bucket)
        counter["bytes"] += buf.numel() * buf.element_size()
        return default_hooks.allreduce_hook(state, bucket)

    def wrap(module):
        ddp = wrap_ddp(module, torch.device("cpu"))
        ddp.register_comm_hook(None, counting_hook)  # what comm_hook: fp16 registers, plus counting
        return ddp

    # the trainer's engine: round_robin, AdamW groups (1e-4 encoder, 1e-3 heads), clipping at 1.0
    config = EngineConfig(max_steps=10_000, batch_size=job["batch_size"], lr=1e-4, head_lr=1e-3,
                          warmup_ratio=0.0, sampling="round_robin", seed=13, task_weights={n: 1.0 for n in names})
    engine = Engine(model, {t: {"train": job["arrays"][t]} for t in names}, config, wrap=wrap)
    module = engine.raw
    step_times, step_bytes, losses = [], [], []
    for step in range(job["warmup"] + job["steps"]):
        counter["bytes"] = counter["buckets"] = 0
        t0 = time.perf_counter()
        step_losses = engine.train_step()
        if step >= job["warmup"]:
            step_times.append(time.perf_counter() - t0)
            step_bytes.append(counter["bytes"])
            losses.append(sum(step_losses.values()))

    # the wire alone: one all_reduce of every gradient element, fp32 and fp16
    n_grad = sum(p.numel() for p in module.parameters())
    wire = {}
    for dtype in (torch.float32, torch.float16):
        x = torch.ones(n_grad, dtype=dtype)
        dist.all_reduce(x)
        best = float("inf")
        for _ in range(job["wire_repeats"]):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            best = min(best, time.perf_counter() - t0)
        wire[str(dtype).replace("torch.", "")] = best
    queue.put({"rank": rank, "mode": mode, "step_s": step_times, "bytes_per_step": step_bytes, "losses": losses,
               "grad_elements": n_grad, "buckets_per_step": counter["buckets"],
               "wire_allreduce_s": wire, "mean_loss": float(np.mean(losses)) if losses else None})
    dist.destroy_process_group()


def run_mode(mode: str, job: dict, world: int) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, mode, job, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join(timeout=120)
        if p.exitcode not in (0, None):
            raise RuntimeError(f"rank process exited with {p.exitcode}")
    return sorted(results, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (quick 3, full 12)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over the 2 workers)")
    args = p.parse_args(argv)
    from dataclasses import asdict

    from mtl.packages import resolve_encoder
    from pipelines.data import read_tasks, task_infos

    world = 2
    n_threads = max(1, (args.threads or os.cpu_count() or 2) // world)
    cfg = load_cfg(QUICK_CONFIG)
    data = read_tasks(cfg)
    arrays = {t: a["train"] for t, a in tokenize_arrays(cfg, data, ("train",)).items()}
    steps = args.steps or (3 if args.quick else 12)
    job = {"threads": n_threads, "tasks": [asdict(i) for i in task_infos(cfg, data)],
           "encoder_dir": str(resolve_encoder(cfg.model.encoder)), "arrays": arrays, "batch_size": args.batch_size,
           "warmup": 1 if args.quick else 4, "steps": steps, "wire_repeats": 3 if args.quick else 5}
    out = {}
    for mode in ("none", "fp16"):
        with phase(f"DDP 2 × gloo, comm hook {mode}, {job['warmup']} + {steps} steps"):
            out[mode] = run_mode(mode, job, world)
        r0 = out[mode][0]
        step_s = max(statistics.median(r["step_s"]) for r in out[mode])
        print(f"  {mode}: {step_s:.2f} s/step, {r0['bytes_per_step'][-1] / 2**20:.1f} MiB/step/rank "
              f"to all-reduce, {r0['buckets_per_step']} buckets", flush=True)

    def summary(mode: str) -> dict:
        rs = out[mode]
        return {
            "step_s_median": round(max(statistics.median(r["step_s"]) for r in rs), 4),
            "step_s_mean": round(max(statistics.fmean(r["step_s"]) for r in rs), 4),
            "step_s_per_rank": [[round(x, 4) for x in r["step_s"]] for r in rs],
            "bytes_per_step_per_rank": rs[0]["bytes_per_step"][-1],
            "mib_per_step_per_rank": round(rs[0]["bytes_per_step"][-1] / 2**20, 2),
            "buckets_per_step": rs[0]["buckets_per_step"],
            "mean_loss": round(rs[0]["mean_loss"], 5) if rs[0]["mean_loss"] is not None else None,
        }

    s_none, s_fp16 = summary("none"), summary("fp16")
    wire = out["none"][0]["wire_allreduce_s"]
    grad_elems = out["none"][0]["grad_elements"]
    figures = {
        "world_size": world, "backend": "gloo", "transport": "127.0.0.1 loopback",
        "threads_per_rank": n_threads, "global_batch": args.batch_size, "steps_timed": steps,
        "gradient_elements": grad_elems, "gradient_mib_fp32": round(grad_elems * 4 / 2**20, 2),
        "hook_none": s_none, "hook_fp16": s_fp16,
        "bytes_ratio_fp16_over_none": round(s_fp16["bytes_per_step_per_rank"] / max(1, s_none["bytes_per_step_per_rank"]), 4),
        "step_time_ratio_fp16_over_none": round(s_fp16["step_s_median"] / s_none["step_s_median"], 4),
        "wire_allreduce_all_grads_s": {k: round(v, 4) for k, v in wire.items()},
    }
    print(f"bytes fp16/none {figures['bytes_ratio_fp16_over_none']}, step time fp16/none "
          f"{figures['step_time_ratio_fp16_over_none']}; bare all_reduce of all gradients: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in wire.items()), flush=True)
    return write_result(NAME, "DDP fp16 compression hook: bytes and step time (2 × gloo)", args, figures, [], notes=[
        "Bytes = what each rank hands to all-reduce per step (bucket nbytes; half for the fp16 copy). "
        "A ring all-reduce over 2 ranks sends and receives about that much per rank.",
        "Step time = forward + backward (with the overlapped all-reduce) + clipping + AdamW; the slower "
        "rank's median over the timed steps (the ratio uses it; step_s_mean beside it).",
        "Both ranks share the machine's cores: on 2 cores each rank has 1 thread, so compute dominates.",
        "No target: informational.",
    ])


if __name__ == "__main__":
    main()
