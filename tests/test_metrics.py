"""Tests for full-ranking retrieval metrics (torchrec_genrec/train/metrics.py).

Ranks are checked against a brute-force Python sort, metrics against their formulas
written out with ``math``.
"""

from __future__ import annotations

import math
from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_genrec.train.metrics import (
    DEFAULT_KS,
    RetrievalMetrics,
    metrics_from_ranks,
    paired_bootstrap,
    rank_of_targets,
)


def _brute_force_rank(scores: List[float], target: int, history: List[int]) -> int:
    """Position of the target after removing history items and sorting by (-score, index)."""
    candidates = [j for j in range(len(scores)) if j == target or j not in history]
    candidates.sort(key=lambda j: (-scores[j], j))
    return candidates.index(target)


@st.composite
def ranking_cases(draw):
    batch = draw(st.integers(1, 5))
    num_items = draw(st.integers(1, 12))
    # Few distinct values (and -inf): many ties.
    value = st.sampled_from([-math.inf, -1.0, 0.0, 0.5, 2.0])
    scores = [draw(st.lists(value, min_size=num_items, max_size=num_items)) for _ in range(batch)]
    targets = draw(st.lists(st.integers(0, num_items - 1), min_size=batch, max_size=batch))
    history = [draw(st.lists(st.integers(0, num_items - 1), max_size=6)) for _ in range(batch)]
    return scores, targets, history


def _jagged(history: List[List[int]]):
    values = torch.tensor([i for h in history for i in h], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(h) for h in history]).cumsum(0)
    return values, offsets


@settings(max_examples=80, deadline=None)
@given(case=ranking_cases(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_rank_matches_brute_force(case, dtype: torch.dtype) -> None:
    scores, targets, history = case
    values, offsets = _jagged(history)
    got = rank_of_targets(torch.tensor(scores, dtype=dtype), torch.tensor(targets), values, offsets)
    assert got.dtype == torch.int64
    assert got.tolist() == [_brute_force_rank(s, t, h) for s, t, h in zip(scores, targets, history)]
    # Without exclusion: same as an empty history for every row.
    plain = rank_of_targets(torch.tensor(scores, dtype=dtype), torch.tensor(targets))
    assert plain.tolist() == [_brute_force_rank(s, t, []) for s, t in zip(scores, targets)]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_rank_equals_position_in_stable_descending_sort(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (6, 30), generator=g).float()
    targets = torch.randint(0, 30, (6,), generator=g)
    # A stable sort of -score keeps index order among ties.
    order = torch.sort(-scores, dim=1, stable=True).indices
    want = (order == targets.unsqueeze(1)).float().argmax(dim=1)
    assert torch.equal(rank_of_targets(scores, targets), want)


def test_ties_go_to_the_lower_item_index() -> None:
    scores = torch.zeros(3, 5)
    assert rank_of_targets(scores, torch.tensor([0, 2, 4])).tolist() == [0, 2, 4]
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert rank_of_targets(scores, torch.tensor([2])).tolist() == [1]  # item 1 only; not item 3


def test_history_is_excluded_but_target_is_not() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0]])
    targets = torch.tensor([3, 1])
    # Row 0 watched items 0 and 2 (item 0 twice); row 1 watched 0 and its own target 1.
    values, offsets = _jagged([[0, 2, 0], [1, 0]])
    assert rank_of_targets(scores, targets).tolist() == [3, 1]
    assert rank_of_targets(scores, targets, values, offsets).tolist() == [1, 0]


def test_empty_histories_and_an_empty_batch_row() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    values, offsets = _jagged([[], [0]])
    assert rank_of_targets(scores, torch.tensor([0, 2]), values, offsets).tolist() == [2, 1]
    empty_values, empty_offsets = _jagged([[], []])
    assert rank_of_targets(scores, torch.tensor([0, 2]), empty_values, empty_offsets).tolist() == [2, 2]


def test_excluded_items_do_not_tie_with_a_minus_inf_target() -> None:
    scores = torch.tensor([[0.0, -math.inf, -math.inf, 1.0]])
    values, offsets = _jagged([[0, 1]])
    # Item 0 (0.0 > -inf) and item 1 (tie, lower index) are removed: only item 3 beats it.
    assert rank_of_targets(scores, torch.tensor([2]), values, offsets).tolist() == [1]


def test_nan_scores_count_against_the_model() -> None:
    nan = float("nan")
    scores = torch.tensor([[nan, 1.0, 2.0, 0.0],
                           [0.0, 1.0, nan, 3.0],
                           [nan, nan, nan, nan]])
    values, offsets = _jagged([[], [3], [1]])
    # Row 0: the NaN item 0 beats target 1, as does item 2. Row 1: target 2 is NaN, so it
    # ranks last among the 3 items kept. Row 2: all NaN, target 3 last of the 3 kept.
    assert rank_of_targets(scores, torch.tensor([1, 2, 3]), values, offsets).tolist() == [2, 2, 2]


def test_history_from_a_keyed_jagged_tensor() -> None:
    kjt = KeyedJaggedTensor(keys=["item", "timestamp"], values=torch.tensor([0, 2, 1, 10, 11, 12]),
                            lengths=torch.tensor([2, 1, 2, 1]))
    history = kjt["item"]
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    ranks = rank_of_targets(scores, torch.tensor([3, 3]), history.values(), history.offsets())
    assert ranks.tolist() == [1, 2]


def test_rank_argument_errors() -> None:
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        rank_of_targets(torch.zeros(4), torch.tensor([0]))
    with pytest.raises(ValueError, match="targets"):
        rank_of_targets(scores, torch.tensor([0]))
    with pytest.raises(ValueError, match="together"):
        rank_of_targets(scores, torch.tensor([0, 1]), exclude_values=torch.tensor([1]))
    with pytest.raises(ValueError, match="exclude_offsets"):
        rank_of_targets(scores, torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0, 1]))


def _python_metrics(ranks: List[int], ks) -> dict:
    n = len(ranks)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = sum(r < k for r in ranks) / n
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) if r < k else 0.0 for r in ranks) / n
    out["mrr"] = sum(1 / (r + 1) for r in ranks) / n
    out["count"] = n
    return out


def _assert_metrics_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-15), name


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 400), max_size=20), min_size=1, max_size=5),
       ks=st.sampled_from([DEFAULT_KS, (1,), (1, 5, 10)]))
def test_accumulator_matches_formulas_across_batches(batches: List[List[int]], ks) -> None:
    ranks = [r for b in batches for r in b]
    m = RetrievalMetrics(ks=ks)
    for b in batches:
        m.update(torch.tensor(b, dtype=torch.int64))
    if not ranks:
        out = m.compute()
        assert out["count"] == 0 and math.isnan(out["mrr"])
        return
    _assert_metrics_close(m.compute(), _python_metrics(ranks, ks))
    per = m.per_user()
    assert per["rank"].tolist() == ranks
    for k in ks:
        assert per[f"hr@{k}"].tolist() == [float(r < k) for r in ranks]
        assert per[f"ndcg@{k}"].tolist() == pytest.approx([1 / math.log2(r + 2) if r < k else 0 for r in ranks])
    assert per["mrr"].tolist() == pytest.approx([1 / (r + 1) for r in ranks])


def test_default_cutoffs_and_metric_names() -> None:
    m = RetrievalMetrics()
    m.update(torch.tensor([0, 9, 10, 49, 50, 199, 200]))
    out = m.compute()
    assert list(out) == ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr", "count"]
    assert (out["hr@10"], out["hr@50"], out["hr@200"]) == (2 / 7, 4 / 7, 6 / 7)
    assert out["count"] == 7


def test_ndcg_and_mrr_at_known_ranks() -> None:
    per = metrics_from_ranks(torch.tensor([0, 1, 3, 9, 10]), ks=(10,))
    assert per["ndcg@10"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(5), 1 / math.log2(11), 0.0])
    assert per["hr@10"].tolist() == [1, 1, 1, 1, 0]
    assert per["mrr"].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.1, 1 / 11])  # MRR is not truncated


def test_merge_and_state_reduce_like_one_accumulator() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 300, (n,), generator=g) for n in (5, 0, 17, 8)]
    whole = RetrievalMetrics()
    for p in parts:
        whole.update(p)
    # Two "ranks", each seeing half of the batches.
    left, right = RetrievalMetrics(), RetrievalMetrics()
    for i, p in enumerate(parts):
        (left if i % 2 == 0 else right).update(p)
    # What an all_reduce(SUM) of each state tensor would give every rank.
    reduced = {name: left.state()[name] + right.state()[name] for name in left.state()}
    assert all(isinstance(t, torch.Tensor) for t in reduced.values())
    summed = RetrievalMetrics(keep_per_user=False)
    summed.load_state(reduced)
    _assert_metrics_close(summed.compute(), whole.compute())
    merged = RetrievalMetrics().merge(left).merge(right)
    _assert_metrics_close(merged.compute(), whole.compute())
    assert sorted(merged.ranks().tolist()) == sorted(whole.ranks().tolist())
    with pytest.raises(ValueError, match="cut-offs"):
        RetrievalMetrics(ks=(5,)).merge(left)


def test_reset_and_per_user_errors() -> None:
    m = RetrievalMetrics(ks=(10,), keep_per_user=False)
    m.update(torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="keep_per_user"):
        m.per_user()
    m.reset()
    assert m.compute()["count"] == 0
    with pytest.raises(ValueError, match="negative"):
        m.update(torch.tensor([-1]))
    with pytest.raises(ValueError, match="cut-offs"):
        RetrievalMetrics(ks=(0,))
    assert RetrievalMetrics().per_user()["rank"].numel() == 0


def test_end_to_end_from_scores() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    values, offsets = _jagged([[0], []])
    m = RetrievalMetrics(ks=(1, 2))
    m.update(rank_of_targets(scores, torch.tensor([2, 2]), values, offsets))  # ranks 0 and 1
    _assert_metrics_close(m.compute(), _python_metrics([0, 1], (1, 2)))


def _paired_sample(seed: int, m: int, true_diff: float):
    """Correlated per-user metrics of two models whose expected difference is true_diff."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(m, generator=g, dtype=torch.float64)
    b = base + 0.3 * torch.randn(m, generator=g, dtype=torch.float64)
    a = base + true_diff + 0.3 * torch.randn(m, generator=g, dtype=torch.float64)
    return a, b


def test_bootstrap_is_reproducible_and_centred() -> None:
    a, b = _paired_sample(0, 500, 0.05)
    first = paired_bootstrap(a, b, num_samples=2000, seed=11)
    assert first == paired_bootstrap(a, b, num_samples=2000, seed=11)
    assert first != paired_bootstrap(a, b, num_samples=2000, seed=12)
    mean_diff, lo, hi = first
    assert mean_diff == pytest.approx(float((a - b).mean()), abs=1e-12)
    assert lo < mean_diff < hi
    # Close to the normal-theory interval 2 * 1.96 * sd / sqrt(M).
    width = 2 * 1.96 * float((a - b).std()) / math.sqrt(500)
    assert hi - lo == pytest.approx(width, rel=0.15)
    assert paired_bootstrap(a, a, num_samples=100) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_covers_true_difference() -> None:
    true_diff = 0.05
    covered = 0
    trials = 40
    for seed in range(trials):
        a, b = _paired_sample(seed, 200, true_diff)
        _, lo, hi = paired_bootstrap(a, b, num_samples=1000, seed=seed)
        covered += lo <= true_diff <= hi
    # Nominal 95%; 40 trials put 85% several standard errors below it.
    assert covered / trials >= 0.85


def test_bootstrap_in_chunks_on_a_large_sample() -> None:
    # Large M: resampled in several chunks.
    a, b = _paired_sample(1, 20_000, 0.01)
    mean_diff, lo, hi = paired_bootstrap(a, b, num_samples=600, seed=0)
    assert lo < mean_diff < hi and lo < 0.01 < hi


def test_bootstrap_argument_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(torch.zeros(3), torch.zeros(3), confidence=1.5)


def test_genrec_compare_paired_runs(tmp_path, capsys):
    import numpy as np

    from torchrec_genrec import cli

    rng = np.random.default_rng(0)
    users = np.arange(500)
    better = rng.integers(0, 5, 500)  # mostly inside the top 10
    worse = better + rng.integers(5, 50, 500)  # the same users, always ranked lower
    for name, ranks in (("a", better), ("b", worse)):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "test_ranks.npz", user=users, rank=ranks)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--samples", "500"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("ndcg@10"))
    assert line.endswith("*") and "500 paired test users" in out
    # Several runs per side (seeds): per-user metrics are averaged before resampling.
    assert cli.main(["compare", f"{tmp_path / 'a'},{tmp_path / 'b'}", str(tmp_path / "b"), "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "(2 run(s))" in out and "averaged over runs" in out
    (tmp_path / "c").mkdir()
    np.savez(tmp_path / "c" / "test_ranks.npz", user=users[:400], rank=better[:400])
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "different users" in capsys.readouterr().err


def test_genrec_compare_picks_the_seen_item_protocol(tmp_path, capsys):
    """Every run records ranks under both protocols; `--seen` compares the one asked
    (whichever the run was trained to report), and a run from before both were kept can
    only be compared as it was evaluated."""
    import numpy as np

    from torchrec_genrec import cli

    users = np.arange(300)
    for name, removed, ranked, exclude in (("a", 0, 40, True), ("b", 3, 5, False)):
        (tmp_path / name).mkdir()
        own, other = (removed, ranked) if exclude else (ranked, removed)
        np.savez(tmp_path / name / "test_ranks.npz", user=users, rank=np.full(300, own),
                 rank_other_protocol=np.full(300, other), exclude_seen=exclude)

    def ndcg_row(*flags):
        assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--samples", "100", *flags]) == 0
        return next(r for r in capsys.readouterr().out.splitlines() if r.startswith("ndcg@10")).split()

    assert float(ndcg_row("--seen", "removed")[1]) == 1.0  # a's rank 0 with seen items removed
    ranked = ndcg_row("--seen", "ranked")
    assert float(ranked[1]) == 0.0 and float(ranked[2]) > 0.3  # a: 40 (outside the top 10); b: 5
    assert float(ndcg_row()[2]) > 0.3  # as run: b reports its ranked protocol (rank 5)
    (tmp_path / "old").mkdir()
    np.savez(tmp_path / "old" / "test_ranks.npz", user=users, rank=np.zeros(300))
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "old"), "--seen", "ranked"]) == 2
    assert "retrain it" in capsys.readouterr().err
