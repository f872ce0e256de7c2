"""Semantic IDs: residual quantisation of content vectors into ``L`` codes of ``K`` each.

- :func:`rq_kmeans`: residual k-means — level ``l`` clusters the residual left by
  levels ``< l`` (k-means++ init, Lloyd iterations, empty clusters re-seeded).
- :class:`RQVAE`: an MLP encoder, ``L`` residual codebooks (straight-through estimator,
  codebook + commitment losses, codebooks initialised by residual k-means, dead codes
  re-seeded) and an MLP decoder that reconstructs the content vector.
- :func:`disambiguate`: items sharing all ``L`` codes get one extra level (their index in
  the collision group), so every item's semantic ID is unique.
- :func:`semantic_id_stats`: codebook usage, collision rate, reconstruction error.

Semantic IDs are looked up as a multi-group table — one TorchRec sub-table per level
(:func:`~torchrec_genrec.models.tables.semantic_id_tables`) whose embeddings are summed per item — and they are tokens of
the unified token space (:func:`add_semantic_id_kinds`, :func:`semantic_id_tokens`).

Example::

    codes, centroids = rq_kmeans(content, num_levels=3, codebook_size=64, seed=0)   # (I, 3)
    sid = disambiguate(codes)                                                       # (I, 4), unique rows
    stats = semantic_id_stats(codes, 64, content, reconstruct(centroids, codes))
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_genrec.tokens import TokenSpace

__all__ = ["RQVAE", "RQVAEConfig", "add_semantic_id_kinds", "disambiguate", "kmeans", "reconstruct",
           "rq_kmeans", "semantic_id_stats", "semantic_id_tokens"]


def kmeans(x: torch.Tensor, k: int, iters: int = 25, generator: Optional[torch.Generator] = None
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. ``x`` ``(N, D)`` -> ``(centroids (k, D),
    assignment (N,))``. Clusters that empty out are re-seeded with the worst-fit points."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}; lower the codebook size")
    g = generator or torch.Generator().manual_seed(0)
    centroids = x[torch.randint(n, (1,), generator=g)]
    closest = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        probs = closest / closest.sum() if float(closest.sum()) > 0 else torch.full_like(closest, 1.0 / n)
        pick = torch.multinomial(probs, 1, generator=g)
        centroids = torch.cat([centroids, x[pick]])
        closest = torch.minimum(closest, (torch.cdist(x, x[pick]).squeeze(1)) ** 2)
    assign = torch.zeros(n, dtype=torch.int64)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)
        assign = dist.argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            worst = dist.gather(1, assign.unsqueeze(1)).squeeze(1).argsort(descending=True)[:empty.numel()]
            new[empty] = x[worst]
        if torch.allclose(new, centroids):
            break
        centroids = new
    assign = torch.cdist(x, centroids).argmin(dim=1)
    return centroids, assign


def rq_kmeans(x: torch.Tensor, num_levels: int, codebook_size: int, seed: int = 0, iters: int = 25
              ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Residual k-means. Returns ``codes`` ``(N, L)`` and the ``L`` codebooks ``(K, D)``."""
    g = torch.Generator().manual_seed(seed)
    residual = x.to(torch.float32).clone()
    codes, books = [], []
    for _ in range(num_levels):
        centroids, assign = kmeans(residual, codebook_size, iters, g)
        codes.append(assign)
        books.append(centroids)
        residual = residual - centroids[assign]
    return torch.stack(codes, dim=1), books


def reconstruct(codebooks: Sequence[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Sum of each level's codeword: ``(N, D)``."""
    return sum(book[codes[:, level]] for level, book in enumerate(codebooks))


def disambiguate(codes: torch.Tensor) -> torch.Tensor:
    """Appends one level that tells apart items sharing all codes: ``(N, L) -> (N, L + 1)``,
    the extra code being the item's rank (by index) inside its collision group (0 when
    the semantic ID is already unique)."""
    _, group = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(group * (codes.shape[0] + 1) + torch.arange(codes.shape[0]), stable=True)
    sorted_group = group[order]
    starts = torch.searchsorted(sorted_group, sorted_group, right=False)
    rank = torch.empty_like(group)
    rank[order] = torch.arange(codes.shape[0]) - starts
    return torch.cat([codes, rank.unsqueeze(1)], dim=1)


def semantic_id_stats(codes: torch.Tensor, codebook_size: int, x: Optional[torch.Tensor] = None,
                      x_hat: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Codebook usage per level (share of the K codes used), code perplexity per level,
    collision rate (share of items whose L-code ID is shared with another item), the
    largest collision group, and the relative reconstruction error
    ``||x - x_hat||^2 / ||x||^2`` when ``x`` and ``x_hat`` are given."""
    out: Dict[str, float] = {"items": int(codes.shape[0]), "levels": int(codes.shape[1])}
    for level in range(codes.shape[1]):
        counts = torch.bincount(codes[:, level], minlength=codebook_size).double()
        p = counts[counts > 0] / counts.sum()
        out[f"usage_l{level}"] = float((counts > 0).double().mean())
        out[f"perplexity_l{level}"] = float(torch.exp(-(p * p.log()).sum()))
    _, group, sizes = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    out["unique_ids"] = int(sizes.numel())
    out["collision_rate"] = float((sizes[group] > 1).double().mean())
    out["max_collision_group"] = int(sizes.max())
    if x is not None and x_hat is not None:
        out["relative_reconstruction_error"] = float(((x - x_hat) ** 2).sum() / (x ** 2).sum().clamp(min=1e-12))
    return out


# ---------------------------------------------------------------------- RQ-VAE
@dataclasses.dataclass
class RQVAEConfig:
    """Args:
    input_dim (int): content vector width.
    latent_dim (int): width of the quantised latent.
    hidden_dim (int): encoder / decoder hidden width.
    num_levels (int): residual levels L.
    codebook_size (int): codes per level K.
    beta (float): commitment weight.
    """

    input_dim: int = 384
    latent_dim: int = 32
    hidden_dim: int = 256
    num_levels: int = 3
    codebook_size: int = 64
    beta: float = 0.25


class RQVAE(nn.Module):
    """Residual-quantised autoencoder (TIGER's semantic-ID quantiser).

    Args:
        config (RQVAEConfig): sizes.

    Example::

        vae = RQVAE(RQVAEConfig(input_dim=384))
        out = vae(x)                    # dict: codes (N, L), z_q (N, d), x_hat (N, D), loss terms
    """

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        c = self.config = config
        self.encoder = nn.Sequential(nn.Linear(c.input_dim, c.hidden_dim), nn.SiLU(),
                                     nn.Linear(c.hidden_dim, c.latent_dim))
        self.decoder = nn.Sequential(nn.Linear(c.latent_dim, c.hidden_dim), nn.SiLU(),
                                     nn.Linear(c.hidden_dim, c.input_dim))
        self.codebooks = nn.Parameter(torch.randn(c.num_levels, c.codebook_size, c.latent_dim) * 0.1)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int = 0) -> None:
        """Residual k-means on the encoder's output (avoids dead codes at the start)."""
        _, books = rq_kmeans(self.encoder(x), self.config.num_levels, self.config.codebook_size, seed, iters=10)
        self.codebooks.copy_(torch.stack(books))

    def quantize(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` ``(N, d)`` -> ``(codes (N, L), z_q (N, d) straight-through, quant_loss)``."""
        residual = z
        codes, quantised = [], torch.zeros_like(z)
        loss = z.new_zeros(())
        for level in range(self.config.num_levels):
            book = self.codebooks[level]
            idx = torch.cdist(residual.detach(), book.detach()).argmin(dim=1)
            e = book[idx]
            loss = loss + F.mse_loss(e, residual.detach()) + self.config.beta * F.mse_loss(residual, e.detach())
            codes.append(idx)
            quantised = quantised + e
            residual = residual - e.detach()
        z_q = z + (quantised - z).detach()
        return torch.stack(codes, dim=1), z_q, loss

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = self.encoder(x)
        codes, z_q, quant_loss = self.quantize(z)
        x_hat = self.decoder(z_q)
        recon = F.mse_loss(x_hat, x)
        return {"codes": codes, "z": z, "z_q": z_q, "x_hat": x_hat, "recon_loss": recon, "quant_loss": quant_loss,
                "loss": recon + quant_loss}

    @torch.no_grad()
    def reseed_dead_codes(self, z: torch.Tensor, codes: torch.Tensor, generator: torch.Generator) -> int:
        """Codes no item uses take a random residual of that level; returns how many."""
        residual, reseeded = z.clone(), 0
        for level in range(self.config.num_levels):
            used = torch.bincount(codes[:, level], minlength=self.config.codebook_size) > 0
            dead = (~used).nonzero().flatten()
            if dead.numel():
                pick = torch.randint(z.shape[0], (dead.numel(),), generator=generator)
                self.codebooks[level, dead] = residual[pick]
                reseeded += int(dead.numel())
            residual = residual - self.codebooks[level][codes[:, level]]
        return reseeded


# ------------------------------------------------------------- tables and tokens
def add_semantic_id_kinds(space: TokenSpace, codebook_sizes: Sequence[int]) -> TokenSpace:
    """``space`` with one token kind per semantic-ID level (``sid0``, ``sid1``, ...)."""
    return TokenSpace(space.kinds + tuple((f"sid{level}", int(k)) for level, k in enumerate(codebook_sizes)))


def semantic_id_tokens(space: TokenSpace, codes: torch.Tensor) -> torch.Tensor:
    """Each item's semantic ID as tokens of ``space``: ``(N, L)`` codes -> ``(N, L)`` token
    ids, level ``l`` in kind ``sid{l}`` (range-checked)."""
    return torch.stack([space.to_tokens(f"sid{level}", codes[:, level]) for level in range(codes.shape[1])], dim=1)
