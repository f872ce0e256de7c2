"""The unified token space: every item, action and special marker is a token of ONE id range.

HSTU looks all of them up in one shared embedding table, so each kind owns a contiguous
range of token ids::

    [ special | items | actions | contexts ... ]
      0..S-1    S..S+I-1   ...

Kinds are declared once, in order; converting a dense id of a kind to a token and back
checks its range, so an out-of-range id is an error that names the kind and the range
instead of silently reading another kind's embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import torch

SPECIAL_TOKENS: Tuple[str, ...] = ("[PAD]", "[BOS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class TokenSpace:
    """Contiguous token ranges, one per kind, in declaration order.

    Args:
        kinds (Tuple[Tuple[str, int], ...]): ``(name, count)`` pairs. The first kind
            is normally ``("special", len(SPECIAL_TOKENS))``.

    Example::

        space = TokenSpace.build(num_items=1682, num_actions=5)
        space.size                                   # 4 + 1682 + 5
        space.to_tokens("item", torch.tensor([0, 1681]))   # tensor([4, 1685])
        space.to_tokens("action", torch.tensor([4]))       # tensor([1690])
    """

    kinds: Tuple[Tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.kinds]
        if len(set(names)) != len(names):
            raise ValueError(f"token kinds must be unique, got {names}")
        for name, count in self.kinds:
            if count < 0:
                raise ValueError(f"token kind {name!r} has a negative count {count}")

    @classmethod
    def build(cls, num_items: int, num_actions: int = 0, contexts: Dict[str, int] | None = None) -> "TokenSpace":
        """Special tokens, then items, then actions (if any), then context kinds."""
        kinds = [("special", len(SPECIAL_TOKENS)), ("item", num_items)]
        if num_actions:
            kinds.append(("action", num_actions))
        for name, count in (contexts or {}).items():
            kinds.append((name, count))
        return cls(tuple(kinds))

    @property
    def ranges(self) -> Dict[str, Tuple[int, int]]:
        """``{kind: (first_token, end_token)}``, end exclusive."""
        out, start = {}, 0
        for name, count in self.kinds:
            out[name] = (start, start + count)
            start += count
        return out

    @property
    def size(self) -> int:
        return sum(count for _, count in self.kinds)

    def count(self, kind: str) -> int:
        return dict(self.kinds)[self._check(kind)]

    def offset(self, kind: str) -> int:
        return self.ranges[self._check(kind)][0]

    def special(self, name: str) -> int:
        """Token id of a special marker such as ``"[BOS]"``."""
        return SPECIAL_TOKENS.index(name)

    def has(self, kind: str) -> bool:
        return any(name == kind for name, _ in self.kinds)

    def _check(self, kind: str) -> str:
        if not self.has(kind):
            raise KeyError(f"token space has no kind {kind!r}; it has {[n for n, _ in self.kinds]}")
        return kind

    def to_tokens(self, kind: str, ids: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Dense ids of ``kind`` (0-based) -> token ids."""
        first, end = self.ranges[self._check(kind)]
        if validate and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= end - first:
                raise ValueError(f"{kind} ids must lie in [0, {end - first}); got values in [{lo}, {hi}]. "
                                 "Was the dataset prepared with a different catalogue than the model?")
        return ids + first

    def from_tokens(self, kind: str, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> dense ids of ``kind``; raises if a token belongs to another kind."""
        first, end = self.ranges[self._check(kind)]
        if tokens.numel() and (int(tokens.min()) < first or int(tokens.max()) >= end):
            raise ValueError(f"tokens outside the {kind} range [{first}, {end})")
        return tokens - first

    def is_kind(self, tokens: torch.Tensor, kind: str) -> torch.Tensor:
        """Bool mask of the tokens that belong to ``kind``."""
        first, end = self.ranges[self._check(kind)]
        return (tokens >= first) & (tokens < end)

    def kind_of(self, tokens: torch.Tensor) -> Sequence[str]:
        """The kind name of each token (for debugging and tests)."""
        bounds = torch.tensor([end for _, end in self.ranges.values()])
        index = torch.bucketize(tokens, bounds, right=True)
        names = [name for name, _ in self.kinds]
        return [names[i] if i < len(names) else "<out of range>" for i in index.tolist()]
