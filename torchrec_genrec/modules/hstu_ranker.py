"""HSTU in its ranking form: target-aware attention that scores many candidates in one pass.

In ranking, HSTU ("Actions Speak Louder than Words", Zhai et al., ICML 2024) reads a user's
history together with the items to be scored. The candidate tokens are appended after the
history, and attention runs under a **target-aware mask** (``h`` = history, ``c`` = candidate;
history length ``n``, ``C`` candidates)::

                 keys:  h_0 h_1 ... h_{n-1}   c_0 c_1 ... c_{C-1}
    query h_i           causal (j <= i)       -   -  ...  -
    query c_k           all n                 only c_k itself

- history tokens attend causally to the history only, exactly as in the retrieval encoder,
  so the candidates never change the history's states;
- each candidate attends to every valid history token and to itself, never to another
  candidate.

So a candidate's output is what the causal encoder would give it as the single next token
of the sequence (position ``n``, timestamp = the request time), whichever other candidates
share the pass. The paper's M-FALCON inference exploits this: the history is encoded once
per request and many candidates, in microbatches, are scored against it in one pass,
instead of one forward per (user, candidate) pair.

Cost: this module never builds the ``(n + C) x (n + C)`` attention of the concatenated
sequence. Per layer, the history is :meth:`HSTULayer.forward_padded` (``O(n^2)``) and the
candidates are ``C x n`` scores against the history keys plus one diagonal term each (the
candidate's own key at relative position 0 and time delta 0), so ``O(C * n)`` per request;
at the last layer the history's outputs are not needed and are skipped.
:func:`target_aware_reference` builds the explicit ``(n + C) x (n + C)`` mask instead: the
readable ground truth used by the tests.

The weights are those of :class:`~torchrec_genrec.modules.hstu.HSTULayer` and the module
names those of :class:`~torchrec_genrec.modules.hstu.HSTUEncoder` (``position_embedding``,
``layers``), so a trained encoder's ``state_dict`` loads into :class:`HSTURankerEncoder`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from torchrec_genrec.modules.hstu import HSTUEncoder, HSTULayer
from torchrec_genrec.ops.hstu_attention import padded_hstu_attention, time_bucket

__all__ = ["HSTURankerEncoder", "target_aware_hstu_layer", "target_aware_reference"]


def _uvqk(layer: HSTULayer, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u (.., H*dv), v (.., H, dv), q (.., H, dqk), k (.., H, dqk)`` of tokens ``x (.., D)``,
    as :class:`HSTULayer` projects them."""
    h, dqk, dv = layer.num_heads, layer.dqk, layer.dv
    uvqk = F.silu(layer.uvqk(layer.input_norm(x)))
    u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
    lead = x.shape[:-1]
    return u, v.reshape(lead + (h, dv)), q.reshape(lead + (h, dqk)), k.reshape(lead + (h, dqk))


def _gate_and_project(layer: HSTULayer, u: torch.Tensor, attn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The end of an :class:`HSTULayer`: ``W_o Dropout(u * LayerNorm(attn)) + x``."""
    return layer.output(layer.dropout(u * layer.attention_norm(attn))) + x


def target_aware_hstu_layer(
    layer: HSTULayer,
    history: torch.Tensor,
    lengths: torch.Tensor,
    history_timestamps: Optional[torch.Tensor],
    candidates: torch.Tensor,
    cand_timestamps: Optional[torch.Tensor],
    cand_positions: torch.Tensor,
    compute_history: bool = True,
    candidate_chunk_size: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """One :class:`HSTULayer` under the target-aware mask, with the layer's own weights.

    History rows get :meth:`HSTULayer.forward_padded` (causal over the history); candidate
    ``c`` of request ``b`` gets::

        A[c, j] = SiLU(q_c . k_j + rab(pos_c - j, ts_c - ts_j)) / N     j < lengths[b]
        A[c, c] = SiLU(q_c . k_c + rab(0, 0)) / N
        y_c     = W_o Dropout(u_c * LayerNorm(sum_j A[c, j] v_j + A[c, c] v_c)) + x_c

    with ``N = max_seq_len``: ``O(C * L)`` work for the candidates, no ``(L + C)^2`` tensor.
    The history is projected once and shared by its own attention and the candidates'.

    Args:
        layer (HSTULayer): the layer whose weights are used.
        history (torch.Tensor): ``(B, L, D)`` history states, right-padded.
        lengths (torch.Tensor): ``(B,)`` valid history positions per row, ``0 <= lengths <= L``.
        history_timestamps (Optional[torch.Tensor]): ``(B, L)`` int64, or None (no time bias).
        candidates (torch.Tensor): ``(B, C, D)`` candidate states.
        cand_timestamps (Optional[torch.Tensor]): ``(B, C)`` int64 (the request time), or None.
        cand_positions (torch.Tensor): ``(B,)`` int64 position of every candidate of a row for
            the relative position bias (the history length, ``<= max_seq_len - 1``).
        compute_history (bool): False skips the history's outputs (the last layer).
        candidate_chunk_size (Optional[int]): candidates per microbatch (bounds the
            ``(B, H, chunk, L)`` scores); None for all at once. Same result either way.

    Returns:
        Tuple[Optional[torch.Tensor], torch.Tensor]: history outputs ``(B, L, D)`` (None when
        ``compute_history`` is False) and candidate outputs ``(B, C, D)``.

    Example::

        layer = HSTULayer(HSTUConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=8))
        hist, cand = target_aware_hstu_layer(
            layer, torch.randn(2, 5, 8), torch.tensor([5, 2]), None,
            torch.randn(2, 3, 8), None, torch.tensor([5, 2]),
        )  # (2, 5, 8), (2, 3, 8)
    """
    b, l_hist = history.shape[0], history.shape[1]
    u_h, v_h, q_h, k_h = _uvqk(layer, history)

    hist_out: Optional[torch.Tensor] = None
    if compute_history:  # = layer.forward_padded(history, lengths, history_timestamps), sharing u, v, q, k
        attn_h = padded_hstu_attention(
            layer.config.max_seq_len, q_h, k_h, v_h, lengths,
            timestamps=history_timestamps if layer.ts_weights is not None else None,
            pos_weights=layer.pos_weights, ts_weights=layer.ts_weights,
        ).reshape(b, l_hist, layer.num_heads * layer.dv)
        hist_out = _gate_and_project(layer, u_h, attn_h, history)

    c = candidates.shape[1]
    if candidate_chunk_size is not None and candidate_chunk_size <= 0:
        raise ValueError(f"candidate_chunk_size must be positive, got {candidate_chunk_size}")
    if candidate_chunk_size is None or candidate_chunk_size >= c:
        cand_out = _candidates_layer(layer, k_h, v_h, lengths, history_timestamps, candidates, cand_timestamps,
                                     cand_positions)
    else:
        chunks = [slice(c0, c0 + candidate_chunk_size) for c0 in range(0, c, candidate_chunk_size)]
        cand_out = torch.cat([
            _candidates_layer(layer, k_h, v_h, lengths, history_timestamps, candidates[:, s],
                              None if cand_timestamps is None else cand_timestamps[:, s], cand_positions)
            for s in chunks
        ], dim=1)
    return hist_out, cand_out


def _candidates_layer(
    layer: HSTULayer,
    k_h: torch.Tensor,
    v_h: torch.Tensor,
    lengths: torch.Tensor,
    history_timestamps: Optional[torch.Tensor],
    candidates: torch.Tensor,
    cand_timestamps: Optional[torch.Tensor],
    cand_positions: torch.Tensor,
) -> torch.Tensor:
    """The candidate half of :func:`target_aware_hstu_layer`: ``(B, C, D)`` outputs from the
    history keys ``k_h (B, L, H, dqk)`` and values ``v_h (B, L, H, dv)``."""
    n_max = layer.config.max_seq_len
    b, l_hist = k_h.shape[0], k_h.shape[1]
    c = candidates.shape[1]
    h, dv = layer.num_heads, layer.dv
    device = candidates.device
    use_time = layer.ts_weights is not None and history_timestamps is not None and cand_timestamps is not None
    u_c, v_c, q_c, k_c = _uvqk(layer, candidates)

    # Candidates against the history keys: (B, H, C, L); the bias is shared by the heads.
    scores = torch.einsum("bchd,blhd->bhcl", q_c, k_h)
    cols = torch.arange(l_hist, device=device)
    pos_c = cand_positions.to(device).view(b, 1)
    if layer.pos_weights is not None:
        rel = (pos_c - cols.view(1, l_hist) + (n_max - 1)).clamp(0, 2 * n_max - 2)  # padding keys: masked below
        scores = scores + layer.pos_weights[rel].view(b, 1, 1, l_hist)
    if use_time:
        assert layer.ts_weights is not None and history_timestamps is not None and cand_timestamps is not None
        delta = cand_timestamps.unsqueeze(2) - history_timestamps.unsqueeze(1)  # (B, C, L)
        scores = scores + layer.ts_weights[time_bucket(delta, layer.ts_weights.numel() - 1)].unsqueeze(1)
    valid = (cols.view(1, l_hist) < lengths.to(device).view(b, 1)).view(b, 1, 1, l_hist)
    attn = torch.where(valid, F.silu(scores), torch.zeros((), dtype=scores.dtype, device=device)) / n_max
    out = torch.einsum("bhcl,blhd->bchd", attn, v_h)  # (B, C, H, dv)

    # The diagonal: each candidate's own key, at relative position 0 and time delta 0.
    self_score = (q_c * k_c).sum(-1)  # (B, C, H)
    if layer.pos_weights is not None:
        self_score = self_score + layer.pos_weights[n_max - 1]
    if use_time:
        assert layer.ts_weights is not None and cand_timestamps is not None
        zero_delta = cand_timestamps - cand_timestamps
        self_score = self_score + layer.ts_weights[time_bucket(zero_delta, layer.ts_weights.numel() - 1)].unsqueeze(2)
    out = out + (F.silu(self_score) / n_max).unsqueeze(3) * v_c
    return _gate_and_project(layer, u_c, out.reshape(b, c, h * dv), candidates)


class HSTURankerEncoder(HSTUEncoder):
    """Stacked HSTU layers scoring ``C`` candidates per request against the request's history
    in one pass, under the target-aware mask (see the module docstring).

    Input preprocessing is :class:`~torchrec_genrec.modules.hstu.HSTUEncoder`'s: embeddings
    times ``sqrt(D)`` plus a learned position embedding (candidates get the one of position
    ``lengths[b]``, the next position), then dropout. Padded history positions are zeroed
    first, so whatever they hold (even NaN) never reaches a valid output. It is an
    ``HSTUEncoder`` (same parameters) with a target-aware forward, so an encoder's
    ``state_dict`` loads here: with one candidate, the output is
    ``HSTUEncoder`` on the history followed by that candidate, read at the candidate.

    Args:
        config (HSTUConfig): dims, heads, biases, dropout; ``max_seq_len`` bounds
            ``lengths + 1`` (the history plus the candidate's slot).

    Example::

        enc = HSTURankerEncoder(HSTUConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=8))
        history = torch.randn(2, 5, 8)                    # B = 2, L = 5
        lengths = torch.tensor([5, 0])                    # the second user has no history
        hist_ts = torch.arange(10).view(2, 5)
        candidates = torch.randn(2, 3, 8)                 # C = 3 candidates per request
        cand_ts = torch.tensor([[20, 20, 20], [9, 9, 9]])  # the request time
        out = enc(history, lengths, hist_ts, candidates, cand_ts)  # (2, 3, 8)
    """

    def forward(
        self,
        history: torch.Tensor,
        lengths: torch.Tensor,
        history_timestamps: Optional[torch.Tensor],
        candidates: torch.Tensor,
        cand_timestamps: Optional[torch.Tensor],
        cand_valid: Optional[torch.Tensor] = None,
        candidate_chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """
        Args:
            history (torch.Tensor): ``(B, L, D)`` history token embeddings, oldest first,
                right-padded; ``L <= max_seq_len``.
            lengths (torch.Tensor): ``(B,)`` int64, ``0 <= lengths <= L`` and
                ``lengths + 1 <= max_seq_len``. An empty history is allowed: its candidates
                then attend to themselves only.
            history_timestamps (Optional[torch.Tensor]): ``(B, L)`` int64, or None for no time
                bias (then ``cand_timestamps`` must be None too).
            candidates (torch.Tensor): ``(B, C, D)`` candidate token embeddings.
            cand_timestamps (Optional[torch.Tensor]): ``(B, C)`` int64, the request time.
            cand_valid (Optional[torch.Tensor]): ``(B, C)`` bool; invalid (padding) candidates
                are zeroed on input and their outputs set to zero. Candidates never affect each
                other, so this only keeps garbage (even NaN) out of the outputs and gradients.
            candidate_chunk_size (Optional[int]): score the candidates in microbatches of this
                many (bounds the ``(B, H, chunk, L)`` score tensor); the result is the same.

        Returns:
            torch.Tensor: ``(B, C, D)`` candidate states after the last layer.
        """
        n_max = self.config.max_seq_len
        _check_inputs(n_max, history, lengths, history_timestamps, candidates, cand_timestamps, cand_valid)
        if candidate_chunk_size is not None and candidate_chunk_size <= 0:
            raise ValueError(f"candidate_chunk_size must be positive, got {candidate_chunk_size}")
        if cand_valid is not None:  # padding candidates hold zeros (no NaN reaches a weight gradient)
            cand_valid = cand_valid.to(candidates.device)
            candidates = torch.where(cand_valid.unsqueeze(2), candidates,
                                     torch.zeros((), dtype=candidates.dtype, device=candidates.device))
        x, xc, cand_pos = self._preprocess(history, lengths, candidates)
        num_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            x_next, xc = target_aware_hstu_layer(layer, x, lengths, history_timestamps, xc, cand_timestamps, cand_pos,
                                                 compute_history=i < num_layers - 1,
                                                 candidate_chunk_size=candidate_chunk_size)
            if x_next is not None:
                x = x_next
        if cand_valid is not None:
            xc = torch.where(cand_valid.unsqueeze(2), xc, torch.zeros((), dtype=xc.dtype, device=xc.device))
        return xc

    def _preprocess(self, history: torch.Tensor, lengths: torch.Tensor,
                    candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scaled embeddings plus position embeddings, dropout; returns history states
        ``(B, L, D)`` (padding zeroed first), candidate states ``(B, C, D)`` and the candidates'
        position ``(B,)``."""
        n_max, scale = self.config.max_seq_len, math.sqrt(self.config.embedding_dim)
        b, l_hist = history.shape[0], history.shape[1]
        positions = torch.arange(l_hist, device=history.device)
        lengths = lengths.to(history.device)
        valid = (positions.view(1, l_hist) < lengths.view(b, 1)).unsqueeze(2)
        history = torch.where(valid, history, torch.zeros((), dtype=history.dtype, device=history.device))
        x = history * scale + self.position_embedding(positions).unsqueeze(0)
        cand_pos = lengths.to(torch.int64).clamp(0, n_max - 1)
        xc = candidates * scale + self.position_embedding(cand_pos).unsqueeze(1)
        return self.input_dropout(x), self.input_dropout(xc), cand_pos


def _check_inputs(
    max_seq_len: int,
    history: torch.Tensor,
    lengths: torch.Tensor,
    history_timestamps: Optional[torch.Tensor],
    candidates: torch.Tensor,
    cand_timestamps: Optional[torch.Tensor],
    cand_valid: Optional[torch.Tensor],
) -> None:
    """Shape checks, and (eagerly only: no data-dependent branch under ``torch.compile`` /
    ``torch.export``) the range of ``lengths``."""
    if history.dim() != 3 or candidates.dim() != 3:
        raise ValueError(f"history and candidates must be (B, L, D) and (B, C, D), got "
                         f"{tuple(history.shape)} and {tuple(candidates.shape)}")
    b, l_hist, d = history.shape
    c = candidates.shape[1]
    if candidates.shape[0] != b or candidates.shape[2] != d:
        raise ValueError(f"candidates must be (B, C, D) = ({b}, C, {d}), got {tuple(candidates.shape)}")
    if l_hist > max_seq_len:
        raise ValueError(f"history of padded length {l_hist} exceeds max_seq_len={max_seq_len}; truncate it first")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be (B,) = ({b},), got {tuple(lengths.shape)}")
    if (history_timestamps is None) != (cand_timestamps is None):
        raise ValueError("history_timestamps and cand_timestamps must both be given or both be None")
    if history_timestamps is not None and history_timestamps.shape != (b, l_hist):
        raise ValueError(f"history_timestamps must be (B, L) = ({b}, {l_hist}), got "
                         f"{tuple(history_timestamps.shape)}")
    if cand_timestamps is not None and cand_timestamps.shape != (b, c):
        raise ValueError(f"cand_timestamps must be (B, C) = ({b}, {c}), got {tuple(cand_timestamps.shape)}")
    if cand_valid is not None and cand_valid.shape != (b, c):
        raise ValueError(f"cand_valid must be (B, C) = ({b}, {c}), got {tuple(cand_valid.shape)}")
    if not torch.compiler.is_compiling() and b > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > l_hist or hi + 1 > max_seq_len:
            raise ValueError(f"lengths must satisfy 0 <= lengths <= L={l_hist} and lengths + 1 <= max_seq_len="
                             f"{max_seq_len}; got min {lo}, max {hi}")


def target_aware_reference(
    encoder: HSTURankerEncoder,
    history: torch.Tensor,
    lengths: torch.Tensor,
    history_timestamps: Optional[torch.Tensor],
    candidates: torch.Tensor,
    cand_timestamps: Optional[torch.Tensor],
) -> torch.Tensor:
    """Ground truth for :class:`HSTURankerEncoder`: the explicit ``(L + C) x (L + C)`` mask.

    Each request becomes one sequence ``[h_0 .. h_{n-1}, c_0 .. c_{C-1}]`` (``n = lengths[b]``)
    right-padded to ``L + C``; token positions are ``0 .. n-1`` for the history and ``n``
    (clamped to ``max_seq_len - 1``) for every candidate; every layer runs a plain dense
    SiLU attention over the whole sequence with the relative bias of those positions and
    timestamps, under the target-aware mask (history: causal over the history; candidate:
    the history and itself). ``O((L + C)^2)``: for tests, not for serving.

    Args:
        encoder (HSTURankerEncoder): the model whose weights are used.
        history (torch.Tensor): ``(B, L, D)``.
        lengths (torch.Tensor): ``(B,)``.
        history_timestamps (Optional[torch.Tensor]): ``(B, L)`` int64, or None.
        candidates (torch.Tensor): ``(B, C, D)``.
        cand_timestamps (Optional[torch.Tensor]): ``(B, C)`` int64, or None.

    Returns:
        torch.Tensor: ``(B, C, D)``, what :meth:`HSTURankerEncoder.forward` returns (without
        ``cand_valid``).

    Example::

        enc = HSTURankerEncoder(HSTUConfig(embedding_dim=8, attention_dim=4, linear_dim=4, max_seq_len=8)).eval()
        args = (torch.randn(2, 5, 8), torch.tensor([5, 0]), None, torch.randn(2, 3, 8), None)
        torch.testing.assert_close(enc(*args), target_aware_reference(enc, *args))
    """
    cfg = encoder.config
    n_max, scale = cfg.max_seq_len, math.sqrt(cfg.embedding_dim)
    b, l_hist, _ = history.shape
    c = candidates.shape[1]
    t = l_hist + c
    device = history.device
    lengths = lengths.to(device).to(torch.int64)
    slots = torch.arange(t, device=device).view(1, t)
    n = lengths.view(b, 1)
    is_hist = slots < n  # (B, T)
    is_cand = (slots >= n) & (slots < n + c)
    cand_idx = (slots - n).clamp(0, max(c - 1, 0))  # which candidate a slot holds
    hist_idx = slots.clamp(max=max(l_hist - 1, 0)).expand(b, t)

    # Token positions (for the position embedding and the relative bias) and timestamps.
    cand_pos = lengths.clamp(0, n_max - 1).view(b, 1)
    pos = torch.where(is_hist, slots, cand_pos.expand(b, t))
    pos = torch.where(is_hist | is_cand, pos, torch.zeros_like(pos))  # padding: any valid index

    def gather(hist_vals: torch.Tensor, cand_vals: torch.Tensor) -> torch.Tensor:
        """Slots of ``(B, T, ...)`` from history ``(B, L, ...)`` and candidates ``(B, C, ...)``."""
        tail = hist_vals.shape[2:]
        zeros = hist_vals.new_zeros((b, t) + tail)
        hv = hist_vals.gather(1, hist_idx.view(b, t, *([1] * len(tail))).expand((b, t) + tail)) if l_hist else zeros
        cv = cand_vals.gather(1, cand_idx.view(b, t, *([1] * len(tail))).expand((b, t) + tail)) if c else zeros
        shape = (b, t) + (1,) * len(tail)
        return torch.where(is_hist.view(shape), hv, torch.where(is_cand.view(shape), cv, zeros))

    x = gather(history, candidates) * scale + encoder.position_embedding(pos)
    ts = gather(history_timestamps, cand_timestamps) if history_timestamps is not None else None

    # The target-aware mask, (B, T, T): query i, key j.
    qi, kj = slots.view(1, t, 1), slots.view(1, 1, t)
    hist_q, hist_k = is_hist.view(b, t, 1), is_hist.view(b, 1, t)
    cand_q = is_cand.view(b, t, 1)
    mask = (hist_q & hist_k & (kj <= qi)) | (cand_q & hist_k) | (cand_q & (kj == qi))

    for layer in encoder.layers:
        h, dqk, dv = layer.num_heads, layer.dqk, layer.dv
        uvqk = F.silu(layer.uvqk(layer.input_norm(x)))
        u, v, q, k = torch.split(uvqk, [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        scores = torch.einsum("bihd,bjhd->bhij", q.reshape(b, t, h, dqk), k.reshape(b, t, h, dqk))
        if layer.pos_weights is not None:
            rel = pos.view(b, t, 1) - pos.view(b, 1, t) + (n_max - 1)
            scores = scores + layer.pos_weights[rel].unsqueeze(1)
        if layer.ts_weights is not None and ts is not None:
            buckets = time_bucket(ts.view(b, t, 1) - ts.view(b, 1, t), layer.ts_weights.numel() - 1)
            scores = scores + layer.ts_weights[buckets].unsqueeze(1)
        attn = F.silu(scores) / n_max * mask.unsqueeze(1).to(scores.dtype)
        out = torch.einsum("bhij,bjhd->bihd", attn, v.reshape(b, t, h, dv)).reshape(b, t, h * dv)
        x = layer.output(layer.dropout(u * layer.attention_norm(out))) + x

    # Read each candidate back from its slot n + c.
    rows = torch.arange(b, device=device).view(b, 1)
    return x[rows, lengths.view(b, 1) + torch.arange(c, device=device).view(1, c)]
