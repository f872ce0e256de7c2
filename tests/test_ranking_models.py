"""Ranking batches, the three rankers (DCNv2+DIN, OneTrans, HSTU), their metrics and the recipe."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from torchrec_genrec.data.ranking import RankingConfig, RankingData
from torchrec_genrec.data.ranking_batching import (NS_FEATURES, RankingDataset, RequestBatchSampler)
from torchrec_genrec.data.splits import Split
from torchrec_genrec.models.ranking import (DLRMRanker, HSTURanker, OneTransRanker, OneTransRankerConfig, Ranker,
                                           RankerConfig)
from torchrec_genrec.modules.din import DINAttention, din_reference
from torchrec_genrec.ops.jagged import jagged_to_padded
from torchrec_genrec.train.ranking_metrics import paired_bootstrap_ranking, per_user_auc, ranking_metrics

from conftest import predict_each_candidate_alone


@pytest.fixture(scope="module")
def data(ml100k):
    return RankingData.build(ml100k.path, RankingConfig(max_seq_len=8))


def test_batches_hold_each_requests_history_once_on_its_first_candidate(data):
    pointwise = RankingDataset(data, Split.TEST)
    events = np.array([5, 6, 7, 300, 2000])
    batch = pointwise[events.tolist()]
    liked, other = data.history(pointwise.events[events])
    assert batch.num_requests == batch.num_candidates == 5
    for name, expected in (("liked", liked), ("other", other)):
        jt = batch.sequence[f"{name}_item"]
        values = torch.split(jt.values(), jt.lengths().tolist())
        for got, want in zip(values, expected):
            assert got.tolist() == data.item[want].tolist()  # oldest first, the most recent 8
        assert batch.event_time[name].numel() == jt.values().numel()
        assert (batch.event_time[name] < batch.target_time.max()).all()
    assert batch.sequence["target_item"].values().tolist() == data.item[pointwise.events[events]].tolist()
    assert batch.pooled["user_id"].values().tolist() == data.user[pointwise.events[events]].tolist()

    grouped = RankingDataset(data, Split.TEST, grouped=True)
    sizes = grouped.candidates_per_request()
    r = int(np.nonzero(sizes >= 3)[0][0])
    batch = grouped[[r, r + 1]]
    assert batch.num_requests == 2 and batch.num_candidates == sizes[r] + sizes[r + 1]
    lengths = batch.sequence["liked_item"].lengths()
    first = batch.first_candidate
    assert first.tolist() == [0, int(sizes[r])]
    assert lengths.sum() == lengths[first].sum()  # nothing on the other candidates' rows
    assert (batch.request_index[: sizes[r]] == 0).all() and (batch.request_index[sizes[r]:] == 1).all()
    # Every candidate of a request comes strictly after its shared history.
    assert (batch.request_time[batch.request_index] <= batch.target_time).all()


def test_request_sampler_packs_whole_requests_to_the_batch_size():
    sizes = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    sampler = RequestBatchSampler(sizes, batch_size=6, shuffle=True, seed=1)
    seen = []
    for requests in sampler:
        seen += requests
        total = sizes[requests].sum()
        assert total >= 6 or requests[-1] == list(sampler)[-1][-1]
        assert sizes[requests[:-1]].sum() < 6  # closed at the first request reaching the size
    assert sorted(seen) == list(range(len(sizes)))
    order0 = [list(b) for b in sampler]
    sampler.set_epoch(1)
    assert [list(b) for b in sampler] != order0


def test_jagged_to_padded_left_and_right():
    values = torch.arange(10.0).view(5, 2)
    lengths = torch.tensor([2, 0, 3])
    left, lvalid = jagged_to_padded(values, lengths, 3, left=True)
    right, rvalid = jagged_to_padded(values, lengths, 3)
    assert left[0].tolist() == [[0, 0], [0, 1], [2, 3]] and lvalid[0].tolist() == [False, True, True]
    assert right[0].tolist() == [[0, 1], [2, 3], [0, 0]] and rvalid[1].tolist() == [False] * 3
    ints, _ = jagged_to_padded(torch.arange(5), lengths, 3, left=True)
    assert ints.tolist() == [[0, 0, 1], [0, 0, 0], [2, 3, 4]]


def test_metrics_match_direct_definitions():
    g = torch.Generator().manual_seed(0)
    n = 400
    y = (torch.rand(n, generator=g) < 0.5).double()
    users = torch.randint(20, (n,), generator=g)
    s = y + torch.randn(n, generator=g)
    pos, neg = s[y == 1], s[y == 0]
    pairwise = float((pos[:, None] > neg[None, :]).double().mean())
    m = ranking_metrics(s, y, users)
    assert m["auc"] == pytest.approx(pairwise, abs=1e-9)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
    assert m["logloss"] == pytest.approx(float(bce), rel=1e-6)
    base = float(torch.nn.functional.binary_cross_entropy(torch.full_like(y, float(y.mean())), y))
    assert m["ne"] == pytest.approx(float(bce) / base, rel=1e-6)
    ids, aucs, weights = per_user_auc(s, y, users)
    u = int(ids[0])
    mine = users == u
    p, q = s[mine & (y == 1)], s[mine & (y == 0)]
    assert float(aucs[0]) == pytest.approx(float((p[:, None] > q[None, :]).double().mean()))
    assert m["gauc"] == pytest.approx(float((aucs * weights).sum() / weights.sum()))
    # A model against itself differs by exactly 0; a better one's interval sits above 0.
    assert paired_bootstrap_ranking(s, s, y, users, "auc", 200) == (0.0, 0.0, 0.0)
    worse = y + 3 * torch.randn(n, generator=g)
    for metric in ("auc", "gauc"):
        diff, lo, hi = paired_bootstrap_ranking(torch.stack([s, s]), torch.stack([worse, worse]), y, users, metric, 200)
        assert lo <= diff <= hi and lo > 0
    # Unequal run counts: the difference of the two models' mean AUCs.
    diff, _, _ = paired_bootstrap_ranking(torch.stack([s, worse]), s, y, users, "auc", 50)
    expected = (m["auc"] + ranking_metrics(worse, y, users)["auc"]) / 2 - m["auc"]
    assert diff == pytest.approx(expected, abs=1e-9)


def _model(data, dataset, **overrides):
    torch.manual_seed(0)
    cfg = RankerConfig(embedding_dim=8, tower_dims=(16,), dropout=0.0, **overrides)
    return Ranker(cfg, data.vocab_sizes, dataset.num_genres, data.config.max_seq_len, device=torch.device("cpu"))


@pytest.mark.parametrize("overrides", [
    {"name": "dlrm"},
    {"name": "onetrans"},
    {"name": "onetrans", "onetrans": OneTransRankerConfig(merge="sep", ns_tokenizer="group_wise",
                                                          selection="scorer_topk")},
    {"name": "onetrans", "onetrans": OneTransRankerConfig(pyramid="none", shared_ns_params=True)},
    {"name": "hstu"},
])
def test_rankers_score_a_candidate_the_same_alone_or_in_a_grouped_request(data, overrides):
    """One pass over a request's candidates (shared history: OneTrans's KV cache, the HSTU
    ranker's target-aware mask, DIN per candidate) equals each candidate alone with that
    history; and a training step moves every parameter group."""
    grouped = RankingDataset(data, Split.TEST, grouped=True)
    model = _model(data, grouped, **overrides).eval()
    sizes = grouped.candidates_per_request()
    (liked_lo, liked_hi), _ = data.sequence_bounds(grouped.history_start, grouped.history_end)
    requests = [int(r) for r in np.nonzero((sizes >= 2) & (liked_hi > liked_lo))[0][:3]]
    batch = grouped[requests]
    assert int(batch.sequence_lengths("liked").min()) > 0  # real shared histories
    together = model.predict(batch)
    torch.testing.assert_close(together, predict_each_candidate_alone(model, grouped, requests), atol=1e-5, rtol=1e-5)

    model.train()
    loss, stats = model(batch)
    assert torch.isfinite(loss) and stats["samples"] == batch.num_candidates
    loss.backward()
    dense = [p for n, p in model.named_parameters() if "embeddings" not in n]
    assert sum(float(p.grad.abs().sum()) for p in dense if p.grad is not None) > 0
    item_table = model.sequence_embeddings.embeddings["item"].weight
    assert float(item_table.grad.abs().sum()) > 0


def test_ranker_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.name"):
        RankerConfig(name="dien")
    with pytest.raises(ValueError, match="model.onetrans.merge"):
        OneTransRankerConfig(merge="zip")
    with pytest.raises(ValueError, match="divisible by model.onetrans.num_heads"):
        RankerConfig(embedding_dim=30, onetrans=OneTransRankerConfig(num_heads=4))
    RankerConfig(name="dlrm", embedding_dim=30, onetrans=OneTransRankerConfig(num_heads=4))  # heads unused


def test_each_architecture_reads_its_own_section_of_the_config():
    """``--set model.onetrans.pyramid=none``: one section per architecture; the flat key
    of before is an unknown key whose closest match is the new one."""
    from torchrec_genrec.config import ConfigError, load_config

    @dataclasses.dataclass
    class Recipe:
        model: RankerConfig = dataclasses.field(default_factory=RankerConfig)

    cfg = load_config(Recipe, None, ["model.onetrans.pyramid=none", "model.dlrm.cross_layers=3",
                                     "model.hstu.num_heads=4"])
    assert cfg.model.onetrans.pyramid == "none" and cfg.model.dlrm.cross_layers == 3 and cfg.model.hstu.num_heads == 4
    with pytest.raises(ConfigError, match="did you mean 'model.onetrans.pyramid'"):
        load_config(Recipe, None, ["model.pyramid=none"])
    with pytest.raises(ConfigError, match="model.onetrans.merge"):
        load_config(Recipe, None, ["model.onetrans.merge=zip"])


def test_ranker_builds_the_architecture_its_config_names(data):
    v = data.vocab_sizes
    for name, cls in (("dlrm", DLRMRanker), ("onetrans", OneTransRanker), ("hstu", HSTURanker)):
        model = Ranker(RankerConfig(name=name, embedding_dim=8), v, 19, 8, device=torch.device("cpu"))
        assert type(model) is cls and isinstance(model, Ranker)
    with pytest.raises(ValueError, match="model.name is 'dlrm'"):
        OneTransRanker(RankerConfig(name="dlrm"), v, 19, 8)


def test_din_attention_pools_each_candidates_own_events():
    """Padded and batched = candidate by candidate over the unpadded events (the plain
    reading); padding never counts, and the weights are not normalised."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    din = DINAttention(embedding_dim=8, hidden_dim=16)
    lengths = [3, 0, 5, 1]
    events = [torch.randn(n, 8, generator=g) for n in lengths]
    query = torch.randn(len(lengths), 8, generator=g)
    keys, valid = jagged_to_padded(torch.cat(events), torch.tensor(lengths), max(lengths))
    keys = keys + (~valid).unsqueeze(-1) * 100.0  # garbage in the padding
    pooled = din(query, keys, valid)
    torch.testing.assert_close(pooled, din_reference(din, query, events))
    assert float(pooled[1].abs().sum()) == 0  # no history: zeros
    doubled = din_reference(din, query[:1], [torch.cat([events[0], events[0]])])
    torch.testing.assert_close(doubled, 2 * pooled[:1])  # a sum, not an average


@pytest.fixture(scope="module")
def ranking_run(ml100k, tmp_path_factory):
    """A few steps of the ranking recipe (OneTrans, grouped training) on ML-100K."""
    from torchrec_genrec.config import load_config
    from torchrec_genrec.train.ranking import RankingRecipeConfig, run_ranking_recipe

    out = tmp_path_factory.mktemp("ranking") / "run"
    cfg = load_config(RankingRecipeConfig, "apps/configs/ranking_ml100k.toml", [
        f"data.dataset={ml100k.path}", "data.grouped=true", "model.name=onetrans", "model.embedding_dim=8",
        "train.max_steps=3", "train.batch_size=64", f"train.output_dir={out}", "train.progress=false",
        "train.tensorboard=false", "data.task.max_seq_len=8"])
    run_ranking_recipe(cfg)
    return out


def test_ranking_recipe_trains_and_writes_metrics(ml100k, ranking_run):
    from torchrec_genrec.config import from_dict

    out = ranking_run
    payload = json.loads((out / "metrics.json").read_text())
    test = payload["metrics"]["test"]
    assert test["samples"] == 10000 and 0.0 < test["auc"] < 1.0 and test["logloss"] > 0
    assert payload["training"]["steps"] == 3
    assert json.loads((out / "metrics.json").read_text())["model"] == "onetrans"
    pred = np.load(out / "test_predictions.npz")
    assert len(pred["logit"]) == 10000 and set(np.unique(pred["label"])) == {0.0, 1.0}
    assert os.path.isdir(out / "checkpoints" / "best")
    cfg = from_dict(RankerConfig, payload["config"]["model"])
    assert set(NS_FEATURES) <= {t.name for t in Ranker(cfg, RankingData.build(ml100k.path).vocab_sizes, 19, 8)
                                .table_specs()}


def test_exported_ranker_scores_like_the_trained_model(ranking_run, tmp_path):
    """The predictor rebuilds each request from raw ids (history split by rating, side
    features from the artifact) and must give the trained model's scores."""
    from torchrec_genrec.inference.artifact import ArtifactError
    from torchrec_genrec.inference.predictor import History, RequestError
    from torchrec_genrec.export import export_ranker, load_trained_ranker
    from torchrec_genrec.inference.ranker import RankerPredictor

    out = str(tmp_path / "artifact")
    export_ranker(str(ranking_run), out, precision="fp32")
    predictor = RankerPredictor.load(out)
    model, cfg, data = load_trained_ranker(str(ranking_run))
    dataset = RankingDataset(data, Split.TEST)
    store = data.store
    raw_items, raw_users = store.item_raw_ids(), store.user_raw_ids()
    values = np.asarray(store.action_values)
    with torch.no_grad():
        for r in (0, 17, 4000, 9999):
            batch = dataset[[r]]
            expected = torch.sigmoid(model.predict(batch)).numpy()
            e = int(dataset.events[r])
            past = np.arange(data.history_start[e], data.history_end[e])
            history = History(items=raw_items[data.item[past]].tolist(),
                              actions=values[np.asarray(store.action)[past]].tolist(),
                              timestamps=data.timestamp[past].tolist())
            got = predictor.score(raw_users[data.user[e]], history, [raw_items[data.item[e]]],
                                  int(data.timestamp[e]))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # One pass over many candidates = each alone.
    many = raw_items[:20].tolist()
    together = predictor.score(raw_users[0], history, many, int(data.timestamp[e]))
    alone = np.concatenate([predictor.score(raw_users[0], history, [i], int(data.timestamp[e])) for i in many])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    # The device option: the CPU named is the default; a GPU where there is none is refused.
    np.testing.assert_array_equal(RankerPredictor.load(out, device="cpu").score(
        raw_users[0], history, many, int(data.timestamp[e])), together)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            RankerPredictor.load(out, device="cuda")
    else:
        on_gpu = RankerPredictor.load(out, device="cuda").score(raw_users[0], history, many, int(data.timestamp[e]))
        np.testing.assert_allclose(on_gpu, together, rtol=1e-4, atol=1e-5)
    with pytest.raises(RequestError, match="unknown item"):
        predictor.score(raw_users[0], history, ["no-such-item"], int(data.timestamp[e]))
    with pytest.raises(RequestError, match="strictly before"):
        predictor.score(raw_users[0], history, many, int(data.timestamp[past[0]]))
    # An artifact written before quantised rankers (no precision / tables / side widths in
    # its manifest) loads as the fp32 model it is.
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    for key in ("precision", "tables", "side_widths"):
        manifest.pop(key)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    np.testing.assert_allclose(RankerPredictor.load(out).score(raw_users[0], history, many, int(data.timestamp[e])),
                               together, rtol=0, atol=0)
    with open(os.path.join(out, "ranker.safetensors"), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(ArtifactError, match="sha256"):
        RankerPredictor.load(out)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_quantised_ranker_artifact_scores_like_the_quantised_model(ranking_run, tmp_path, precision):
    """An int8 / fp16 artifact holds TorchRec's quantised id tables: the predictor scores
    exactly like the trained model quantised in memory, and close to the fp32 model."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC

    from torchrec_genrec.export import export_ranker, load_trained_ranker
    from torchrec_genrec.inference.ranker import RankerPredictor, quantize_ranker_tables

    manifest = export_ranker(str(ranking_run), str(tmp_path / precision), precision=precision)
    export_ranker(str(ranking_run), str(tmp_path / "fp32"), precision="fp32")
    assert manifest["precision"] == precision and manifest["tables"]["item"]["precision"] == precision
    predictor = RankerPredictor.load(str(tmp_path / precision))
    assert isinstance(predictor.model.sequence_embeddings, QuantEC)
    assert isinstance(predictor.model.pooled_embeddings, QuantEBC)
    sizes = {p: os.path.getsize(tmp_path / p / "ranker.safetensors") for p in (precision, "fp32")}
    assert sizes[precision] < sizes["fp32"]

    model, _, data = load_trained_ranker(str(ranking_run))
    fp32 = load_trained_ranker(str(ranking_run))[0]
    quantize_ranker_tables(model, precision)
    dataset = RankingDataset(data, Split.TEST)
    with torch.no_grad():
        batch = dataset[list(range(0, 10000, 97))]
        got = torch.sigmoid(predictor.model.predict(batch))
        torch.testing.assert_close(got, torch.sigmoid(model.predict(batch)), rtol=0, atol=0)
        difference = (got - torch.sigmoid(fp32.predict(batch))).abs()
    assert 0 < float(difference.max()) < (0.02 if precision == "int8" else 0.002)


def test_rank_endpoint_batches_requests_and_answers_like_the_predictor(ranking_run, tmp_path):
    import concurrent.futures
    import urllib.error
    import urllib.request

    from conftest import http_server
    from torchrec_genrec.inference.predictor import History
    from torchrec_genrec.export import export_ranker
    from torchrec_genrec.inference.ranker import RankerPredictor
    from torchrec_genrec.serving.app import ServeConfig, create_app

    out = str(tmp_path / "artifact")
    export_ranker(str(ranking_run), out)
    predictor = RankerPredictor.load(out)
    app = create_app(predictor, ServeConfig(max_batch=8, max_wait_ms=20, max_candidates=30))

    def call(url, body):
        request = urllib.request.Request(f"{url}/rank", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    items = list(predictor._item_index)[:12]
    users = list(predictor._user_index)[:6]
    bodies = [{"user": u, "history": {"items": items[:3 + i], "actions": [5] * (3 + i),
                                      "timestamps": list(range(1000, 1003 + i))},
               "candidates": items[i:i + 4 + i], "timestamp": 5000} for i, u in enumerate(users)]
    with http_server(app) as url:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda body: call(url, body), bodies))
        for body, (status, answer) in zip(bodies, answers):
            assert status == 200
            expected = predictor.score(body["user"], History(**body["history"]), body["candidates"], 5000)
            assert answer["scores"] == pytest.approx(expected.tolist(), abs=1e-6)
        status, answer = call(url, {**bodies[0], "candidates": ["nope"]})
        assert status == 422 and "unknown item" in answer["error"]
        status, answer = call(url, {**bodies[0], "candidates": items * 3})
        assert status == 422 and "at most 30" in answer["error"]
        status, answer = call(url, {**bodies[0], "timestamp": 1001})
        assert status == 422 and "strictly before" in answer["error"]


def test_two_ranks_train_the_same_model_as_one_at_the_same_global_batch(ml100k, tmp_path):
    """2 gloo ranks x 64 candidates = 1 process x 128: the same steps (global loss
    weighting, TorchRec's gradient division), hence the same test predictions. Tables are
    pinned to fused sharding types: a data-parallel table would train with the dense
    optimiser instead of the fused one, a different model."""
    import subprocess
    import sys

    genrec = os.path.join(os.path.dirname(sys.executable), "genrec")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    common = ["rank", "--config", "apps/configs/ranking_ml100k.toml", "--set", f"data.dataset={ml100k.path}",
              "--set", "model.name=dlrm", "--set", "model.embedding_dim=8", "--set", "model.dropout=0.0",
              "--set", "data.task.max_seq_len=8", "--set", "train.max_steps=3", "--set", "train.progress=false",
              "--set", "train.tensorboard=false", "--set", "eval.batch_size=4096",
              "--set", "plan.pins=" + json.dumps([f"{t}:table_wise" for t in (
                  "rating", "genre", "user_id", "user_age", "user_gender", "user_occupation", "user_zip",
                  "release_year", "event_hour", "event_weekday")] + ["item:row_wise"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([genrec, *common, "--set", "train.batch_size=128", "--set", f"train.output_dir={one}"],
                   check=True, env=env, capture_output=True)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", genrec, *common,
                           "--set", "train.batch_size=64", "--set", f"train.output_dir={two}"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert b["training"]["world_size"] == 2 and b["training"]["global_batch_size"] == 128
    assert a["training"]["history"][0]["train_bce"] == pytest.approx(b["training"]["history"][0]["train_bce"],
                                                                     rel=1e-5)
    pa, pb = (np.load(d / "test_predictions.npz") for d in (one, two))
    assert np.array_equal(pa["event"], pb["event"]) and len(pb["event"]) == 10000  # every test sample once
    np.testing.assert_allclose(pa["logit"], pb["logit"], atol=1e-4)
    assert a["metrics"]["test"]["auc"] == pytest.approx(b["metrics"]["test"]["auc"], abs=1e-4)
