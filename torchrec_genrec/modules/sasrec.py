"""SASRec: the self-attentive sequential recommender, as a jagged sequence encoder.

Kang & McAuley, ICDM 2018, "Self-Attentive Sequential Recommendation". The baseline that HSTU is
measured against: a causal softmax transformer over the item history, with a learned absolute
positional embedding. Here it is a plain ``nn.Module`` over jagged tensors (values + offsets), with
the same ``forward(embeddings, offsets, timestamps)`` signature as the HSTU encoder, so one
retrieval model can swap one encoder for the other. The id embeddings themselves are looked up
outside (a TorchRec table in the model); this module only encodes them.

Per block, with the residual form of the paper, ``g(x) = x + Dropout(g(LayerNorm(x)))``::

    x = x + Dropout(MHA(LN(x)))            # causal, softmax, dropout on the attention weights
    x = x + Dropout(W2·Dropout(ReLU(W1·LN(x) + b1)) + b2)

after an input of ``sqrt(D)·e + p`` (id embedding ``e``, position embedding ``p``) with dropout,
and followed by one final LayerNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Load the fbgemm operators (jagged_to_padded_dense, dense_to_jagged) on import.
import fbgemm_gpu  # noqa: F401


@dataclass
class SASRecConfig:
    """Hyper-parameters of :class:`SASRecEncoder`.

    The defaults are the ML-1M setting of the paper and of the HSTU comparison.

    Args:
        embedding_dim (int): model width D (also the width of the input embeddings).
        num_blocks (int): number of transformer blocks.
        num_heads (int): attention heads; must divide ``embedding_dim``.
        dropout (float): dropout rate of the input, the attention weights, the attention output
            and the feed-forward network.
        max_seq_len (int): longest sequence accepted; size of the positional embedding table.
        ffn_dim (Optional[int]): hidden width of the point-wise feed-forward network;
            ``None`` means ``embedding_dim`` (as in the paper).
    """

    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_seq_len: int = 200
    ffn_dim: Optional[int] = None

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        if self.num_heads <= 0 or self.embedding_dim % self.num_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be positive and divide "
                f"embedding_dim ({self.embedding_dim})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive, got {self.ffn_dim}")


class _CausalSelfAttention(nn.Module):
    """Causal multi-head softmax self-attention over a right-padded batch.

    Args:
        embedding_dim (int): model width D.
        num_heads (int): number of heads H (D must be divisible by H).
        dropout (float): dropout rate on the attention weights (training only).
    """

    def __init__(self, embedding_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): ``(B, N, D)`` right-padded inputs; attention is causal.

        Returns:
            torch.Tensor: ``(B, N, D)``.
        """
        B, N, D = x.shape
        H = self.num_heads
        q, k, v = self.in_proj(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, N, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class _PointWiseFeedForward(nn.Module):
    """Two position-wise linear layers with a ReLU between, and dropout after each activation.

    Args:
        embedding_dim (int): model width D.
        ffn_dim (int): hidden width.
        dropout (float): dropout rate.
    """

    def __init__(self, embedding_dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(embedding_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., D)``."""
        return self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))


class _SASRecBlock(nn.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then feed-forward network.

    Args:
        config (SASRecConfig): hyper-parameters.
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        D = config.embedding_dim
        self.attention_norm = nn.LayerNorm(D, eps=1e-8)
        self.attention = _CausalSelfAttention(D, config.num_heads, config.dropout)
        self.attention_dropout = nn.Dropout(config.dropout)
        self.ffn_norm = nn.LayerNorm(D, eps=1e-8)
        self.ffn = _PointWiseFeedForward(D, config.ffn_dim or D, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``, causal."""
        x = x + self.attention_dropout(self.attention(self.attention_norm(x)))
        return x + self.ffn(self.ffn_norm(x))


class SASRecEncoder(nn.Module):
    """SASRec causal transformer encoder over jagged sequences.

    Takes the embeddings of B sequences as one jagged tensor and returns, for every position,
    the encoding of the sequence up to and including that position. A sequence is encoded the
    same whatever else is in the batch: the batch is padded inside the module to its longest
    sequence, and padded positions are masked out of the attention, so they never reach a real
    output. ``timestamps`` are accepted for parity with the HSTU encoder and ignored (SASRec sees
    order through positions only).

    Shapes: ``embeddings (T, D)``, ``offsets (B + 1,)`` -> ``(T, D)``, where
    ``T = sum_b L[b]`` and ``L[b] = offsets[b + 1] - offsets[b] <= max_seq_len``.

    Args:
        config (SASRecConfig): hyper-parameters.

    Example::

        # B = 3 sequences, oldest event first; sequence 1 is empty
        #   seq 0: e0 e1 e2      L[0] = 3
        #   seq 1:               L[1] = 0
        #   seq 2: e3 e4         L[2] = 2
        encoder = SASRecEncoder(SASRecConfig(embedding_dim=8, max_seq_len=4))
        embeddings = torch.randn(5, 8)            # (T, D) = rows e0..e4
        offsets = torch.tensor([0, 3, 3, 5])      # (B + 1,)
        out = encoder(embeddings, offsets)        # (5, 8)
        # out[2] encodes e0 e1 e2; out[3] encodes e3 only; out[4] encodes e3 e4
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embedding_dim
        self.position_embedding = nn.Embedding(config.max_seq_len, D)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(D, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Positional embedding ~ truncated N(0, 1/D), as in the generative-recommenders baseline;
        the linear and LayerNorm layers keep their PyTorch defaults."""
        D = self.config.embedding_dim
        std = math.sqrt(1.0 / D)
        nn.init.trunc_normal_(self.position_embedding.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def forward(
        self,
        embeddings: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            embeddings (torch.Tensor): ``(T, D)`` jagged values of B sequences, oldest first
                within each sequence.
            offsets (torch.Tensor): ``(B + 1,)`` int64 offsets into ``embeddings``.
            timestamps (Optional[torch.Tensor]): ``(T,)`` event times; unused by SASRec.

        Returns:
            torch.Tensor: ``(T, D)``; row t is the causal encoding of its sequence up to and
            including t.
        """
        del timestamps  # SASRec orders by position only.
        D = self.config.embedding_dim
        if embeddings.dim() != 2 or embeddings.size(1) != D:
            raise ValueError(f"embeddings must be (T, {D}), got {tuple(embeddings.shape)}")
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"offsets must be (B + 1,), got {tuple(offsets.shape)}")
        offsets = offsets.to(torch.int64)
        T = embeddings.size(0)
        lengths = offsets[1:] - offsets[:-1]  # (B,)
        max_len = int(lengths.max()) if lengths.numel() > 0 else 0
        if max_len > self.config.max_seq_len:
            raise ValueError(
                f"a sequence of length {max_len} exceeds max_seq_len={self.config.max_seq_len}"
            )
        # At least one padded column, so that empty batches and empty sequences flow through.
        N = max(max_len, 1)

        x = torch.ops.fbgemm.jagged_to_padded_dense(embeddings, [offsets], [N], 0.0)  # (B, N, D)
        x = self.forward_padded(x)
        return torch.ops.fbgemm.dense_to_jagged(x, [offsets], T)[0]  # (T, D)

    def forward_padded(self, embeddings: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                       timestamps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder on right-padded sequences (``torch.export``-able: no data-dependent
        control flow).

        Args:
            embeddings (torch.Tensor): ``(B, N, D)``, right-padded, ``N <= max_seq_len``.
            lengths (Optional[torch.Tensor]): ``(B,)``; unused: the causal mask alone keeps
                padding (which comes after every real token) out of real outputs.
            timestamps (Optional[torch.Tensor]): unused by SASRec.

        Returns:
            torch.Tensor: ``(B, N, D)``; valid positions equal :meth:`forward`'s rows.
        """
        del lengths, timestamps
        D = self.config.embedding_dim
        positions = torch.arange(embeddings.shape[1], device=embeddings.device)
        x = embeddings * math.sqrt(D) + self.position_embedding(positions).unsqueeze(0)
        x = self.input_dropout(x)

        # Sequences are right-padded, so the causal mask alone keeps padding away from every
        # real query (padded keys come after it). Padded queries see real and padded keys, never
        # an empty row (no NaN), and are dropped by the caller. No explicit mask lets
        # scaled_dot_product_attention take its fused causal kernel, several times faster on
        # CPU than the masked math path.
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)
