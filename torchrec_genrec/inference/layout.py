"""Serving-side token layout: users' events -> encoder tokens -> table lookups -> padded
encoder inputs, as :class:`~torchrec_genrec.models.retrieval.GenerativeRetrieval` lays
them out in training.

Shared by the :class:`~torchrec_genrec.inference.Predictor` and the TorchRec package
(:mod:`torchrec_genrec.inference.torchrec_package`), which keeps this module extern, so it
imports only torch, TorchRec and :mod:`torchrec_genrec.ops`.

Example::

    tokens, added, times, lengths = layout_tokens(items, actions, ts, event_lengths, "summed", 4, 1686)
    x = lookup_tokens(collection, features, tokens, added, lengths, dim=50)      # (T, D)
    padded, padded_times = pad_tokens(x, times, lengths)                         # (B, L, D), (B, L)
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from torchrec_genrec.ops.jagged import lengths_to_offsets, positions_in_sequence, sequence_ids

__all__ = ["layout_tokens", "lookup_tokens", "pad_tokens", "rows_of"]


def layout_tokens(items: torch.Tensor, actions: Optional[torch.Tensor], timestamps: torch.Tensor,
                  lengths: torch.Tensor, action_mode: str, item_offset: int, action_offset: int
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Events -> encoder tokens.

    Args:
        items (torch.Tensor): ``(E,)`` dense item ids, jagged over users, oldest first.
        actions (Optional[torch.Tensor]): ``(E,)`` dense action ids (unused for ``none``).
        timestamps (torch.Tensor): ``(E,)`` int64.
        lengths (torch.Tensor): ``(B,)`` events per user.
        action_mode (str): ``interleaved`` ([item, action] token pairs), ``summed`` (the
            action token's embedding added to the item's) or ``none``.
        item_offset (int): first item token of the token space.
        action_offset (int): first action token.

    Returns:
        Tuple: ``(tokens (T,), tokens to add (T,) or None, token times (T,), tokens per user (B,))``.
    """
    tokens = items.to(torch.int64) + item_offset
    times = timestamps.to(torch.int64)
    lengths = lengths.to(torch.int64)
    if action_mode == "interleaved":
        tokens = torch.stack([tokens, actions.to(torch.int64) + action_offset], dim=1).reshape(-1)
        return tokens, None, times.repeat_interleave(2), lengths * 2
    if action_mode == "summed":
        return tokens, actions.to(torch.int64) + action_offset, times, lengths
    return tokens, None, times, lengths


def lookup_tokens(collection: nn.Module, features: List[str], tokens: torch.Tensor, added: Optional[torch.Tensor],
                  lengths: torch.Tensor, dim: int) -> torch.Tensor:
    """``(T, dim)`` embeddings of ``tokens`` (plus those of ``added``), looked up in one
    KeyedJaggedTensor through the (quantised or float) token collection, as in training:
    ``tokens`` under ``features[0]``, ``added`` under ``features[1]``, the rest empty.

    ``lengths`` ``(B,)`` splits ``tokens`` per user (``(1,)`` with the total works too)."""
    zeros = torch.zeros_like(lengths)
    empty = torch.zeros(0, dtype=torch.int64, device=tokens.device)
    rest = len(features) - 2
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(features), values=torch.cat([tokens, added if added is not None else empty] + [empty] * rest),
        lengths=torch.cat([lengths, lengths if added is not None else zeros] + [zeros] * rest).to(torch.int32))
    out = collection(kjt)
    x = out[features[0]].values()[:, :dim].float()
    if added is not None:
        x = x + out[features[1]].values()[:, :dim].float()
    return x


def rows_of(lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices into the jagged values of rows ``rows`` (in that order)."""
    starts = lengths_to_offsets(lengths)[:-1][rows]
    lens = lengths[rows]
    return torch.repeat_interleave(starts, lens) + positions_in_sequence(lengths_to_offsets(lens), int(lens.sum()))


def pad_tokens(x: torch.Tensor, times: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``(T, D)`` embeddings and ``(T,)`` times -> right-padded ``(B, L, D)`` and
    ``(B, L)`` with ``L = max(lengths)``, zeros after each row's end."""
    offsets = lengths_to_offsets(lengths)
    total = x.shape[0]
    index = (sequence_ids(offsets, total), positions_in_sequence(offsets, total))
    width = int(lengths.max())
    padded = x.new_zeros(lengths.numel(), width, x.shape[1]).index_put(index, x)
    return padded, times.new_zeros(lengths.numel(), width).index_put(index, times)
