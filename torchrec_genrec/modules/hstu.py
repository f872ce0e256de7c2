"""HSTU: Hierarchical Sequential Transduction Units ("Actions Speak Louder than Words", ICML 2024).

One layer, on jagged inputs (``T`` tokens of ``B`` sequences, no padding)::

    x̂ = LayerNorm(x)
    u, v, q, k = split(SiLU(x̂ W_uvqk + b))                  per head
    A = SiLU(q kᵀ + rab) / n     under a causal mask        (no softmax)
    y = W_o Dropout(u ⊙ LayerNorm(A v)) + x

``rab`` is a learned relative bias over position and log-bucketed time differences
(see :mod:`torchrec_genrec.ops.hstu_attention`), one per layer, shared by its heads;
``n`` is the configured maximum sequence length, so a user's output never depends on
which other users share the batch.

The encoder stacks layers after the input preprocessing of the reference implementation
(embeddings scaled by sqrt(D), plus a learned absolute position embedding, dropout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_genrec.ops.hstu_attention import HSTUAttentionKernel, hstu_attention, padded_hstu_attention, time_bucket
from torchrec_genrec.ops.jagged import positions_in_sequence


@dataclasses.dataclass
class HSTUConfig:
    """Args:
    embedding_dim (int): model width D (= the token embedding dim).
    num_blocks (int): HSTU layers.
    num_heads (int): attention heads H.
    attention_dim (int): per-head query/key dim (dqk).
    linear_dim (int): per-head value/gate dim (dv).
    max_seq_len (int): N, the longest sequence; also the attention normaliser n.
    dropout (float): dropout on the input and on each layer's gated output.
    num_time_buckets (int): log-time buckets of the relative bias.
    use_position_bias (bool): learned bias over relative position.
    use_time_bias (bool): learned bias over log-bucketed time difference.
    kernel (str): ``jagged`` (no padding; the CPU's fast path), ``triton`` (fused jagged
        kernels, CUDA) or ``pytorch`` (padded reference).
    """

    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50
    linear_dim: int = 50
    max_seq_len: int = 200
    dropout: float = 0.2
    num_time_buckets: int = 128
    use_position_bias: bool = True
    use_time_bias: bool = True
    kernel: str = "jagged"


class HSTULayer(nn.Module):
    """One HSTU layer over jagged tokens.

    Args:
        config (HSTUConfig): dims, heads, bias and dropout settings.

    Example::

        layer = HSTULayer(HSTUConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=4))
        x = torch.randn(5, 8)                     # T = 5 tokens: sequences of 3 and 2
        offsets = torch.tensor([0, 3, 5])
        y = layer(x, offsets, timestamps=torch.tensor([1, 5, 9, 2, 3]))   # (5, 8)
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.num_heads, self.dqk, self.dv = c.num_heads, c.attention_dim, c.linear_dim
        self.input_norm = nn.LayerNorm(c.embedding_dim)
        self.uvqk = nn.Linear(c.embedding_dim, c.num_heads * (2 * c.linear_dim + 2 * c.attention_dim))
        self.attention_norm = nn.LayerNorm(c.num_heads * c.linear_dim)
        self.output = nn.Linear(c.num_heads * c.linear_dim, c.embedding_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.pos_weights = (nn.Parameter(torch.empty(2 * c.max_seq_len - 1).normal_(0, 0.02))
                            if c.use_position_bias else None)
        self.ts_weights = (nn.Parameter(torch.empty(c.num_time_buckets + 1).normal_(0, 0.02))
                           if c.use_time_bias else None)
        self.kernel = HSTUAttentionKernel(c.kernel)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``(T, D)`` jagged token states.
            offsets (torch.Tensor): ``(B + 1,)`` sequence boundaries.
            timestamps (Optional[torch.Tensor]): ``(T,)`` int64, or None (no time bias).

        Returns:
            torch.Tensor: ``(T, D)``.
        """
        t = x.shape[0]
        h, dqk, dv = self.num_heads, self.dqk, self.dv
        uvqk = F.silu(self.uvqk(self.input_norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        attn = hstu_attention(
            self.config.max_seq_len,
            q.reshape(t, h, dqk), k.reshape(t, h, dqk), v.reshape(t, h, dv), offsets,
            timestamps=timestamps if self.ts_weights is not None else None,
            pos_weights=self.pos_weights, ts_weights=self.ts_weights, kernel=self.kernel,
        ).reshape(t, h * dv)
        return self.output(self.dropout(u * self.attention_norm(attn))) + x

    def forward_padded(self, x: torch.Tensor, lengths: torch.Tensor, timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        """The same layer on right-padded sequences (the exportable inference path).

        Args:
            x (torch.Tensor): ``(B, L, D)``.
            lengths (torch.Tensor): ``(B,)`` valid positions per row.
            timestamps (Optional[torch.Tensor]): ``(B, L)`` int64, or None.

        Returns:
            torch.Tensor: ``(B, L, D)``; valid positions equal :meth:`forward`'s rows.
        """
        b, n = x.shape[0], x.shape[1]
        h, dqk, dv = self.num_heads, self.dqk, self.dv
        uvqk = F.silu(self.uvqk(self.input_norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        attn = padded_hstu_attention(
            self.config.max_seq_len,
            q.reshape(b, n, h, dqk), k.reshape(b, n, h, dqk), v.reshape(b, n, h, dv), lengths,
            timestamps=timestamps if self.ts_weights is not None else None,
            pos_weights=self.pos_weights, ts_weights=self.ts_weights,
        ).reshape(b, n, h * dv)
        return self.output(self.dropout(u * self.attention_norm(attn))) + x

    def forward_padded_last(self, x: torch.Tensor, lengths: torch.Tensor,
                            timestamps: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward_padded` at each row's last valid position only: keys and values
        over the whole row, one query per row (what serving reads from the last layer).

        Args:
            x (torch.Tensor): ``(B, L, D)``.
            lengths (torch.Tensor): ``(B,)``, ``1 <= lengths <= L``.
            timestamps (Optional[torch.Tensor]): ``(B, L)`` int64, or None.

        Returns:
            torch.Tensor: ``(B, D)`` = ``forward_padded(x, ...)[b, lengths[b] - 1]``.
        """
        b, n = x.shape[0], x.shape[1]
        h, dqk, dv = self.num_heads, self.dqk, self.dv
        c = self.config
        rows = torch.arange(b, device=x.device)
        last = lengths.to(x.device) - 1  # (B,)
        uvqk = F.silu(self.uvqk(self.input_norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        q_last = q[rows, last].reshape(b, h, dqk)
        scores = torch.einsum("bhd,bjhd->bhj", q_last, k.reshape(b, n, h, dqk))  # (B, H, L)
        cols = torch.arange(n, device=x.device)
        if self.pos_weights is not None:
            scores = scores + self.pos_weights[last.view(b, 1) - cols.view(1, n) + (c.max_seq_len - 1)].unsqueeze(1)
        if self.ts_weights is not None and timestamps is not None:
            delta = timestamps[rows, last].view(b, 1) - timestamps
            scores = scores + self.ts_weights[time_bucket(delta, self.ts_weights.numel() - 1)].unsqueeze(1)
        mask = (cols.view(1, n) <= last.view(b, 1)).unsqueeze(1).to(scores.dtype)  # causal; padding is after
        attn = F.silu(scores) / c.max_seq_len * mask
        out = torch.einsum("bhj,bjhd->bhd", attn, v.reshape(b, n, h, dv)).reshape(b, h * dv)
        return self.output(self.dropout(u[rows, last] * self.attention_norm(out))) + x[rows, last]


class HSTUEncoder(nn.Module):
    """Stacked HSTU layers with the reference input preprocessing.

    Args:
        config (HSTUConfig): see :class:`HSTUConfig`.

    Example::

        enc = HSTUEncoder(HSTUConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=4))
        out = enc(torch.randn(5, 8), torch.tensor([0, 3, 5]), torch.arange(5))  # (5, 8)
    """

    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        self.position_embedding = nn.Embedding(config.max_seq_len, config.embedding_dim)
        nn.init.trunc_normal_(self.position_embedding.weight, std=math.sqrt(1.0 / config.embedding_dim))
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(HSTULayer(config) for _ in range(config.num_blocks))

    def forward(self, embeddings: torch.Tensor, offsets: torch.Tensor,
                timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): ``(T, D)`` jagged token embeddings, oldest first per sequence.
            offsets (torch.Tensor): ``(B + 1,)`` int64; every ``L[b] <= max_seq_len``.
            timestamps (Optional[torch.Tensor]): ``(T,)`` int64.

        Returns:
            torch.Tensor: ``(T, D)``: position ``i`` of a sequence encodes tokens ``0..i``.
        """
        positions = positions_in_sequence(offsets, embeddings.shape[0])
        if embeddings.shape[0] and int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"a sequence is longer than max_seq_len={self.config.max_seq_len}; truncate it first")
        x = embeddings * math.sqrt(self.config.embedding_dim) + self.position_embedding(positions)
        x = self.input_dropout(x)
        for layer in self.layers:
            x = layer(x, offsets, timestamps)
        return x

    def forward_padded(self, embeddings: torch.Tensor, lengths: torch.Tensor,
                       timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` on right-padded sequences, without data-dependent control flow,
        so ``torch.export`` can trace it with dynamic batch and length.

        Args:
            embeddings (torch.Tensor): ``(B, L, D)``, ``L <= max_seq_len``.
            lengths (torch.Tensor): ``(B,)`` valid positions per row.
            timestamps (Optional[torch.Tensor]): ``(B, L)`` int64.

        Returns:
            torch.Tensor: ``(B, L, D)``; valid positions equal :meth:`forward`'s rows.
        """
        return self._padded_layers(embeddings, lengths, timestamps, len(self.layers))

    def forward_padded_last(self, embeddings: torch.Tensor, lengths: torch.Tensor,
                            timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, D)``: :meth:`forward_padded` read at each row's last valid position, with
        the last layer computing that one query per row (serving's user vector)."""
        x = self._padded_layers(embeddings, lengths, timestamps, len(self.layers) - 1)
        return self.layers[-1].forward_padded_last(x, lengths, timestamps)

    def _padded_layers(self, embeddings: torch.Tensor, lengths: torch.Tensor, timestamps: Optional[torch.Tensor],
                       num_layers: int) -> torch.Tensor:
        """Input preprocessing, then the first ``num_layers`` layers, on padded rows."""
        positions = torch.arange(embeddings.shape[1], device=embeddings.device)
        x = embeddings * math.sqrt(self.config.embedding_dim) + self.position_embedding(positions).unsqueeze(0)
        x = self.input_dropout(x)
        for layer in self.layers[:num_layers]:
            x = layer.forward_padded(x, lengths, timestamps)
        return x
