"""fp32 against bf16 (and fp16) autocast for one multi-task training step of MiniLM.

    python -m benchmarks.precision [--quick]

On CPUs without native bf16 matrix units (no AMX / avx512_bf16, like the 2-core development
machines) bf16 autocast adds casts and runs slower than fp32; on GPUs it pays. This measures it.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import best_of, device, machine_info, parser, threads, write_result


def main() -> None:
    args = parser(__doc__).parse_args()
    torch.set_num_threads(threads(args))
    from transformers import AutoTokenizer

    from mtl.engine import Engine, EngineConfig
    from mtl.model import MultiTaskModel, TaskInfo
    from mtl.packages import minilm_dir

    dev = device()
    batch, length = (16, 64) if args.quick else (32, 64)
    tasks = [TaskInfo("topic", "sequence_classification", ["a", "b", "c", "d", "e"], length)]
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok(["the quick brown fox jumps over the lazy dog " * 8] * batch, truncation=True,
              max_length=length, padding="max_length", return_tensors="np")
    arrays = {"topic": {"train": {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                  "labels": np.zeros(batch, dtype=np.int64)}}}

    def step(precision: str):
        """The trainer's engine step (autocast, AdamW, clipping; GradScaler for CUDA fp16)."""
        model = MultiTaskModel.from_encoder(minilm_dir(), tasks, seed=0)
        config = EngineConfig(max_steps=1_000_000, batch_size=batch, lr=1e-5, warmup_ratio=0.0,
                              precision=precision, sampling="joint")
        engine = Engine(model, arrays, config, device=dev)
        engine.module.train()
        return engine.train_step

    repeats = 3 if args.quick else 8
    figures = {"batch": batch, "seq_len": length, "device": str(dev)}
    for name in ("fp32", "bf16", "fp16"):
        try:
            t = best_of(step(name), repeats=repeats, warmup=1)
            figures[f"{name}_step_s"] = t["median_s"]
            figures[f"{name}_samples_per_s"] = batch / t["median_s"]
        except Exception as err:  # fp16 autocast is not supported everywhere on CPU
            figures[f"{name}_error"] = repr(err)[:200]
    if "bf16_step_s" in figures:
        figures["bf16_speedup_vs_fp32"] = figures["fp32_step_s"] / figures["bf16_step_s"]
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()})
    simd = machine_info().get("simd") or []
    write_result("precision", "fp32 vs bf16/fp16 autocast, one MiniLM training step", args, figures, [],
                 notes=[f"CPU SIMD flags seen: {simd}",
                        "bf16 pays only with native bf16 matrix units (AMX, avx512_bf16) or on GPUs."])


if __name__ == "__main__":
    main()
