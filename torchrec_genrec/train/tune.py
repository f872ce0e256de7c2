"""Hyper-parameter search for a retrieval recipe (``genrec tune``), on Optuna.

Optuna's TPE sampler proposes each trial's settings from a search-space file, its median
pruner stops a trial whose validation NDCG@10 falls below the median of earlier trials at
the same evaluation, and its journal file keeps the study so a killed search resumes.
Every trial is an ordinary run of the one ``Trainer`` under ``OUT/trial-NNNN/`` (TensorBoard
and checkpoints included); the objective is the best validation NDCG@10 — the test split is
never evaluated here. When the search ends, ``OUT/trials.md`` (and ``trials.csv``) tables
every trial and ``OUT/best.toml`` is the best trial's complete recipe, ready for
``genrec train --config OUT/best.toml``.

A search-space file names config keys (any ``--set`` key) and their ranges::

    [params."model.dropout"]
    type = "float"
    low = 0.0
    high = 0.5

    [params."train.optim.lr"]
    type = "float"
    low = 1e-4
    high = 3e-3
    log = true

    [params."model.num_blocks"]
    type = "int"
    low = 1
    high = 4

    [params."model.loss"]
    type = "categorical"
    choices = ["sampled_softmax", "full_softmax"]

Example::

    genrec tune --config apps/configs/hstu_ml100k.toml --space apps/search/retrieval.toml \\
        --trials 20 --out runs/tune_hstu
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from torchrec_genrec.config import ConfigError, load_config, read_toml, to_dict
from torchrec_genrec.data.datasets import resolve_store
from torchrec_genrec.train.io import write_json_atomic

KINDS = ("float", "int", "categorical")


@dataclasses.dataclass
class Param:
    """One searched setting.

    Args:
        key (str): a config key, as for ``--set`` (``model.dropout``).
        kind (str): ``float``, ``int`` or ``categorical``.
        low, high (float): the range (float / int), both ends included.
        log (bool): sample on a log scale (float / int).
        step (Optional[float]): a grid step (float / int).
        choices (List[Any]): the values (categorical).
    """

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None
    choices: List[Any] = dataclasses.field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, self.choices)


def load_space(path: str) -> List[Param]:
    """Reads a search-space TOML file (see the module docstring).

    Raises:
        ConfigError: a missing or malformed file or entry, naming the file and the key.
    """
    data = read_toml(path, "search space")
    unknown = set(data) - {"params"}
    if unknown or not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"{path}: a search space is a [params.\"KEY\"] table per searched setting"
                          + (f"; unknown top-level {sorted(unknown)}" if unknown else ""))
    params = []
    for key, spec in data["params"].items():
        where = f"{path}: params.\"{key}\""
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a table with type = \"float\" | \"int\" | \"categorical\"")
        kind = spec.get("type")
        if kind not in KINDS:
            raise ConfigError(f"{where}: type must be one of {list(KINDS)}, got {kind!r}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        extra = set(spec) - allowed
        if extra:
            raise ConfigError(f"{where}: {sorted(extra)} do not apply to a {kind} setting (allowed: {sorted(allowed)})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            params.append(Param(key, kind, choices=choices))
            continue
        low, high = spec.get("low"), spec.get("high")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not math.isfinite(low) or not math.isfinite(high) or low > high:
            raise ConfigError(f"{where}: low and high must be numbers with low <= high, got {low!r}, {high!r}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: an int setting needs integer low and high")
        log = spec.get("log", False)
        if log and low <= 0:
            raise ConfigError(f"{where}: a log-scale range must be positive, got low = {low}")
        params.append(Param(key, kind, float(low), float(high), bool(log), spec.get("step")))
    return params


def override(key: str, value: Any) -> str:
    """``key=value`` with ``value`` as a TOML literal (what ``--set`` reads)."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, str):
        return f"{key}={json.dumps(value)}"
    return f"{key}={value!r}"


def _toml(data: Dict[str, Any], prefix: str = "") -> str:
    """A config dict as TOML (scalars and lists of scalars; tables for nested dicts)."""
    def literal(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(literal(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = [f"{k} = {literal(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines += ["", f"[{name}]", _toml(v, f"{name}.")]
    return "\n".join(lines).strip("\n")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tune(config: str, space: str, trials: int, out: str, overrides: Sequence[str] = (), seed: int = 0,
         startup_trials: int = 5, warmup_evaluations: int = 1) -> Dict[str, Any]:
    """Runs (or resumes) a search until ``trials`` trials have finished.

    Args:
        config (str): the base recipe TOML (a retrieval recipe with a validation split).
        space (str): the search-space TOML.
        trials (int): finished trials wanted in total (complete or pruned); a resumed search
            runs only the rest, and a trial a killed search left running is run again.
        out (str): the search directory.
        overrides (Sequence[str]): ``--set`` overrides applied to every trial.
        seed (int): the sampler's seed (each trial trains with the recipe's own seed).
        startup_trials (int): trials before the pruner may stop one.
        warmup_evaluations (int): validations of a trial before it may be stopped.

    Returns:
        Dict[str, Any]: what ``OUT/best.json`` holds (the best trial, its settings and
        validation metrics, the counts of trials by state).

    Raises:
        ConfigError: a bad config, space or setting, or a directory that holds a search of
            other settings.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig, RetrievalTask
    from torchrec_genrec.train.trainer import Trainer, seed_everything

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    params = load_space(space)
    base = load_config(RetrievalRecipeConfig, config, overrides)
    if base.model.name == "mostpop":
        raise ConfigError("mostpop has nothing to tune: search an hstu or sasrec recipe")
    if base.data.holdout != 2:
        raise ConfigError("tuning selects on the validation split: set data.holdout = 2 (the test split is never "
                          "used to choose)")
    for p in params:  # every key must be a config key, every value of its range a valid setting
        for value in ([p.low, p.high] if p.kind != "categorical" else p.choices):
            value = int(value) if p.kind == "int" else value
            try:
                load_config(RetrievalRecipeConfig, config, [*overrides, override(p.key, value)]).validate()
            except ConfigError as e:
                raise ConfigError(f"{space}: params.\"{p.key}\" = {value!r}: {e}") from None
    os.makedirs(out, exist_ok=True)
    with open(config, "rb") as f:
        identity = {"config": to_dict(base), "space": [dataclasses.asdict(p) for p in params], "seed": seed,
                    "base_file": f.read().decode(errors="replace")}
    search_file = os.path.join(out, "search.json")
    if os.path.exists(search_file):
        with open(search_file) as f:
            saved = json.load(f)
        if saved.get("digest") != _digest(identity):
            raise ConfigError(f"{out} holds a search of another config, space or seed ({search_file}); resume it with "
                              "the same ones, or search into a new --out")
    else:
        write_json_atomic(search_file, {"digest": _digest(identity), "config_path": os.path.abspath(config),
                                        "space_path": os.path.abspath(space), "overrides": list(overrides),
                                        "seed": seed, "space": identity["space"]})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(os.path.join(out, "study.journal")))
    study = optuna.create_study(study_name="genrec-tune", storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                                                   n_warmup_steps=max(warmup_evaluations - 1, 0)),
                                load_if_exists=True)
    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        # A search killed mid-trial: that trial's run is incomplete; it is run again as a new one.
        study.tell(t.number, state=state.FAIL)

    def objective(trial: "optuna.Trial") -> float:
        values = {p.key: p.suggest(trial) for p in params}
        run_dir = os.path.join(out, f"trial-{trial.number:04d}")
        sets = [*overrides, *(override(k, v) for k, v in values.items()), f"train.output_dir={run_dir}",
                "train.resume=never"]
        cfg = load_config(RetrievalRecipeConfig, config, sets).validate()
        seed_everything(cfg.train.seed)
        start = time.perf_counter()
        task = RetrievalTask(cfg, resolve_store(cfg.data.dataset))
        trainer = Trainer(task, cfg.train, pins=cfg.plan.pins)
        evaluations: List[float] = []
        stopped: List[bool] = []

        def report(epoch: int, score: float) -> bool:
            evaluations.append(score)
            trial.report(score, len(evaluations) - 1)
            stopped.append(trial.should_prune())
            return stopped[-1]

        result = trainer.fit(on_validation=report)
        pruned = any(stopped)
        best_row = next((r for r in result.history if r["epoch"] == result.best_epoch), {})
        valid = {k[len("valid_"):]: v for k, v in best_row.items() if k.startswith("valid_")}
        record = {"trial": trial.number, "params": values, "overrides": sets, "best_epoch": result.best_epoch,
                  "epochs_run": result.epochs_run, "evaluations": evaluations, "valid": valid,
                  "pruned": pruned, "seconds": round(time.perf_counter() - start, 1)}
        write_json_atomic(os.path.join(run_dir, "trial.json"), record)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("seconds", record["seconds"])
        if pruned:
            raise optuna.TrialPruned()
        return float(max(evaluations)) if evaluations else float("-inf")

    def finished() -> int:
        return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))

    while finished() < trials:
        study.optimize(objective, n_trials=1, catch=())
    return _write_results(study, out, config, overrides)


def _write_results(study: Any, out: str, config: str, overrides: Sequence[str]) -> Dict[str, Any]:
    import optuna

    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    keys = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        row = {"trial": t.number, "state": t.state.name.lower(),
               "valid_ndcg@10": None if t.value is None else round(t.value, 5),
               "last_reported": round(max(t.intermediate_values.values()), 5) if t.intermediate_values else None,
               "epochs_run": t.user_attrs.get("epochs_run"), "seconds": t.user_attrs.get("seconds")}
        row.update({k: t.params.get(k) for k in keys})
        rows.append(row)
    with open(os.path.join(out, "trials.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(os.path.join(out, "trials.csv.tmp"), os.path.join(out, "trials.csv"))
    ranked = sorted(rows, key=lambda r: (r["valid_ndcg@10"] is None, -(r["valid_ndcg@10"] or 0.0)))
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(ranked[0]) + " |", "|" + "---|" * len(ranked[0])] if ranked else []
    lines += ["| " + " | ".join(fmt(v) for v in r.values()) + " |" for r in ranked]
    with open(os.path.join(out, "trials.md.tmp"), "w") as f:
        f.write("Trials by validation NDCG@10 (best first; pruned trials show their last reported value)\n\n")
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "trials.md.tmp"), os.path.join(out, "trials.md"))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail")}
    if not complete:
        summary = {"best": None, "trials": counts}
        write_json_atomic(os.path.join(out, "best.json"), summary)
        return summary
    best = study.best_trial
    sets = [*overrides, *(override(k, v) for k, v in best.params.items())]
    record_path = os.path.join(out, f"trial-{best.number:04d}", "trial.json")
    with open(record_path) as f:
        record = json.load(f)
    best_cfg = load_config(RetrievalRecipeConfig, config, sets)
    best_cfg.train.output_dir = os.path.join("runs", os.path.basename(os.path.abspath(out)) + "_best")
    with open(os.path.join(out, "best.toml.tmp"), "w") as f:
        f.write(f"# The best of {len(trials)} trials of `genrec tune` (trial {best.number}, validation NDCG@10 "
                f"{best.value:.4f});\n# train it with: genrec train --config {os.path.join(out, 'best.toml')}\n\n")
        f.write(_toml(to_dict(best_cfg)) + "\n")
    os.replace(os.path.join(out, "best.toml.tmp"), os.path.join(out, "best.toml"))
    summary = {"best": {"trial": best.number, "valid_ndcg@10": best.value, "params": best.params,
                        "overrides": sets, "valid": record["valid"], "epochs_run": record["epochs_run"]},
               "trials": counts}
    write_json_atomic(os.path.join(out, "best.json"), summary)
    return summary

