"""Data-path benchmark: CSV -> sequence store -> jagged batches, against the project's aims.

Steps:

1. Generate a synthetic event log as CSV (``user,item,timestamp,action``). Timed, but
   not one of the figures.
2. Preparation: read the CSV with :func:`read_interactions` and write the sequence
   store with :func:`write_store`, in a fresh process (so its memory is its own).
   Figures: events/s, and the peak resident memory above the process's memory after
   imports as a multiple of the raw arrays (events x 4 columns x 8 bytes).
3. Batching: the TRAIN split, ``max_seq_len=200``, batches of 128, shuffled, with 0 and
   2 loader workers. Figures: batches/s and events/s.
4. Training step rate: filled in by :func:`measure_training_step_rate` once a default
   training recipe exists.

Every figure is printed beside its aim as a ratio; a ratio >= 1.00x meets the aim.

Usage::

    .venv/bin/python bench/data_bench.py [--events 10000000] [--tmp DIR] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, Optional

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torchrec_genrec.data.synthetic import SyntheticConfig, write_csv  # noqa: E402
from torchrec_genrec.logging_utils import silence_known_noise  # noqa: E402

#: The aims this benchmark reports against.
AIM_PREPARE_EVENTS_PER_S = 2.0e6
AIM_PREPARE_MEMORY_MULTIPLE = 3.0  # at most
RAW_BYTES_PER_EVENT = 4 * 8  # user, item, timestamp, action as int64
BATCH_SIZE = 128
MAX_SEQ_LEN = 200
#: The README's default recipe; the loader must outpace its training step.
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "apps", "configs", "hstu_ml100k.toml")
AIM_LOADER_OVER_STEP = 3.0  # at least


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def _proc_status_kib(field: str) -> int:
    """A memory field (``VmRSS``, ``VmHWM``) of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------ preparation


def _prepare_child(csv_path: str, store_path: str, profile: bool, conn) -> None:
    """Runs in a fresh (spawned) process: imports, then reads and writes, timed."""
    import numpy as np

    from torchrec_genrec.data.readers import read_interactions
    from torchrec_genrec.data.store import write_store

    result: Dict[str, float] = {}
    baseline_kib = _proc_status_kib("VmRSS")
    result["peak_reset"] = float(_reset_peak_rss())
    result["baseline_bytes"] = baseline_kib * 1024.0
    start = time.perf_counter()
    interactions = read_interactions(csv_path, action_col="action")
    result["read_s"] = time.perf_counter() - start
    result["read_peak_bytes"] = _proc_status_kib("VmHWM") * 1024.0
    result["table_bytes"] = float(interactions.events.nbytes)
    stats = write_store(interactions, store_path)
    result["total_s"] = time.perf_counter() - start
    result["write_s"] = result["total_s"] - result["read_s"]
    result["events"] = float(stats.num_events)
    result["peak_bytes"] = _proc_status_kib("VmHWM") * 1024.0

    if profile:
        # Phase by phase, on the table already read (the same steps as write_store).
        from torchrec_genrec.data import store as store_mod

        events = interactions.events
        t = time.perf_counter()
        _, user = store_mod._factorize(events.column("user"))
        result["factorize_user_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _, item = store_mod._factorize(events.column("item"))
        result["factorize_item_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ts = events.column("timestamp").to_numpy()
        order = store_mod._sort_by_user_then_time(user, ts)
        result["sort_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _, action = store_mod._factorize(events.column("action"))
        result["factorize_action_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out = tempfile.mkdtemp(dir=os.path.dirname(store_path))
        if order is None:  # already in (user, time) order
            order = np.arange(len(item))
        np.save(os.path.join(out, "item.npy"), item[order])
        np.save(os.path.join(out, "timestamp.npy"), ts[order])
        np.save(os.path.join(out, "action.npy"), action[order].astype(np.int16))
        result["gather_save_s"] = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
    conn.send(result)
    conn.close()


def measure_preparation(csv_path: str, store_path: str, profile: bool = False) -> Dict[str, float]:
    """Times CSV -> store in a spawned process and measures its peak memory.

    Returns:
        Dict[str, float]: ``events``, ``total_s``, ``read_s``, ``write_s``,
        ``baseline_bytes`` (RSS after imports), ``peak_bytes`` (VmHWM) and, with
        ``profile``, per-phase seconds.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_prepare_child, args=(csv_path, store_path, profile, child))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the preparation process exited with {proc.exitcode}")
    return result


# ------------------------------------------------------------------------ batching


@dataclasses.dataclass
class LoaderRate:
    num_workers: int
    batches: int
    events: int
    seconds: float

    @property
    def batches_per_s(self) -> float:
        return self.batches / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def measure_batching(store_path: str, num_workers: int, num_batches: int = 300, warmup: int = 5) -> LoaderRate:
    """Batches/s of the TRAIN loader (shuffled, batch 128, max length 200).

    Worker start-up and the first ``warmup`` batches are not timed.
    """
    from torchrec_genrec.data.batching import SequenceDataset, make_dataloader
    from torchrec_genrec.data.splits import Split

    dataset = SequenceDataset(store_path, Split.TRAIN, max_seq_len=MAX_SEQ_LEN)
    loader = make_dataloader(dataset, BATCH_SIZE, shuffle=True, seed=0, num_workers=num_workers)
    epoch, seen, batches, events = 0, 0, 0, 0
    start = time.perf_counter()
    while batches < num_batches:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            seen += 1
            if seen <= warmup:
                start = time.perf_counter()
                continue
            events += int(batch.features["item"].lengths().sum())
            batches += 1
            if batches >= num_batches:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    del loader  # stops persistent workers
    return LoaderRate(num_workers, batches, events, seconds)


# ------------------------------------------------------------------------ training


def measure_training_step_rate(store_path: str, recipe: str = DEFAULT_RECIPE, steps: int = 8,
                               warmup: int = 2) -> float:
    """Training steps/s of the default recipe's model on this store (same batch size and
    max length), under DistributedModelParallel on one process, batches prefetched so
    only the step itself is timed."""
    import torch

    from torchrec_genrec.config import load_config
    from torchrec_genrec.data.batching import SequenceDataset, make_dataloader
    from torchrec_genrec.data.splits import Split
    from torchrec_genrec.data.store import SequenceStore
    from torchrec_genrec.models.retrieval import GenerativeRetrieval
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig
    from torchrec_genrec.train.sharding import build_optimizer, shard

    cfg = load_config(RetrievalRecipeConfig, recipe)
    store = SequenceStore.open(store_path)
    ctx = init_distributed()
    torch.manual_seed(0)
    model = GenerativeRetrieval(cfg.model, store.num_items, store.num_actions, cfg.data.max_seq_len)
    dmp = shard(model, ctx, cfg.train.optim, cfg.train.batch_size)
    optimizer = build_optimizer(dmp, cfg.train.optim)
    dataset = SequenceDataset(store_path, Split.TRAIN, cfg.data.max_seq_len)
    loader = iter(make_dataloader(dataset, cfg.train.batch_size, shuffle=True, seed=0))
    batches = [next(loader) for _ in range(warmup + steps)]
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        out = dmp(batch)  # one process: the mean over this batch's predictions
        loss = out["item_loss_sum"] / out["queries"]
        if "action_loss_sum" in out:
            loss = loss + cfg.model.action_loss_weight * out["action_loss_sum"] / out["actions"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def reorder_csv(csv_path: str, order: str, seed: int) -> None:
    """Rewrites the generated CSV (written user by user) in the row order of a real log.

    ``time``: globally by timestamp, as an event log is appended; ``random``: shuffled;
    ``user``: left as written (the easiest case for preparation).
    """
    if order == "user":
        return
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(csv_path)
    if order == "time":
        rows = np.argsort(table.column("timestamp").to_numpy(), kind="stable")
    else:
        rows = np.random.default_rng(seed).permutation(table.num_rows)
    pacsv.write_csv(table.take(pa.array(rows)), csv_path)


def _ratio_line(name: str, value: float, unit: str, aim: float, higher_is_better: bool = True) -> str:
    ratio = value / aim if higher_is_better else aim / value
    bound = "" if higher_is_better else "<= "
    return f"{name}: {_human(value)}{unit} (aim {bound}{_human(aim)}{unit}: {ratio:.2f}x)"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="events in the synthetic log")
    parser.add_argument("--tmp", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--batches", type=int, default=300, help="timed batches per loader setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also time preparation phase by phase")
    parser.add_argument("--keep", action="store_true", help="keep the CSV and the store")
    parser.add_argument("--order", choices=["time", "random", "user"], default="time",
                        help="row order of the CSV: time (an appended event log), random, or user by user")
    args = parser.parse_args(argv)
    silence_known_noise()

    if args.tmp:
        os.makedirs(args.tmp, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="genrec-data-bench-", dir=args.tmp)
    csv_path = os.path.join(scratch, "events.csv")
    store_path = os.path.join(scratch, "store")
    # A catalogue and a population the size of a mid-sized public log: mean length 100.
    config = SyntheticConfig(num_users=max(args.events // 100, 1), num_items=max(args.events // 100, 1),
                             num_events=args.events, min_seq_len=5, seed=args.seed)
    try:
        print(f"synthetic log: {config.num_events:,} events, {config.num_users:,} users, "
              f"{config.num_items:,} items (Zipf {config.item_zipf}), {os.cpu_count()} CPUs")
        start = time.perf_counter()
        write_csv(config, csv_path)
        reorder_csv(csv_path, args.order, args.seed)
        gen_s = time.perf_counter() - start
        size = os.path.getsize(csv_path)
        print(f"  generated {size / 1e6:.0f} MB of CSV in {gen_s:.1f} s "
              f"({_human(config.num_events / gen_s)} events/s; not an aim), rows in {args.order} order")

        prep = measure_preparation(csv_path, store_path, profile=args.profile)
        raw = prep["events"] * RAW_BYTES_PER_EVENT
        above = prep["peak_bytes"] - prep["baseline_bytes"]
        rate = prep["events"] / prep["total_s"]
        print(f"  read {prep['read_s']:.2f} s, write_store {prep['write_s']:.2f} s; raw arrays {raw / 1e6:.0f} MB; "
              f"above the RSS after imports ({prep['baseline_bytes'] / 1e6:.0f} MB): "
              f"read peak {(prep['read_peak_bytes'] - prep['baseline_bytes']) / 1e6:.0f} MB "
              f"(table {prep['table_bytes'] / 1e6:.0f} MB), "
              f"overall peak {(prep['peak_bytes'] - prep['baseline_bytes']) / 1e6:.0f} MB"
              + ("" if prep["peak_reset"] else " (peak not resettable: includes imports)"))
        if args.profile:
            phases = ("factorize_user_s", "factorize_item_s", "sort_s", "factorize_action_s", "gather_save_s")
            print("  phases: read " + f"{prep['read_s']:.2f} s, "
                  + ", ".join(f"{p[:-2].replace('_', ' ')} {prep[p]:.2f} s" for p in phases))

        rates = [measure_batching(store_path, w, args.batches) for w in (0, 2)]

        print()
        print(_ratio_line("prepare", rate, " events/s", AIM_PREPARE_EVENTS_PER_S))
        mult = above / raw
        print(f"prepare peak memory: {mult:.2f}x raw arrays "
              f"(aim <= {AIM_PREPARE_MEMORY_MULTIPLE:.1f}x: {AIM_PREPARE_MEMORY_MULTIPLE / mult:.2f}x)")
        for r in rates:
            print(f"batching, {r.num_workers} workers: {r.batches_per_s:.0f} batches/s, "
                  f"{_human(r.events_per_s)} events/s (batch {BATCH_SIZE}, max length {MAX_SEQ_LEN})")
        step_rate = measure_training_step_rate(store_path)
        loader_rate = rates[0].batches_per_s  # the recipe's default: batches built in the training process
        print(f"training step rate ({DEFAULT_RECIPE}): {step_rate:.2f} steps/s; loader at "
              f"{loader_rate / step_rate:.0f}x the step rate (aim >= {AIM_LOADER_OVER_STEP:.0f}x: "
              f"{loader_rate / step_rate / AIM_LOADER_OVER_STEP:.0f}x)")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
