"""DAS: one-stage joint training of semantic-ID quantisers and a debiased CF model, tied
by dual alignment.

Two RQ-VAEs quantise item content vectors and user content vectors (a user's is the
mean of its history's item vectors) into semantic IDs. A two-tower CF model over user and
item ids learns from the behaviour log with popularity/conformity debiasing: the score is
``<u_interest, i_interest> + <u_conformity, popularity(i)>`` where ``popularity(i)`` is an
embedding of the item's popularity bucket, so the interest towers are freed from
popularity (DICE-style); the interest embeddings are the CF embeddings DAS aligns with.
Alignment: InfoNCE (in-batch negatives) between the quantised embedding (projected to the
CF width) and the CF embedding, over several views —

- ``i2i`` / ``u2u``: the same item (user) across the two views;
- ``u2i`` / ``i2u``: a user and an item it engaged with, across views;
- co-occurrence ``i2i``: an item and the next item the same user engaged with;
- co-occurrence ``u2u``: a user and another user who engaged with the same item.

``L = L_quant + lambda_align * L_align + lambda_cf * L_cf``. A fusion module
(:class:`SIDFusion`) attends across the per-level SID embeddings and the CF embedding
(mixed widths, projected) and gives the joint vector used as a ranker feature; it trains
with the CF objective.

The id tables (user and item interest, user conformity, popularity buckets) are TorchRec
tables of one ``EmbeddingCollection``, looked up once per step through one
KeyedJaggedTensor, so ``DistributedModelParallel`` plans and shards them and trains them
with its fused optimiser.

Example::

    das = DAS(DASConfig(content_dim=384), num_users=943, num_items=1682, popularity_bucket=bucket)
    losses = das(das_batch)                                    # dict with "loss"
    out = das.export(item_content, user_content)               # codes, CF and fused vectors
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_genrec.modules.semantic_ids import RQVAE, RQVAEConfig

__all__ = ["DAS", "DASBatch", "DASConfig", "SIDFusion", "info_nce"]


@dataclasses.dataclass
class DASConfig:
    """Args:
    content_dim (int): content vector width.
    latent_dim (int): quantised latent width (SID embedding width).
    num_levels (int): semantic-ID levels.
    codebook_size (int): codes per level.
    cf_dim (int): CF embedding width (the fused vector has this width too).
    popularity_buckets (int): buckets of the conformity branch.
    temperature (float): InfoNCE temperature.
    lambda_align (float): weight of the alignment losses.
    lambda_cf (float): weight of the CF loss.
    views (tuple): alignment views used (ablations drop some).
    """

    content_dim: int = 384
    latent_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 64
    cf_dim: int = 32
    popularity_buckets: int = 10
    temperature: float = 0.1
    lambda_align: float = 0.1
    lambda_cf: float = 1.0
    views: tuple = ("i2i", "u2u", "u2i", "i2u", "co_i2i", "co_u2u")


@dataclasses.dataclass
class DASBatch(Pipelineable):
    """``B`` training pairs: ``user`` engaged with ``item``; ``next_item`` is the item that
    user engaged with next (co-occurrence), ``co_user`` another user who engaged with
    ``item`` (all ``(B,)`` int64); ``item_content`` / ``user_content`` ``(B, C)`` the
    content vectors of ``item`` and ``user``."""

    user: torch.Tensor
    item: torch.Tensor
    next_item: torch.Tensor
    co_user: torch.Tensor
    item_content: torch.Tensor
    user_content: torch.Tensor

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "DASBatch":
        return DASBatch(*(fn(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> "DASBatch":
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).record_stream(stream)


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """One-directional InfoNCE: row ``b`` of ``query`` should match row ``b`` of ``key``
    among all rows of ``key`` (in-batch negatives). ``(B, D), (B, D) -> ()``."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


class SIDFusion(nn.Module):
    """Attention across per-level SID embeddings and a CF embedding of another width.

    Args:
        sid_dim (int): width of each level's SID embedding.
        cf_dim (int): width of the CF embedding (and of the output).
        num_levels (int): SID levels.

    Shape: ``(N, L, sid_dim)`` and ``(N, cf_dim)`` -> ``(N, cf_dim)``.
    """

    def __init__(self, sid_dim: int, cf_dim: int, num_levels: int) -> None:
        super().__init__()
        self.sid_projection = nn.Linear(sid_dim, cf_dim)
        self.cf_projection = nn.Linear(cf_dim, cf_dim)
        self.position = nn.Parameter(torch.zeros(num_levels + 1, cf_dim))
        self.query = nn.Parameter(torch.randn(cf_dim) * 0.02)
        self.key = nn.Linear(cf_dim, cf_dim, bias=False)
        self.out = nn.Linear(cf_dim, cf_dim)

    def forward(self, sid_levels: torch.Tensor, cf: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.sid_projection(sid_levels), self.cf_projection(cf).unsqueeze(1)], dim=1)
        tokens = tokens + self.position
        weights = torch.softmax(self.key(tokens) @ self.query / tokens.shape[-1] ** 0.5, dim=1)  # (N, L+1)
        return self.out((weights.unsqueeze(-1) * tokens).sum(dim=1))


class DAS(nn.Module):
    """The DAS model (see the module docstring).

    Args:
        config (DASConfig): sizes and loss weights.
        num_users, num_items (int): id ranges of the CF towers.
        popularity_bucket (torch.Tensor): ``(I,)`` int64 popularity bucket of each item
            (from training events only).
        device (torch.device): where the id tables are created (``meta`` for DMP).
    """

    #: table -> the KeyedJaggedTensor features that read it.
    TABLES = {"das_user_interest": ("das_user", "das_co_user"), "das_item_interest": ("das_item", "das_next_item"),
              "das_user_conformity": ("das_conformity_user",), "das_popularity": ("das_popularity",)}
    FEATURES = tuple(f for features in TABLES.values() for f in features)

    def __init__(self, config: DASConfig, num_users: int, num_items: int, popularity_bucket: torch.Tensor,
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        c = self.config = config
        rq = RQVAEConfig(input_dim=c.content_dim, latent_dim=c.latent_dim, hidden_dim=4 * c.latent_dim,
                         num_levels=c.num_levels, codebook_size=c.codebook_size)
        self.item_quantizer, self.user_quantizer = RQVAE(rq), RQVAE(rq)
        self.rows = {"das_user_interest": num_users, "das_item_interest": num_items,
                     "das_user_conformity": num_users, "das_popularity": c.popularity_buckets}
        self.tables = EmbeddingCollection(tables=[
            EmbeddingConfig(name=name, embedding_dim=c.cf_dim, num_embeddings=self.rows[name],
                            feature_names=list(features), init_fn=lambda w: nn.init.normal_(w, std=0.05))
            for name, features in self.TABLES.items()], device=device)
        self.register_buffer("popularity_bucket", popularity_bucket.to(torch.int64))
        # Quantised latents -> CF width, one projection per side (mixed dimensions).
        self.item_to_cf = nn.Linear(c.latent_dim, c.cf_dim)
        self.user_to_cf = nn.Linear(c.latent_dim, c.cf_dim)
        self.item_fusion = SIDFusion(c.latent_dim, c.cf_dim, c.num_levels)
        self.user_fusion = SIDFusion(c.latent_dim, c.cf_dim, c.num_levels)

    @torch.no_grad()
    def init_codebooks(self, item_content: torch.Tensor, user_content: torch.Tensor, seed: int = 0) -> None:
        self.item_quantizer.init_codebooks(item_content, seed)
        self.user_quantizer.init_codebooks(user_content, seed + 1)

    @staticmethod
    def _levels(quantizer: RQVAE, codes: torch.Tensor) -> torch.Tensor:
        """``(N, L, latent)``: each level's codeword of each row."""
        return torch.stack([quantizer.codebooks[level][codes[:, level]] for level in range(codes.shape[1])], dim=1)

    def _lookup(self, batch: DASBatch) -> Dict[str, torch.Tensor]:
        """Every id row the step reads, in one lookup through the collection (with a fused
        optimiser, a row read any other way would not be updated)."""
        ids = {"das_user": batch.user, "das_co_user": batch.co_user, "das_item": batch.item,
               "das_next_item": batch.next_item, "das_conformity_user": batch.user,
               "das_popularity": self.popularity_bucket[batch.item]}
        values = torch.cat([ids[f] for f in self.FEATURES])
        lengths = torch.ones(values.numel(), dtype=torch.int32, device=values.device)
        out = self.tables(KeyedJaggedTensor.from_lengths_sync(list(self.FEATURES), values, lengths))
        return {f: out[f].values() for f in self.FEATURES}

    def weights(self, table: str) -> torch.Tensor:
        """``(rows, cf_dim)`` the weight of an (unsharded) id table."""
        return self.tables.embeddings[table].weight

    def forward(self, batch: DASBatch) -> Dict[str, torch.Tensor]:
        c = self.config
        items = self.item_quantizer(batch.item_content)
        users = self.user_quantizer(batch.user_content)
        quant = items["loss"] + users["loss"]
        rows = self._lookup(batch)
        u_cf, i_cf = rows["das_user"], rows["das_item"]
        conformity = rows["das_conformity_user"] @ rows["das_popularity"].T  # (B, B): user b x item b's bucket
        target = torch.arange(batch.user.numel(), device=batch.user.device)
        cf = F.cross_entropy(u_cf @ i_cf.T + conformity, target)
        # Fused vectors train with the same objective (they are the ranker features).
        u_f = self.user_fusion(self._levels(self.user_quantizer, users["codes"]) +
                               (users["z_q"] - users["z_q"].detach()).unsqueeze(1), u_cf)
        i_f = self.item_fusion(self._levels(self.item_quantizer, items["codes"]) +
                               (items["z_q"] - items["z_q"].detach()).unsqueeze(1), i_cf)
        fuse = F.cross_entropy(u_f @ i_f.T + conformity, target)
        iq, uq = self.item_to_cf(items["z_q"]), self.user_to_cf(users["z_q"])
        t = c.temperature
        views = {
            "i2i": lambda: info_nce(iq, i_cf, t),
            "u2u": lambda: info_nce(uq, u_cf, t),
            "u2i": lambda: info_nce(uq, i_cf, t),
            "i2u": lambda: info_nce(iq, u_cf, t),
            "co_i2i": lambda: info_nce(iq, rows["das_next_item"], t),
            "co_u2u": lambda: info_nce(uq, rows["das_co_user"], t),
        }
        align_terms = {name: views[name]() for name in c.views}
        align = sum(align_terms.values()) / max(len(align_terms), 1)
        loss = quant + c.lambda_align * align + c.lambda_cf * (cf + fuse)
        return {"loss": loss, "quant": quant.detach(), "align": align.detach(), "cf": cf.detach(),
                "fuse": fuse.detach(), "recon": (items["recon_loss"] + users["recon_loss"]).detach(),
                **{f"align_{k}": v.detach() for k, v in align_terms.items()}}

    @torch.no_grad()
    def export(self, item_content: torch.Tensor, user_content: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Codes, CF (interest) vectors and fused vectors of every item and user."""
        items = self.item_quantizer(item_content)
        users = self.user_quantizer(user_content)
        i_cf, u_cf = self.weights("das_item_interest"), self.weights("das_user_interest")
        return {
            "item_codes": items["codes"], "user_codes": users["codes"],
            "item_cf": i_cf.clone(), "user_cf": u_cf.clone(),
            "item_fused": self.item_fusion(self._levels(self.item_quantizer, items["codes"]), i_cf),
            "user_fused": self.user_fusion(self._levels(self.user_quantizer, users["codes"]), u_cf),
            "item_reconstruction": items["x_hat"], "user_reconstruction": users["x_hat"],
        }
