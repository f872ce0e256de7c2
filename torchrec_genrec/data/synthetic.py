"""Synthetic event logs: any scale, known structure, no download.

Events are drawn from a small generative model, :class:`SyntheticWorld`, fixed by a
:class:`SyntheticConfig` and its seed:

- **Popularity.** Item popularity is a truncated Zipf law: the item of popularity rank
  ``r`` (1-based) has weight ``r ** -item_zipf``. Ranks are shuffled over item ids, so a
  low id says nothing about popularity.
- **Sequence lengths** are long-tailed: ``min_seq_len`` plus a lognormal share
  (shape ``length_sigma``) of the remaining events, rounded so the lengths sum to exactly
  ``num_events``. The mean length is therefore ``num_events / num_users``.
- **Actions** (event types, or ratings) are drawn independently per event with
  ``action_probs``.
- **Timestamps** (seconds): each user starts at a uniform time in
  ``[start_timestamp, start_timestamp + timestamp_span)`` and advances by
  ``1 + floor(Exponential(mean_gap))`` per event, so they strictly increase per user.
- **Planted structure** (off by default; for testing sequential models). Every user has
  a taste cluster (uniform over ``num_clusters``) and every item belongs to one cluster.
  Every item has ``markov_fanout`` successors (uniform over all items) with fixed
  probabilities halving from one successor to the next: a sparse Markov chain. Each event
  after a user's first one is, with probability ``p_markov``, a successor of the user's
  previous item; otherwise (and always for the first event) it is drawn from the user's
  cluster with probability ``p_cluster`` (popularity restricted to the cluster) or from
  global popularity. Given the previous item and the user's cluster, the next item's
  distribution is therefore known exactly
  (:meth:`SyntheticWorld.next_item_distribution`), and given only the observed history,
  so is the Bayes posterior predictive
  (:meth:`SyntheticWorld.posterior_next_item_distribution`): the Bayes-optimal HR@k of
  a dataset is computable.

Generation is streamed: users are generated in fixed blocks, each from its own random
streams derived from ``(seed, block)``, and blocks are grouped into chunks of about
``chunk_events`` events. 100M events never sit in memory at once, and the output is the
same for any chunk size. Raw ids are 0-based (``user`` in ``0 .. num_users - 1``, ``item``
in ``0 .. num_items - 1``); the MovieLens writer shifts them to 1-based.

Example::

    config = SyntheticConfig(num_users=1000, num_items=500, num_events=50_000, seed=1)
    interactions = generate(config)                  # small: in memory
    write_csv(config, "events.csv")                  # any size: chunk by chunk
    write_movielens_1m(config, "ml-synthetic/")      # ratings.dat, movies.dat, users.dat
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from torchrec_genrec.data.interactions import ACTION, ITEM, TIMESTAMP, USER, Interactions

#: Users per generation block. Fixed (not a parameter): the random streams are keyed by
#: block, so changing it would change the data a seed gives.
BLOCK_USERS = 1024

#: MovieLens-1M's rating frequencies (1..5 stars), for :meth:`SyntheticConfig.movielens_1m_like`.
ML1M_RATING_PROBS = (0.056, 0.108, 0.261, 0.349, 0.226)

#: The 18 MovieLens-1M genres, in the order of its README.
ML_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)
#: MovieLens-1M age groups and occupation codes (users.dat).
ML_AGES = (1, 18, 25, 35, 45, 50, 56)
ML_NUM_OCCUPATIONS = 21

# Independent random streams, so that e.g. turning on the Markov chain does not change
# the sequence lengths or the popularity of a seed.
_S_LENGTHS, _S_POPULARITY, _S_CLUSTERS, _S_SUCCESSORS, _S_BLOCK, _S_PROFILES = range(6)
_B_ITEM, _B_SOURCE, _B_MARKOV, _B_ACTION, _B_TIME = range(5)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.

    Args:
        num_users (int): users; every one gets at least ``min_seq_len`` events.
        num_items (int): item catalogue size (rare items may never be drawn).
        num_events (int): total events, exactly.
        item_zipf (float): Zipf exponent of item popularity (1.0-1.2 is typical of
            real logs; 0 is uniform).
        min_seq_len (int): shortest user sequence.
        length_sigma (float): lognormal shape of the lengths above the minimum; larger
            means a longer tail (0 gives equal lengths).
        action_probs (Tuple[float, ...]): probability of each action id ``0 .. A - 1``
            (e.g. view, click, like, share); normalised.
        start_timestamp (int): earliest first event (seconds since the epoch).
        timestamp_span (int): users' first events are uniform over this many seconds.
        mean_gap (float): mean seconds between a user's consecutive events.
        num_clusters (int): taste clusters; 0 turns the cluster structure off.
        p_cluster (float): chance that a non-Markov event comes from the user's cluster.
        p_markov (float): chance that an event (other than a user's first) follows the
            Markov chain from the previous item; 0 turns it off.
        markov_fanout (int): successors per item in the Markov chain.
        seed (int): everything generated is a function of the config, seed included.

    Example::

        SyntheticConfig(num_users=100_000, num_items=50_000, num_events=10_000_000)
        SyntheticConfig(num_clusters=20, p_markov=0.5)    # planted structure
    """

    num_users: int = 6040
    num_items: int = 3706
    num_events: int = 1_000_000
    item_zipf: float = 1.1
    min_seq_len: int = 5
    length_sigma: float = 1.0
    action_probs: Tuple[float, ...] = (0.70, 0.15, 0.10, 0.05)
    start_timestamp: int = 956_703_932  # 2000-04-25, when MovieLens-1M starts
    timestamp_span: int = 3 * 365 * 86400
    mean_gap: float = 3600.0
    num_clusters: int = 0
    p_cluster: float = 0.8
    p_markov: float = 0.0
    markov_fanout: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.num_users < 1 or self.num_items < 1:
            problems.append("num_users and num_items must be >= 1")
        if self.min_seq_len < 1:
            problems.append("min_seq_len must be >= 1")
        if self.num_events < self.num_users * self.min_seq_len:
            problems.append(f"num_events ({self.num_events}) must be >= num_users * min_seq_len "
                            f"({self.num_users} * {self.min_seq_len})")
        if self.item_zipf < 0 or self.length_sigma < 0 or self.mean_gap < 0 or self.timestamp_span < 1:
            problems.append("item_zipf, length_sigma and mean_gap must be >= 0, timestamp_span >= 1")
        if not self.action_probs or min(self.action_probs) < 0 or sum(self.action_probs) <= 0:
            problems.append("action_probs must be non-empty, non-negative and not all zero")
        if not 0 <= self.num_clusters <= self.num_items:
            problems.append("num_clusters must be in 0 .. num_items")
        if not (0 <= self.p_cluster <= 1 and 0 <= self.p_markov <= 1):
            problems.append("p_cluster and p_markov must be probabilities")
        if self.markov_fanout < 1:
            problems.append("markov_fanout must be >= 1")
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))

    @property
    def num_actions(self) -> int:
        return len(self.action_probs)

    @classmethod
    def movielens_1m_like(cls, **overrides) -> "SyntheticConfig":
        """MovieLens-1M's shape: 6040 users, 3706 rated movies, ~1M ratings, at least 20
        per user, five actions with ML-1M's star frequencies.

        Example::

            write_movielens_1m(SyntheticConfig.movielens_1m_like(seed=3), "ml-synthetic/")
        """
        fields = dict(num_users=6040, num_items=3706, num_events=1_000_209, min_seq_len=20,
                      length_sigma=1.0, action_probs=ML1M_RATING_PROBS, mean_gap=600.0)
        fields.update(overrides)
        return cls(**fields)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _cdf(weights: np.ndarray) -> np.ndarray:
    """Cumulative distribution ending at exactly 1.0, for ``searchsorted(cdf, u, "right")``
    with ``u`` in ``[0, 1)``: the result is always a valid index."""
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def _long_tailed_lengths(config: SyntheticConfig) -> np.ndarray:
    """``min_seq_len`` + lognormal shares of the remaining events, summing exactly to ``num_events``."""
    rng = _rng(config.seed, _S_LENGTHS)
    n, budget = config.num_users, config.num_events - config.num_users * config.min_seq_len
    share = rng.lognormal(0.0, config.length_sigma, size=n)
    extra = share * (budget / share.sum())
    lengths = np.floor(extra).astype(np.int64)
    # Largest-remainder rounding: the total is exact and no length moves by more than one.
    short = budget - int(lengths.sum())
    if short > 0:
        lengths[np.argpartition(lengths - extra, short - 1)[:short]] += 1
    return lengths + config.min_seq_len


class SyntheticWorld:
    """The latent structure a config's seed fixes, and the sampler of its events.

    Args:
        config (SyntheticConfig): what to generate.

    Attributes:
        lengths (np.ndarray): int64 ``[U]`` events per user (summing to ``num_events``).
        popularity (np.ndarray): float64 ``[I]`` global item distribution, by item id.
        item_cluster (Optional[np.ndarray]): int64 ``[I]`` cluster of each item.
        user_cluster (Optional[np.ndarray]): int64 ``[U]`` taste cluster of each user.
        successors (Optional[np.ndarray]): int64 ``[I, K]`` Markov successors of each item.
        successor_probs (Optional[np.ndarray]): float64 ``[K]`` chance of each successor slot.

    Example::

        world = SyntheticWorld(SyntheticConfig(num_clusters=10, p_markov=0.5))
        for batch in world.batches(chunk_events=1 << 20):   # pa.RecordBatch
            ...
        p = world.next_item_distribution(prev_item=17, user=3)   # float64 [I], sums to 1
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        seed, num_items = config.seed, config.num_items
        self.lengths = _long_tailed_lengths(config)
        self.offsets = np.zeros(config.num_users + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])

        # Popularity by rank, ranks shuffled over ids.
        self._rank_cdf = _cdf(np.arange(1, num_items + 1, dtype=np.float64) ** -config.item_zipf)
        self._rank_to_item = _rng(seed, _S_POPULARITY).permutation(num_items)
        self.popularity = np.empty(num_items, dtype=np.float64)
        self.popularity[self._rank_to_item] = np.diff(self._rank_cdf, prepend=0.0)
        self._action_cdf = _cdf(np.asarray(config.action_probs, dtype=np.float64))

        self.item_cluster: Optional[np.ndarray] = None
        self.user_cluster: Optional[np.ndarray] = None
        if config.num_clusters > 0:
            rng = _rng(seed, _S_CLUSTERS)
            c = config.num_clusters
            # Round-robin then shuffled: every cluster has items, sizes differ by at most one.
            self.item_cluster = rng.permutation(np.arange(num_items, dtype=np.int64) % c)
            self.user_cluster = rng.integers(0, c, size=config.num_users, dtype=np.int64)
            # One searchsorted samples any mix of clusters: items sorted by cluster, and
            # cluster c's CDF shifted into [c, c + 1], so u + c lands inside cluster c.
            self._items_by_cluster = np.argsort(self.item_cluster, kind="stable")
            self._cluster_starts = np.searchsorted(self.item_cluster[self._items_by_cluster], np.arange(c + 1))
            mass = np.bincount(self.item_cluster, weights=self.popularity, minlength=c)
            self._pop_in_cluster = self.popularity / mass[self.item_cluster]
            within = np.cumsum(self._pop_in_cluster[self._items_by_cluster])
            ends = within[self._cluster_starts[1:] - 1]
            before = np.concatenate(([0.0], ends[:-1]))
            cluster_of_slot = self.item_cluster[self._items_by_cluster]
            self._cluster_cdf = cluster_of_slot + (within - before[cluster_of_slot])
            self._cluster_cdf[self._cluster_starts[1:] - 1] = np.arange(1, c + 1)

        self.successors: Optional[np.ndarray] = None
        self.successor_probs: Optional[np.ndarray] = None
        if config.p_markov > 0:
            k = config.markov_fanout
            self.successors = _rng(seed, _S_SUCCESSORS).integers(0, num_items, size=(num_items, k), dtype=np.int64)
            self.successor_probs = 0.5 ** np.arange(k, dtype=np.float64)
            self.successor_probs /= self.successor_probs.sum()
            self._successor_cdf = _cdf(self.successor_probs)

    @property
    def num_blocks(self) -> int:
        return -(-self.config.num_users // BLOCK_USERS)

    # ------------------------------------------------------------------ sampling

    def _draw_items(self, rng_item: np.random.Generator, rng_source: np.random.Generator,
                    user_of_event: np.ndarray) -> np.ndarray:
        """Independent (non-Markov) draws: the user's cluster or global popularity."""
        u = rng_item.random(len(user_of_event))
        items = self._rank_to_item[np.searchsorted(self._rank_cdf, u, side="right")]
        if self.user_cluster is not None and self.config.p_cluster > 0:
            rows = np.flatnonzero(rng_source.random(len(u)) < self.config.p_cluster)
            # Reusing u is sound: where the cluster is chosen the global draw is dropped.
            cluster = self.user_cluster[user_of_event[rows]]
            slot = np.searchsorted(self._cluster_cdf, cluster + u[rows], side="right")
            # Rounding in cluster + u may step past the cluster's last slot.
            slot = np.minimum(slot, self._cluster_starts[cluster + 1] - 1)
            items[rows] = self._items_by_cluster[slot]
        return items

    def _follow_markov(self, rng: np.random.Generator, items: np.ndarray, first: np.ndarray) -> None:
        """Overwrites Markov steps in place with a successor of the previous item.

        Consecutive Markov steps form chains that must resolve in order, but all steps at
        the same depth in their chain resolve together, so the Python loop runs over chain
        depths (a few dozen), never over events.
        """
        n = len(items)
        is_markov = rng.random(n) < self.config.p_markov
        is_markov[first] = False
        pos = np.flatnonzero(is_markov)
        if len(pos) == 0:
            return
        slot = np.searchsorted(self._successor_cdf, rng.random(len(pos)), side="right")
        anchor = np.where(is_markov, 0, np.arange(n))  # last non-Markov event at or before
        np.maximum.accumulate(anchor, out=anchor)
        depth = pos - anchor[pos]
        order = np.argsort(depth, kind="stable")
        pos, slot, depth = pos[order], slot[order], depth[order]
        bounds = np.searchsorted(depth, np.arange(1, int(depth[-1]) + 2))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            p = pos[lo:hi]
            items[p] = self.successors[items[p - 1], slot[lo:hi]]

    def block(self, index: int) -> pa.RecordBatch:
        """The events of users ``index * BLOCK_USERS ..`` (up to ``BLOCK_USERS`` of them).

        Returns:
            pa.RecordBatch: int64 columns ``user, item, timestamp, action``, grouped by
            user, time-ordered within a user.
        """
        config = self.config
        u0 = index * BLOCK_USERS
        u1 = min(u0 + BLOCK_USERS, config.num_users)
        lengths = self.lengths[u0:u1]
        n = int(lengths.sum())
        first = self.offsets[u0:u1] - self.offsets[u0]
        user = np.repeat(np.arange(u0, u1, dtype=np.int64), lengths)
        streams = [_rng(config.seed, _S_BLOCK, index, s) for s in range(5)]

        item = self._draw_items(streams[_B_ITEM], streams[_B_SOURCE], user)
        if self.successors is not None:
            self._follow_markov(streams[_B_MARKOV], item, first)
        action = np.searchsorted(self._action_cdf, streams[_B_ACTION].random(n), side="right").astype(np.int64)

        rng = streams[_B_TIME]
        step = np.floor(rng.exponential(config.mean_gap, size=n)).astype(np.int64) + 1
        start = config.start_timestamp + np.floor(rng.random(u1 - u0) * config.timestamp_span).astype(np.int64)
        # A running sum over the block, restarted at each user's first event.
        step[first] = 0
        timestamp = np.cumsum(step)
        timestamp += np.repeat(start - timestamp[first], lengths)
        return pa.RecordBatch.from_arrays(
            [pa.array(user), pa.array(item), pa.array(timestamp), pa.array(action)],
            names=[USER, ITEM, TIMESTAMP, ACTION],
        )

    def batches(self, chunk_events: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """Streams all events, about ``chunk_events`` at a time (whole users per chunk).

        The concatenated output does not depend on ``chunk_events``.

        Returns:
            Iterator[pa.RecordBatch]: see :meth:`block`.
        """
        pending: List[pa.RecordBatch] = []
        size = 0
        for index in range(self.num_blocks):
            batch = self.block(index)
            pending.append(batch)
            size += batch.num_rows
            if size >= chunk_events:
                yield _concat(pending)
                pending, size = [], 0
        if pending:
            yield _concat(pending)

    # ------------------------------------------------------------------ the oracle

    def _independent_part(self, cluster_weights: Optional[np.ndarray]) -> np.ndarray:
        """Distribution of a non-Markov draw, given a distribution over the user's cluster."""
        if self.item_cluster is None:
            return self.popularity.copy()
        p_c = self.config.p_cluster
        return (1 - p_c) * self.popularity + p_c * cluster_weights[self.item_cluster] * self._pop_in_cluster

    def _with_markov(self, independent: np.ndarray, prev_item: Optional[int]) -> np.ndarray:
        if self.successors is None or prev_item is None:
            return independent
        p_m = self.config.p_markov
        out = (1 - p_m) * independent
        np.add.at(out, self.successors[prev_item], p_m * self.successor_probs)  # add.at: repeated successors add up
        return out

    def next_item_distribution(self, prev_item: Optional[int], user: int) -> np.ndarray:
        """The exact distribution of a user's next item, knowing the user's cluster.

        This is what the generator samples from: an oracle that also knows the latent
        cluster, so its hit rate bounds any model's from above.

        Args:
            prev_item (Optional[int]): the user's previous raw item id; None for a first event.
            user (int): raw user id.

        Returns:
            np.ndarray: float64 ``[I]`` over raw item ids, summing to 1.
        """
        weights = None
        if self.user_cluster is not None:
            weights = np.zeros(self.config.num_clusters)
            weights[self.user_cluster[user]] = 1.0
        return self._with_markov(self._independent_part(weights), prev_item)

    def cluster_posterior(self, history: Sequence[int]) -> Optional[np.ndarray]:
        """``P(cluster | history)`` under the generative model (uniform prior).

        Args:
            history (Sequence[int]): the user's raw item ids so far, oldest first, from
                the user's first event on.

        Returns:
            Optional[np.ndarray]: float64 ``[C]``, or None without clusters.
        """
        if self.item_cluster is None:
            return None
        c = self.config.num_clusters
        x = np.asarray(history, dtype=np.int64)
        if len(x) == 0:
            return np.full(c, 1.0 / c)
        p_c = self.config.p_cluster
        # Per step: shared(t) is the chance of x[t] under every cluster; clusters equal to
        # x[t]'s own get the extra p_c * pop_in_cluster(x[t]) on top.
        shared = (1 - p_c) * self.popularity[x]
        own = p_c * self._pop_in_cluster[x]
        if self.successors is not None:
            p_m = self.config.p_markov
            hit = self.successors[x[:-1]] == x[1:, None]
            markov = p_m * (hit * self.successor_probs).sum(axis=1)
            shared[1:] = (1 - p_m) * shared[1:] + markov
            own[1:] *= 1 - p_m
        zero = shared == 0
        with np.errstate(divide="ignore"):
            log_step = np.log(shared + own)
        log_shared = np.log(np.where(zero, 1.0, shared))
        cx = self.item_cluster[x]
        log_lik = np.full(c, log_shared.sum())
        log_lik += np.bincount(cx, weights=log_step - log_shared, minlength=c)
        # A step no cluster but x[t]'s own can explain rules the other clusters out.
        impossible = np.bincount(cx[zero], minlength=c) < int(zero.sum())
        log_lik[impossible] = -np.inf
        if np.all(np.isneginf(log_lik)):
            raise ValueError("this history cannot come from this synthetic world")
        post = np.exp(log_lik - log_lik.max())
        return post / post.sum()

    def posterior_next_item_distribution(self, history: Sequence[int]) -> np.ndarray:
        """The Bayes posterior predictive of the next item given only the items seen.

        Ranking items by it is Bayes-optimal for hit rate: the best any model can do
        from the item history (actions and timestamps carry no signal here).

        Args:
            history (Sequence[int]): the user's raw item ids so far, oldest first, from
                the user's first event on (not truncated).

        Returns:
            np.ndarray: float64 ``[I]`` over raw item ids, summing to 1.

        Example::

            p = world.posterior_next_item_distribution(items[:-1])
            hit = items[-1] in np.argsort(-p)[:10]      # one user's oracle HR@10
            expected_hit_rate(p, 10)                     # its expectation
        """
        prev = int(history[-1]) if len(history) else None
        return self._with_markov(self._independent_part(self.cluster_posterior(history)), prev)


def expected_hit_rate(distribution: np.ndarray, k: int) -> float:
    """Chance that an item drawn from ``distribution`` is among its own ``k`` most likely.

    With the true next-item distribution this is the expected HR@k of the best possible
    ranking.
    """
    k = min(k, len(distribution))
    return float(np.partition(distribution, len(distribution) - k)[-k:].sum())


def _concat(batches: List[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_arrays(
        [pa.array(np.concatenate([b.column(i).to_numpy() for b in batches])) for i in range(batches[0].num_columns)],
        names=batches[0].schema.names,
    )


def iter_batches(config: SyntheticConfig, chunk_events: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Streams a config's events as record batches of about ``chunk_events`` rows.

    Returns:
        Iterator[pa.RecordBatch]: int64 columns ``user, item, timestamp, action``.
    """
    return SyntheticWorld(config).batches(chunk_events)


def _source(config: SyntheticConfig) -> str:
    return (f"synthetic (seed={config.seed}, {config.num_users} users, {config.num_items} items, "
            f"{config.num_events} events)")


def generate(config: SyntheticConfig) -> Interactions:
    """All events of a config in memory (for small cases and tests).

    Returns:
        Interactions: int64 ``user, item, timestamp, action``.

    Example::

        write_store(generate(SyntheticConfig(num_users=100, num_items=50, num_events=2000)), "store/")
    """
    table = pa.Table.from_batches(list(iter_batches(config)))
    return Interactions(table, source=_source(config), action_name="action", timestamp_unit="s").validate()


def write_csv(config: SyntheticConfig, path: str, chunk_events: int = 1 << 20) -> int:
    """Writes a config's events as CSV (header ``user,item,timestamp,action``), chunk by chunk.

    Returns:
        int: events written.
    """
    written = 0
    schema = pa.schema([(name, pa.int64()) for name in (USER, ITEM, TIMESTAMP, ACTION)])
    # pyarrow quotes header names whatever the quoting style; a plain header reads anywhere.
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    with open(path, "wb") as f:
        f.write((",".join(schema.names) + "\n").encode())
        with pa_csv.CSVWriter(f, schema, write_options=options) as writer:
            for batch in iter_batches(config, chunk_events):
                writer.write_batch(batch)
                written += batch.num_rows
    return written


def _action_to_rating(action: np.ndarray, num_actions: int) -> np.ndarray:
    """Spreads action ids ``0 .. A - 1`` (A <= 5) monotonically over 1..5 stars."""
    if num_actions == 1:
        return np.full(len(action), 5, dtype=np.int64)
    return 1 + np.rint(action * (4 / (num_actions - 1))).astype(np.int64)


def write_movielens_1m(config: SyntheticConfig, directory: str, chunk_events: int = 1 << 20) -> int:
    """Writes a config's events in the MovieLens-1M file format, for any reader of ML-1M.

    ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``movies.dat``
    (``MovieID::Title::Genres``, e.g. ``18::Synthetic Movie 17 (1994)::Drama|War``) and
    ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``), Latin-1, ids 1-based
    (raw id + 1). Ratings come from the action: with five actions, action ``a`` is
    ``a + 1`` stars; fewer actions are spread evenly over 1..5. Genres follow the item's
    cluster when there are clusters (so content features carry the planted taste).

    Args:
        config (SyntheticConfig): at most five actions.
        directory (str): created if missing; the three files are overwritten.
        chunk_events (int): events per write.

    Returns:
        int: ratings written.

    Example::

        write_movielens_1m(SyntheticConfig.movielens_1m_like(), "ml-synthetic/")
    """
    if config.num_actions > 5:
        raise ValueError(f"MovieLens ratings are 1..5 stars; the config has {config.num_actions} actions")
    os.makedirs(directory, exist_ok=True)
    world = SyntheticWorld(config)
    options = pa_csv.WriteOptions(include_header=False, delimiter=":", quoting_style="none")
    written = 0
    with open(os.path.join(directory, "ratings.dat"), "wb") as f:
        for batch in world.batches(chunk_events):
            n = batch.num_rows
            # pyarrow writes one-character delimiters; a null column between two fields
            # writes nothing, which turns ":" into "::".
            gap = pa.nulls(n)
            rating = _action_to_rating(batch.column(ACTION).to_numpy(), config.num_actions)
            table = pa.table([pc.add(batch.column(USER), 1), gap, pc.add(batch.column(ITEM), 1), gap,
                              pa.array(rating), gap, batch.column(TIMESTAMP)],
                             names=["u", "g1", "i", "g2", "r", "g3", "t"])
            pa_csv.write_csv(table, f, options)
            written += n

    rng = _rng(config.seed, _S_PROFILES)
    years = rng.integers(1919, 2001, size=config.num_items)
    first_genre = (world.item_cluster % len(ML_GENRES) if world.item_cluster is not None
                   else rng.integers(0, len(ML_GENRES), size=config.num_items))
    # Up to two more genres, distinct from the first (-1: none).
    more = (first_genre[:, None] + rng.integers(1, len(ML_GENRES), size=(config.num_items, 2))) % len(ML_GENRES)
    more[rng.random((config.num_items, 2)) < (0.5, 0.8)] = -1
    names = {}  # genre ids -> "A|B|C"; few distinct combinations, so cached
    with open(os.path.join(directory, "movies.dat"), "w", encoding="latin-1", newline="\n") as f:
        for i in range(config.num_items):  # per item, not per event
            key = (int(first_genre[i]), int(more[i, 0]), int(more[i, 1]))
            if key not in names:
                ids = dict.fromkeys(g for g in key if g >= 0)  # ordered, without repeats
                names[key] = "|".join(ML_GENRES[g] for g in ids)
            f.write(f"{i + 1}::Synthetic Movie {i + 1} ({years[i]})::{names[key]}\n")

    gender = np.where(rng.random(config.num_users) < 0.72, "M", "F")  # ML-1M is 72% male
    age = np.asarray(ML_AGES)[rng.integers(0, len(ML_AGES), size=config.num_users)]
    occupation = rng.integers(0, ML_NUM_OCCUPATIONS, size=config.num_users)
    zip_code = rng.integers(0, 100_000, size=config.num_users)
    with open(os.path.join(directory, "users.dat"), "w", encoding="latin-1", newline="\n") as f:
        f.writelines(f"{u + 1}::{gender[u]}::{age[u]}::{occupation[u]}::{zip_code[u]:05d}\n"
                     for u in range(config.num_users))
    return written
