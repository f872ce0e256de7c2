"""Generative retrieval: a causal sequence encoder over a unified token table, trained to
predict the next item at every position (HSTU, or SASRec as the baseline).

Sparse arch: ONE TorchRec ``EmbeddingCollection`` table holds every token (items,
actions, special markers), created on the meta device so ``DistributedModelParallel``
materialises and shards it. Every embedding the loss touches — history tokens, sampled
negatives, the catalogue for full softmax — is looked up through the collection, as a
feature of one ``KeyedJaggedTensor``: with a fused (in-backward) optimiser, reading the
table's weight directly would give those rows no update.

Dense arch: the encoder, the L2-normalised dot-product interaction and, as the paper's
auxiliary task, a next-action head.

Actions enter in one of three ways (``action_mode``):

- ``interleaved`` (the paper): each event is two tokens, item then action. The action
  token's output predicts the next item; the item token's output predicts the action
  the user takes on it.
- ``summed``: one token per event, item embedding + action embedding. The next action
  is predicted from the output and the next item's embedding.
- ``none``: item tokens only (the published HSTU / SASRec benchmark setting).
"""

from __future__ import annotations

import math

import dataclasses
from functools import partial
from typing import Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from torchrec_genrec.config import check_ranges
from torchrec_genrec.batch import ACTION_KEY, ITEM_KEY, TIMESTAMP_KEY, SequenceBatch
from torchrec_genrec.models.tables import RETRIEVAL_FEATURES, TOKEN_TABLE, retrieval_tables, table_width
from torchrec_genrec.modules.hstu import HSTUConfig, HSTUEncoder
from torchrec_genrec.modules.sasrec import SASRecConfig, SASRecEncoder
from torchrec_genrec.ops.jagged import lengths_to_offsets, positions_in_sequence, sequence_ids
from torchrec_genrec.ops.random import keyed_randint
from torchrec_genrec.table_spec import TableSpec
from torchrec_genrec.tokens import TokenSpace

# Features of the one KeyedJaggedTensor looked up in the token table.
HISTORY, HISTORY_ACTIONS, NEGATIVES, CATALOG = RETRIEVAL_FEATURES
_FEATURES = list(RETRIEVAL_FEATURES)


@dataclasses.dataclass
class RetrievalConfig:
    """Args:
    name (str): the model: ``hstu``, ``sasrec`` (generative retrieval with that
        encoder) or ``mostpop`` (the popularity floor; the other fields do not apply).
    embedding_dim (int): D, for tokens and the encoder.
    num_blocks (int): encoder layers.
    num_heads (int): attention heads.
    attention_dim (int): HSTU per-head query/key dim.
    linear_dim (int): HSTU per-head value dim.
    dropout (float): encoder dropout.
    use_time_bias (bool): HSTU relative bias over log-bucketed time deltas.
    kernel (str): HSTU attention kernel: ``jagged`` (CPU and GPU), ``triton`` (fused
        Triton kernels, CUDA) or ``pytorch`` (padded reference).
    action_mode (str): ``interleaved``, ``summed`` or ``none`` (see module docstring).
    loss (str): ``sampled_softmax`` or ``full_softmax`` (one matmul against the whole
        table: exact, and cheap up to ~1e5 items).
    negatives (str): sampled softmax's negatives: ``uniform`` (per user, over all items),
        ``in_batch`` (drawn from the batch's events, i.e. by popularity; shared by the
        batch) or ``mixed`` (both: ``num_negatives`` of each).
    num_negatives (int): sampled negatives per user (uniform) or per batch (in_batch).
    logq_correction (bool): subtract each candidate's log sampling probability from its
        logit (training item frequency for the positive and in-batch negatives, 1/N for
        uniform ones), so popularity-sampled negatives estimate the full softmax
        (Yi et al., RecSys 2019). A no-op for ``uniform`` alone.
    temperature (float): softmax temperature on cosine similarities.
    label_smoothing (float): share of the target mass spread evenly over all candidates
        (the catalogue, or the positive and its sampled negatives), torch's convention.
    action_loss_weight (float): weight of the next-action loss (0 turns it off).
    """

    name: Literal["hstu", "sasrec", "mostpop"] = "hstu"
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50
    linear_dim: int = 50
    dropout: float = 0.2
    use_time_bias: bool = True
    kernel: Literal["jagged", "triton", "pytorch"] = "jagged"
    action_mode: Literal["interleaved", "summed", "none"] = "interleaved"
    loss: Literal["sampled_softmax", "full_softmax"] = "sampled_softmax"
    negatives: Literal["uniform", "in_batch", "mixed"] = "uniform"
    num_negatives: int = 128
    logq_correction: bool = True
    temperature: float = 0.05
    label_smoothing: float = 0.0
    action_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        check_ranges("model", self, {"embedding_dim": (4, None), "num_blocks": (1, None), "num_heads": (1, None),
                                     "attention_dim": (1, None), "linear_dim": (1, None), "dropout": (0.0, 1.0),
                                     "num_negatives": (1, None), "temperature": (1e-6, None),
                                     "label_smoothing": (0.0, 0.999),
                                     "action_loss_weight": (0.0, None)})


@dataclasses.dataclass
class _Tokens:
    """A batch laid out as encoder tokens."""

    tokens: torch.Tensor  # (T',) token ids
    actions: Optional[torch.Tensor]  # (T',) action tokens to add (summed mode)
    timestamps: torch.Tensor  # (T',)
    lengths: torch.Tensor  # (B,)
    offsets: torch.Tensor  # (B + 1,)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def _sampled_cross_entropy(logits: torch.Tensor, excluded: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Summed softmax cross-entropy with the target in column 0 and ``excluded``
    candidates (accidental hits of the positive) left out of the softmax and of the
    smoothing mass.

    Args:
        logits (torch.Tensor): ``(Q, 1 + K)``, the positive first.
        excluded (torch.Tensor): ``(Q, 1 + K)`` bool.
        label_smoothing (float): share of the target mass spread evenly over the kept
            candidates, the positive included (``F.cross_entropy``'s convention, so that
            with nothing excluded the two agree).
    """
    log_p = torch.log_softmax(logits.masked_fill(excluded, float("-inf")), dim=1)
    nll = -log_p[:, 0]
    if label_smoothing > 0:
        kept = (~excluded).to(log_p.dtype)
        spread = -(log_p.masked_fill(excluded, 0.0) * kept).sum(1) / kept.sum(1)
        nll = (1 - label_smoothing) * nll + label_smoothing * spread
    return nll.sum()


class GenerativeRetrieval(nn.Module):
    """Next-item retrieval over a unified token table.

    Args:
        config (RetrievalConfig): model and loss settings.
        num_items (int): catalogue size N.
        num_actions (int): action vocabulary size A (0: no actions).
        max_seq_len (int): longest event history a batch holds.
        device (torch.device): where the token table is created; ``meta`` (default) lets
            ``DistributedModelParallel`` materialise it sharded.

    Example::

        model = GenerativeRetrieval(RetrievalConfig(), num_items=1682, num_actions=5, max_seq_len=200)
        dmp = DistributedModelParallel(model, ...)
        out = dmp(train_batch)                     # training: loss sums and counts (see forward)
        scores = dmp.module.score(eval_batch)      # (B, N), full catalogue
    """

    def __init__(self, config: RetrievalConfig, num_items: int, num_actions: int, max_seq_len: int,
                 device: torch.device = torch.device("meta"), seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        # Training steps taken: with the seed and the user id it keys the sampled negatives,
        # so they do not depend on the rank or the batch a user lands in, and a checkpoint
        # (this is a buffer) resumes the same draws.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.num_items = num_items
        # log q of each item for logQ correction (set_item_frequencies); a plain attribute,
        # not a buffer: it is data, not a weight, and stays out of checkpoints and artifacts.
        self._item_log_prob: Optional[torch.Tensor] = None
        self.action_mode = config.action_mode if num_actions else "none"
        self.num_actions = num_actions if self.action_mode != "none" else 0
        self.space = TokenSpace.build(num_items=num_items, num_actions=self.num_actions)
        self.max_seq_len = max_seq_len
        # Interleaving doubles the tokens; evaluation appends the target item token.
        encoder_len = 2 * max_seq_len + 1 if self.action_mode == "interleaved" else max_seq_len + 1
        d = config.embedding_dim
        # fbgemm's fused tables need a multiple of 4 columns; a model width such as the
        # paper's 50 is stored in 52 columns and the extra ones are never read.
        self.table_dim = table_width(d)
        self.token_embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(
                name=TOKEN_TABLE, embedding_dim=self.table_dim, num_embeddings=self.space.size, feature_names=list(_FEATURES),
                init_fn=partial(nn.init.trunc_normal_, mean=0.0, std=0.02, a=-0.04, b=0.04),
            )],
            device=device,
        )
        if config.name not in ("hstu", "sasrec"):
            raise ValueError(f"GenerativeRetrieval encodes with hstu or sasrec, not {config.name!r}")
        if config.name == "hstu":
            self.encoder: nn.Module = HSTUEncoder(HSTUConfig(
                embedding_dim=d, num_blocks=config.num_blocks, num_heads=config.num_heads,
                attention_dim=config.attention_dim, linear_dim=config.linear_dim, max_seq_len=encoder_len,
                dropout=config.dropout, use_time_bias=config.use_time_bias, kernel=config.kernel,
            ))
        else:
            self.encoder = SASRecEncoder(SASRecConfig(
                embedding_dim=d, num_blocks=config.num_blocks, num_heads=config.num_heads,
                dropout=config.dropout, max_seq_len=encoder_len,
            ))
        self.action_head: Optional[nn.Module] = None
        if self.num_actions and config.action_loss_weight > 0:
            width = d if self.action_mode == "interleaved" else 2 * d
            self.action_head = nn.Linear(width, self.num_actions)

    def table_specs(self) -> List[TableSpec]:
        """The model's embedding tables as the planner sees them (see ``plans``)."""
        return retrieval_tables(self.num_items, self.num_actions, self.config.embedding_dim, self.max_seq_len,
                                self.config.num_negatives, interleaved=self.action_mode == "interleaved")

    # ----------------------------------------------------------------- layout
    def _layout(self, batch: SequenceBatch, append_target: bool) -> _Tokens:
        kjt = batch.features
        items, lengths = kjt[ITEM_KEY].values(), kjt[ITEM_KEY].lengths()
        ts = kjt[TIMESTAMP_KEY].values()
        actions = kjt[ACTION_KEY].values() if self.action_mode != "none" else None
        device = items.device
        item_tokens = self.space.to_tokens("item", items)
        action_tokens = self.space.to_tokens("action", actions) if actions is not None else None
        if append_target:
            # Each row gets its target item token at the end (no action: it is unknown).
            b = lengths.numel()
            row_ends = lengths_to_offsets(lengths)[1:]
            insert_at = row_ends + torch.arange(b, device=device)  # where each target lands in the grown values
            new_len = items.numel() + b
            keep = torch.ones(new_len, dtype=torch.bool, device=device)
            keep[insert_at] = False
            grown = torch.empty(new_len, dtype=torch.int64, device=device)
            grown[keep], grown[insert_at] = item_tokens, self.space.to_tokens("item", batch.target_item)
            grown_ts = torch.empty(new_len, dtype=torch.int64, device=device)
            grown_ts[keep], grown_ts[insert_at] = ts, batch.target_timestamp
            if action_tokens is not None:
                grown_actions = torch.full((new_len,), -1, dtype=torch.int64, device=device)
                grown_actions[keep] = action_tokens
                action_tokens = grown_actions
            item_tokens, ts, lengths = grown, grown_ts, lengths + 1
        if self.action_mode == "interleaved":
            # [item_0, action_0, item_1, action_1, ...]; an appended target has no action token.
            pairs = torch.stack([item_tokens, action_tokens], dim=1).reshape(-1)
            pair_ts = ts.repeat_interleave(2)
            valid = pairs >= 0
            tokens, timestamps = pairs[valid], pair_ts[valid]
            lengths = 2 * lengths - (1 if append_target else 0)
            return _Tokens(tokens, None, timestamps, lengths, lengths_to_offsets(lengths))
        if self.action_mode == "summed" and append_target:
            # The appended target has no action: add the [PAD] token's embedding.
            action_tokens = torch.where(action_tokens < 0, self.space.special("[PAD]"), action_tokens)
        return _Tokens(item_tokens, action_tokens if self.action_mode == "summed" else None,
                       ts, lengths, lengths_to_offsets(lengths))

    def _lookup(self, layout: _Tokens, negatives: Optional[torch.Tensor] = None,
                negative_lengths: Optional[torch.Tensor] = None, catalog: bool = False) -> Dict[str, torch.Tensor]:
        """Looks up every needed token in one KeyedJaggedTensor through the collection."""
        b = layout.lengths.numel()
        device = layout.tokens.device
        zeros = torch.zeros(b, dtype=torch.int64, device=device)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        values = [layout.tokens]
        lengths = [layout.lengths]
        values.append(layout.actions if layout.actions is not None else empty)
        lengths.append(layout.lengths if layout.actions is not None else zeros)
        values.append(negatives if negatives is not None else empty)
        lengths.append(negative_lengths if negative_lengths is not None else zeros)
        if catalog:
            values.append(self.space.to_tokens("item", torch.arange(self.num_items, device=device), validate=False))
            cat_lengths = zeros.clone()
            cat_lengths[0] = self.num_items
            lengths.append(cat_lengths)
        else:
            values.append(empty)
            lengths.append(zeros)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(_FEATURES), values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32)
        )
        out = self.token_embeddings(kjt)
        d = self.config.embedding_dim
        return {k: out[k].values()[:, :d] for k in _FEATURES}

    def _encode(self, layout: _Tokens, emb: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = emb[HISTORY]
        if layout.actions is not None:
            x = x + emb[HISTORY_ACTIONS]
        return self.encoder(x, layout.offsets, layout.timestamps)

    # --------------------------------------------------------------- training
    def forward(self, batch: SequenceBatch) -> Dict[str, torch.Tensor]:
        """Training losses on a TRAIN batch, as sums over this batch's predictions with
        their counts (the trainer turns them into the global mean across ranks).

        Returns:
            Dict[str, torch.Tensor]: ``item_loss_sum`` over ``queries`` next-item
            predictions; with the action head, ``action_loss_sum`` and ``action_correct``
            over ``actions`` predictions; ``tokens`` encoded.
        """
        cfg = self.config
        layout = self._layout(batch, append_target=False)
        event_lengths = batch.features[ITEM_KEY].lengths()
        items = batch.features[ITEM_KEY].values()
        b = event_lengths.numel()
        num_events = items.numel()
        event_offsets = lengths_to_offsets(event_lengths)
        event_pos = positions_in_sequence(event_offsets, num_events)
        event_row = sequence_ids(event_offsets, num_events)
        is_query = event_pos < (event_lengths[event_row] - 1)  # every event but each row's last
        query_event = torch.nonzero(is_query).squeeze(1)
        positive_items = items[query_event + 1]
        query_row = event_row[query_event]

        negatives = negative_lengths = None
        uniform_items = shared_items = None
        if cfg.loss == "sampled_softmax":
            k = cfg.num_negatives
            # Per-row (uniform) negatives row by row, then the shared in-batch ones as the
            # last row's extra list: values stay in row order for the jagged lookup.
            negative_lengths = torch.zeros(b, dtype=torch.int64, device=items.device)
            chunks = []
            if cfg.negatives in ("uniform", "mixed"):
                uniform_items = self.uniform_negatives(batch.user, int(self.step))  # (B, K)
                negative_lengths += k
                chunks.append(uniform_items.reshape(-1))
            if cfg.negatives in ("in_batch", "mixed"):  # in-batch negatives depend on the batch by definition
                pick = torch.randint(0, num_events, (k,)).to(items.device)
                shared_items = items[pick]  # (K,)
                negative_lengths[-1] += k
                chunks.append(shared_items)
            negatives = self.space.to_tokens("item", torch.cat(chunks), validate=False)
        emb = self._lookup(layout, negatives, negative_lengths, catalog=cfg.loss == "full_softmax")
        h = self._encode(layout, emb)

        # Token index of each event's item token (and of the token whose output predicts the next item).
        if self.action_mode == "interleaved":
            item_token_idx = 2 * torch.arange(num_events, device=items.device)
            query_token_idx = item_token_idx[query_event] + 1  # the action token
        else:
            item_token_idx = torch.arange(num_events, device=items.device)
            query_token_idx = query_event
        user = _normalize(h[query_token_idx])  # (Q, D)
        item_emb = emb[HISTORY][item_token_idx]  # pure item embeddings, (E, D)
        positive = _normalize(item_emb[query_event + 1])
        pos_logit = (user * positive).sum(-1, keepdim=True)  # (Q, 1)

        if cfg.loss == "full_softmax":
            catalog = _normalize(emb[CATALOG])  # (N, D)
            logits = user @ catalog.T
            item_loss_sum = F.cross_entropy(logits / cfg.temperature, positive_items, reduction="sum",
                                            label_smoothing=cfg.label_smoothing)
        else:
            k = cfg.num_negatives
            neg = _normalize(emb[NEGATIVES])
            columns, masks = [pos_logit / cfg.temperature], []
            correct = cfg.logq_correction and cfg.negatives != "uniform"
            if correct:
                log_q = self._log_prob(items.device)
                columns[0] = columns[0] - log_q[positive_items].unsqueeze(1)
            if uniform_items is not None:
                # Per-row negatives: scatter the queries into (B, Lq, D) and take one batched
                # matmul; fbgemm's CPU jagged_dense_bmm is several times slower here.
                row_negatives = neg[:b * k].reshape(b, k, -1)
                q_counts = torch.bincount(query_row, minlength=b)
                q_pos = positions_in_sequence(lengths_to_offsets(q_counts), len(query_row))
                padded = user.new_zeros(b, int(q_counts.max()) if q_counts.numel() else 0, user.shape[1])
                padded = padded.index_put((query_row, q_pos), user)
                logits = torch.bmm(padded, row_negatives.transpose(1, 2))[query_row, q_pos] / cfg.temperature
                if correct:
                    logits = logits + math.log(self.num_items)  # - log(1/N)
                columns.append(logits)
                masks.append(uniform_items[query_row] == positive_items.unsqueeze(1))
            if shared_items is not None:
                logits = user @ neg[-k:].T / cfg.temperature
                if correct:
                    logits = logits - log_q[shared_items].unsqueeze(0)
                columns.append(logits)
                masks.append(shared_items.unsqueeze(0) == positive_items.unsqueeze(1))
            logits = torch.cat(columns, dim=1)
            # A negative equal to the positive is not a negative.
            same = torch.cat([torch.zeros_like(masks[0][:, :1]), *masks], dim=1)
            item_loss_sum = _sampled_cross_entropy(logits, same, cfg.label_smoothing)

        action_loss_sum = action_correct = None
        num_actions_predicted = 0
        if self.action_head is not None:
            actions = batch.features[ACTION_KEY].values()
            if self.action_mode == "interleaved":
                # The item token's output predicts the action taken on that item.
                action_logits = self.action_head(h[item_token_idx])
                action_target = actions
            else:
                # Output at event i plus the next item's embedding predicts the next action.
                action_logits = self.action_head(torch.cat([h[query_token_idx], item_emb[query_event + 1]], dim=1))
                action_target = actions[query_event + 1]
            action_loss_sum = F.cross_entropy(action_logits, action_target, reduction="sum")
            action_correct = (action_logits.argmax(1) == action_target).sum()
            num_actions_predicted = len(action_target)
        if self.training:
            self.step += 1
        out = {"item_loss_sum": item_loss_sum, "queries": len(query_event), "tokens": layout.tokens.numel()}
        if action_loss_sum is not None:
            out.update(action_loss_sum=action_loss_sum, action_correct=action_correct, actions=num_actions_predicted)
        return out

    def set_item_frequencies(self, counts: torch.Tensor) -> None:
        """Training-event count of every item ``(N,)``: the sampling probability of in-batch
        negatives, for logQ correction (an item never seen counts as half an event)."""
        counts = counts.to(torch.float64).clamp_min(0.5)
        self._item_log_prob = (counts / counts.sum()).log().to(torch.float32)

    def _log_prob(self, device: torch.device) -> torch.Tensor:
        if self._item_log_prob is None:
            raise RuntimeError("logQ correction needs the training item frequencies: call set_item_frequencies "
                               "(RetrievalTask does), or set model.logq_correction=false")
        if self._item_log_prob.device != device:
            self._item_log_prob = self._item_log_prob.to(device)
        return self._item_log_prob

    def uniform_negatives(self, users: torch.Tensor, step: int) -> torch.Tensor:
        """The ``(B, K)`` item ids sampled as negatives for these users at this training step:
        a pure function of (seed, step, user), whatever rank or batch the user is in."""
        k = self.config.num_negatives
        return keyed_randint(self.num_items, self.seed, step, users.to(torch.int64).unsqueeze(1),
                             torch.arange(k, device=users.device))

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score(self, batch: SequenceBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores the whole catalogue for each history of a VALID/TEST batch.

        Returns:
            Tuple[torch.Tensor, Optional[torch.Tensor]]: ``(B, N)`` cosine scores of all
            items, and ``(B, A)`` logits of the action on the target item (or None).
        """
        with_action = self.action_head is not None and batch.target_item is not None
        layout = self._layout(batch, append_target=with_action)
        emb = self._lookup(layout, catalog=True)
        h = self._encode(layout, emb)
        ends = layout.offsets[1:]
        # With an appended target, the user state is the token before it.
        user_idx = ends - (2 if with_action else 1)
        user = _normalize(h[user_idx])
        scores = user @ _normalize(emb[CATALOG]).T
        action_logits = None
        if with_action:
            if self.action_mode == "interleaved":
                action_logits = self.action_head(h[ends - 1])
            else:
                target_emb = emb[HISTORY][ends - 1]
                action_logits = self.action_head(torch.cat([h[user_idx], target_emb], dim=1))
        return scores, action_logits
