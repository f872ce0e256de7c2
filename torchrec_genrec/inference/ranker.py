"""Rankers for serving: load a ranker artifact, score a user's candidates in one pass.

``genrec export RUN --out DIR [--precision int8|fp16|fp32]`` on a ``genrec rank`` run
(:func:`~torchrec_genrec.export.ranker.export_ranker`) writes a directory holding the
model's weights (safetensors: the id tables as TorchRec's quantised inference collections
— int8 row-wise with a per-row fp16 scale and bias, or fp16 —, or the trained fp32 model;
dense parameters fp32), the item and user side features it reads (genres, release year,
age, gender, occupation, zip; safetensors), the raw ids and the timestamp unit
(``vocab.json``) and a ``manifest.json`` (config, stack versions, each file's size and
sha256) — nothing pickled; it is checked like a retrieval artifact before it loads.
:class:`RankerPredictor` rebuilds the model from the config and scores one request: all
candidates share the user's history, which is encoded once (OneTrans: the Stage I cache;
HSTU ranker: one target-aware pass; DCNv2+DIN: one lookup). It needs neither the training
code nor the dataset: requests become batches through :mod:`torchrec_genrec.batch`, as
the training data does.

Example::

    predictor = RankerPredictor.load("artifacts/onetrans")
    history = History(items=[50, 172], actions=[5, 3], timestamps=[881250949, 881251000])
    probs = predictor.score(user=196, history=history, candidates=[1, 2, 3], timestamp=881260000)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Union

import numpy as np
import torch
from torchrec.inference.modules import DEFAULT_QUANT_MAPPING, quantize_inference_model
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection

from torchrec_genrec.batch import (SEQUENCES, USER_SIDES, EventSequences, ItemSides, assemble_batch, ns_feature_ids,
                                   per_second, request_sequences)
from torchrec_genrec.config import ConfigError, from_dict
from torchrec_genrec.inference import artifact as art
from torchrec_genrec.inference.predictor import History, RequestError, serving_device
from torchrec_genrec.inference.quant import PRECISIONS, TORCH_DTYPES
from torchrec_genrec.models.ranking import Ranker, RankerConfig
from torchrec_genrec.plans.planner import FrozenEmbeddingCollection

__all__ = ["FEATURES", "RANKER_FORMAT", "WEIGHTS", "RankRequest", "RankerPredictor", "quantize_ranker_tables"]

RANKER_FORMAT = "torchrec-genrec/ranking"
WEIGHTS = "ranker.safetensors"
FEATURES = "features.safetensors"
#: The ranker's frozen tables, each in its own collection ``<name>_embeddings``.
_FROZEN_TABLES = ("content", "das", "lum")


def quantize_ranker_tables(model: Ranker, precision: str) -> Dict[str, Dict[str, Any]]:
    """Swaps the ranker's id-table collections for TorchRec's quantised inference ones, in place.

    Every ``EmbeddingCollection`` / ``EmbeddingBagCollection`` of the model (items, ratings,
    the NS features, semantic IDs, and the frozen content / DAS / LUM tables) becomes a
    ``QuantEmbeddingCollection`` / ``QuantEmbeddingBagCollection`` over fbgemm's inference
    TBE at ``precision``; the model's forward is unchanged and the dense parameters stay
    fp32. ``fp32`` leaves the model as trained.

    Args:
        model (Ranker): an unsharded ranker on CPU.
        precision (str): ``int8``, ``fp16`` or ``fp32``.

    Returns:
        Dict[str, Dict[str, Any]]: per table, ``rows``, ``dim`` and ``precision``.

    Example::

        model, _, _ = load_trained_ranker("runs/ranking_ml100k")    # torchrec_genrec.export
        tables = quantize_ranker_tables(model, "int8")
    """
    if precision not in PRECISIONS:
        raise art.ArtifactError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    tables: Dict[str, Dict[str, Any]] = {}
    for module in model.modules():
        if isinstance(module, (EmbeddingCollection, EmbeddingBagCollection)):
            configs = module.embedding_configs() if isinstance(module, EmbeddingCollection) \
                else module.embedding_bag_configs()
            for c in configs:
                tables[c.name] = {"rows": c.num_embeddings, "dim": c.embedding_dim, "precision": "fp32"}
    if precision != "fp32":
        # TorchRec swaps modules by exact type name: the frozen subclass is named too.
        mapping = {**DEFAULT_QUANT_MAPPING, torch.typename(FrozenEmbeddingCollection): QuantEmbeddingCollection}
        quantize_inference_model(model, quantization_mapping=mapping,
                                 per_table_weight_dtype={name: TORCH_DTYPES[precision] for name in tables},
                                 quantization_dtype=TORCH_DTYPES[precision])
        # Record what was swapped, not what was asked for.
        quant_types = (QuantEmbeddingCollection, QuantEmbeddingBagCollection)
        quantised = [m for m in model.modules() if isinstance(m, quant_types)]
        swapped = {c.name for m in quantised
                   for c in (m.embedding_configs() if isinstance(m, QuantEmbeddingCollection)
                             else m.embedding_bag_configs())}
        for name in swapped:
            tables[name]["precision"] = precision
    return tables


_FEATURE_KEYS = ("genre_offsets", "genre_values", "item_year", *(f"user_{k}" for k in USER_SIDES))


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise art.ArtifactError(f"not a readable safetensors file ({e})", path=path) from e


def _check_ranker_manifest(manifest: Dict[str, Any], where: str) -> None:
    """The settings a ranker is rebuilt from, each of the expected type (a clear error, not
    a KeyError deep in the model's constructor)."""
    art.require(manifest, "model", dict, where)
    art.require(manifest, "model.name", str, where)
    art.require(manifest, "task", dict, where)
    art.require(manifest, "task.max_seq_len", int, where, lambda n: n > 0, "a positive integer")
    art.require(manifest, "task.positive_threshold", (int, float), where)
    if "lifelong_len" in manifest["task"]:
        art.require(manifest, "task.lifelong_len", int, where, lambda n: n >= 0, "an integer >= 0")
    art.require(manifest, "vocab_sizes", dict, where,
                lambda v: all(type(n) is int and n > 0 for n in v.values()), "positive table sizes")
    art.require(manifest, "num_genres", int, where, lambda n: n > 0, "a positive integer")
    if "precision" in manifest:
        art.require(manifest, "precision", str, where, lambda p: p in ("fp32", "fp16", "int8"), "fp32, fp16 or int8")
    for name, table in (manifest.get("tables") or {}).items():
        for key, check in (("rows", lambda n: n > 0), ("dim", lambda n: n > 0)):
            art.require(manifest, f"tables.{name}.{key}", int, where, check, "a positive integer")
        art.require(manifest, f"tables.{name}.precision", str, where, lambda p: p in ("fp32", "fp16", "int8"),
                    "fp32, fp16 or int8")


def _check_ranker_vocab(vocab: Any, where: str) -> None:
    if not isinstance(vocab, dict):
        raise art.ArtifactError("expected an object with item_ids, user_ids, action_values, genres", path=where)
    for key in ("item_ids", "user_ids"):
        art.require(vocab, key, list, where, lambda ids: all(type(i) in (int, str) for i in ids),
                    "a flat list of integer or string ids")
    art.require(vocab, "action_values", list, where,
                lambda v: all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v), "a list of numbers")
    art.require(vocab, "genres", list, where)


@dataclasses.dataclass
class RankRequest:
    """A validated ranking request in dense ids (:meth:`RankerPredictor.prepare`)."""

    user: int
    sequences: Dict[str, EventSequences]
    targets: np.ndarray
    seconds: int


class RankerPredictor:
    """Scores candidates for one user request with an exported ranker.

    Args:
        model (Ranker): the ranker in eval mode.
        manifest, vocab (Dict[str, Any]): the artifact's.
        features (Dict[str, torch.Tensor]): its side features.
        device (torch.device): where ``model`` lives; each batch is moved there once.
    """

    def __init__(self, model: Ranker, manifest: Dict[str, Any], vocab: Dict[str, Any],
                 features: Dict[str, torch.Tensor], device: torch.device = torch.device("cpu")) -> None:
        self.model, self.manifest, self.device = model.eval(), manifest, device
        self.max_seq_len = int(manifest["task"]["max_seq_len"])
        self.lifelong_len = int(manifest["task"].get("lifelong_len", 0))
        self.positive_threshold = float(manifest["task"]["positive_threshold"])
        self._item_index = {raw: i for i, raw in enumerate(vocab["item_ids"])}
        self._user_index = {raw: i for i, raw in enumerate(vocab["user_ids"])}
        self._action_index = {float(v): i for i, v in enumerate(vocab["action_values"])}
        self._action_values = np.asarray(vocab["action_values"], dtype=np.float64)
        self._per_second = per_second(vocab.get("timestamp_unit", "s"))
        f = {k: v.numpy() for k, v in features.items()}
        self._items = ItemSides.from_csr(f["genre_offsets"], f["genre_values"], int(manifest["num_genres"]))
        self._item_year = f["item_year"]
        self._user_sides = {k: f[f"user_{k}"] for k in USER_SIDES}

    @classmethod
    def load(cls, directory: str, check_versions: bool = True,
             device: Union[str, torch.device] = "cpu") -> "RankerPredictor":
        """Verifies (sizes, sha256, versions) and loads an artifact of ``export_ranker``.

        Args:
            directory (str): the artifact.
            check_versions (bool): refuse an artifact exported with another stack.
            device (str): where the ranker runs, ``cpu`` (default) or ``cuda[:N]``: the model
                is built and quantised there (fbgemm's inference TBE on the device), so the
                same artifact serves on either.
        """
        target = serving_device(device)
        reader = art.ArtifactReader(directory, RANKER_FORMAT, required=(WEIGHTS, FEATURES, art.VOCAB),
                                    check_versions=check_versions)
        manifest, where = reader.manifest, reader.manifest_path
        _check_ranker_manifest(manifest, where)
        vocab = reader.json(art.VOCAB)
        _check_ranker_vocab(vocab, reader.path(art.VOCAB))
        try:
            config = from_dict(RankerConfig, manifest["model"], where)
        except ConfigError as e:
            raise art.ArtifactError(f"the model settings do not fit this library's ranker ({e})", path=where) from e
        weights = _load_tensors(reader.verified_path(WEIGHTS))
        precision = manifest.get("precision", "fp32")  # artifacts before quantised rankers were fp32
        # Semantic-ID codes and frozen tables travel inside the weights: rebuild the side inputs.
        # A quantised frozen table only sizes the model here (its rows load after quantising).
        shapes = dict(weights)
        for name, table in manifest.get("tables", {}).items():
            key = f"{name}_embeddings.embeddings.{name}.weight"
            if name in _FROZEN_TABLES and key in weights and table["precision"] != "fp32":
                shapes[key] = torch.zeros(table["rows"], table["dim"])
        try:
            model = Ranker(config, manifest["vocab_sizes"], num_genres=int(manifest["num_genres"]),
                           max_seq_len=int(manifest["task"]["max_seq_len"]), device=target,
                           side=Ranker.side_inputs_from_state(shapes, manifest["vocab_sizes"],
                                                              manifest.get("side_widths")))
            quantize_ranker_tables(model, precision)
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise art.ArtifactError(f"{WEIGHTS} does not fit the {precision} {config.name} ranker its manifest "
                                    f"describes ({type(e).__name__}: {e})", path=reader.path(WEIGHTS)) from e
        missing = [k for k in missing if ".tbes." not in k]
        if missing or unexpected:
            raise art.ArtifactError(f"{WEIGHTS} does not fit a {precision} {config.name} ranker: missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}", path=directory)
        features = _load_tensors(reader.verified_path(FEATURES))
        missing_sides = [k for k in _FEATURE_KEYS if k not in features]
        if missing_sides:
            raise art.ArtifactError(f"side features {missing_sides} are missing", path=reader.path(FEATURES))
        return cls(model, manifest, vocab, features, device=target)

    def _dense(self, index: Dict[Any, int], raw: Sequence[Any], what: str) -> np.ndarray:
        ids, unknown = [], []
        for r in raw:
            i = index.get(r)
            if i is None:
                unknown.append(r)
            ids.append(i)
        if unknown:
            raise RequestError(f"unknown {what} id(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                               "the model knows only the ids of its training data")
        return np.asarray(ids, dtype=np.int64)

    def _sequences(self, history: History, timestamp: int) -> Dict[str, EventSequences]:
        n = len(history.items)
        if history.actions is None or history.timestamps is None or len(history.actions) != n \
                or len(history.timestamps) != n:
            raise RequestError("a ranking history needs items, actions and timestamps of the same length")
        items = self._dense(self._item_index, history.items, "item")
        try:
            actions = np.asarray([self._action_index[float(a)] for a in history.actions], dtype=np.int64)
        except (KeyError, TypeError, ValueError):
            raise RequestError(f"history actions must be among {self._action_values.tolist()}") from None
        times = np.asarray(history.timestamps, dtype=np.int64)
        if n and (np.any(np.diff(times) < 0) or times[-1] >= timestamp):
            raise RequestError("history timestamps must be non-decreasing and strictly before the request's")
        seconds = times // self._per_second
        liked = self._action_values[actions] >= self.positive_threshold
        return request_sequences(items, actions, seconds, liked, self.max_seq_len, self.lifelong_len)

    def prepare(self, user: Any, history: History, candidates: Sequence[Any], timestamp: int) -> "RankRequest":
        """Validates one request and maps it to dense ids (what :meth:`score_prepared` takes).

        Raises:
            RequestError: unknown ids, mismatched or unordered history, no candidates.
        """
        if len(candidates) == 0:
            raise RequestError("no candidates to score")
        (u,) = self._dense(self._user_index, [user], "user")
        targets = self._dense(self._item_index, candidates, "item")
        return RankRequest(u, self._sequences(history, int(timestamp)), targets, int(timestamp) // self._per_second)

    @torch.no_grad()
    def score_prepared(self, requests: Sequence["RankRequest"]) -> list:
        """Like-probabilities for several prepared requests, all in one batch: each
        request's history is encoded once and shared by its candidates.

        Returns:
            list: per request, ``(C_r,)`` probabilities in its candidates' order.
        """
        counts = np.asarray([len(r.targets) for r in requests], dtype=np.int64)
        targets = np.concatenate([r.targets for r in requests])
        seconds = np.repeat(np.asarray([r.seconds for r in requests], dtype=np.int64), counts)
        users = np.repeat(np.asarray([r.user for r in requests], dtype=np.int64), counts)
        ns_ids = ns_feature_ids(users, targets, seconds, self._user_sides, self._item_year)
        sequences = {name: EventSequences(*(np.concatenate([getattr(r.sequences[name], f) for r in requests])
                                            for f in ("items", "actions", "seconds", "lengths")))
                     for name in SEQUENCES}
        lifelong = None
        if self.lifelong_len > 0:
            lifelong = EventSequences(*(np.concatenate([getattr(r.sequences["lifelong"], f) for r in requests])
                                        for f in ("items", "actions", "seconds", "lengths")))
        batch = assemble_batch(sequences, counts, targets, seconds, ns_ids, self._items, user=users,
                               lifelong=lifelong)
        probs = torch.sigmoid(self.model.predict(batch.to(self.device))).cpu().numpy()
        return np.split(probs, np.cumsum(counts)[:-1])

    def score(self, user: Any, history: History, candidates: Sequence[Any], timestamp: int) -> np.ndarray:
        """Like-probabilities of ``candidates`` for ``user`` at ``timestamp``, in one pass.

        Args:
            user: raw user id (its side features come from the artifact).
            history (History): the user's events before ``timestamp`` (items, actions,
                timestamps; raw ids and values), oldest first.
            candidates (Sequence): raw item ids to score.
            timestamp (int): the request time (the dataset's timestamp unit).

        Returns:
            np.ndarray: ``(C,)`` probabilities, in the candidates' order.

        Raises:
            RequestError: unknown ids, mismatched or unordered history, no candidates.
        """
        return self.score_prepared([self.prepare(user, history, candidates, timestamp)])[0]

    def info(self) -> Dict[str, Any]:
        return {"task": "ranking", "model": self.manifest["model"]["name"], "test": self.manifest["run"].get("test"),
                "precision": self.manifest.get("precision", "fp32"),
                "items": len(self._item_index), "users": len(self._user_index)}



