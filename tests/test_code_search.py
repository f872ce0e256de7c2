"""Constrained beam search over semantic IDs (ops/code_search.py): it never returns a code
path that is not an item, with a beam wide enough it finds the exact top-k of the summed
log-probabilities, and excluded items take no place in the answer."""

import pytest
import torch

from torchrec_genrec.modules.semantic_ids import disambiguate
from torchrec_genrec.ops.code_search import CodeTable, constrained_beam_search


def _catalogue(n=300, sizes=(6, 5, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (n,), generator=g) for k in sizes], dim=1)
    codes = disambiguate(codes)
    sizes = [*sizes, int(codes[:, -1].max()) + 1]
    return codes, sizes


def _step_from_logits(sizes, seed=1):
    """A deterministic 'model': log-probabilities of each level's codes depend on the
    prefix through a hash, so the summed score of an item is known exactly."""
    def step(level, prefix):
        key = torch.zeros(prefix.shape[:-1], dtype=torch.int64)
        for lv in range(prefix.shape[-1]):
            key = key * 1000003 + prefix[..., lv] + 7
        code = torch.arange(sizes[level])
        logits = torch.sin((key.unsqueeze(-1) * 31 + code * 17 + seed * 13 + level).double()) * 3
        return torch.log_softmax(logits, dim=-1)
    return step


def _exhaustive(step, codes, sizes, rows):
    """Every item's summed log-probability, by teacher forcing its own path."""
    total = torch.zeros(codes.shape[0], dtype=torch.float64)
    for level in range(codes.shape[1]):
        lp = step(level, codes[:, :level].unsqueeze(0)).squeeze(0)  # (N, K)
        total += lp[torch.arange(codes.shape[0]), codes[:, level]]
    return total.unsqueeze(0).expand(rows, -1)


def test_table_maps_paths_to_items_and_refuses_bad_codes():
    codes, sizes = _catalogue()
    table = CodeTable(codes, sizes)
    keys = table.keys(codes)
    assert torch.equal(table.items_of(keys), torch.arange(codes.shape[0]))
    assert torch.equal(table.codes_of(torch.arange(codes.shape[0])), codes)
    assert int(table.items_of(torch.tensor([-5, 10**12]))[0]) == -1
    with pytest.raises(ValueError, match="disambiguation"):
        CodeTable(torch.tensor([[0, 1], [0, 1]]), [2, 2])
    with pytest.raises(ValueError, match=r"level 1 codes must be in \[0, 2\)"):
        CodeTable(torch.tensor([[0, 2]]), [2, 2])
    with pytest.raises(ValueError, match="62 bits"):
        CodeTable(torch.tensor([[0, 0, 0, 0, 0]]), [2**13] * 5)


def test_beam_never_leaves_the_catalogue():
    codes, sizes = _catalogue(n=200, sizes=(8, 8, 8))
    table = CodeTable(codes, sizes)
    g = torch.Generator().manual_seed(3)

    def noisy(level, prefix):  # a model that likes codes no item has
        return torch.log_softmax(torch.randn(*prefix.shape[:-1], sizes[level], generator=g) * 5, dim=-1)

    items, scores = constrained_beam_search(noisy, table, batch_size=16, beam=12, k=10)
    assert (items >= 0).all() and torch.isfinite(scores).all()
    assert all(len(set(row.tolist())) == 10 for row in items)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.mark.parametrize("beam", [8, 128])
def test_a_wide_beam_finds_the_exact_top_k(beam):
    codes, sizes = _catalogue()
    table = CodeTable(codes, sizes)
    step = _step_from_logits(sizes)
    exact = _exhaustive(step, codes, sizes, rows=2)
    items, scores = constrained_beam_search(step, table, batch_size=2, beam=beam, k=5)
    best = torch.topk(exact, 5, dim=1)
    torch.testing.assert_close(scores.double(), exact.gather(1, items), rtol=0, atol=1e-5)  # scores are the items'
    if beam >= table.prefix_keys[-2].numel():  # the beam holds every prefix: exact
        assert beam == 128 and torch.equal(items, best.indices)
    else:  # a narrow beam is a lower bound on the best found
        assert (scores[:, 0].double() <= best.values[:, 0] + 1e-5).all()


def test_excluded_items_take_no_place():
    codes, sizes = _catalogue()
    table = CodeTable(codes, sizes)
    step = _step_from_logits(sizes)
    exact = _exhaustive(step, codes, sizes, rows=2)
    top = torch.topk(exact, 8, dim=1).indices
    # Row 0 excludes its 3 best items, row 1 nothing.
    values, offsets = top[0, :3], torch.tensor([0, 3, 3])
    items, _ = constrained_beam_search(step, table, batch_size=2, beam=400, k=5, exclude_values=values,
                                       exclude_offsets=offsets)
    assert torch.equal(items[0], top[0, 3:8]) and torch.equal(items[1], top[1, :5])


def test_fewer_paths_than_k_are_padded():
    table = CodeTable(torch.tensor([[0, 0], [1, 1]]), [2, 2])
    step = lambda level, prefix: torch.zeros(*prefix.shape[:-1], 2)  # noqa: E731
    items, scores = constrained_beam_search(step, table, batch_size=1, beam=5, k=5)
    assert sorted(items[0, :2].tolist()) == [0, 1] and (items[0, 2:] == -1).all()
    assert torch.isinf(scores[0, 2:]).all()
