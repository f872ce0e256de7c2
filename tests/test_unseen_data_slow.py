"""The README's main command on data the recipe has never seen: MovieLens-1M files written by
the synthetic generator (planted taste clusters and a sparse Markov chain). Slow: run with
``make test-slow``."""

import json

import pytest

from torchrec_genrec import cli
from torchrec_genrec.data.synthetic import SyntheticConfig, write_movielens_1m


@pytest.mark.slow
def test_default_recipe_on_ml1m_format_synthetic_data_beats_mostpop(genrec_home, tmp_path):
    raw = tmp_path / "ml-1m"
    config = SyntheticConfig.movielens_1m_like(num_users=600, num_items=400, num_events=40_000,
                                               item_zipf=0.6, num_clusters=8, p_markov=0.7, seed=11)
    write_movielens_1m(config, str(raw))
    assert cli.main(["prepare", "movielens-1m", "--path", str(raw)]) == 0

    def run(recipe, out, *extra):
        code = cli.main(["train", "--config", recipe, "--set", "data.dataset=movielens-1m",
                         "--set", f"train.output_dir={out}", "--set", "train.progress=false", *extra])
        assert code == 0
        return json.loads((out / "metrics.json").read_text())["metrics"]["test"]

    hstu = run("apps/configs/hstu_ml100k.toml", tmp_path / "hstu", "--set", "train.epochs=20")
    mostpop = run("apps/configs/mostpop_ml100k.toml", tmp_path / "mostpop")
    assert hstu["count"] == mostpop["count"] == 600
    assert hstu["ndcg@10"] > 1.5 * mostpop["ndcg@10"], (hstu, mostpop)
    assert hstu["hr@10"] > mostpop["hr@10"]
