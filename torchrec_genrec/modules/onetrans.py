"""OneTrans: feature interaction and sequence modeling with one transformer (ByteDance).

One causal transformer runs over a single token sequence per request::

    [ S-tokens (behaviour sequence, oldest first) ; NS-tokens (non-sequential features) ]

Per layer, pre-norm with RMSNorm::

    x = x + Attn(RMSNorm(x))          causal over the token order, padded S-tokens never attended
    x = x + FFN(RMSNorm(x))           FFN = Linear(D, F) -> GELU -> Linear(F, D)

Mixed parameterisation: every S-token uses one shared set of weights (QKV, attention output,
FFN, both norms); NS-token ``i`` has its own set, stored as ``(L_NS, ...)`` banks and applied to
all NS-tokens at once with ``einsum``. The NS-tokens are heterogeneous features (user profile,
candidate item, context...), so they get their own weights; the S-tokens are homogeneous events.

Pyramid stacking: layer ``l`` computes queries only for its last tokens: all NS-tokens and
``S_{l+1}`` of its S-tokens, while keys and values cover all its tokens. The S side shrinks
layer by layer (:func:`pyramid_schedule`), which is where the compute saving comes from
(:func:`flops_per_sample`). The stack returns the NS-token states after the last layer.

Serving splits the stack in two (:meth:`OneTrans.encode_sequence` and
:meth:`OneTrans.forward_cached`): since S-tokens come first and attention is causal, no S-token
ever sees an NS-token, so the whole S side, and every layer's S keys and values, depends on
the user only. Stage I computes it once per request; Stage II runs just the NS-tokens of each
candidate against the cached keys and values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# One explicit eps for every RMSNorm (shared and per-token), so both paths normalise alike.
_RMS_NORM_EPS = 1e-6

_PYRAMIDS = ("linear", "none")
_SELECTIONS = ("recency", "scorer_topk", "scorer_threshold")


@dataclasses.dataclass
class OneTransConfig:
    """Hyper-parameters of :class:`OneTrans`.

    Args:
        embedding_dim (int): model width D; the S- and NS-token embeddings given to the
            stack must already have this width.
        num_layers (int): transformer layers (at least 1).
        num_heads (int): attention heads; must divide ``embedding_dim``.
        ffn_dim (Optional[int]): hidden width F of the feed-forward network; ``None`` means
            ``4 * embedding_dim``.
        num_ns_tokens (int): L_NS, the number of non-sequential tokens per request.
        dropout (float): dropout on the attention and FFN outputs before each residual add.
        pyramid (str): ``linear``: the number of S-tokens a layer keeps as queries falls
            linearly from the input S length to ``pyramid_min_s_tokens`` over the layers;
            ``none``: every layer keeps all its tokens (a plain transformer).
        pyramid_min_s_tokens (int): S-tokens left after the last layer under ``linear``.
            The default 0 lets the last layer compute queries for the NS-tokens only, which is
            all the stack returns: last-layer S queries would be pure waste.
        selection (str): which S-tokens survive a layer. ``recency`` keeps the most recent
            ones (the last positions, S-tokens being given oldest first and left-padded);
            ``scorer_topk`` keeps the top-scored valid ones by a learned per-layer scorer, in
            their temporal order; ``scorer_threshold`` does the same and additionally drops
            (treats as padding from the next layer on) kept tokens whose
            ``sigmoid(score) < score_threshold``.
        score_threshold (float): the threshold of ``scorer_threshold``, in ``[0, 1]``.
        shared_ns_params (bool): NS-tokens use the S-token weights too (the "shared-only"
            ablation) instead of a weight set per NS-token.
        max_s_tokens (Optional[int]): the longest S input the model takes; the pyramid
            schedule is computed for it, and a layer keeps ``min(schedule, its input)``
            tokens. With left padding that is what a request padded to ``max_s_tokens``
            would keep, so a request's scores do not depend on how far its batch pads it.
            None: the schedule follows each batch's padded length (fine for fixed-length
            inputs).
    """

    embedding_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_dim: Optional[int] = None
    num_ns_tokens: int = 8
    dropout: float = 0.0
    pyramid: str = "linear"
    pyramid_min_s_tokens: int = 0
    selection: str = "recency"
    score_threshold: float = 0.5
    shared_ns_params: bool = False
    max_s_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_heads <= 0 or self.embedding_dim % self.num_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be positive and divide embedding_dim ({self.embedding_dim})"
            )
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive or None (= 4 * embedding_dim), got {self.ffn_dim}")
        if self.num_ns_tokens < 1:
            raise ValueError(f"num_ns_tokens must be >= 1, got {self.num_ns_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pyramid not in _PYRAMIDS:
            raise ValueError(f"pyramid must be one of {_PYRAMIDS}, got {self.pyramid!r}")
        if self.pyramid_min_s_tokens < 0:
            raise ValueError(f"pyramid_min_s_tokens must be >= 0, got {self.pyramid_min_s_tokens}")
        if self.selection not in _SELECTIONS:
            raise ValueError(f"selection must be one of {_SELECTIONS}, got {self.selection!r}")
        if self.max_s_tokens is not None and self.max_s_tokens < 0:
            raise ValueError(f"max_s_tokens must be >= 0 or None, got {self.max_s_tokens}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")

    @property
    def ffn_hidden_dim(self) -> int:
        """F: ``ffn_dim``, or ``4 * embedding_dim`` when it is None."""
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.embedding_dim


def pyramid_schedule(config: OneTransConfig, s_len: int) -> List[int]:
    """How many S-tokens each layer keeps as queries (and hands to the next layer).

    Under ``linear``, with ``S = s_len``, ``S_min = min(pyramid_min_s_tokens, S)`` and
    ``n = num_layers``: ``S_l = S - round((S - S_min) * l / n)`` for ``l = 1..n``, the
    rounding half up; so ``S_n = S_min`` and the counts never grow. Under ``none``: ``S``
    for every layer.

    Args:
        config (OneTransConfig): the stack's configuration.
        s_len (int): padded S length at the input of the stack.

    Returns:
        List[int]: ``[S_1, ..., S_n]``, one per layer.

    Example::

        pyramid_schedule(OneTransConfig(num_layers=3), 7)   # [5, 2, 0]
    """
    n = config.num_layers
    if config.pyramid == "none":
        return [s_len] * n
    dropped = s_len - min(config.pyramid_min_s_tokens, s_len)
    # Integer half-up rounding of dropped * l / n, so no float edge case decides a count.
    return [s_len - (2 * dropped * layer + n) // (2 * n) for layer in range(1, n + 1)]


def flops_per_sample(config: OneTransConfig, s_len: int, pyramid: Optional[str] = None) -> int:
    """Multiply-adds of one :meth:`OneTrans.forward` row (one request with ``s_len`` S-tokens).

    Counts the matrix products, each multiply-add once (double it for FLOPs in the
    two-per-multiply-add convention): the S keys/values over a layer's S input, the queries,
    attention output and FFN over the tokens it keeps, the NS projections, the scorer, and
    the attention scores and weighted sum over the full (masked) query-by-key matrix, as
    ``scaled_dot_product_attention`` computes it. Norms, softmax, biases and activations are
    left out. The counts are exact for the tensors the module builds.

    Args:
        config (OneTransConfig): the stack's configuration.
        s_len (int): padded S length of the request.
        pyramid (Optional[str]): overrides ``config.pyramid`` (``linear`` or ``none``), to
            compare both with one config.

    Returns:
        int: multiply-adds of the stack for one request.

    Example::

        config = OneTransConfig(embedding_dim=64, num_layers=4)
        saved = 1 - flops_per_sample(config, 512) / flops_per_sample(config, 512, pyramid="none")
    """
    if pyramid is not None:
        config = dataclasses.replace(config, pyramid=pyramid)
    d, f, num_ns = config.embedding_dim, config.ffn_hidden_dim, config.num_ns_tokens
    total = 0
    s_in = s_len
    for keep in pyramid_schedule(config, s_len):
        queries, keys = keep + num_ns, s_in + num_ns
        total += s_in * d * 2 * d  # S keys and values, over all S-tokens of the layer
        total += keep * d * d  # S queries, over the kept S-tokens only
        total += num_ns * d * 3 * d  # NS queries, keys and values
        if config.selection != "recency":
            total += s_in * d  # the scorer
        total += 2 * queries * keys * d  # q·k scores and the weighted sum of values
        total += queries * (d * d + 2 * d * f)  # attention output projection and FFN
        s_in = keep
    return total


class _PerTokenLinear(nn.Module):
    """A linear layer per token: token ``i`` of ``x (..., L, in)`` goes through its own
    ``weight[i] (in, out)`` and ``bias[i]``, all tokens in one batched matmul.

    Args:
        num_tokens (int): L.
        in_features (int): input width.
        out_features (int): output width.
    """

    def __init__(self, num_tokens: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tokens, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_tokens, out_features))
        # nn.Linear's default initialisation, token by token.
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., L, in)`` -> ``(..., L, out)``."""
        if x.dim() == 3:
            # One batched matmul per token with the bias folded in (the result stays token-major
            # in memory, a transposed view): a separate broadcast bias add over a transposed
            # einsum result costs as much as the matmul at serving sizes.
            return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight).transpose(0, 1)
        return torch.einsum("...li,lio->...lo", x, self.weight) + self.bias


class _PerTokenRMSNorm(nn.Module):
    """RMSNorm with a scale vector per token: ``x (..., L, D)``, ``weight (L, D)``.

    Args:
        num_tokens (int): L.
        dim (int): D.
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(num_tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., L, D)`` -> ``(..., L, D)``."""
        return F.rms_norm(x, (self.dim,), eps=_RMS_NORM_EPS) * self.weight


def _rms_norm(dim: int, num_tokens: Optional[int]) -> nn.Module:
    """A shared RMSNorm (``num_tokens=None``) or one per token."""
    return nn.RMSNorm(dim, eps=_RMS_NORM_EPS) if num_tokens is None else _PerTokenRMSNorm(num_tokens, dim)


def _linear(in_features: int, out_features: int, num_tokens: Optional[int]) -> nn.Module:
    """A shared linear layer (``num_tokens=None``) or one per token."""
    return nn.Linear(in_features, out_features) if num_tokens is None else _PerTokenLinear(
        num_tokens, in_features, out_features)


class _BlockWeights(nn.Module):
    """The weights of one transformer block for one kind of token: shared by every token
    (``num_tokens=None``; any number of tokens) or one set per token (exactly
    ``num_tokens`` tokens, on the second-to-last dim). Every member maps ``(..., T, in)``
    to ``(..., T, out)`` either way.

    Args:
        dim (int): D.
        ffn_dim (int): F.
        num_tokens (Optional[int]): None for shared weights, else the number of tokens.
    """

    def __init__(self, dim: int, ffn_dim: int, num_tokens: Optional[int]) -> None:
        super().__init__()
        self.attention_norm = _rms_norm(dim, num_tokens)
        self.qkv = _linear(dim, 3 * dim, num_tokens)  # output laid out as [q | k | v]
        self.attention_output = _linear(dim, dim, num_tokens)
        self.ffn_norm = _rms_norm(dim, num_tokens)
        self.ffn_in = _linear(dim, ffn_dim, num_tokens)
        self.ffn_out = _linear(ffn_dim, dim, num_tokens)


@dataclasses.dataclass
class OneTransCache:
    """Stage-I output of :meth:`OneTrans.encode_sequence`: the S side of every layer for B
    requests. Layer ``l``'s entries describe the ``S_l`` S-tokens entering that layer
    (``S_0`` = the padded input length), which are the S keys and values its NS queries see.

    Args:
        keys (List[torch.Tensor]): per layer, ``(B, S_l, D)`` attention keys.
        values (List[torch.Tensor]): per layer, ``(B, S_l, D)`` attention values.
        valid (List[torch.Tensor]): per layer, ``(B, S_l)`` bool, False for padding (and for
            tokens dropped by ``scorer_threshold``).
        positions (List[torch.Tensor]): per layer, ``(B, S_l)`` int64 positions in the input
            sequence.
        s_len (int): padded S length of the encoded input; NS-token ``i`` sits at position
            ``s_len + i``.
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    valid: List[torch.Tensor]
    positions: List[torch.Tensor]
    s_len: int

    @property
    def num_requests(self) -> int:
        """B, the number of cached requests (rows)."""
        return self.valid[0].shape[0]


@dataclasses.dataclass
class _KeptSTokens:
    """The S-tokens a layer keeps as queries, gathered from its input (K of them per row).

    Args:
        states (torch.Tensor): ``(B, K, D)`` residual states.
        normed (torch.Tensor): ``(B, K, D)`` the same after the attention norm.
        valid (torch.Tensor): ``(B, K)`` bool, for the next layer.
        positions (torch.Tensor): ``(B, K)`` int64.
        gate (Optional[torch.Tensor]): ``(B, K)`` sigmoid of the scores, or None (recency).
    """

    states: torch.Tensor
    normed: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    gate: Optional[torch.Tensor]


@dataclasses.dataclass
class _CandidateGrid:
    """Stage II's layout of C candidates by request: a padded grid of ``num_rows`` rows of
    ``slots`` candidates, each grid row holding candidates of one request (its ``source`` cache
    row), flattened to ``num_rows * slots`` entries. Attention then runs per grid row against
    that row's cached keys and values, with no copy of them per candidate; unused entries hold
    zeros and are never read back.

    ``slots = ceil(C / requests with a candidate)``, and a request with more candidates than
    that takes several grid rows. So the grid has at most about ``2 C`` entries however skewed
    the candidate counts are (one row per request would pad every request to the largest), and
    at most about twice as many rows as requests. One request: one row of C slots. One
    candidate per request, in order (pointwise batches): one row per request of one slot.

    Args:
        num_rows (int): grid rows.
        slots (int): candidates per grid row.
        sources (Optional[torch.Tensor]): ``(num_rows,)`` int64 cache row of each grid row;
            None when grid row ``i`` is cache row ``i``, for every cache row.
        positions (Optional[torch.Tensor]): ``(C,)`` int64 flat grid entry of each candidate;
            None when the grid is the candidates themselves, in order (no scatter or gather).
    """

    num_rows: int
    slots: int
    sources: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]

    @classmethod
    def build(cls, request_index: torch.Tensor, num_requests: int) -> "_CandidateGrid":
        """The grid of ``request_index`` ``(C,)`` over ``num_requests`` cache rows."""
        c = request_index.shape[0]
        if c:
            low, high = torch.aminmax(request_index)
            if int(low) < 0 or int(high) >= num_requests:
                raise ValueError(f"request_index must lie in [0, {num_requests}), got values in "
                                 f"[{int(low)}, {int(high)}]")
        if num_requests == 1 or c == 0:
            return cls(num_requests, c if num_requests == 1 else 0, None, None)
        counts = torch.bincount(request_index, minlength=num_requests)
        slots = -(-c // int(torch.count_nonzero(counts)))
        row_counts = (counts + slots - 1) // slots  # grid rows per request
        num_rows = int(row_counts.sum())
        # Rank of each candidate among its request's, in input order: a stable sort groups them.
        sorted_index, order = torch.sort(request_index, stable=True)
        rank = torch.arange(c, device=request_index.device) - (counts.cumsum(0) - counts)[sorted_index]
        first_row = row_counts.cumsum(0) - row_counts
        entry = (first_row[sorted_index] + rank // slots) * slots + rank % slots
        positions = torch.empty_like(request_index).scatter_(0, order, entry)
        sources = torch.repeat_interleave(torch.arange(num_requests, device=counts.device), row_counts,
                                          output_size=num_rows)
        if num_rows == num_requests and torch.equal(sources, torch.arange(num_requests, device=sources.device)):
            sources = None
        if num_rows * slots == c and torch.equal(positions, torch.arange(c, device=positions.device)):
            positions = None
        return cls(num_rows, slots, sources, positions)

    def cache_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, ...)`` cache rows -> ``(num_rows, ...)``, one per grid row."""
        return x if self.sources is None else x.index_select(0, self.sources)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, ...)`` -> ``(num_rows * slots, ...)``, zeros in the unused entries."""
        if self.positions is None:
            return x
        return x.new_zeros((self.num_rows * self.slots, *x.shape[1:])).index_copy(0, self.positions, x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(num_rows * slots, ...)`` -> ``(C, ...)``."""
        return x if self.positions is None else x.index_select(0, self.positions)


def _add_weighted_values(out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out + weights @ values`` for a batch of tiny matrices: ``(B, Q, V)``, ``(B, Q, K)``,
    ``(B, K, V)``.

    PyTorch's CPU ``bmm`` runs matrices under 400 multiply-adds (``Q * K * V``) through a scalar
    loop, far slower than one broadcast multiply-add per key, which is what it does for them
    here (the NS-part of Stage II with few NS-tokens and narrow heads); larger ones, and other
    devices, go to ``baddbmm``.
    """
    num_keys = weights.shape[-1]
    if out.device.type != "cpu" or weights.shape[1] * num_keys * values.shape[-1] >= 400:
        return torch.baddbmm(out, weights, values)
    for key in range(num_keys):
        out = torch.addcmul(out, weights[..., key:key + 1], values[:, key:key + 1])
    return out


def _attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                    key_valid: torch.Tensor) -> torch.Tensor:
    """``(B, 1, Q, K)`` bool, True = attend: causal by input position, valid keys only.

    A query always sees its own key, valid or not: a padded S query would otherwise have no key
    at all and ``scaled_dot_product_attention`` would give NaN for it. Padded queries' outputs
    are never read by valid tokens, since they stay invalid as keys.
    """
    q = query_positions.unsqueeze(-1)  # (B, Q, 1)
    k = key_positions.unsqueeze(-2)  # (B, 1, K)
    return (((k <= q) & key_valid.unsqueeze(-2)) | (k == q)).unsqueeze(1)


class OneTransBlock(nn.Module):
    """One OneTrans layer: pre-norm causal attention and FFN, S-tokens on shared weights,
    NS-tokens on their own, queries for the kept S-tokens and all NS-tokens only.

    Three ways to run it, all computing the same numbers for the NS-tokens:
    :meth:`forward` attends over the joint ``[S ; NS]`` sequence; :meth:`encode_sequence`
    runs the S side alone (Stage I); :meth:`forward_ns` runs the NS side of C candidates
    against the S keys and values cached per request (Stage II).

    Scorer selections (``scorer_topk``, ``scorer_threshold``): a ``Linear(D, 1)`` scores each
    normalised S input state; the top-``keep`` valid ones survive, in temporal order. The
    choice itself has no gradient, so each kept token's new state is scaled by
    ``sigmoid(score)``: a token the scorer rates low contributes less downstream, which is the
    signal that trains the scorer. (A straight-through estimator, unit gate forward and the
    sigmoid's gradient backward, is the alternative that leaves the forward states unscaled.)

    Args:
        config (OneTransConfig): the stack's configuration.

    Example::

        block = OneTransBlock(OneTransConfig(embedding_dim=8, num_ns_tokens=2))
        s, ns = torch.randn(1, 4, 8), torch.randn(1, 2, 8)
        s_pos, ns_pos = torch.arange(4).view(1, 4), torch.tensor([[4, 5]])
        s2, valid2, pos2, ns2 = block(s, torch.ones(1, 4, dtype=torch.bool), s_pos, ns, ns_pos, keep=2)
        # s2 (1, 2, 8) holds positions 2 and 3; ns2 (1, 2, 8)
    """

    def __init__(self, config: OneTransConfig) -> None:
        super().__init__()
        self.config = config
        d, f = config.embedding_dim, config.ffn_hidden_dim
        self.num_heads = config.num_heads
        self.s_weights = _BlockWeights(d, f, num_tokens=None)
        self.ns_weights = None if config.shared_ns_params else _BlockWeights(d, f, config.num_ns_tokens)
        self.scorer = nn.Linear(d, 1) if config.selection != "recency" else None
        self.dropout = nn.Dropout(config.dropout)

    @property
    def _ns(self) -> _BlockWeights:
        return self.s_weights if self.ns_weights is None else self.ns_weights

    def forward(self, s_states: torch.Tensor, s_valid: torch.Tensor, s_positions: torch.Tensor,
                ns_states: torch.Tensor, ns_positions: torch.Tensor,
                keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer over the joint ``[S ; NS]`` sequence, one attention call.

        Args:
            s_states (torch.Tensor): ``(B, S_l, D)`` S-token states.
            s_valid (torch.Tensor): ``(B, S_l)`` bool.
            s_positions (torch.Tensor): ``(B, S_l)`` int64 input positions.
            ns_states (torch.Tensor): ``(B, L_NS, D)``.
            ns_positions (torch.Tensor): ``(B, L_NS)`` int64, after every S position.
            keep (int): S-tokens kept as queries, ``0 <= keep <= S_l``.

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: the kept S-tokens'
            states ``(B, keep, D)``, valid ``(B, keep)`` and positions ``(B, keep)``, and the
            NS states ``(B, L_NS, D)``.
        """
        s_normed = self.s_weights.attention_norm(s_states)
        s_keys, s_values = self._s_keys_values(s_normed)
        kept = self._select(s_states, s_normed, s_valid, s_positions, keep)
        ns_queries, ns_keys, ns_values = self._ns_qkv(ns_states)
        attended = self._attend(
            torch.cat([self._s_queries(kept.normed), ns_queries], dim=1),
            torch.cat([s_keys, ns_keys], dim=1),
            torch.cat([s_values, ns_values], dim=1),
            torch.cat([kept.positions, ns_positions], dim=1),
            torch.cat([s_positions, ns_positions], dim=1),
            torch.cat([s_valid, torch.ones_like(ns_positions, dtype=torch.bool)], dim=1),
        )
        s_attended, ns_attended = attended.split([keep, ns_states.shape[1]], dim=1)
        return (self._s_update(kept, s_attended), kept.valid, kept.positions,
                self._residual_and_ffn(self._ns, ns_states, ns_attended))

    def encode_sequence(self, s_states: torch.Tensor, s_valid: torch.Tensor, s_positions: torch.Tensor,
                        keep: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, Optional[_KeptSTokens]]:
        """The S side of the layer alone (S-tokens never see NS-tokens).

        Args:
            s_states (torch.Tensor): ``(B, S_l, D)``.
            s_valid (torch.Tensor): ``(B, S_l)`` bool.
            s_positions (torch.Tensor): ``(B, S_l)`` int64.
            keep (Optional[int]): S-tokens kept as queries; None skips the queries (the last
                layer, whose S outputs nothing reads).

        Returns:
            Tuple[torch.Tensor, torch.Tensor, Optional[_KeptSTokens]]: the S keys and values
            ``(B, S_l, D)``, and the kept tokens with their new states (None when ``keep`` is).
        """
        s_normed = self.s_weights.attention_norm(s_states)
        s_keys, s_values = self._s_keys_values(s_normed)
        if keep is None:
            return s_keys, s_values, None
        kept = self._select(s_states, s_normed, s_valid, s_positions, keep)
        attended = self._attend(self._s_queries(kept.normed), s_keys, s_values,
                                kept.positions, s_positions, s_valid)
        kept.states = self._s_update(kept, attended)
        return s_keys, s_values, kept

    def forward_ns(self, ns_states: torch.Tensor, s_keys: torch.Tensor, s_values: torch.Tensor,
                   s_valid: Optional[torch.Tensor], causal_bias: torch.Tensor, grid: _CandidateGrid) -> torch.Tensor:
        """The NS side of the layer against cached S keys and values, one row of them per grid row.

        Every S position precedes the NS positions, so the NS queries see all valid S keys,
        and the NS keys causally. The S-part scores are one batched matmul per (grid row, head)
        against that row's keys, no copy of them per candidate; the NS-part scores one small
        product per (candidate, head); one softmax covers both. NS-token ``i`` always sees
        itself, so no row is fully masked, even for a request without a valid S-token.

        Args:
            ns_states (torch.Tensor): ``(C, L_NS, D)``.
            s_keys (torch.Tensor): ``(N, S_l, D)``, N = ``grid.num_rows``.
            s_values (torch.Tensor): ``(N, S_l, D)``.
            s_valid (Optional[torch.Tensor]): ``(N, S_l)`` bool; None when all are valid.
            causal_bias (torch.Tensor): ``(L_NS, L_NS)``, 0 where NS key ``j <= i``, else -inf.
            grid (_CandidateGrid): where each candidate sits.

        Returns:
            torch.Tensor: ``(C, L_NS, D)`` NS states after the layer.
        """
        num_ns, d = ns_states.shape[1:]
        h, m = self.num_heads, grid.slots
        dh = d // h
        n, s_len = s_keys.shape[:2]
        rows = n * h * m  # (grid row, head, slot) triples
        ns = self._ns
        qkv = grid.scatter(ns.qkv(ns.attention_norm(ns_states)))  # (N * slots, L_NS, 3D)
        # Heads first, (N, H, slots, L_NS, D / H) each: one copy of the (small) NS projections.
        q, k, v = qkv.view(n, m, num_ns, 3, h, dh).permute(3, 0, 4, 1, 2, 5).contiguous()
        # (N * H, D / H, S_l) and (N * H, S_l, D / H): copies of the cache rows, not per candidate.
        s_keys = s_keys.reshape(n, s_len, h, dh).permute(0, 2, 3, 1).reshape(n * h, dh, s_len)
        s_values = s_values.reshape(n, s_len, h, dh).transpose(1, 2).reshape(n * h, s_len, dh)
        q = q * (1.0 / math.sqrt(dh))  # scaled here: q is smaller than the scores
        # S part, (N * H, slots * L_NS, S_l): all NS queries of a grid row against its S keys.
        if s_valid is None:
            s_scores = torch.bmm(q.view(n * h, m * num_ns, dh), s_keys)
        else:  # -inf on the invalid keys, a (N * H, 1, S_l) bias
            s_bias = s_keys.new_zeros(n, 1, 1, s_len).masked_fill_(~s_valid.view(n, 1, 1, s_len), float("-inf"))
            s_scores = torch.baddbmm(s_bias.expand(n, h, 1, s_len).reshape(n * h, 1, s_len),
                                     q.view(n * h, m * num_ns, dh), s_keys)
        # NS part, (N * H * slots, L_NS, L_NS): each candidate's NS queries against its NS keys.
        ns_scores = torch.baddbmm(causal_bias, q.view(rows, num_ns, dh), k.view(rows, num_ns, dh).transpose(1, 2))
        weights = torch.cat([s_scores.view(rows, num_ns, s_len), ns_scores], dim=-1).softmax(dim=-1)
        s_weights, ns_weights = weights.split([s_len, num_ns], dim=-1)
        attended = torch.bmm(s_weights.reshape(n * h, m * num_ns, s_len), s_values).view(rows, num_ns, dh)
        attended = _add_weighted_values(attended, ns_weights, v.view(rows, num_ns, dh))
        attended = attended.view(n, h, m, num_ns, dh).permute(0, 2, 3, 1, 4).reshape(n * m, num_ns, d)
        return self._residual_and_ffn(ns, ns_states, grid.gather(attended))

    def _s_keys_values(self, s_normed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every S-token (the q rows of the shared QKV are skipped)."""
        d = self.config.embedding_dim
        qkv = self.s_weights.qkv
        keys_values = F.linear(s_normed, qkv.weight[d:], qkv.bias[d:])
        return keys_values[..., :d], keys_values[..., d:]

    def _s_queries(self, kept_normed: torch.Tensor) -> torch.Tensor:
        """Queries of the kept S-tokens only: this is the pyramid's saving."""
        d = self.config.embedding_dim
        qkv = self.s_weights.qkv
        return F.linear(kept_normed, qkv.weight[:d], qkv.bias[:d])

    def _ns_qkv(self, ns_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ns = self._ns
        return ns.qkv(ns.attention_norm(ns_states)).chunk(3, dim=-1)

    def _select(self, s_states: torch.Tensor, s_normed: torch.Tensor, s_valid: torch.Tensor,
                s_positions: torch.Tensor, keep: int) -> _KeptSTokens:
        """The ``keep`` S-tokens that issue queries in this layer and survive it."""
        if self.scorer is None:
            # Recency: left padding puts the most recent tokens last.
            start = s_states.shape[1] - keep
            return _KeptSTokens(s_states[:, start:], s_normed[:, start:], s_valid[:, start:],
                                s_positions[:, start:], gate=None)
        scores = self.scorer(s_normed).squeeze(-1)  # (B, S_l)
        ranked = scores.masked_fill(~s_valid, float("-inf"))
        # Sorted indices keep the temporal order of the kept tokens.
        index = ranked.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep)
        gate = torch.sigmoid(scores.gather(1, index))
        valid = s_valid.gather(1, index)
        if self.config.selection == "scorer_threshold":
            valid = valid & (gate >= self.config.score_threshold)
        rows = index.unsqueeze(-1).expand(-1, -1, s_states.shape[-1])
        return _KeptSTokens(s_states.gather(1, rows), s_normed.gather(1, rows), valid,
                            s_positions.gather(1, index), gate)

    def _attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Multi-head attention: ``(B, Q, D)`` queries over ``(B, K, D)`` keys -> ``(B, Q, D)``."""
        b, q_len, d = queries.shape
        k_len, h = keys.shape[1], self.num_heads

        def heads(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.reshape(b, length, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(queries, q_len), heads(keys, k_len), heads(values, k_len),
            attn_mask=_attention_mask(query_positions, key_positions, key_valid),
        )  # (B, H, Q, D / H)
        return out.transpose(1, 2).reshape(b, q_len, d)

    def _residual_and_ffn(self, weights: _BlockWeights, states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        states = states + self.dropout(weights.attention_output(attended))
        ffn = weights.ffn_out(F.gelu(weights.ffn_in(weights.ffn_norm(states))))
        return states + self.dropout(ffn)

    def _s_update(self, kept: _KeptSTokens, attended: torch.Tensor) -> torch.Tensor:
        states = self._residual_and_ffn(self.s_weights, kept.states, attended)
        # The scorer's only gradient path: see the class docstring.
        return states if kept.gate is None else states * kept.gate.unsqueeze(-1)


class OneTrans(nn.Module):
    """The OneTrans stack: one causal transformer over ``[S-tokens ; NS-tokens]``.

    Inputs are embedded by the caller. S-tokens come oldest first and LEFT-padded (the most
    recent event in the last column), which is what ``recency`` selection relies on; the
    scorer selections accept padding anywhere. Padded S values are ignored (zeroed on entry).
    A row may have no valid S-token: its NS-tokens then attend to NS-tokens only.

    Output: the NS-token states after the last layer and a final RMSNorm (per NS-token, or
    shared when ``shared_ns_params``), ``(B, L_NS, D)``.

    Serving (one user request, C candidates whose features make up the NS-tokens)::

        cache = model.encode_sequence(s_tokens, s_valid)           # Stage I, per request
        out = model.forward_cached(cache, ns_tokens, request_index)  # Stage II, per candidate

    equals ``model(s_tokens[request_index], s_valid[request_index], ns_tokens)``.

    Args:
        config (OneTransConfig): see :class:`OneTransConfig`.

    Example::

        model = OneTrans(OneTransConfig(embedding_dim=16, num_ns_tokens=3)).eval()
        s_tokens = torch.randn(2, 5, 16)                       # (B, S, D), left-padded
        s_valid = torch.tensor([[True] * 5, [False, False, False, True, True]])
        ns_tokens = torch.randn(2, 3, 16)                      # (B, L_NS, D)
        out = model(s_tokens, s_valid, ns_tokens)              # (2, 3, 16)

        cache = model.encode_sequence(s_tokens, s_valid)
        candidates = torch.randn(4, 3, 16)                     # 3 candidates of request 0, 1 of request 1
        scored = model.forward_cached(cache, candidates, torch.tensor([0, 0, 0, 1]))  # (4, 3, 16)
    """

    def __init__(self, config: OneTransConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(OneTransBlock(config) for _ in range(config.num_layers))
        self.final_norm = _rms_norm(config.embedding_dim,
                                    None if config.shared_ns_params else config.num_ns_tokens)

    def pyramid_schedule(self, s_len: int) -> List[int]:
        """S-tokens each layer keeps for an input padded to ``s_len``: :func:`pyramid_schedule`
        of ``max_s_tokens`` (capped by ``s_len``) when the config sets it, else of ``s_len``."""
        limit = self.config.max_s_tokens
        if limit is None:
            return pyramid_schedule(self.config, s_len)
        if s_len > limit:
            raise ValueError(f"the S input has {s_len} tokens, more than max_s_tokens={limit}; truncate the "
                             "sequences or raise max_s_tokens")
        return [min(keep, s_len) for keep in pyramid_schedule(self.config, limit)]

    def forward(self, s_tokens: torch.Tensor, s_valid: torch.Tensor, ns_tokens: torch.Tensor) -> torch.Tensor:
        """The full stack over the joint sequence, one request per row (the reference that
        the cached path reproduces).

        Args:
            s_tokens (torch.Tensor): ``(B, S, D)`` float, oldest first, left-padded.
            s_valid (torch.Tensor): ``(B, S)`` bool, True for a real token.
            ns_tokens (torch.Tensor): ``(B, L_NS, D)``.

        Returns:
            torch.Tensor: ``(B, L_NS, D)`` NS-token states.
        """
        self._check_sequence(s_tokens, s_valid)
        self._check_ns(ns_tokens, s_tokens.shape[0])
        s_states, s_positions = self._s_inputs(s_tokens, s_valid)
        ns_states, ns_positions = ns_tokens, self._ns_positions(s_tokens.shape[1], ns_tokens)
        for layer, keep in zip(self.layers, self.pyramid_schedule(s_tokens.shape[1])):
            s_states, s_valid, s_positions, ns_states = layer(
                s_states, s_valid, s_positions, ns_states, ns_positions, keep)
        return self.final_norm(ns_states)

    def encode_sequence(self, s_tokens: torch.Tensor, s_valid: torch.Tensor) -> OneTransCache:
        """Stage I: the S side of every layer, once per request, independent of the candidates.

        Args:
            s_tokens (torch.Tensor): ``(B, S, D)`` float, oldest first, left-padded.
            s_valid (torch.Tensor): ``(B, S)`` bool.

        Returns:
            OneTransCache: per layer, the keys, values, valid mask and positions of the
            S-tokens entering it.
        """
        self._check_sequence(s_tokens, s_valid)
        s_states, s_positions = self._s_inputs(s_tokens, s_valid)
        cache = OneTransCache(keys=[], values=[], valid=[], positions=[], s_len=s_tokens.shape[1])
        schedule = self.pyramid_schedule(s_tokens.shape[1])
        for index, (layer, keep) in enumerate(zip(self.layers, schedule)):
            is_last = index == len(self.layers) - 1
            keys, values, kept = layer.encode_sequence(s_states, s_valid, s_positions, None if is_last else keep)
            cache.keys.append(keys)
            cache.values.append(values)
            cache.valid.append(s_valid)
            cache.positions.append(s_positions)
            if kept is not None:
                s_states, s_valid, s_positions = kept.states, kept.valid, kept.positions
        return cache

    def forward_cached(self, cache: OneTransCache, ns_tokens: torch.Tensor,
                       request_index: torch.Tensor) -> torch.Tensor:
        """Stage II: the NS side of every layer for C candidates, against the cached S side.

        The cache is never copied per candidate: candidates are laid out by request
        (:class:`_CandidateGrid`; in any order, a request may have none) and attend to their
        request's cached keys and values as they are. With a single cached request (serving
        one user), its padded and dropped S-tokens are also removed from the keys up front.
        Differentiable like :meth:`forward` (training runs it too), dropout included.

        Args:
            cache (OneTransCache): :meth:`encode_sequence` of B requests.
            ns_tokens (torch.Tensor): ``(C, L_NS, D)``, one row per candidate.
            request_index (torch.Tensor): ``(C,)`` int64, the cache row (request) of each
                candidate, in ``[0, B)``.

        Returns:
            torch.Tensor: ``(C, L_NS, D)`` = :meth:`forward` on the candidates' requests.
        """
        self._check_ns(ns_tokens, None)
        if request_index.shape != (ns_tokens.shape[0],):
            raise ValueError(f"request_index must be ({ns_tokens.shape[0]},), got {tuple(request_index.shape)}")
        grid = _CandidateGrid.build(request_index, cache.num_requests)
        num_ns = ns_tokens.shape[1]
        # NS-token i sees NS-tokens j <= i; the cached S positions all precede the NS ones.
        causal_bias = ns_tokens.new_full((num_ns, num_ns), float("-inf")).triu_(1)
        ns_states = ns_tokens
        for layer, keys, values, valid in zip(self.layers, cache.keys, cache.values, cache.valid):
            if cache.num_requests == 1:
                # Keep only the request's valid keys: padding costs nothing, and no S mask.
                kept = valid[0].nonzero().squeeze(1)
                keys, values, valid = keys.index_select(1, kept), values.index_select(1, kept), None
            else:
                keys, values, valid = grid.cache_rows(keys), grid.cache_rows(values), grid.cache_rows(valid)
            ns_states = layer.forward_ns(ns_states, keys, values, valid, causal_bias, grid)
        return self.final_norm(ns_states)

    def _s_inputs(self, s_tokens: torch.Tensor, s_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded S values zeroed (so padding content can never leak, even as NaN), and the
        ``(B, S)`` input positions."""
        b, s_len = s_valid.shape
        states = s_tokens.masked_fill(~s_valid.unsqueeze(-1), 0.0)
        positions = torch.arange(s_len, device=s_tokens.device).expand(b, s_len)
        return states, positions

    def _ns_positions(self, s_len: int, ns_tokens: torch.Tensor) -> torch.Tensor:
        """``(C, L_NS)``: NS-token ``i`` sits at ``s_len + i``, after every S-token."""
        c, num_ns = ns_tokens.shape[:2]
        return (s_len + torch.arange(num_ns, device=ns_tokens.device)).expand(c, num_ns)

    def _check_sequence(self, s_tokens: torch.Tensor, s_valid: torch.Tensor) -> None:
        d = self.config.embedding_dim
        if s_tokens.dim() != 3 or s_tokens.shape[2] != d:
            raise ValueError(f"s_tokens must be (B, S, {d}), got {tuple(s_tokens.shape)}")
        if s_valid.shape != s_tokens.shape[:2] or s_valid.dtype != torch.bool:
            raise ValueError(f"s_valid must be bool {tuple(s_tokens.shape[:2])}, got "
                             f"{s_valid.dtype} {tuple(s_valid.shape)}")

    def _check_ns(self, ns_tokens: torch.Tensor, batch: Optional[int]) -> None:
        c = self.config
        if ns_tokens.dim() != 3 or ns_tokens.shape[1:] != (c.num_ns_tokens, c.embedding_dim) or (
                batch is not None and ns_tokens.shape[0] != batch):
            expected = "C" if batch is None else str(batch)
            raise ValueError(f"ns_tokens must be ({expected}, {c.num_ns_tokens}, {c.embedding_dim}), "
                             f"got {tuple(ns_tokens.shape)}")
