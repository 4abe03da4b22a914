"""The arithmetic of task sampling, batch streams and loss weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl.sampling import BatchStream, TaskSampler, temperature_probs
from mtl.weighting import LossWeighting, dwa_weights, pcgrad_combine

TASKS = ["a", "b", "c"]
SIZES = [100, 400, 900]


def test_temperature_distribution():
    # p_i ∝ n_i^(1/T): with T=2, sqrt(100, 400, 900) = 10, 20, 30 -> 1/6, 2/6, 3/6
    assert temperature_probs(SIZES, 2.0) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert temperature_probs(SIZES, 1.0) == pytest.approx([100 / 1400, 400 / 1400, 900 / 1400])
    assert temperature_probs(SIZES, 1e9) == pytest.approx([1 / 3] * 3, abs=1e-6)


def test_temperature_sampler_draws_match_the_distribution():
    s = TaskSampler(TASKS, SIZES, "temperature", temperature=2.0, total_steps=6000, seed=1)
    counts = {t: 0 for t in TASKS}
    for step in range(6000):
        counts[s.tasks_for_step(step)[0]] += 1
    freq = np.array([counts[t] for t in TASKS]) / 6000
    assert freq == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.02)


def test_proportional_joint_round_robin():
    assert TaskSampler(TASKS, SIZES, "proportional").probabilities(0) == pytest.approx(np.array(SIZES) / 1400)
    assert TaskSampler(TASKS, SIZES, "joint").tasks_for_step(7) == TASKS
    rr = TaskSampler(TASKS, SIZES, "round_robin")
    assert [rr.tasks_for_step(i)[0] for i in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_annealed_exponent_goes_from_one_to_point_two():
    s = TaskSampler(TASKS, SIZES, "annealed", total_steps=11)
    assert s.alpha(0) == 1.0 and s.alpha(10) == pytest.approx(0.2) and s.alpha(5) == pytest.approx(0.6)
    assert s.probabilities(0) == pytest.approx(np.array(SIZES) / 1400)
    w = np.array(SIZES, dtype=float) ** 0.2
    assert s.probabilities(10) == pytest.approx(w / w.sum())


def test_sampler_is_a_pure_function_of_seed_and_step():
    a = TaskSampler(TASKS, SIZES, "temperature", seed=5)
    b = TaskSampler(TASKS, SIZES, "temperature", seed=5)
    seq = [a.tasks_for_step(i) for i in range(200)]
    assert seq == [b.tasks_for_step(i) for i in range(200)]  # every worker draws the same
    assert [a.tasks_for_step(i) for i in range(150, 200)] == seq[150:]  # resume mid-way
    c = TaskSampler(TASKS, SIZES, "temperature", seed=6)
    assert seq != [c.tasks_for_step(i) for i in range(200)]


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown sampling"):
        TaskSampler(TASKS, SIZES, "random")


def test_batch_stream_epochs_are_permutations_and_ranks_partition_a_batch():
    s = BatchStream(n_rows=10, batch=4, seed=0, task_id=1)
    assert s.per_epoch == 2  # 10 // 4, remainder dropped
    epoch0 = np.concatenate([s.batch_indices(0), s.batch_indices(1)])
    assert len(set(epoch0.tolist())) == 8 and set(epoch0.tolist()) <= set(range(10))
    assert not np.array_equal(s.batch_indices(0), s.batch_indices(2))  # a new permutation each epoch
    again = BatchStream(10, 4, 0, 1)
    assert np.array_equal(again.batch_indices(3), s.batch_indices(3))  # stateless: resume by count
    rows = s.batch_indices(5)
    assert sorted(np.concatenate([rows[0::2], rows[1::2]]).tolist()) == sorted(rows.tolist())
    small = BatchStream(n_rows=3, batch=8, seed=0, task_id=0)
    assert sorted(small.batch_indices(0).tolist()) == [0, 1, 2]


def test_static_weighting_is_weighted_sum():
    w = LossWeighting(TASKS, "static", {"a": 2.0, "b": 0.5, "c": 1.0})
    total = w({"a": torch.tensor(1.0), "b": torch.tensor(4.0)})
    assert float(total) == pytest.approx(2.0 * 1.0 + 0.5 * 4.0)


def test_uncertainty_weighting_formula_and_gradient():
    w = LossWeighting(["a", "b"], "uncertainty")
    with torch.no_grad():
        w.log_vars["a"].fill_(math.log(4.0))  # σ² = 4
    la, lb = torch.tensor(2.0), torch.tensor(3.0)
    total = w({"a": la, "b": lb})
    # Σ exp(-s_i) L_i + s_i
    assert float(total) == pytest.approx(2.0 / 4.0 + math.log(4.0) + 3.0 + 0.0)
    total.backward()
    # d/ds (e^{-s} L + s) = 1 - e^{-s} L
    assert float(w.log_vars["a"].grad) == pytest.approx(1 - 2.0 / 4.0)
    assert float(w.log_vars["b"].grad) == pytest.approx(1 - 3.0)
    assert w.weights() == pytest.approx({"a": 0.25, "b": 1.0})
    assert w.unused_parameters(["a"]) == [w.log_vars["b"]]


def test_uncertainty_log_variances_are_fsdp_shardable_and_old_scalars_load():
    """FSDP2's fully_shard refuses 0-dim parameters, so each log-variance has shape [1];
    checkpoints holding the earlier scalars still load."""
    w = LossWeighting(["a", "b"], "uncertainty")
    assert all(p.shape == (1,) for p in w.parameters())
    w.load_state_dict({"log_vars.a": torch.tensor(0.5), "log_vars.b": torch.tensor(-1.0)})
    assert w.log_vars["a"].tolist() == [0.5] and w.log_vars["b"].tolist() == [-1.0]


def test_dwa_weights_from_known_loss_ratios():
    history = [{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 1.0}]  # r = 0.5, 1.0
    w = dwa_weights(history, ["a", "b"], temperature=2.0)
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)
    assert w["a"] == pytest.approx(2 * ea / (ea + eb))
    assert w["b"] == pytest.approx(2 * eb / (ea + eb))
    assert sum(w.values()) == pytest.approx(2.0)
    assert dwa_weights(history[:1], ["a", "b"], 2.0) == {"a": 1.0, "b": 1.0}  # not enough history


def test_dwa_module_updates_at_window_end():
    w = LossWeighting(["a", "b"], "dwa", dwa_temperature=1.0)
    w.end_window({"a": 2.0, "b": 2.0})
    assert w.weights() == {"a": 1.0, "b": 1.0}
    w.end_window({"a": 1.0, "b": 2.0})  # a improved (r=0.5), b stalled (r=1): b weighs more
    assert w.weights()["b"] > 1.0 > w.weights()["a"]
    total = w({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    assert float(total) == pytest.approx(2.0)
    restored = LossWeighting(["a", "b"], "dwa", dwa_temperature=1.0)
    restored.load_extra_state(w.extra_state())
    assert restored.weights() == w.weights()


def test_pcgrad_projects_conflicting_gradients_only():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflicting: g1·g2 = -1
    out = pcgrad_combine([g1, g2])
    # g1' = g1 - (g1·g2/|g2|²) g2 = [0.5, 0.5]; g2' = g2 - (g2·g1/|g1|²) g1 = [0, 1]
    assert out.tolist() == pytest.approx([0.5, 1.5])
    h1, h2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # agreeing: plain sum
    assert pcgrad_combine([h1, h2]).tolist() == pytest.approx([2.0, 1.0])



def _varied(n: int, width: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of 3..width tokens (right-padded masks), row i's id in ``idx``."""
    lengths = np.random.default_rng(seed).integers(3, width + 1, size=n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return {"idx": np.arange(n), "input_ids": mask * 7, "attention_mask": mask, "labels": np.arange(n) % 3}


def _padded_tokens(batches) -> int:
    """Tokens computed when each batch is trimmed to its longest row."""
    return sum(len(b) * int(b.max()) for b in batches)


def test_length_batches_keep_the_rows_and_cut_the_padding():
    from mtl.sampling import GROUP_BATCHES, length_batches

    lengths = _varied(1000)["attention_mask"].sum(1)
    rows = np.random.default_rng(1).permutation(1000)
    grouped = length_batches(rows, lengths, 8, np.random.default_rng(2))
    assert [len(b) for b in grouped] == [8] * 125  # as many batches as cutting rows directly
    assert sorted(np.concatenate(grouped).tolist()) == list(range(1000))
    plain = [rows[i:i + 8] for i in range(0, 1000, 8)]
    # within a window of GROUP_BATCHES batches, rows are sorted by length: a batch spans few lengths
    assert max(int(lengths[b].max() - lengths[b].min()) for b in grouped) <= 3
    assert _padded_tokens([lengths[b] for b in grouped]) < 0.7 * _padded_tokens([lengths[b] for b in plain])
    # each window keeps its own rows (the data's order stays random between windows)
    window = GROUP_BATCHES * 8
    first = set(np.concatenate(grouped[:GROUP_BATCHES]).tolist())
    assert first == set(rows[:window].tolist())
    # a ragged end: one short batch, no row lost
    tail = length_batches(rows[:21], lengths, 8, np.random.default_rng(0))
    assert sorted(len(b) for b in tail) == [5, 8, 8] and sorted(np.concatenate(tail).tolist()) == sorted(rows[:21].tolist())


def test_batch_stream_grouped_by_length_covers_the_same_rows_each_epoch():
    lengths = _varied(200)["attention_mask"].sum(1)
    plain, grouped = BatchStream(200, 8, 0, 1), BatchStream(200, 8, 0, 1, lengths)
    for epoch in range(2):
        ks = range(epoch * 25, (epoch + 1) * 25)
        rows = [grouped.batch_indices(k) for k in ks]
        assert sorted(np.concatenate(rows).tolist()) == sorted(
            np.concatenate([plain.batch_indices(k) for k in ks]).tolist())
        assert all(len(r) == 8 for r in rows)
        assert _padded_tokens([lengths[r] for r in rows]) < 0.7 * _padded_tokens(
            [lengths[plain.batch_indices(k)] for k in ks])
    again = BatchStream(200, 8, 0, 1, lengths)
    assert all(np.array_equal(again.batch_indices(k), grouped.batch_indices(k)) for k in (0, 7, 31))  # resume by count
    with pytest.raises(ValueError, match="lengths has 3 entries for 200 rows"):
        BatchStream(200, 8, 0, 1, lengths[:3])


def test_length_grouped_stream_keeps_rows_batches_and_columns_together():
    from mtl.sampling import length_grouped

    arrays = _varied(530)
    order = np.random.default_rng(3).permutation(530)
    stream = [{k: v[order[i:i + 16]] for k, v in arrays.items()} for i in range(0, 530, 16)]
    out = list(length_grouped(iter(stream), 16, seed=5))
    assert len(out) == len(stream) == 34 and [len(b["idx"]) for b in out].count(16) == 33
    assert sorted(np.concatenate([b["idx"] for b in out]).tolist()) == list(range(530))
    for b in out:  # every column moved with its row
        assert np.array_equal(b["attention_mask"], arrays["attention_mask"][b["idx"]])
        assert np.array_equal(b["labels"], b["idx"] % 3)
    lengths = [b["attention_mask"].sum(1) for b in out]
    assert _padded_tokens(lengths) < 0.7 * _padded_tokens([b["attention_mask"].sum(1) for b in stream])
    again = list(length_grouped(iter(stream), 16, seed=5))
    assert all(np.array_equal(a["idx"], b["idx"]) for a, b in zip(out, again))
