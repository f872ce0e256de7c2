"""Counter-based random numbers: a pure function of integer keys, not of a generator's state.

Training on 1 or N ranks must draw the same sampled negatives for the same user at the
same step, whichever rank holds the user and whatever else is in its batch; a resumed
run must draw what the uninterrupted one drew. A stateful generator gives neither, so the
draws here hash their keys (seed, step, user, slot) with a 32-bit integer mixer
(the "lowbias32" finaliser), vectorised in int64 arithmetic that never overflows.

Example::

    negatives = keyed_randint(num_items, seed, step, users.unsqueeze(1), torch.arange(k))  # (B, k)
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["hash32", "keyed_randint", "keyed_truncated_normal", "keyed_uniform"]

_MASK32 = 0xFFFFFFFF
Key = Union[int, torch.Tensor]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for ``x, c < 2^32`` without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return ((x * lo) + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit hash of int64 values (their low 32 bits), as int64 in ``[0, 2^32)``."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(*keys: Key) -> torch.Tensor:
    """Hashes a broadcastable tuple of integer keys into one ``[0, 2^32)`` value each."""
    device = next((k.device for k in keys if isinstance(k, torch.Tensor)), None)
    h = torch.zeros((), dtype=torch.int64, device=device)
    for key in keys:
        k = torch.as_tensor(key, dtype=torch.int64, device=device)
        # Fold the high half in too, so keys >= 2^32 (large steps, ids) stay distinct.
        k = hash32(k ^ (k >> 32))
        h = hash32(h * 31 + k)
    return h


def keyed_randint(high: int, *keys: Key) -> torch.Tensor:
    """Integers uniform in ``[0, high)``, one per broadcast element of ``keys``.

    Args:
        high (int): exclusive upper bound, at most ``2^31``.
        *keys (int or torch.Tensor): integer keys (e.g. seed, step, user ids ``(B, 1)``,
            slots ``(K,)``); the output has their broadcast shape.

    Returns:
        torch.Tensor: int64.
    """
    if not 0 < high <= 1 << 31:
        raise ValueError(f"high must be in [1, 2^31], got {high}")
    return (_combine(*keys) * high) >> 32  # < 2^32 * 2^31: exact


def keyed_uniform(*keys: Key) -> torch.Tensor:
    """Floats uniform in ``(0, 1)`` (float64), one per broadcast element of ``keys``."""
    return (_combine(*keys).double() + 0.5) / 2.0**32


def keyed_truncated_normal(std: float, bound: float, *keys: Key) -> torch.Tensor:
    """Normal(0, std) truncated to ``[-bound, bound]`` (float32), by the inverse CDF.

    Example::

        rows = keyed_truncated_normal(0.02, 0.04, seed, row_ids.unsqueeze(1), torch.arange(dim))
    """
    u = keyed_uniform(*keys)
    edge = torch.special.ndtr(torch.tensor(-bound / std, dtype=torch.float64))
    p = edge + u * (1 - 2 * edge)  # uniform over the truncated range of the CDF
    return (std * torch.special.ndtri(p)).float()
