"""The ``genrec`` command: prepare, train, tune, rank, content, lum, compare, plan, export, serve, doctor.

Each subcommand is a thin wrapper: it parses arguments, calls the library and prints a
short report. Heavy imports happen inside the subcommand so ``genrec doctor`` works even
when torch or torchrec do not import.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional


def _cmd_doctor(args: argparse.Namespace) -> int:
    from torchrec_genrec.logging_utils import silence_known_noise
    from torchrec_genrec.stack import run_checks

    silence_known_noise()
    checks = run_checks()
    failed = [c for c in checks if not c.ok]
    untested = [c for c in checks if c.untested]
    if not args.quiet or failed or untested:
        for c in checks:
            print(f"{'BAD' if not c.ok else 'untested' if c.untested else 'ok':<8}  {c.name:<18} {c.detail}")
        for c in failed:
            print(f"\nfix ({c.name}): {c.fix}")
    if failed:
        print(f"\n{len(failed)} problem(s) found.", file=sys.stderr)
        return 1
    if untested:
        print(f"\nThe stack loads and runs, but {', '.join(c.name for c in untested)} differ(s) from the tested "
              "combination: results are untested. For the tested one, run scripts/bootstrap.sh.")
    elif not args.quiet:
        print("\nThe stack is the known-good combination.")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from torchrec_genrec.data import datasets

    if args.dataset == "csv":
        import shlex

        from torchrec_genrec.data.errors import DataError
        from torchrec_genrec.data.readers import ArgumentSpelling, ReaderArgumentError

        if not args.path or not args.out:
            raise SystemExit("genrec prepare csv needs --path FILE and --out DIR")
        def column(name):  # "2" is a 0-based position, anything else a header name
            return int(name) if name is not None and name.isdigit() else name

        # The reader names its own parameters; its errors are re-spelled with our flags.
        flags = {"delimiter": "--delimiter", "user_col": "--user-col", "item_col": "--item-col",
                 "timestamp_col": "--timestamp-col", "action_col": "--action-col", "id_type": "--id-type",
                 "has_header": "--no-header"}

        def shell_word(value) -> str:  # a tab must be typed as $'\t' in a shell
            text = str(value)
            if text.isprintable():
                return shlex.quote(text)
            return "$'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"

        def setting(name, value) -> str:
            if name == "has_header":
                return "--no-header" if not value else "without --no-header"
            return f"{flags.get(name, name)} {shell_word(value)}"

        cli_spelling = ArgumentSpelling(name=lambda name: flags.get(name, name), setting=setting, separator=" ")
        try:
            stats = datasets.prepare_csv(
                args.path, args.out, delimiter=args.delimiter, user_col=column(args.user_col),
                item_col=column(args.item_col), timestamp_col=column(args.timestamp_col),
                action_col=column(args.action_col),
                has_header=not args.no_header, id_type=args.id_type, force=args.force,
            )
        except ReaderArgumentError as e:
            raise DataError(e.render(cli_spelling), path=e.path, line=e.line) from None
        out = args.out
    elif args.dataset == "synthetic":
        from torchrec_genrec.data.errors import DataError
        from torchrec_genrec.data.synthetic import SyntheticConfig

        try:
            config = SyntheticConfig(num_users=args.users, num_items=args.items, num_events=args.events,
                                     item_zipf=args.zipf, min_seq_len=args.min_seq_len,
                                     length_sigma=args.length_sigma, num_clusters=args.clusters,
                                     p_markov=args.p_markov, seed=args.seed)
        except ValueError as e:
            raise DataError(f"{e} (flags --users --items --events --zipf --min-seq-len --length-sigma --clusters "
                            "--p-markov)") from None
        stats = datasets.prepare_synthetic(config, out=args.out, force=args.force)
        out = args.out or datasets.dataset_dir("synthetic")
    else:
        stats = datasets.prepare(args.dataset, path=args.path, out=args.out, force=args.force)
        out = args.out or datasets.dataset_dir(args.dataset)
    print(f"{args.dataset}: {stats} -> {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from torchrec_genrec.config import load_config
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig, run_retrieval_recipe

    cfg = load_config(RetrievalRecipeConfig, args.config, args.set)
    result = run_retrieval_recipe(cfg)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # every rank has the same metrics; rank 0 reports them
    ds = result["dataset"]
    print(f"{result['model']} on {ds['source']} ({ds['num_users']} users, {ds['num_items']} items); "
          f"{result['protocol']}")
    for split, metrics in result["metrics"].items():
        cells = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "count" and not isinstance(v, dict))
        print(f"  {split:<5} ({int(metrics['count'])} users)  {cells}")
        for protocol, other in metrics.items():
            if isinstance(other, dict):  # the other seen-items protocol
                print(f"        {protocol.replace('_', ' ')}: hr@10 {other['hr@10']:.4f}  ndcg@10 {other['ndcg@10']:.4f}"
                      f"  mrr {other['mrr']:.4f}")
    print(f"metrics -> {os.path.join(cfg.train.output_dir, 'metrics.json')}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from torchrec_genrec.train.tune import tune

    summary = tune(args.config, args.space, args.trials, args.out, overrides=args.set, seed=args.seed,
                   startup_trials=args.startup_trials, warmup_evaluations=args.warmup_evaluations)
    counts = summary["trials"]
    print(f"{sum(counts.values())} trials in {args.out}: {counts['complete']} complete, {counts['pruned']} pruned, "
          f"{counts['fail']} failed (see {os.path.join(args.out, 'trials.md')})")
    best = summary["best"]
    if best is None:
        print("no trial completed")
        return 1
    print(f"best: trial {best['trial']}, validation NDCG@10 {best['valid_ndcg@10']:.4f} with "
          + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print(f"its recipe: {os.path.join(args.out, 'best.toml')} (genrec train --config {os.path.join(args.out, 'best.toml')})")
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from torchrec_genrec.config import load_config
    from torchrec_genrec.train.ranking import RankingRecipeConfig, run_ranking_recipe

    cfg = load_config(RankingRecipeConfig, args.config, args.set)
    result = run_ranking_recipe(cfg)
    ds = result["dataset"]
    print(f"{result['model']} ranker on {ds['source']} ({ds['train_samples']:,} train / "
          f"{ds['valid_samples']:,} valid / "
          f"{ds['test_samples']:,} test samples); {result['protocol']}")
    for split, metrics in result["metrics"].items():
        cells = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("auc", "gauc", "logloss", "ne"))
        print(f"  {split:<5} ({metrics['samples']:,} samples)  {cells}")
    t = result["training"]
    print(f"  best epoch {t['best_epoch']} of {t['epochs_run']}, {t['train_samples_per_s']:,.0f} training samples/s")
    print(f"metrics -> {os.path.join(cfg.train.output_dir, 'metrics.json')}")
    return 0


def _cmd_content(args: argparse.Namespace) -> int:
    import json

    import torch

    from torchrec_genrec.data.content import load_side_features
    from torchrec_genrec.data.datasets import resolve_store
    from torchrec_genrec.data.ranking import RankingData, RankingConfig
    from torchrec_genrec.data.splits import Split
    from torchrec_genrec.data.store import SequenceStore
    from torchrec_genrec.modules.das import DASConfig
    from torchrec_genrec.train import content as pipeline

    torch.manual_seed(args.seed)
    store = SequenceStore.open(resolve_store(args.dataset))
    log = pipeline.behaviour_log(store, args.valid_fraction, args.test_fraction)
    rows = {"item": store.num_items}
    load = lambda name: load_side_features(store.path, name, rows)["item"]  # noqa: E731
    show = lambda d: print(json.dumps(d, indent=2, default=float))  # noqa: E731
    if args.action == "embed":
        vectors = pipeline.embed_content(store, args.encoder, args.name or args.encoder, args.dim, args.model_dir,
                                         progress=True)
        print(f"{vectors.shape[0]} items x {vectors.shape[1]} ({args.encoder}) -> "
              f"{store.path}/content/{args.name or args.encoder}.safetensors")
    elif args.action == "adapt":
        adapted, stats = pipeline.adapt_content_moco(log, load(args.content), epochs=args.epochs, seed=args.seed,
                                                     progress=True)
        name = args.name or f"{args.content}_scl"
        from torchrec_genrec.data.content import save_side_features

        save_side_features(store.path, name, {"item": adapted},
                           {"kind": "content", "adapted_from": args.content, "method": "moco", **stats,
                            "behaviour_cutoff": log.cutoff})
        show({"name": name, **stats})
    elif args.action == "sid":
        out = pipeline.build_semantic_ids(store, log, load(args.content), args.method, args.levels, args.codebook_size,
                                          args.seed, args.name or f"sid_{args.method}_{args.content}",
                                          progress=True)
        show({"item": out["item_stats"], "user": out["user_stats"],
              "co_consumption": pipeline.co_consumption_lift(log, out["item_codes"])})
    elif args.action == "das":
        cfg = DASConfig(content_dim=load(args.content).shape[1], num_levels=args.levels,
                        codebook_size=args.codebook_size, lambda_align=args.lambda_align)
        out = pipeline.train_das(store, log, load(args.content), cfg, epochs=args.epochs, seed=args.seed,
                                 name=args.name or f"das_{args.content}", progress=True)
        show({"item": out["item_stats"], "user": out["user_stats"], "final": out["history"][-1],
              "co_consumption": pipeline.co_consumption_lift(log, out["item_codes"])})
    else:  # report
        data = RankingData.build(store.path, RankingConfig(valid_fraction=args.valid_fraction,
                                                           test_fraction=args.test_fraction))
        test = data.samples(Split.TEST)
        for name in args.sets:
            side = load_side_features(store.path, name)
            report = {"name": name, "kind": side.meta.get("kind")}
            if "item" in side:
                report["test_i2i"] = pipeline.content_i2i_recall(store, side["item"], test, data.label)
            if "item_codes" in side:
                report["item_stats"] = side.meta.get("item_stats")
                report["co_consumption"] = pipeline.co_consumption_lift(log, side["item_codes"])
            show(report)
    return 0


def _cmd_lum(args: argparse.Namespace) -> int:
    from torchrec_genrec.config import load_config
    from torchrec_genrec.train import lum as pipeline

    if args.action == "train":
        import json

        overrides = (list(args.set) + ([f"train.output_dir={json.dumps(args.out)}"] if args.out else [])
                     + ["train.progress=true"])
        cfg = load_config(pipeline.LUMRecipeConfig, args.config, overrides)
        if not cfg.train.output_dir:
            raise SystemExit("genrec lum train: give --out DIR (or train.output_dir in the config)")
        cfg.validate()
        _, seqs, history = pipeline.pretrain_lum(cfg)
        last = history[-1]
        print(f"LUM ({cfg.data.condition}, {cfg.model.encoder}, {cfg.data.layout}) on {cfg.data.dataset}: "
              f"{int((seqs.lengths() > 0).sum())} users, {int(seqs.lengths().sum()):,} tokens; epoch {last['epoch']}: "
              f"loss {last['loss']:.4f}, top-1 vs negatives {last['top1']:.3f}, {last['tokens_per_s']:,.0f} tokens/s")
        print(f"model -> {os.path.join(cfg.train.output_dir, pipeline.WEIGHTS)}; curves -> "
              f"{cfg.train.output_dir}/tensorboard")
        return 0
    if not args.run:
        raise SystemExit(f"genrec lum {args.action}: give --run DIR (a `genrec lum train --out DIR` run)")
    try:
        if len(args.run) == 1:
            return _lum_use(args, *pipeline.load_lum(args.run[0]))
        if args.action != "features":
            raise ValueError("several --run directories (cross-fitted LUMs) are for `features` only")
        loaded = [pipeline.load_lum(run) for run in args.run]
        for k, (run, (_, _, cfg)) in enumerate(zip(args.run, loaded)):
            if (cfg.data.folds, cfg.data.holdout_fold) != (len(args.run), k):
                raise ValueError(f"--run {run} was trained with folds {cfg.data.folds}, holdout_fold "
                                 f"{cfg.data.holdout_fold}; "
                                 f"cross-fitted runs come in holdout order: run k has folds {len(args.run)}, "
                                 "holdout_fold k")
            first = loaded[0][2].data
            if (cfg.data.dataset, cfg.data.condition, cfg.data.max_events) != (first.dataset, first.condition,
                                                                               first.max_events):
                raise ValueError(f"--run {run} differs from {args.run[0]} in dataset, condition or max_events")
        return _lum_use(args, [m for m, _, _ in loaded], loaded[0][1], loaded[0][2])
    except ValueError as e:  # bad --condition / --steps / ids / folds: say what, not a traceback
        raise SystemExit(f"genrec lum {args.action}: {e}") from None


def _lum_use(args: argparse.Namespace, model, seqs, cfg) -> int:
    import json

    import numpy as np
    import torch

    from torchrec_genrec.data.datasets import resolve_store
    from torchrec_genrec.data.store import SequenceStore
    from torchrec_genrec.train import lum as pipeline

    if args.action == "eval":
        condition = args.condition or cfg.data.condition
        ask = lambda **kw: pipeline.conditioned_retrieval(model, seqs, cfg, condition, steps=args.steps, **kw)  # noqa
        if cfg.data.condition == "none":
            report = {"plain": ask(), "condition_after": ask(condition_prior=True)}
        else:
            report = {"true": ask(), "wrong": ask(wrong_condition=True)}
        print(json.dumps(report, indent=1))
        return 0
    store = SequenceStore.open(resolve_store(cfg.data.dataset))
    if args.action == "features":
        name = args.name or f"lum_{cfg.data.condition}"
        out = pipeline.lum_features(model, seqs, store, name, steps=args.steps, top_k=args.k, progress=True,
                                    event_history=cfg.data.max_events if args.point_in_time else None)
        events = f", point-in-time interests of {len(out['lum_event']):,} events" if "lum_event" in out else ""
        print(f"{name}: interests {tuple(out['lum_interest'].shape)} (user x condition){events}, top-{args.k} items "
              f"{tuple(out['lum_topk'].shape)}, item embeddings {tuple(out['lum_item'].shape)} -> "
              f"{store.path}/content/{name}.safetensors; use it with `genrec rank --set model.lum={name}`")
        return 0
    # retrieve: top-k items of one user under the given conditions (raw ids)
    if not args.user or not args.conditions:
        raise ValueError("give --user RAW_ID and --conditions VALUE [VALUE ...]")
    match = np.nonzero(store.user_raw_ids().astype(str) == str(args.user))[0]
    if not match.size:
        raise ValueError(f"user {args.user!r} is not in {store.path}")
    size = seqs.space.count("condition")
    bad = [c for c in args.conditions if not 0 <= c < size]
    if bad:
        raise ValueError(f"condition values {bad} out of range: {cfg.data.condition} takes 0..{size - 1}")
    user = int(match[0])
    prefix = pipeline.user_prefix(seqs, user, pipeline.prefix_room(model, args.steps))
    if prefix.numel() == 0:
        raise ValueError(f"user {args.user!r} has no event before the validation cutoff")
    scores, items = model.retrieve(prefix, seqs.space.to_tokens("condition", torch.tensor(args.conditions)), args.k,
                                   args.steps, exclude=seqs.seen(user))
    raw_items = store.item_raw_ids()
    print(json.dumps({f"{cfg.data.condition}={c}": [{"item": raw_items[i].item(), "score": round(float(v), 4)}
                                               for i, v in zip(items[n].tolist(), scores[n].tolist())]
                      for n, c in enumerate(args.conditions)}, indent=1))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from torchrec_genrec.config import ConfigError
    from torchrec_genrec.models.tables import MODEL_TABLES, content_tables, ns_bank_table, onetrans_dense_banks
    from torchrec_genrec.plans.planner import cluster_topology, format_report, plan_tables
    from torchrec_genrec.plans.spec import parse_pins

    def count(text: str, name: str) -> int:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value.is_integer() or value < 1:
            raise ConfigError(f"--{name} must be a positive whole number (1e9 is fine), got {text!r}")
        return int(value)

    num_items, num_users = count(args.num_items, "num-items"), count(args.num_users, "num-users")
    extra = {"levels": args.levels, "codebook_size": args.codebook_size} if args.model == "hstu-sid" else {}
    if args.model == "hstu-sid" and (args.levels < 1 or args.codebook_size < 2):
        raise ConfigError(f"--levels must be >= 1 and --codebook-size >= 2, got {args.levels}, {args.codebook_size}")
    tables = MODEL_TABLES[args.model](num_items=num_items, num_users=num_users, embedding_dim=args.embedding_dim,
                                      max_seq_len=args.max_seq_len, num_actions=args.num_actions, **extra)
    if args.content_dim:
        tables += content_tables(num_items, args.content_dim)
    banks = []
    if args.model == "onetrans":
        banks = onetrans_dense_banks(args.embedding_dim, args.ns_tokens, args.layers)
        if args.ns_banks == "table":
            tables.append(ns_bank_table(banks[-1], args.layers))
            banks[-1] = dataclasses.replace(banks[-1], placement="table")
    if args.cache_load_factor is not None:
        tables = [dataclasses.replace(t, cache_load_factor=args.cache_load_factor)
                  if t.num_bytes >= 1024**3 else t for t in tables]
    topology = cluster_topology(args.nodes, args.gpus_per_node, args.hbm_gb, args.ddr_gb, args.compute_device)
    if args.verbose:
        logging.getLogger("torchrec.distributed.planner.stats").setLevel(logging.INFO)
    report = plan_tables(tables, topology, args.batch_size, pins=parse_pins(args.pin))
    print(f"{args.model}: {len(tables)} table(s), {sum(t.num_bytes for t in tables) / 1024**3:,.1f} GiB of fp32 "
          f"weights; {args.nodes} node(s) x {args.gpus_per_node} {args.compute_device} rank(s), batch "
          f"{args.batch_size} per rank")
    print(format_report(report, tables))
    if args.model == "hstu-sid":
        ids = MODEL_TABLES["hstu"](num_items=num_items, num_users=num_users, embedding_dim=args.embedding_dim,
                                   max_seq_len=args.max_seq_len, num_actions=args.num_actions)
        sid_rows, id_rows = sum(t.num_embeddings for t in tables), sum(t.num_embeddings for t in ids)
        sid_bytes, id_bytes = sum(t.num_bytes for t in tables), sum(t.num_bytes for t in ids)
        print(f"semantic-ID token table vs the ID token table at {num_items:,} items: {sid_rows:,} vs {id_rows:,} rows, "
              f"{sid_bytes / 1024**2:,.1f} MiB vs {id_bytes / 1024**3:,.1f} GiB of fp32 weights "
              f"({id_bytes / sid_bytes:,.0f}x smaller); {args.levels}+1 code levels of {args.codebook_size} address "
              f"{args.codebook_size ** args.levels:,.0f} paths before disambiguation")
    for bank in banks:
        where = ("replicated on every rank (data-parallel)" if bank.placement == "data_parallel"
                 else "held as table ns_token_weights (placed above)")
        print(f"dense {bank.name}: shape {list(bank.shape)}, {bank.num_bytes / 1024**2:,.2f} MiB, {where}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from torchrec_genrec.data.errors import DataError
    from torchrec_genrec.train.metrics import metrics_from_ranks, paired_bootstrap

    def protocol_ranks(data, run: str):
        """The ranks under the protocol asked: a run records its own and the other one."""
        if args.seen == "as-run":
            return data["rank"]
        if "exclude_seen" not in data:  # runs from before both protocols were recorded
            if args.seen == "removed":
                return data["rank"]
            raise DataError("this run recorded only the seen-removed protocol (trained before both were kept); "
                            "retrain it to compare with seen items ranked", path=run)
        as_run = "removed" if bool(data["exclude_seen"]) else "ranked"
        return data["rank"] if args.seen == as_run else data["rank_other_protocol"]

    def load(runs: str):
        """Per-user metrics of one run, or averaged over comma-separated runs (seeds)."""
        users, per_run = None, []
        for run in runs.split(","):
            path = os.path.join(run, "test_ranks.npz")
            if not os.path.exists(path):
                raise DataError("no test_ranks.npz: pass the output_dir of a `genrec train` run", path=run)
            data = np.load(path)
            if users is not None and not np.array_equal(users, data["user"]):
                raise DataError(f"{run} was tested on different users than {runs.split(',')[0]}")
            users = data["user"]
            per_run.append(metrics_from_ranks(torch.from_numpy(protocol_ranks(data, run)), args.ks))
        mean = {k: torch.stack([m[k] for m in per_run]).mean(0) for k in per_run[0]}
        return users, mean, len(per_run)

    users_a, per_a, n_a = load(args.run_a)
    users_b, per_b, n_b = load(args.run_b)
    if not np.array_equal(users_a, users_b):
        raise DataError(f"the runs were tested on different users ({len(users_a)} vs {len(users_b)}); "
                        "compare runs on the same dataset and split")
    protocol = {"as-run": "each run's own protocol", "removed": "seen items removed from the ranking",
                "ranked": "seen items ranked too"}[args.seen]
    print(f"A = {args.run_a} ({n_a} run(s))\nB = {args.run_b} ({n_b} run(s))\n{protocol}; {len(users_a)} paired test users"
          f"{' (per-user metrics averaged over runs)' if max(n_a, n_b) > 1 else ''}, "
          f"{args.samples} bootstrap resamples, 95% intervals")
    print(f"{'metric':<10} {'A':>8} {'B':>8} {'A-B':>9} {'95% CI of A-B':>22} {'A/B':>6}")
    for name in per_a:
        a, b = per_a[name], per_b[name]
        diff, lo, hi = paired_bootstrap(a, b, num_samples=args.samples, seed=args.seed)
        ratio = float(a.mean() / b.mean()) if float(b.mean()) else float("nan")
        flag = "" if lo <= 0 <= hi else "  *"
        print(f"{name:<10} {float(a.mean()):>8.4f} {float(b.mean()):>8.4f} {diff:>+9.4f} "
              f"[{lo:>+9.4f}, {hi:>+9.4f}] {ratio:>6.2f}{flag}")
    print("* the interval excludes 0")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from torchrec_genrec.errors import DataError
    from torchrec_genrec.export import export_ranker, export_run, export_torchrec_package, is_ranking_run, table_bytes

    if is_ranking_run(args.run):
        if args.target != "predictor":
            raise DataError(f"{args.run} is a ranking run: it exports for the RankerPredictor only "
                            "(--target predictor)")
        manifest = export_ranker(args.run, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite,
                                 precision=args.precision)
        print(f"wrote {args.out}: {manifest['model']['name']} ranker, tables {args.precision} (dense layers fp32), "
              "load it with torchrec_genrec.inference.ranker.RankerPredictor")
        for name, entry in manifest["files"].items():
            print(f"  {name:<24} {entry['bytes']:>12,d} bytes  sha256 {entry['sha256'][:16]}...")
        return 0
    if args.target == "torchrec-package":
        path = export_torchrec_package(args.run, args.out, precision=args.precision, checkpoint=args.checkpoint,
                                       overwrite=args.overwrite)
        print(f"wrote {path} (torch.package for TorchRec's predictor; loading it unpickles: trusted sources only)")
        return 0
    manifest = export_run(args.run, args.out, precision=args.precision, checkpoint=args.checkpoint,
                          overwrite=args.overwrite)
    table = manifest["table"]
    print(f"wrote {args.out}: {manifest['model']['name']} over {manifest['num_items']} items, "
          f"token table {table['rows']} x {table['dim']} {manifest['precision']} "
          f"({table_bytes(manifest) / 2**20:.2f} MiB as stored, {table_bytes(manifest, True) / 2**20:.2f} MiB payload)")
    for name, entry in manifest["files"].items():
        print(f"  {name:<24} {entry['bytes']:>12,d} bytes  sha256 {entry['sha256'][:16]}...")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from torchrec_genrec.serving.app import ServeConfig, serve

    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                         header_timeout_s=args.header_timeout_s, request_timeout_s=args.request_timeout_s,
                         keep_alive_s=args.keep_alive_s, threads=args.threads).validate()
    serve(args.artifact, args.host, args.port, config, device=args.device,
          check_versions=not args.ignore_versions,
          announce=lambda: print(f"serving {args.artifact} on http://{args.host}:{args.port} (/recommend /score or "
                                 "/rank, /healthz /metrics)", flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrec", description=__doc__.splitlines()[0])
    parser.add_argument("--report", metavar="FILE", default=None,
                        help="write the command's exit status, seconds and peak GPU memory to FILE (JSON)")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="check the installed torch / fbgemm / torchrec / torchx stack")
    doctor.add_argument("--quiet", action="store_true", help="print only problems")
    doctor.set_defaults(func=_cmd_doctor)

    prepare = sub.add_parser("prepare", help="read a dataset into a sequence store")
    prepare.add_argument("dataset", help="movielens-100k (embedded), movielens-1m, movielens-20m, csv, or synthetic "
                                         "(generated here: --users --items --events ...)")
    prepare.add_argument("--path", help="raw files: a directory (MovieLens), a file (csv) or the RecBole wheel")
    prepare.add_argument("--out", help="store directory (default: $GENREC_HOME/datasets/NAME)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prepare.add_argument("--delimiter", help="csv: field delimiter, one or more characters, e.g. ',' or '::' "
                                             "(default: from the extension, else sniffed from line 1)")
    prepare.add_argument("--user-col", default="user", help="csv: user id column")
    prepare.add_argument("--item-col", default="item", help="csv: item id column")
    prepare.add_argument("--timestamp-col", default="timestamp", help="csv: timestamp column")
    prepare.add_argument("--action-col", default=None, help="csv: optional action/rating column")
    prepare.add_argument("--no-header", action="store_true",
                         help="csv: the file has no header; --*-col are 0-based column positions")
    prepare.add_argument("--id-type", choices=["auto", "int", "string"], default="auto",
                         help="csv: how to read user/item ids (auto: integers if they all parse)")
    prepare.add_argument("--users", type=int, default=6040, help="synthetic: users")
    prepare.add_argument("--items", type=int, default=3706, help="synthetic: item catalogue size")
    prepare.add_argument("--events", type=int, default=1_000_000, help="synthetic: events in total")
    prepare.add_argument("--zipf", type=float, default=1.1, help="synthetic: Zipf exponent of item popularity")
    prepare.add_argument("--min-seq-len", type=int, default=5, help="synthetic: shortest user sequence")
    prepare.add_argument("--length-sigma", type=float, default=1.0,
                         help="synthetic: lognormal shape of the sequence lengths (larger: a longer tail)")
    prepare.add_argument("--clusters", type=int, default=0, help="synthetic: planted taste clusters (0: none)")
    prepare.add_argument("--p-markov", type=float, default=0.0,
                         help="synthetic: chance an event follows the planted item chain")
    prepare.add_argument("--seed", type=int, default=0, help="synthetic: seed of everything generated")
    prepare.set_defaults(func=_cmd_prepare)

    train = sub.add_parser("train", help="train and evaluate a recipe")
    train.add_argument("--config", required=True, help="a recipe TOML file (apps/configs/*.toml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.seed=1 (repeatable)")
    train.set_defaults(func=_cmd_train)
    tune = sub.add_parser("tune", help="search a retrieval recipe's settings on validation NDCG@10 (Optuna TPE, "
                                       "median pruning; resumable)")
    tune.add_argument("--config", required=True, help="the base recipe TOML (apps/configs/hstu_ml100k.toml)")
    tune.add_argument("--space", required=True, help="the search space TOML (apps/search/*.toml)")
    tune.add_argument("--trials", type=int, required=True, help="finished trials wanted (a resumed search runs the rest)")
    tune.add_argument("--out", required=True, help="the search directory: trial-NNNN/ runs, trials.md, best.toml")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field for every trial (repeatable)")
    tune.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    tune.add_argument("--startup-trials", type=int, default=5,
                      help="random trials before TPE models the space and before pruning starts")
    tune.add_argument("--warmup-evaluations", type=int, default=2,
                      help="validations of a trial before the pruner may stop it")
    tune.set_defaults(func=_cmd_tune)
    rank = sub.add_parser("rank", help="train and test a ranker (DCNv2+DIN, OneTrans, HSTU) on the ranking task")
    rank.add_argument("--config", required=True, help="a ranking recipe TOML file (apps/configs/ranking_ml100k.toml)")
    rank.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set model.name=dlrm (repeatable)")
    rank.set_defaults(func=_cmd_rank)
    content = sub.add_parser("content", help="content embeddings, MoCo adaptation, semantic IDs, DAS, reports")
    content.add_argument("action", choices=["embed", "adapt", "sid", "das", "report"])
    content.add_argument("--dataset", default="movielens-100k", help="a prepared dataset's name or store path")
    content.add_argument("--name", default="", help="name of the side-feature set written")
    content.add_argument("--encoder", choices=["minilm", "tfidf"], default="minilm", help="embed: text encoder")
    content.add_argument("--model-dir", default=None, help="embed: a sentence-transformers directory")
    content.add_argument("--dim", type=int, default=64, help="embed: tfidf width")
    content.add_argument("--content", default="minilm", help="adapt/sid/das: the content set to start from")
    content.add_argument("--method", choices=["rqkmeans", "rqvae"], default="rqkmeans", help="sid: quantiser")
    content.add_argument("--levels", type=int, default=3, help="sid/das: semantic-ID levels")
    content.add_argument("--codebook-size", type=int, default=64, help="sid/das: codes per level")
    content.add_argument("--epochs", type=int, default=20, help="adapt/das: epochs")
    content.add_argument("--lambda-align", type=float, default=0.1, help="das: alignment weight")
    content.add_argument("--seed", type=int, default=0)
    content.add_argument("--valid-fraction", type=float, default=0.1,
                         help="the ranking split: behaviour models see only events before validation")
    content.add_argument("--test-fraction", type=float, default=0.1)
    content.add_argument("--sets", nargs="*", default=[], help="report: side-feature sets to report on")
    content.set_defaults(func=_cmd_content)
    lum = sub.add_parser("lum", help="LUM: pre-train on <condition, item> tokens, evaluate conditioned retrieval, "
                                     "cache ranker features, retrieve top-k per condition")
    lum.add_argument("action", choices=["train", "eval", "features", "retrieve"])
    lum.add_argument("--config", default=None, help="train: a TOML LUMRecipeConfig (apps/configs/lum_ml100k.toml)")
    lum.add_argument("--set", action="append", default=[], help="train: override a config key, e.g. data.condition=hour")
    lum.add_argument("--out", default="", help="train: the run directory")
    lum.add_argument("--run", nargs="+", default=[],
                     help="eval/features/retrieve: a trained run directory; features also takes K cross-fitted "
                          "runs (folds=K, holdout_fold 0..K-1, in that order)")
    lum.add_argument("--condition", default="", help="eval: the condition asked (required for condition=none)")
    lum.add_argument("--steps", type=int, default=1, help="generated items pooled into each interest (1: none)")
    lum.add_argument("--name", default="", help="features: the side-feature set written (default lum_<condition>)")
    lum.add_argument("--k", type=int, default=10, help="features/retrieve: top-k items per condition")
    lum.add_argument("--point-in-time", action="store_true",
                     help="features: also cache every pre-cutoff event's interest given only the events before it "
                          "(the ranker's training samples read those: no sample sees itself or its future)")
    lum.add_argument("--user", default="", help="retrieve: a raw user id")
    lum.add_argument("--conditions", nargs="+", type=int, default=[], help="retrieve: condition values asked")
    lum.set_defaults(func=_cmd_lum)
    plan = sub.add_parser("plan", help="dry-run the sharding planner for a model on a (hypothetical) cluster")
    plan.add_argument("--model", choices=["hstu", "sasrec", "onetrans", "hstu-sid"], default="hstu",
                      help="hstu-sid: semantic-ID generative retrieval's single token table (--levels, --codebook-size)")
    plan.add_argument("--levels", type=int, default=4, help="hstu-sid: semantic-ID levels (as genrec content sid)")
    plan.add_argument("--codebook-size", type=int, default=1024, help="hstu-sid: codes per level")
    plan.add_argument("--num-items", default="1e6", help="catalogue size, e.g. 1e9")
    plan.add_argument("--num-users", default="1e6", help="users (OneTrans's user-id table)")
    plan.add_argument("--num-actions", type=int, default=5, help="action vocabulary (e.g. ratings)")
    plan.add_argument("--embedding-dim", type=int, default=256)
    plan.add_argument("--max-seq-len", type=int, default=1024, help="history length (lookups per sample)")
    plan.add_argument("--content-dim", type=int, default=0, help="add a frozen content table of this width")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    plan.add_argument("--hbm-gb", type=float, default=80.0, help="device memory per GPU")
    plan.add_argument("--ddr-gb", type=float, default=256.0, help="host memory per rank")
    plan.add_argument("--compute-device", choices=["cuda", "cpu"], default="cuda")
    plan.add_argument("--batch-size", type=int, default=128, help="samples per rank per step")
    plan.add_argument("--pin", action="append", default=[], metavar="TABLE:TYPE[:KERNEL]",
                      help="pin a table's sharding type (and kernel), e.g. tokens:table_wise (repeatable)")
    plan.add_argument("--cache-load-factor", type=float, default=None,
                      help="CUDA: let tables of 1 GiB or more keep only this share of rows in HBM, the rest "
                           "in host memory (fbgemm's UVM cache), e.g. 0.2")
    plan.add_argument("--ns-tokens", type=int, default=8, help="onetrans: NS tokens (L_NS)")
    plan.add_argument("--layers", type=int, default=4, help="onetrans: transformer layers")
    plan.add_argument("--ns-banks", choices=["replicated", "table"], default="replicated",
                      help="onetrans: keep the per-NS-token weight banks replicated (default) or as a TorchRec "
                           "table the planner shards")
    plan.add_argument("--verbose", action="store_true", help="also print TorchRec's planner statistics")
    plan.set_defaults(func=_cmd_plan)

    compare = sub.add_parser("compare", help="paired-bootstrap comparison of two runs' test metrics")
    compare.add_argument("run_a", help="output_dir of run A, or several joined by commas (seeds)")
    compare.add_argument("run_b", help="output_dir of run B (same dataset and split), or several")
    compare.add_argument("--ks", type=int, nargs="+", default=[10, 50, 200], help="cut-offs")
    compare.add_argument("--samples", type=int, default=10000, help="bootstrap resamples")
    compare.add_argument("--seed", type=int, default=0, help="resampling seed")
    compare.add_argument("--seen", choices=["as-run", "removed", "ranked"], default="as-run",
                         help="the protocol compared: each run's own (eval.exclude_seen), seen items removed from "
                              "the ranking, or ranked too (every run records both)")
    compare.set_defaults(func=_cmd_compare)

    export = sub.add_parser("export", help="turn a trained run into an inference artifact")
    export.add_argument("run", help="a finished run's output_dir (sharded or not)")
    export.add_argument("--out", required=True, help="artifact directory (or package file for torchrec-package)")
    export.add_argument("--precision", choices=["int8", "fp16", "fp32"], default="int8",
                        help="embedding table precision (TorchRec inference quantisation): the token table of a "
                             "retrieval run, the id tables of a ranker")
    export.add_argument("--checkpoint", default="best", help="best (default) or a checkpoint name")
    export.add_argument("--target", choices=["predictor", "torchrec-package"], default="predictor",
                        help="predictor: safe artifact for genrec's Predictor / serve (default); torchrec-package: "
                             "a torch.package with a TorchRec PredictFactory (unpickled on load)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=_cmd_export)

    serve = sub.add_parser("serve", help="serve an artifact over HTTP (/recommend /score, or /rank for rankers; "
                                         "/healthz /metrics)")
    serve.add_argument("artifact", help="a directory written by `genrec export`")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=64, help="most requests per encoder pass")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, help="batching wait after the first request")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    serve.add_argument("--header-timeout-s", type=float, default=10.0,
                       help="seconds a connection has to send a complete request head (idle and half-sent ones close)")
    serve.add_argument("--request-timeout-s", type=float, default=30.0, help="seconds to receive a body, else 408")
    serve.add_argument("--threads", type=int, default=0,
                       help="torch threads for inference (0: every core); fewer leave cores to other processes")
    serve.add_argument("--device", default="cpu", help="where the model runs: cpu (default) or cuda[:N]")
    serve.add_argument("--keep-alive-s", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--ignore-versions", action="store_true",
                       help="load an artifact exported with another torch/TorchRec/fbgemm version")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report is None:
        return _run(args)
    import time

    start, code = time.perf_counter(), 1
    try:
        code = _run(args)
        return code
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        _write_report(args.report, args.command, code, time.perf_counter() - start)


def _write_report(path: str, command: str, code: int, seconds: float) -> None:
    """``--report``: what a driver script (scripts/gpu_check.sh) needs of a finished command."""
    import json

    report = {"command": command, "exit": code, "seconds": round(seconds, 3)}
    torch = sys.modules.get("torch")  # only if the command used it: importing it here would cost a second
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        report["device"] = torch.cuda.get_device_name()
        report["peak_gpu_memory_bytes"] = max(torch.cuda.max_memory_allocated(i)
                                              for i in range(torch.cuda.device_count()))
        report["peak_gpu_memory_reserved_bytes"] = max(torch.cuda.max_memory_reserved(i)
                                                       for i in range(torch.cuda.device_count()))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _run(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        # Before anything imports torchrec: the doctor must report a stack that does not load.
        return args.func(args)
    from torchrec_genrec.config import ConfigError
    from torchrec_genrec.data.errors import DataError
    from torchrec_genrec.plans.spec import PlanError
    from torchrec_genrec.logging_utils import silence_known_noise

    silence_known_noise()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("torchrec_genrec").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (DataError, ConfigError, PlanError) as e:
        # Bad input is the user's to fix: say what and where, without a traceback.
        print(f"genrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
