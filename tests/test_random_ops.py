"""Counter-based random numbers (ops/random.py)."""

import torch

from torchrec_genrec.ops.random import hash32, keyed_randint, keyed_truncated_normal, keyed_uniform


def lowbias32(x: int) -> int:
    """The reference 32-bit mixer, in Python integers."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash32_matches_the_reference_mixer():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**40 + 7]
    assert hash32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]


def test_keyed_randint_is_a_function_of_its_keys_only():
    users = torch.tensor([5, 9, 2])
    a = keyed_randint(1000, 0, 3, users.unsqueeze(1), torch.arange(4))
    assert a.shape == (3, 4)
    # The same user gets the same draws alone or in another batch.
    b = keyed_randint(1000, 0, 3, torch.tensor([[9]]), torch.arange(4))
    assert torch.equal(a[1:2], b)
    assert not torch.equal(keyed_randint(1000, 0, 4, users.unsqueeze(1), torch.arange(4)), a)  # next step
    assert not torch.equal(keyed_randint(1000, 1, 3, users.unsqueeze(1), torch.arange(4)), a)  # other seed


def test_keyed_randint_is_uniform():
    x = keyed_randint(50, 0, 1, torch.arange(200_000))
    assert int(x.min()) == 0 and int(x.max()) == 49
    counts = torch.bincount(x, minlength=50).double()
    chi2 = float(((counts - 4000) ** 2 / 4000).sum())
    assert chi2 < 100  # 49 degrees of freedom: p < 1e-4 beyond ~90


def test_keyed_uniform_and_truncated_normal():
    u = keyed_uniform(3, torch.arange(100_000))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    x = keyed_truncated_normal(0.02, 0.04, 1, torch.arange(50_000))
    assert float(x.abs().max()) <= 0.04
    # A normal truncated at 2 sigma has std 0.880 sigma.
    assert abs(float(x.std()) - 0.880 * 0.02) < 0.0005
