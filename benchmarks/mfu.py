"""Model FLOPs utilisation of training: model FLOPs/s ÷ the machine's measured fp32 matmul peak.

    python -m benchmarks.mfu --quick     # 4 timed steps, 2 profiled
    python -m benchmarks.mfu             # 24 timed steps, 4 profiled

Peak: the best fp32 matmul rate measured here at the training thread count: ``torch.mm`` of square
matrices (512, 1024, 2048; also 768 and 4096 in the full run; FLOPs = 2·n³) and of the model's own
GEMM shapes (batch·48 tokens × 384 by 384 × 384, 384 × 1536, 1536 × 384), best of N each (on CUDA
TF32 is switched off: an fp32 peak). Square sizes past the caches run slower than the model's
small GEMMs on CPU, so the max over both is the honest ceiling.

Training: the trainer's step (``benchmarks.common.PlainLoop``: TrainModule, AdamW, clipping) on
MiniLM with the quick config's four tasks, round_robin, batch 16. Model FLOPs per step::

    6 · N · T  +  12 · n_layers · d · Σ_batches(B · L²)

with N the encoder's non-embedding parameters (10.6 M for MiniLM-L6; heads, < 0.5 %, ignored),
T = token positions computed (batch × length after trimming shared padding), d the hidden size and
L the trimmed length (the attention score and value matmuls, forward 4·L²·d per sequence and
layer, ×3 for forward + backward). MFU = model FLOPs/s ÷ peak. Target on CPU ≥ 0.40.

Where the time goes: forward / backward / optimizer wall-clock split, and the top operators of a
``torch.profiler`` run over a few steps (self time), grouped into matmul and the rest.
"""

from __future__ import annotations

import time

from benchmarks.common import (
    QUICK_CONFIG,
    PlainLoop,
    Timer,
    best_of,
    device,
    load_cfg,
    parser,
    phase,
    target,
    threads,
    tokenize_arrays,
    write_result,
)

NAME = "mfu"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_addmm_activation", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def matmul_peak(dev, sizes: list[int], repeats: int) -> dict:
    import torch

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev)
        b = torch.randn(n, n, device=dev)
        t = best_of(lambda a=a, b=b: torch.mm(a, b), repeats, warmup=2)
        out[n] = {"gflops_best": 2 * n ** 3 / t["best_s"] / 1e9, "gflops_median": 2 * n ** 3 / t["median_s"] / 1e9}
        print(f"  mm {n}×{n}: best {out[n]['gflops_best']:.1f} GFLOP/s, median {out[n]['gflops_median']:.1f}",
              flush=True)
    return out


def model_shaped_gemms(dev, tokens: int, hidden: int, inter: int, repeats: int) -> dict:
    """The encoder's own GEMMs (forward shapes) at ``tokens`` rows."""
    import torch

    out = {}
    for name, (k, n) in {"qkv_or_out_proj": (hidden, hidden), "ffn_up": (hidden, inter),
                         "ffn_down": (inter, hidden)}.items():
        x = torch.randn(tokens, k, device=dev)
        w = torch.randn(k, n, device=dev)
        t = best_of(lambda x=x, w=w: torch.mm(x, w), repeats, warmup=2)
        out[name] = {"shape": [tokens, k, n], "gflops_best": round(2 * tokens * k * n / t["best_s"] / 1e9, 2)}
    return out


def profile_steps(loop: PlainLoop, steps: int, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    cuda = loop.device.type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            loop.step()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    top_ops = [{"op": e.key, "self_ms": round(getattr(e, key) / 1000, 1),
                "share": round(getattr(e, key) / total, 4), "calls": e.count} for e in rows[:top]]
    matmul = sum(getattr(e, key) for e in events if e.key in MATMUL_OPS)
    # the optimizer's step is one annotated range; its total CPU time covers the ops inside it
    optim = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    cpu_total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {"steps": steps, "by": key, "total_self_ms": round(total / 1000, 1), "top_ops": top_ops,
            "matmul_share": round(matmul / total, 4), "optimizer_step_share_cpu": round(optim / cpu_total, 4)}


def optimizer_variants(module, repeats: int) -> dict:
    """Seconds per AdamW step over the model's parameters (random gradients): the default
    implementation, foreach and fused (where this torch build has them on this device)."""
    import torch

    params = [p.detach().clone().requires_grad_(True) for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, kw in {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items():
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)
            out[name] = round(best_of(opt.step, repeats, warmup=1)["best_s"], 4)
        except (RuntimeError, TypeError, ValueError) as err:
            out[name] = f"unavailable: {str(err)[:80]}"
        finally:
            opt = None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="timed steps (quick 4, full 24)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    import torch

    from mtl.packages import resolve_encoder
    from pipelines.data import read_tasks, task_infos

    n_threads = threads(args)
    torch.set_num_threads(n_threads)
    dev = device()
    steps = args.steps or (4 if args.quick else 24)
    warmup = 1 if args.quick else 4
    prof_steps = 2 if args.quick else 4

    with phase("matmul peak"):
        if dev.type == "cpu":
            sizes = [512, 1024, 2048] if args.quick else [512, 768, 1024, 2048, 4096]
        else:
            sizes = [4096, 8192]
        peaks = matmul_peak(dev, sizes, 5 if args.quick else 20)

    cfg = load_cfg(QUICK_CONFIG, ["train.sampling=round_robin", f"train.batch_size={args.batch_size}",
                                  f"train.max_steps={warmup + steps + prof_steps}"])
    data = read_tasks(cfg)
    arrays = tokenize_arrays(cfg, data, ("train",))
    loop = PlainLoop(cfg, task_infos(cfg, data), arrays, str(resolve_encoder(cfg.model.encoder)), dev)
    enc = loop.module.model.encoder
    n_layers, hidden, inter = enc.config.num_hidden_layers, enc.config.hidden_size, enc.config.intermediate_size
    n_params = sum(p.numel() for p in enc.parameters())
    n_emb = sum(p.numel() for n, p in enc.named_parameters() if n.startswith("embeddings."))
    n_nonemb = n_params - n_emb

    tokens_per_step = args.batch_size * 48  # the quick config's max_length; the real mean is reported beside
    with phase("model-shaped GEMMs"):
        gemms = model_shaped_gemms(dev, tokens_per_step, hidden, inter, 5 if args.quick else 20)
    # the peak: the best fp32 matmul rate measured here, square or model-shaped
    square_peak = max(v["gflops_best"] for v in peaks.values()) * 1e9
    peak = max([square_peak / 1e9] + [g["gflops_best"] for g in gemms.values()]) * 1e9
    print(f"  peak {peak / 1e9:.1f} GFLOP/s (model-shaped: "
          + ", ".join(f"{k} {g['gflops_best']}" for k, g in gemms.items()) + ")", flush=True)

    with phase(f"{warmup} warm-up + {steps} timed training steps"):
        for _ in range(warmup):
            loop.step()
        tok0, real0, sq0, ex0 = loop.tokens, loop.real_tokens, loop.seq_sq, loop.examples
        timings: dict[str, float] = {}
        with Timer() as t:
            for _ in range(steps):
                loop.step(timings)
        tokens, real = loop.tokens - tok0, loop.real_tokens - real0
        seq_sq, examples = loop.seq_sq - sq0, loop.examples - ex0

    flops = 6 * n_nonemb * tokens + 12 * n_layers * hidden * seq_sq
    flops_per_s = flops / t.s
    mfu = flops_per_s / peak
    mfu_real = (6 * n_nonemb * real + 12 * n_layers * hidden * seq_sq * real / max(tokens, 1)) / t.s / peak
    split = {k: round(v / t.s, 4) for k, v in timings.items()}
    print(f"training: {flops_per_s / 1e9:.2f} GFLOP/s model, peak {peak / 1e9:.1f} GFLOP/s -> MFU {mfu:.3f}; "
          f"{examples / t.s:.2f} samples/s, {tokens / t.s:.0f} tokens/s; split {split}", flush=True)

    with phase(f"torch.profiler over {prof_steps} steps"):
        t0 = time.time()
        prof = profile_steps(loop, prof_steps)
        prof["wall_s"] = round(time.time() - t0, 2)
    for op in prof["top_ops"][:8]:
        print(f"  {op['share']:6.1%}  {op['self_ms']:9.1f} ms  {op['op']}", flush=True)
    print(f"  matmul ops {prof['matmul_share']:.1%} of self time; optimizer step "
          f"{prof['optimizer_step_share_cpu']:.1%}", flush=True)
    with phase("AdamW step: default vs foreach vs fused"):
        optim = optimizer_variants(loop.module, 2 if args.quick else 5)
    print(f"  AdamW step seconds: {optim}", flush=True)

    figures = {
        "device": str(dev),
        "threads": n_threads,
        "matmul_peak_gflops": round(peak / 1e9, 2),
        "square_mm_peak_gflops": round(square_peak / 1e9, 2),
        "matmul_by_size": {str(k): {kk: round(vv, 2) for kk, vv in v.items()} for k, v in peaks.items()},
        "model_shaped_gemms": gemms,
        "model": {"encoder": "all-MiniLM-L6-v2", "params": n_params, "embedding_params": n_emb,
                  "non_embedding_params": n_nonemb, "layers": n_layers, "hidden": hidden},
        "steps_timed": steps,
        "batch_size": args.batch_size,
        "train_s": round(t.s, 3),
        "samples_per_s": round(examples / t.s, 3),
        "tokens_per_s": round(tokens / t.s, 1),
        "padding_share_of_tokens": round(1 - real / max(tokens, 1), 4),
        "model_gflops_per_s": round(flops_per_s / 1e9, 3),
        "flops_formula": "6·N_nonemb·T + 12·layers·hidden·Σ(B·L²) per step; T = B·L after trimming",
        "mfu": round(mfu, 4),
        "mfu_vs_square_mm_peak": round(flops_per_s / square_peak, 4),
        "mfu_non_padding_tokens": round(mfu_real, 4),
        "time_split": split,
        "profile": prof,
        "adamw_step_s": optim,
    }
    return write_result(NAME, "Model FLOPs utilisation of training (fp32)", args, figures, [
        target("mfu" + ("_cpu" if dev.type == "cpu" else "_gpu"), mfu, 0.40, ">=",
               note="model FLOPs/s ÷ measured fp32 torch.mm peak"),
    ], notes=[
        "Peak = best fp32 torch.mm rate measured in this run (square sizes and the model's GEMM shapes) at "
        "the same thread count (TF32 off on CUDA); best-of-N on a shared machine makes it an optimistic "
        "ceiling, so the MFU is a conservative figure.",
        "Model FLOPs count padded positions inside a trimmed batch (the machine computes them); "
        "mfu_non_padding_tokens counts only real tokens.",
        "AdamW updates all 22.6 M parameters each step (the 11.9 M embedding table included, dense "
        "gradient); that work is memory-bound and not in the model FLOPs.",
    ])


if __name__ == "__main__":
    main()
