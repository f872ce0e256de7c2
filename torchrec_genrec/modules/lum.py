"""LUM: a generative transformer over ``<condition, item>`` tokens, with conditioned queries.

Step 1 (knowledge construction): tokens of the unified token space (one TorchRec table),
a pre-norm causal softmax transformer over packed rows (several users per row, a
block-diagonal causal mask: no cross-user attention) with positions counted within each
user's sequence. Next-condition-item loss: at every condition position the output should
score the item that follows above ``num_negatives`` sampled items (InfoNCE, item
embeddings tied to the token table).

Step 2 (knowledge querying, :meth:`LUM.query`): several condition tokens appended after one
shared history prefix, each attending to the prefix and itself only (queries masked from
each other), read out in one pass: one interest vector per condition.

Example::

    model = LUM(LUMConfig(), space)
    loss = model.loss(batch.tokens, batch.segment, batch.position, is_condition)
    interests = model.query(prefix_tokens, condition_tokens)     # (N, D)
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_genrec.data.lum import block_causal_mask
from torchrec_genrec.tokens import TokenSpace

__all__ = ["LUM", "LUMConfig"]


@dataclasses.dataclass
class LUMConfig:
    """Args:
    embedding_dim (int): token and model width D.
    num_layers (int): transformer blocks.
    num_heads (int): attention heads.
    max_positions (int): longest per-user sequence (tokens), plus query slots.
    num_negatives (int): sampled negative items per condition position.
    temperature (float): InfoNCE temperature.
    dropout (float): dropout in the blocks.
    """

    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_positions: int = 256
    num_negatives: int = 128
    temperature: float = 0.05
    dropout: float = 0.1


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        x = x + self.dropout(self.out(att.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class LUM(nn.Module):
    """See the module docstring.

    Args:
        config (LUMConfig): sizes.
        space (TokenSpace): the token space (kinds ``item`` and ``condition`` at least).
        device (torch.device): where the token table is created (``meta`` for DMP).
    """

    def __init__(self, config: LUMConfig, space: TokenSpace, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.config, self.space = config, space
        d = config.embedding_dim
        if d % config.num_heads:
            raise ValueError(f"embedding_dim {d} must be divisible by num_heads {config.num_heads}")
        self.tokens = EmbeddingCollection(tables=[EmbeddingConfig(
            name="lum_tokens", embedding_dim=d, num_embeddings=space.size, feature_names=["lum_tokens"],
            init_fn=lambda w: nn.init.normal_(w, std=0.02))], device=device)
        self.position = nn.Embedding(config.max_positions, d)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(_Block(d, config.num_heads, config.dropout) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(d)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids of any shape -> embeddings ``(*shape, D)`` via the TorchRec table."""
        flat = tokens.reshape(-1)
        kjt = KeyedJaggedTensor.from_lengths_sync(["lum_tokens"], flat, torch.ones_like(flat))
        return self.tokens(kjt)["lum_tokens"].values().view(*tokens.shape, -1)

    def encode(self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` tokens and positions, ``(B, L, L)`` bool mask -> ``(B, L, D)``."""
        if int(position.max()) >= self.config.max_positions:
            raise ValueError(f"positions reach {int(position.max())}; config.max_positions is "
                             f"{self.config.max_positions}")
        # A row that may attend to nothing (padding) attends to itself: no NaN from softmax.
        mask = mask | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        x = self.embed(tokens) + self.position(position)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def loss(self, tokens: torch.Tensor, segment: torch.Tensor, position: torch.Tensor,
             generator: torch.Generator | None = None) -> Tuple[torch.Tensor, dict]:
        """Next-condition-item InfoNCE over packed rows (see :func:`block_causal_mask`)."""
        h = self.encode(tokens, position, block_causal_mask(segment))
        first, end = self.space.ranges["condition"]
        at = (tokens >= first) & (tokens < end) & (segment >= 0)
        at[:, -1] = False
        rows, cols = at.nonzero(as_tuple=True)
        query = F.normalize(h[rows, cols], dim=-1)
        positive_tokens = tokens[rows, cols + 1]
        i_first, i_end = self.space.ranges["item"]
        negatives = torch.randint(i_first, i_end, (self.config.num_negatives,), generator=generator,
                                  device=tokens.device)
        pos = F.normalize(self.embed(positive_tokens), dim=-1)
        neg = F.normalize(self.embed(negatives), dim=-1)
        logits = torch.cat([(query * pos).sum(-1, keepdim=True), query @ neg.T], dim=1) / self.config.temperature
        # A sampled negative equal to the positive is not a negative.
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives.unsqueeze(0) == positive_tokens.unsqueeze(1), -1e9)
        loss = F.cross_entropy(logits, torch.zeros(len(rows), dtype=torch.int64, device=tokens.device))
        hit = (logits[:, :1] > logits[:, 1:]).all(dim=1).float().mean()
        return loss, {"loss": loss.detach(), "positions": torch.tensor(float(len(rows))), "top1": hit}

    def query(self, prefix: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """One user's history ``prefix`` ``(P,)`` and ``N`` condition tokens -> ``(N, D)``
        interest vectors, in one pass: each condition sees the prefix and itself only."""
        p, n = prefix.numel(), conditions.numel()
        tokens = torch.cat([prefix, conditions]).unsqueeze(0)
        position = torch.cat([torch.arange(p), torch.full((n,), p)]).unsqueeze(0).to(prefix.device)
        mask = torch.zeros(p + n, p + n, dtype=torch.bool, device=prefix.device)
        mask[:p, :p] = torch.ones(p, p, dtype=torch.bool, device=prefix.device).tril()
        mask[p:, :p] = True
        mask[p:, p:] = torch.eye(n, dtype=torch.bool, device=prefix.device)
        return self.encode(tokens, position, mask.unsqueeze(0))[0, p:]

    @torch.no_grad()
    def item_scores(self, interests: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` interest vectors -> ``(N, I)`` cosine scores over every item."""
        first, end = self.space.ranges["item"]
        items = F.normalize(self.embed(torch.arange(first, end, device=interests.device)), dim=-1)
        return F.normalize(interests, dim=-1) @ items.T
