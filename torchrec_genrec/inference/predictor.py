"""The standalone predictor: an artifact from ``genrec export`` in, recommendations out.

It needs neither the training code nor the dataset: the token table is TorchRec's
quantised inference collection loaded from safetensors, the encoder is the exported
program, the id maps come from the artifact's ``vocab.json``. Nothing is unpickled (see
:mod:`torchrec_genrec.inference.artifact`).

Retrieval is exact: the user vector against every item row of the quantised table
(cosine, as in training), in chunks, so the rows are dequantised a chunk at a time and an
int8 table stays int8 in memory; then ``torch.topk``.

Example::

    predictor = Predictor.load("artifacts/hstu_int8")
    history = History(items=[50, 172, 133], actions=[5, 4, 5], timestamps=[881250949, 881251000, 881252000])
    [rec] = predictor.recommend([history], k=10)          # rec.items: raw ids, history excluded
    scores = predictor.score(history, candidates=[1, 2, 3])  # one encoder pass for all candidates
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from torchrec_genrec.inference import artifact as art
from torchrec_genrec.inference.exported_program import load_exported_program
from torchrec_genrec.inference.layout import layout_tokens, lookup_tokens, pad_tokens, rows_of
from torchrec_genrec.inference.quant import PRECISIONS, build_quant_table
from torchrec_genrec.ops.jagged import plan_length_buckets
from torchrec_genrec.tokens import TokenSpace

__all__ = ["History", "Predictor", "PreparedHistory", "Recommendation", "RequestError"]

#: Item rows dequantised and scored at a time.
_CHUNK_ROWS = 32768


def _flat_ids(ids: List[Any]) -> bool:
    """Raw ids are all integers or all strings (what a store's id map holds)."""
    if all(type(i) is int for i in ids):
        return True
    return all(isinstance(i, str) for i in ids)


def serving_device(device: Union[str, torch.device]) -> torch.device:
    """A device to serve on, checked: ``cpu`` or an available ``cuda[:N]``.

    Raises:
        ValueError: an unknown device, or CUDA asked for where there is none.
    """
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device: use cpu or cuda[:N]") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here; serve on cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"--device {device}: serving runs on cpu or cuda")
    return resolved


class RequestError(ValueError):
    """A request the model cannot answer as sent (unknown ids, empty or over-long history,
    k out of range, mismatched fields); the message says which and how to fix it."""


@dataclasses.dataclass
class History:
    """One user's events, oldest first, in the dataset's raw ids and values.

    Args:
        items (Sequence): raw item ids.
        actions (Optional[Sequence]): raw action values (e.g. ratings), one per item;
            required when the model reads actions.
        timestamps (Optional[Sequence[int]]): event times (seconds), one per item;
            required when the model reads time (HSTU's time bias).
    """

    items: Sequence[Any]
    actions: Optional[Sequence[Any]] = None
    timestamps: Optional[Sequence[int]] = None


@dataclasses.dataclass
class Recommendation:
    """Top-k for one history: raw item ids, best first, and their cosine scores."""

    items: List[Any]
    scores: List[float]


@dataclasses.dataclass
class PreparedHistory:
    """A validated history in dense ids (what :meth:`Predictor.prepare` returns)."""

    items: np.ndarray  # (L,) int64 dense item ids
    actions: Optional[np.ndarray]  # (L,) int64 dense action ids
    timestamps: np.ndarray  # (L,) int64
    exclude: np.ndarray  # dense item ids never to recommend (the history and any extra)


class _ItemIndex:
    """The item rows of the quantised token table, scored a chunk at a time.

    Views the TBE's storage (no copy): int8 rows are dequantised per chunk as
    ``code * scale + bias`` with the row's fp16 scale and bias, exactly as fbgemm's lookup
    does, so candidate scores and catalogue scores agree with the table's lookups.
    """

    def __init__(self, table: torch.nn.Module, precision: str, first_row: int, num_items: int, dim: int) -> None:
        [(weight, scale_bias)] = table._emb_modules[0].split_embedding_weights()
        rows = slice(first_row, first_row + num_items)
        self.precision = precision
        self.dim = dim
        if precision == "int8":
            self.codes = weight[rows, :dim]
            sb = scale_bias[rows].contiguous().view(torch.float16).float()  # (N, 2): scale, bias
            self.scale, self.bias = sb[:, :1].contiguous(), sb[:, 1:].contiguous()
        elif precision == "fp16":
            self.codes = weight[rows].view(torch.float16)[:, :dim]
        else:
            self.codes = weight[rows].view(torch.float32)[:, :dim]
        self.num_items = num_items
        norms = torch.cat([self.rows(slice(s, s + _CHUNK_ROWS)).norm(dim=1) for s in range(0, num_items, _CHUNK_ROWS)])
        self.inv_norm = 1.0 / norms.clamp_min(1e-6)  # F.normalize's eps, as in training

    def rows(self, ids: Union[torch.Tensor, slice]) -> torch.Tensor:
        """``(K, D)`` float32 item embeddings of dense ids ``ids`` (a tensor or a slice)."""
        codes = self.codes[ids].float()
        if self.precision == "int8":
            return codes * self.scale[ids] + self.bias[ids]
        return codes

    def cosine(self, users: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(K,)`` or ``(B, K)`` cosine scores of unit user vectors against items ``ids``."""
        return (users @ self.rows(ids).T) * self.inv_norm[ids]

    def topk(self, users: torch.Tensor, k: int, exclude: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` over all items per user, ``exclude[b]`` never returned.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: ``(B, k)`` scores (``-inf`` where fewer than
            k items remain) and dense item ids.
        """
        b, device = users.shape[0], users.device
        ex_rows = torch.from_numpy(np.repeat(np.arange(b), [len(e) for e in exclude])).to(device)
        ex_cols = torch.from_numpy(np.concatenate(exclude) if b else np.zeros(0, np.int64)).to(device)
        best_scores = users.new_full((b, 0), float("-inf"))
        best_ids = torch.zeros((b, 0), dtype=torch.int64, device=device)
        for start in range(0, self.num_items, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, self.num_items)
            scores = (users @ self.rows(slice(start, stop)).T) * self.inv_norm[start:stop]
            inside = (ex_cols >= start) & (ex_cols < stop)
            scores[ex_rows[inside], ex_cols[inside] - start] = float("-inf")
            merged = torch.cat([best_scores, scores], dim=1)
            merged_ids = torch.cat([best_ids, torch.arange(start, stop, device=device).expand(b, -1)], dim=1)
            top = torch.topk(merged, min(k, merged.shape[1]), dim=1)
            best_scores, best_ids = top.values, merged_ids.gather(1, top.indices)
        return best_scores, best_ids


class Predictor:
    """Recommends and scores from an exported artifact.

    Args:
        directory (str): an artifact written by ``genrec export``.
        check_versions (bool): refuse an artifact exported with another torch / TorchRec /
            fbgemm minor version (default True).
        device (str): where the model runs: ``cpu`` (default) or ``cuda[:N]``; the artifact
            is the same whichever device exported or serves it.

    Raises:
        ArtifactError: missing, truncated, corrupted, unsafe or incompatible artifact.

    Example::

        predictor = Predictor("artifacts/hstu_int8")
        recs = predictor.recommend([History(items=[1, 2], actions=[4, 5], timestamps=[10, 20])], k=5)
    """

    def __init__(self, directory: str, check_versions: bool = True, device: Union[str, torch.device] = "cpu") -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.directory = directory
        self.device = serving_device(device)
        reader = art.ArtifactReader(directory, art.ARTIFACT_FORMAT, required=(art.ENCODER, art.EMBEDDINGS, art.VOCAB),
                                    check_versions=check_versions)
        self.manifest = m = reader.manifest
        where = reader.manifest_path
        positive = (lambda n: n > 0, "a positive integer")
        self.precision = art.require(m, "precision", str, where, lambda p: p in PRECISIONS,
                                     f"one of {sorted(PRECISIONS)}")
        self.num_items = art.require(m, "num_items", int, where, *positive)
        self.dim = art.require(m, "embedding_dim", int, where, *positive)
        self.action_mode = art.require(m, "action_mode", str, where, lambda a: a in ("interleaved", "summed", "none"),
                                       "interleaved, summed or none")
        self.max_history = art.require(m, "max_history", int, where, *positive)
        self.uses_timestamps = art.require(m, "uses_timestamps", bool, where)
        num_actions = art.require(m, "num_actions", int, where, lambda n: n >= 0, "a count >= 0")
        art.require(m, "model.name", str, where)
        table = art.require(m, "table", dict, where)
        art.require(m, "table.name", str, where)
        rows = art.require(m, "table.rows", int, where, *positive)
        dim = art.require(m, "table.dim", int, where, lambda d: d >= self.dim, f"at least embedding_dim {self.dim}")
        row_bytes = art.require(m, "table.row_bytes", int, where, *positive)
        features = art.require(m, "table.features", list, where,
                               lambda f: len(f) >= 2 and all(isinstance(x, str) and x.isidentifier() for x in f),
                               "two or more feature names")
        self.space = TokenSpace.build(num_items=self.num_items, num_actions=num_actions)
        if rows < self.space.offset("item") + self.num_items:
            raise art.ArtifactError(f"table.rows {rows} cannot hold {self.num_items} items", path=where)

        encoder_path = reader.path(art.ENCODER)
        program = load_exported_program(reader.bytes(art.ENCODER, art.MAX_PROGRAM_BYTES), encoder_path)
        try:
            if self.device.type != "cpu":
                # The graph was traced on the CPU: its device arguments move with it.
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, self.device)
            self._encoder = program.module()
        except Exception as e:  # noqa: BLE001 - any failure here is an unusable artifact
            raise art.ArtifactError(f"the exported program does not run ({type(e).__name__}: {e})",
                                    path=encoder_path) from e
        embeddings_path = reader.verified_path(art.EMBEDDINGS)
        try:
            weight = load_file(embeddings_path)["weight"]
        except (SafetensorError, KeyError, OSError) as e:
            raise art.ArtifactError(f"cannot read the token table ({e})", path=embeddings_path) from e
        if tuple(weight.shape) != (rows, row_bytes) or weight.dtype != torch.uint8:
            raise art.ArtifactError(f"token table is {tuple(weight.shape)} {weight.dtype}, the manifest says "
                                    f"{(rows, row_bytes)} uint8", path=embeddings_path)
        self._features = list(features)
        self._table = build_quant_table(table["name"], rows, dim, self._features, self.precision, self.device)
        try:
            self._table.load_state_dict({f"embeddings.{table['name']}.weight": weight.to(self.device)}, strict=False)
        except RuntimeError as e:
            raise art.ArtifactError(f"the token table does not fit a {self.precision} table of {rows} x {dim} "
                                    f"({e})", path=embeddings_path) from e

        vocab_path = reader.path(art.VOCAB)
        vocab = reader.json(art.VOCAB)
        if not isinstance(vocab, dict):
            raise art.ArtifactError("expected an object with item_ids, action_name, action_values", path=vocab_path)
        item_ids = art.require(vocab, "item_ids", list, vocab_path, _flat_ids, "a flat list of integer or string ids")
        self.item_ids = np.asarray(item_ids)
        if len(self.item_ids) != self.num_items:
            raise art.ArtifactError(f"{len(self.item_ids)} item ids for {self.num_items} items", path=vocab_path)
        self._item_order = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids = self.item_ids[self._item_order]
        if len(np.unique(self._sorted_ids)) != self.num_items:
            raise art.ArtifactError("item_ids repeats an id", path=vocab_path)
        action_values = vocab.get("action_values") or []
        if not isinstance(action_values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in action_values):
            raise art.ArtifactError("key 'action_values' must be a list of numbers", path=vocab_path)
        if self.action_mode != "none" and len(action_values) != num_actions:
            raise art.ArtifactError(f"{len(action_values)} action values for {num_actions} actions", path=vocab_path)
        self._actions = {float(v): i for i, v in enumerate(action_values)}
        action_name = vocab.get("action_name")
        if action_name is not None and not isinstance(action_name, str):
            raise art.ArtifactError("key 'action_name' must be a string or null", path=vocab_path)
        self.action_name = action_name
        self.uses_actions = self.action_mode != "none"
        self._index = _ItemIndex(self._table, self.precision, self.space.offset("item"), self.num_items, self.dim)

    @classmethod
    def load(cls, directory: str, check_versions: bool = True, device: Union[str, torch.device] = "cpu") -> "Predictor":
        """Same as the constructor; reads better at call sites."""
        return cls(directory, check_versions=check_versions, device=device)

    # ------------------------------------------------------------------ inputs
    def dense_item_ids(self, raw: Sequence[Any], what: str = "item", unknown: str = "error") -> np.ndarray:
        """Raw item ids -> dense ids.

        Args:
            raw (Sequence): raw ids.
            what (str): how errors name the ids (``item``, ``candidate``).
            unknown (str): ``error`` (default): an unknown id or id type is a
                :class:`RequestError` naming it; ``skip``: unknown ids are left out.
        """
        raw_arr = np.asarray(list(raw))
        if raw_arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if raw_arr.dtype.kind != self._sorted_ids.dtype.kind and not (
                raw_arr.dtype.kind in "iu" and self._sorted_ids.dtype.kind in "iu"):
            if unknown == "skip":
                return np.zeros(0, dtype=np.int64)
            raise RequestError(f"{what} ids must be {self._id_kind()}, got {raw_arr.dtype.name} values "
                               f"such as {raw_arr[:3].tolist()}")
        pos_clipped = np.minimum(np.searchsorted(self._sorted_ids, raw_arr), len(self._sorted_ids) - 1)
        known = self._sorted_ids[pos_clipped] == raw_arr
        if not known.all():
            if unknown == "skip":
                return self._item_order[pos_clipped[known]].astype(np.int64)
            unknown_ids = raw_arr[~known][:5].tolist()
            raise RequestError(f"unknown {what} id(s) {unknown_ids}: not in the catalogue this model was trained on "
                               f"({self.num_items} items)")
        return self._item_order[pos_clipped].astype(np.int64)

    def _id_kind(self) -> str:
        return "integers" if self._sorted_ids.dtype.kind in "iu" else "strings"

    def prepare(self, history: Union[History, Mapping[str, Any]], exclude: Optional[Sequence[Any]] = None,
                truncate: bool = False) -> PreparedHistory:
        """Validates one history and maps it to dense ids.

        Args:
            history (History | Mapping): the events (a mapping with the same keys works).
            exclude (Optional[Sequence]): more raw item ids never to recommend (unknown ones
                are ignored: they cannot be recommended anyway).
            truncate (bool): keep the most recent ``max_history`` events of a longer history
                instead of refusing it.

        Raises:
            RequestError: empty or over-long history, unknown ids or action values, fields
                of different lengths, a field the model needs is missing.
        """
        if isinstance(history, Mapping):
            unknown_keys = set(history) - {"items", "actions", "timestamps"}
            if unknown_keys:
                raise RequestError(f"unknown history field(s) {sorted(unknown_keys)}; "
                                   "expected items, actions, timestamps")
            history = History(history.get("items") or [], history.get("actions"), history.get("timestamps"))
        n = len(history.items)
        if n == 0:
            raise RequestError("empty history: the model needs at least one event")
        for name in ("actions", "timestamps"):
            values = getattr(history, name)
            if values is not None and len(values) != n:
                raise RequestError(f"history has {n} items but {len(values)} {name}: one per event")
        if n > self.max_history:
            if not truncate:
                raise RequestError(f"history has {n} events, the model reads at most {self.max_history}: "
                                   f"send the most recent {self.max_history}")
            keep = slice(n - self.max_history, n)
        else:
            keep = slice(0, n)
        items = self.dense_item_ids(history.items)
        actions = None
        if self.uses_actions:
            if history.actions is None:
                raise RequestError(f"this model reads each event's {self.action_name or 'action'}: send history.actions")
            try:
                actions = np.asarray([self._actions[float(a)] for a in history.actions], dtype=np.int64)
            except (KeyError, TypeError, ValueError):
                bad = [a for a in history.actions if not _is_number(a) or float(a) not in self._actions][:5]
                raise RequestError(f"unknown {self.action_name or 'action'} value(s) {bad}; "
                                   f"known: {sorted(self._actions)}") from None
            actions = actions[keep]
        if self.uses_timestamps:
            if history.timestamps is None:
                raise RequestError("this model reads event times: send history.timestamps (seconds)")
            try:
                timestamps = np.asarray(history.timestamps, dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                raise RequestError("timestamps must be integers (seconds)") from None
        else:
            timestamps = np.zeros(n, dtype=np.int64)
        extra = self.dense_item_ids(exclude or [], unknown="skip")
        return PreparedHistory(items[keep], actions, timestamps[keep], np.unique(np.concatenate([items, extra])))

    # ------------------------------------------------------------------ model
    @torch.inference_mode()
    def user_vectors(self, prepared: Sequence[PreparedHistory]) -> torch.Tensor:
        """``(B, D)`` unit user vectors: one table lookup for the batch, then the encoder
        once per length bucket (the exported encoder pads, so mixing 20- and 200-event
        histories in one call would mostly compute padding)."""
        device = self.device
        actions = (torch.from_numpy(np.concatenate([p.actions for p in prepared])).to(device)
                   if self.uses_actions else None)
        host_lengths = np.asarray([len(p.items) for p in prepared], dtype=np.int64)
        tokens, added, times, lengths = layout_tokens(
            torch.from_numpy(np.concatenate([p.items for p in prepared])).to(device), actions,
            torch.from_numpy(np.concatenate([p.timestamps for p in prepared])).to(device),
            torch.from_numpy(host_lengths).to(device), self.action_mode, self.space.offset("item"),
            self.space.offset("action") if self.uses_actions else 0)
        x = lookup_tokens(self._table, self._features, tokens, added, lengths, self.dim)
        users = x.new_empty(len(prepared), self.dim)
        for rows, _ in _length_buckets(host_lengths):
            rows_t = torch.from_numpy(rows).to(device)
            index = rows_of(lengths, rows_t)
            padded, padded_times = pad_tokens(x[index], times[index], lengths[rows_t])
            users[rows_t] = self._encoder(padded, lengths[rows_t], padded_times)
        return users

    # ------------------------------------------------------------------ API
    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
            raise RequestError(f"k must be an integer in [1, {self.num_items}], got {k!r}")
        return int(k)

    @torch.inference_mode()
    def recommend_prepared(self, prepared: Sequence[PreparedHistory], k: Union[int, Sequence[int]]) -> List[Recommendation]:
        """:meth:`recommend` on prepared histories; ``k`` may differ per history."""
        ks = [k] * len(prepared) if isinstance(k, (int, np.integer)) else list(k)
        users = self.user_vectors(prepared)
        scores, ids = self._index.topk(users, max(ks), [p.exclude for p in prepared])
        out = []
        for row, kk in enumerate(ks):
            s, i = scores[row, :kk].cpu(), ids[row, :kk].cpu()
            finite = torch.isfinite(s)
            out.append(Recommendation(self.item_ids[i[finite].numpy()].tolist(), s[finite].tolist()))
        return out

    def recommend(self, histories: Sequence[Union[History, Mapping[str, Any]]], k: int = 10,
                  exclude: Optional[Sequence[Sequence[Any]]] = None, truncate: bool = False) -> List[Recommendation]:
        """Top-``k`` items for each history, its own items excluded, in one batch.

        Args:
            histories (Sequence[History]): B users' events.
            k (int): items per user, ``1 <= k <= num_items``.
            exclude (Optional[Sequence[Sequence]]): per user, more raw ids to leave out.
            truncate (bool): see :meth:`prepare`.

        Returns:
            List[Recommendation]: B lists of raw ids and cosine scores, best first (fewer
            than k when the history and exclusions leave fewer items).
        """
        k = self.check_k(k)
        prepared = [self.prepare(h, None if exclude is None else exclude[i], truncate)
                    for i, h in enumerate(histories)]
        return self.recommend_prepared(prepared, k) if prepared else []

    @torch.inference_mode()
    def score_prepared(self, prepared: Sequence[PreparedHistory], candidates: Sequence[np.ndarray]) -> List[np.ndarray]:
        """:meth:`score` for several users: one encoder pass for all of them."""
        users = self.user_vectors(prepared)
        return [self._index.cosine(users[row], torch.from_numpy(c).to(self.device)).cpu().numpy()
                for row, c in enumerate(candidates)]

    def score(self, history: Union[History, Mapping[str, Any]], candidates: Sequence[Any],
              truncate: bool = False) -> np.ndarray:
        """Scores many candidates for one user in one encoder pass.

        Args:
            history (History): the user's events.
            candidates (Sequence): raw item ids (unknown ids are a :class:`RequestError`).
            truncate (bool): see :meth:`prepare`.

        Returns:
            np.ndarray: ``(len(candidates),)`` cosine scores, the same values
            :meth:`recommend` ranks by.
        """
        if len(candidates) == 0:
            raise RequestError("no candidates to score")
        prepared = self.prepare(history, truncate=truncate)
        return self.score_prepared([prepared], [self.dense_item_ids(candidates, "candidate")])[0]

    def info(self) -> Dict[str, Any]:
        """What ``/healthz`` reports: model, precision, sizes, versions."""
        m = self.manifest
        return {"model": m["model"]["name"], "precision": self.precision, "num_items": self.num_items,
                "max_history": self.max_history, "action_mode": self.action_mode,
                "uses_timestamps": self.uses_timestamps, "versions": m["versions"], "created": m["created"]}


#: Fixed price of one more encoder call, in padded attention pairs (one call costs about as
#: much as ~30k (query, key) pairs of padded attention on CPU at D = 50).
_CALL_OVERHEAD_PAIRS = 32768.0


def _length_buckets(lengths: np.ndarray) -> List[Tuple[np.ndarray, int]]:
    """Cuts a batch into runs of similar length (see :func:`plan_length_buckets`): padded
    attention costs ``P^2`` pairs per row and the projections ``~64 P``; one encoder call
    costs ``_CALL_OVERHEAD_PAIRS``."""
    return plan_length_buckets(lengths, lambda P: P.astype(np.float64) ** 2 + 64.0 * P, np.ones_like,
                               _CALL_OVERHEAD_PAIRS)


def _is_number(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return not isinstance(x, bool)
