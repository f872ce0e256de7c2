"""LUM: a generative transformer over ``<condition, item>`` tokens, with conditioned queries.

Step 1 (knowledge construction): tokens of the unified token space (one TorchRec table),
a pre-norm causal softmax transformer with positions counted within each user's sequence,
over either layout of a batch of users:

- packed rows (:meth:`LUM.loss`): several users per fixed-length row, a block-diagonal
  causal mask (no cross-user attention);
- the library's jagged layout (:meth:`LUM.loss_jagged`): token values + offsets; the
  pointwise layers run on the values only, attention per length bucket
  (:func:`~torchrec_genrec.ops.jagged.jagged_causal_attention`).

Next-condition-item loss: at every condition position the output should score the item
that follows above ``num_negatives`` sampled items (InfoNCE, item embeddings tied to the
token table).

Step 2 (knowledge querying): several condition tokens appended after one shared history
prefix, each attending to the prefix and itself only (queries masked from each other),
read out in one pass: one interest vector per condition (:meth:`LUM.query`). Or generate
several items per condition, greedily, all conditions' branches advancing in one pass per
step (:meth:`LUM.generate`), and average the generated item embeddings (the outputs that
picked each item) into the interest (:meth:`LUM.interests`); :meth:`LUM.retrieve` returns
the top-k items per condition.

Training under DistributedModelParallel (the token table sharded, fused optimiser):
``model(batch)`` returns the InfoNCE sum over a batch's condition positions with their
count; one lookup per step reads the batch's tokens and the sampled negatives (drawn from
``(seed, step)``, so they do not depend on the rank or the batch a user lands in).

Example::

    model = LUM(LUMConfig(), space)
    out = model(LUMBatch(tokens, offsets))                                # training sums
    loss, stats = model.loss(batch.tokens, batch.segment, batch.position)
    loss, stats = model.loss_jagged(tokens, offsets)                    # same users, jagged
    interests = model.query(prefix_tokens, condition_tokens)            # (N, D)
    scores, items = model.retrieve(prefix_tokens, condition_tokens, k=10, steps=4)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_genrec.ops.masks import block_causal_mask
from torchrec_genrec.config import ConfigError, check_ranges
from torchrec_genrec.modules.hstu import HSTUConfig, HSTUEncoder
from torchrec_genrec.modules.hstu_ranker import HSTURankerEncoder
from torchrec_genrec.ops.jagged import JaggedAttentionPlan, jagged_causal_attention, positions_in_sequence
from torchrec_genrec.ops.random import keyed_randint
from torchrec_genrec.tokens import TokenSpace

__all__ = ["LUM", "LUMConfig"]

#: Why the HSTU encoder takes no packed rows (said by the model and by the recipe config).
HSTU_NO_PACKED_ROWS = ("packed rows need a block-diagonal mask, which HSTU's jagged kernel does not take; "
                       "use layout='jagged' (or one user per padded row) with encoder='hstu'")


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
    encoder (str): ``transformer`` (pre-norm softmax blocks; packed or jagged layout) or
        ``hstu`` (the library's HSTU layers, :class:`~torchrec_genrec.modules.hstu_ranker.
        HSTURankerEncoder`: the retrieval model's sequence encoder; jagged layout only, group
        queries through its target-aware mask; relative position bias, no time bias).
    """

    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_positions: int = 256
    num_negatives: int = 128
    temperature: float = 0.05
    dropout: float = 0.1
    encoder: str = "transformer"

    def validate(self) -> "LUMConfig":
        check_ranges("model", self, {"embedding_dim": (4, None), "num_layers": (1, None), "num_heads": (1, None),
                                     "max_positions": (2, None), "num_negatives": (1, None),
                                     "temperature": (1e-6, None), "dropout": (0.0, 1.0)})
        if self.encoder not in ("transformer", "hstu"):
            raise ConfigError(f"unknown LUM encoder {self.encoder!r}; choose 'transformer' or 'hstu'")
        if self.embedding_dim % self.num_heads:
            raise ConfigError(f"model.embedding_dim {self.embedding_dim} must be divisible by model.num_heads "
                              f"{self.num_heads}")
        return self


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

    def forward_jagged(self, x: torch.Tensor, plan: JaggedAttentionPlan) -> torch.Tensor:
        """The same block on ``(T, D)`` jagged values in ``plan``'s order: the pointwise
        parts on the values only."""
        t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(t, 3, self.heads, d // self.heads)
        att = jagged_causal_attention(qkv, plan)
        x = x + self.dropout(self.out(att.reshape(t, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class LUM(nn.Module):
    """See the module docstring.

    Args:
        config (LUMConfig): sizes.
        space (TokenSpace): the token space (kinds ``item`` and ``condition`` at least).
        device (torch.device): where the token table is created (``meta`` for DMP).
        seed (int): keys the sampled negatives (with the training step).
    """

    #: Features of the one KeyedJaggedTensor looked up in the token table.
    FEATURES = ("lum_tokens", "lum_negatives")

    def __init__(self, config: LUMConfig, space: TokenSpace, device: torch.device = torch.device("cpu"),
                 seed: int = 0) -> None:
        super().__init__()
        self.config, self.space = config.validate(), space
        self.seed = seed
        # Training steps taken: keys the negatives, checkpointed with the model.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        d = config.embedding_dim
        self.tokens = EmbeddingCollection(tables=[EmbeddingConfig(
            name="lum_tokens", embedding_dim=d, num_embeddings=space.size, feature_names=list(self.FEATURES),
            init_fn=lambda w: nn.init.normal_(w, std=0.02))], device=device)
        if config.encoder == "hstu":
            self.hstu = HSTURankerEncoder(HSTUConfig(
                embedding_dim=d, num_blocks=config.num_layers, num_heads=config.num_heads,
                attention_dim=d // config.num_heads, linear_dim=d // config.num_heads,
                max_seq_len=config.max_positions, dropout=config.dropout, use_time_bias=False))
        else:
            self.position = nn.Embedding(config.max_positions, d)
            nn.init.normal_(self.position.weight, std=0.02)
            self.blocks = nn.ModuleList(_Block(d, config.num_heads, config.dropout) for _ in range(config.num_layers))
            self.norm = nn.LayerNorm(d)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids of any shape -> embeddings ``(*shape, D)`` via the TorchRec table."""
        x, _ = self._lookup(tokens.reshape(-1), None)
        return x.view(*tokens.shape, -1)

    def _lookup(self, tokens: torch.Tensor, negatives: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(T,)`` tokens and ``(K,)`` negative tokens -> ``(T, D)``, ``(K, D)`` in one
        lookup through the table (with a fused optimiser, every row a step reads must come
        through the collection to be updated)."""
        flat = tokens.reshape(-1)
        n = max(flat.numel(), 1)
        k = 0 if negatives is None else negatives.numel()
        ones = torch.ones(flat.numel(), dtype=torch.int64, device=flat.device)
        neg_lengths = torch.zeros(n, dtype=torch.int64, device=flat.device)
        neg_lengths[0] = k
        values = flat if negatives is None else torch.cat([flat, negatives])
        lengths = torch.cat([ones if flat.numel() else torch.zeros(1, dtype=torch.int64, device=flat.device),
                             neg_lengths])
        kjt = KeyedJaggedTensor.from_lengths_sync(list(self.FEATURES), values, lengths.to(torch.int32))
        out = self.tokens(kjt)
        x = out["lum_tokens"].values()
        return x, (out["lum_negatives"].values() if negatives is not None else None)

    def _check_positions(self, position: torch.Tensor) -> None:
        if position.numel() and int(position.max()) >= self.config.max_positions:
            raise ValueError(f"positions reach {int(position.max())}; config.max_positions is "
                             f"{self.config.max_positions}")

    def encode(self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` tokens and positions, ``(B, L, L)`` bool mask -> ``(B, L, D)``
        (the transformer encoder; packed rows need an arbitrary block mask)."""
        return self._encode_embedded(self.embed(tokens), position, mask)

    def _encode_embedded(self, x: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.encoder == "hstu":
            raise ValueError(HSTU_NO_PACKED_ROWS)
        self._check_positions(position)
        # A row that may attend to nothing (padding) attends to itself: no NaN from softmax.
        mask = mask | torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
        x = x + self.position(position)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def encode_jagged(self, tokens: torch.Tensor, offsets: torch.Tensor,
                      plan: Optional[JaggedAttentionPlan] = None) -> torch.Tensor:
        """The library's jagged layout: ``(T,)`` token values of ``B`` users one after the
        other, ``(B + 1,)`` offsets -> ``(T, D)``. No padding slot goes through the
        pointwise layers; attention runs per length bucket (:class:`JaggedAttentionPlan`;
        ``plan`` is unused by the HSTU encoder, whose jagged kernel buckets by itself).
        Each user's rows equal the user encoded alone."""
        if self.config.encoder == "hstu":  # the causal jagged forward of the retrieval encoder
            return HSTUEncoder.forward(self.hstu, self.embed(tokens), offsets)
        plan = plan or JaggedAttentionPlan(offsets)
        tokens = plan.to_plan_order(tokens)
        return plan.to_input_order(self._encode_plan_order(self.embed(tokens), plan))

    def _encode_plan_order(self, x: torch.Tensor, plan: JaggedAttentionPlan) -> torch.Tensor:
        position = positions_in_sequence(plan.offsets, x.shape[0])
        self._check_positions(position)
        x = x + self.position(position)
        for block in self.blocks:
            x = block.forward_jagged(x, plan)
        return self.norm(x)

    def forward(self, batch: "LUMBatch") -> Dict[str, torch.Tensor]:  # noqa: F821 - data.lum.LUMBatch
        """Training sums on a batch (jagged, or packed rows when ``batch.segment`` is set):
        ``loss_sum`` of the next-condition-item InfoNCE over ``positions`` condition
        positions, ``top1_sum`` of those whose item beat every negative, ``tokens``."""
        i_first, i_end = self.space.ranges["item"]
        slots = torch.arange(self.config.num_negatives, device=batch.tokens.device)
        negatives = i_first + keyed_randint(i_end - i_first, self.seed, int(self.step), slots)
        if batch.segment is None:
            loss_sum, n, hits = self._jagged_sums(batch.tokens, batch.offsets, negatives)
            tokens = batch.tokens.numel()
        else:
            loss_sum, n, hits = self._packed_sums(batch.tokens, batch.segment, batch.position, negatives)
            tokens = int((batch.segment >= 0).sum())
        if self.training:
            self.step += 1
        return {"loss_sum": loss_sum, "positions": n, "top1_sum": hits, "tokens": tokens}

    def _draw_negatives(self, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        i_first, i_end = self.space.ranges["item"]
        return torch.randint(i_first, i_end, (self.config.num_negatives,), generator=generator).to(device)

    def loss(self, tokens: torch.Tensor, segment: torch.Tensor, position: torch.Tensor,
             generator: torch.Generator | None = None) -> Tuple[torch.Tensor, dict]:
        """Next-condition-item InfoNCE over packed rows (see :func:`block_causal_mask`),
        negatives drawn from ``generator``: the mean and stats (``loss``, ``positions``,
        ``top1``). The HSTU encoder takes padded rows only (one user per row, padding at
        the end)."""
        sums = self._packed_sums(tokens, segment, position, self._draw_negatives(generator, tokens.device))
        return self._mean(*sums)

    def loss_jagged(self, tokens: torch.Tensor, offsets: torch.Tensor, generator: torch.Generator | None = None,
                    plan: Optional[JaggedAttentionPlan] = None) -> Tuple[torch.Tensor, dict]:
        """:meth:`loss` on the jagged layout (:meth:`encode_jagged`): the same positions,
        computed in the plan's order (no reordering back)."""
        sums = self._jagged_sums(tokens, offsets, self._draw_negatives(generator, tokens.device), plan)
        return self._mean(*sums)

    @staticmethod
    def _mean(loss_sum: torch.Tensor, n: int, hits: torch.Tensor) -> Tuple[torch.Tensor, dict]:
        loss = loss_sum / max(n, 1)
        return loss, {"loss": loss.detach(), "positions": torch.tensor(float(n)), "top1": hits / max(n, 1)}

    def _packed_sums(self, tokens: torch.Tensor, segment: torch.Tensor, position: torch.Tensor,
                     negatives: torch.Tensor) -> Tuple[torch.Tensor, int, torch.Tensor]:
        x, neg = self._lookup(tokens.reshape(-1), negatives)
        x = x.view(*tokens.shape, -1)
        if self.config.encoder == "hstu":
            lengths = (segment >= 0).sum(1)
            cols = torch.arange(segment.shape[1], device=segment.device)
            if not torch.equal(segment, torch.where(cols < lengths.unsqueeze(1), segment[:, :1], -1)):
                raise ValueError(HSTU_NO_PACKED_ROWS)
            h = self.hstu.forward_padded(x, lengths)
        else:
            h = self._encode_embedded(x, position, block_causal_mask(segment))
        at = self.space.is_kind(tokens, "condition") & (segment >= 0)
        at[:, -1] = False
        rows, cols = at.nonzero(as_tuple=True)
        return self._infonce_sums(h[rows, cols], x[rows, cols + 1], tokens[rows, cols + 1], neg, negatives)

    def _jagged_sums(self, tokens: torch.Tensor, offsets: torch.Tensor, negatives: torch.Tensor,
                     plan: Optional[JaggedAttentionPlan] = None) -> Tuple[torch.Tensor, int, torch.Tensor]:
        if self.config.encoder == "hstu":
            x, neg = self._lookup(tokens, negatives)
            h = HSTUEncoder.forward(self.hstu, x, offsets)
        else:
            plan = plan or JaggedAttentionPlan(offsets)
            tokens, offsets = plan.to_plan_order(tokens), plan.offsets
            x, neg = self._lookup(tokens, negatives)
            h = self._encode_plan_order(x, plan)
        ends = offsets[1:][offsets[1:] > offsets[:-1]]
        last = torch.zeros_like(tokens, dtype=torch.bool)
        last[ends - 1] = True  # a user's last token predicts nothing
        at = (self.space.is_kind(tokens, "condition") & ~last).nonzero(as_tuple=True)[0]
        return self._infonce_sums(h[at], x[at + 1], tokens[at + 1], neg, negatives)

    def _infonce_sums(self, outputs: torch.Tensor, positives: torch.Tensor, positive_tokens: torch.Tensor,
                      neg: torch.Tensor, negatives: torch.Tensor) -> Tuple[torch.Tensor, int, torch.Tensor]:
        """InfoNCE of each output against its positive item's embedding and the shared
        negatives: ``(loss sum, positions, top-1 hits)``."""
        query = F.normalize(outputs, dim=-1)
        pos = F.normalize(positives, dim=-1)
        neg = F.normalize(neg, dim=-1)
        logits = torch.cat([(query * pos).sum(-1, keepdim=True), query @ neg.T], dim=1) / self.config.temperature
        # A sampled negative equal to the positive is not a negative.
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives.unsqueeze(0) == positive_tokens.unsqueeze(1), -1e9)
        n = len(positive_tokens)
        loss_sum = F.cross_entropy(logits, torch.zeros(n, dtype=torch.int64, device=outputs.device), reduction="sum")
        hits = (logits[:, :1] > logits[:, 1:]).all(dim=1).float().sum()
        return loss_sum, n, hits.detach()

    def query(self, prefix: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """One user's history ``prefix`` ``(P,)`` and ``N`` condition tokens -> ``(N, D)``
        interest vectors, in one pass: each condition sees the prefix and itself only."""
        if self.config.encoder == "hstu":  # the target-aware mask: O(N * P), no (P + N)^2 matrix
            return self.hstu(self.embed(prefix).unsqueeze(0), torch.tensor([prefix.numel()], device=prefix.device),
                             None, self.embed(conditions.view(-1)).unsqueeze(0), None)[0]
        return self.query_branches(prefix, conditions.view(-1, 1))[:, -1]

    def query_branches(self, prefix: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
        """``N`` token branches ``(N, m)`` continuing one shared ``prefix`` ``(P,)``, in one
        pass -> ``(N, m, D)``: a branch's tokens see the prefix and their own branch
        (causally), never another branch. :meth:`query` is ``m = 1``."""
        p, (n, m) = prefix.numel(), branches.shape
        device = prefix.device
        if self.config.encoder == "hstu":  # each branch as its own jagged sequence
            tokens = torch.cat([prefix.expand(n, p), branches], 1).reshape(-1)
            offsets = torch.arange(n + 1, device=device) * (p + m)
            return self.encode_jagged(tokens, offsets).view(n, p + m, -1)[:, p:]
        tokens = torch.cat([prefix, branches.reshape(-1)]).unsqueeze(0)
        position = torch.cat([torch.arange(p, device=device), (p + torch.arange(m, device=device)).repeat(n)])
        branch = torch.cat([torch.full((p,), -1, device=device), torch.arange(n, device=device).repeat_interleave(m)])
        causal = torch.ones(p + n * m, p + n * m, dtype=torch.bool, device=device).tril()
        same = (branch.unsqueeze(1) == branch.unsqueeze(0)) | (branch.unsqueeze(0) == -1)
        out = self.encode(tokens, position.unsqueeze(0), (causal & same).unsqueeze(0))
        return out[0, p:].view(n, m, -1)

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, conditions: torch.Tensor, steps: int,
                 exclude: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Greedy generation of ``steps`` items per condition: the output at condition
        ``c`` picks the best item not yet seen, the branch continues ``c, i_1, c, i_2, ..., c``.
        All ``N`` branches advance together (one pass per step).

        Args:
            prefix (torch.Tensor): ``(P,)`` the history tokens (``P + 2 * steps - 1 <=
                max_positions``).
            conditions (torch.Tensor): ``(N,)`` condition tokens.
            steps (int): items per condition.
            exclude (torch.Tensor): item ids (not tokens) never generated, e.g. the history's.

        Returns:
            ``(N, steps, D)`` output embeddings and ``(N, steps)`` generated item ids.
        """
        if prefix.numel() + 2 * steps - 1 > self.config.max_positions:
            raise ValueError(f"a prefix of {prefix.numel()} tokens plus {steps} generated items exceeds "
                             f"max_positions {self.config.max_positions}; cut the prefix")
        n = conditions.numel()
        branches = conditions.view(n, 1)
        outputs, items = [], []
        banned = torch.zeros(n, self.space.count("item"), dtype=torch.bool, device=prefix.device)
        if exclude is not None:
            banned[:, exclude] = True
        for _ in range(steps):
            out = self.query_branches(prefix, branches)[:, -1]
            scores = self.item_scores(out).masked_fill(banned, -math.inf)
            best = scores.argmax(dim=1)
            banned[torch.arange(n), best] = True
            outputs.append(out)
            items.append(best)
            branches = torch.cat([branches, self.space.to_tokens("item", best).view(n, 1), conditions.view(n, 1)], 1)
        return torch.stack(outputs, 1), torch.stack(items, 1)

    @torch.no_grad()
    def interests(self, prefix: torch.Tensor, conditions: torch.Tensor, steps: int = 1,
                  exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One interest vector per condition, ``(N, D)``: the condition's output
        (``steps = 1``: :meth:`query`, as the encoder gives it) or, for ``steps > 1``, the
        mean of the ``steps`` outputs of :meth:`generate` (each the predicted embedding of
        the next item under the condition, normalised first; the mean has norm <= 1).
        Retrieval ranks by cosine, so the scale matters only to a consumer of the vectors."""
        if steps == 1:
            return self.query(prefix, conditions)
        outputs, _ = self.generate(prefix, conditions, steps, exclude)
        return F.normalize(outputs, dim=-1).mean(1)

    @torch.no_grad()
    def retrieve(self, prefix: torch.Tensor, conditions: torch.Tensor, k: int, steps: int = 1,
                 exclude: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items per condition: ``(N, k)`` cosine scores and item ids, the items
        in ``exclude`` left out (and never generated on the way)."""
        return self.retrieve_from(self.interests(prefix, conditions, steps, exclude), k, exclude)

    @torch.no_grad()
    def retrieve_from(self, interests: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items of ``(N, D)`` interest vectors (cached ones, say), ``exclude`` left out."""
        scores = self.item_scores(interests)
        if exclude is not None:
            scores[:, exclude] = -math.inf
        return scores.topk(k, dim=1)

    def item_embeddings(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """``(I, D)`` every item's token embedding, in item-id order."""
        first, end = self.space.ranges["item"]
        return self.embed(torch.arange(first, end, device=device))

    @torch.no_grad()
    def item_scores(self, interests: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` interest vectors -> ``(N, I)`` cosine scores over every item."""
        return F.normalize(interests, dim=-1) @ F.normalize(self.item_embeddings(interests.device), dim=-1).T
