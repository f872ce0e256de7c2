"""Content embeddings, semantic IDs, MUSE, DAS and their use in the ranker."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchrec_genrec.data.content import (item_texts, load_side_features, save_side_features, side_features_path,
                                          tfidf_embed)
from torchrec_genrec.data.errors import DataError
from torchrec_genrec.data.ranking import RankingConfig, RankingData
from torchrec_genrec.data.ranking_batching import RankingDataset
from torchrec_genrec.data.splits import GlobalTimeSplit, Split
from torchrec_genrec.models.ranking import OneTransRankerConfig, Ranker, RankerConfig, count_table_parameters
from torchrec_genrec.modules.das import DAS, DASBatch, DASConfig, SIDFusion, info_nce
from torchrec_genrec.modules.muse import (SimilarityAwareTargetAttention, SimTier, gsu_top_k,
                                          target_attention_reference)
from torchrec_genrec.modules.semantic_ids import (RQVAEConfig, add_semantic_id_kinds, disambiguate, reconstruct,
                                                  rq_kmeans, semantic_id_stats, semantic_id_tokens)
from torchrec_genrec.tokens import TokenSpace
from torchrec_genrec.train import content as pipeline
from torchrec_genrec.train.content import train_rqvae

from conftest import predict_each_candidate_alone


# ------------------------------------------------------------------ content
def test_item_texts_and_tfidf_vectors(ml100k):
    texts = item_texts(ml100k)
    assert len(texts) == ml100k.num_items
    assert texts[0].startswith("Toy Story (1995)") and "Animation" in texts[0]
    x = tfidf_embed(texts, dim=32)
    assert x.shape == (ml100k.num_items, 32) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(x, tfidf_embed(texts, dim=32))  # deterministic
    # Two "Star Trek" films are closer to each other than to "Toy Story".
    trek = [i for i, t in enumerate(texts) if t.startswith("Star Trek")]
    assert len(trek) >= 2
    assert float(x[trek[0]] @ x[trek[1]]) > float(x[trek[0]] @ x[0])


def test_minilm_encoder_runs_offline_from_the_packaged_model():
    from torchrec_genrec.data.content import embed_texts

    x = embed_texts(["Star Trek: First Contact (1996). Genres: Action, Sci-Fi",
                     "Star Trek: Generations (1994). Genres: Action, Sci-Fi",
                     "Sense and Sensibility (1995). Genres: Drama, Romance"], "minilm")
    assert x.shape == (3, 384)
    assert float(x[0] @ x[1]) > float(x[0] @ x[2]) + 0.1


def test_side_feature_sets_round_trip_and_refuse_bad_files(tmp_path):
    store = str(tmp_path)
    save_side_features(store, "demo", {"item": np.eye(3, dtype=np.float32)}, {"encoder": "x"})
    side = load_side_features(store, "demo", {"item": 3})
    torch.testing.assert_close(side["item"], torch.eye(3))
    assert side.meta == {"encoder": "x"}
    with pytest.raises(DataError, match="rebuild"):
        load_side_features(store, "demo", {"item": 4})
    with pytest.raises(DataError, match="genrec content embed"):
        load_side_features(store, "missing")
    with pytest.raises(KeyError, match="has no 'codes'"):
        side["codes"]
    with open(side_features_path(store, "demo"), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(DataError, match="demo.safetensors"):
        load_side_features(store, "demo")
    with pytest.raises(ValueError, match="names use"):
        side_features_path(store, "../x")


# ------------------------------------------------------------------ semantic IDs
def _planted(n_per=40, centers=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g) * 5
    labels = torch.arange(centers).repeat_interleave(n_per)
    return c[labels] + 0.1 * torch.randn(len(labels), dim, generator=g), labels


def test_rq_kmeans_recovers_planted_clusters_and_residual_levels_reduce_error():
    x, labels = _planted()
    codes, books = rq_kmeans(x, num_levels=3, codebook_size=8, seed=0)
    assert codes.shape == (len(x), 3)
    # Level 0 is the planted clustering up to relabelling: each cluster maps to one code.
    for c in range(8):
        assert len(torch.unique(codes[labels == c, 0])) == 1
    assert len(torch.unique(codes[:, 0])) == 8
    errors = [float(((x - reconstruct(books[:k], codes[:, :k])) ** 2).sum()) for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]


def test_disambiguation_makes_ids_unique_and_stats_count_collisions():
    codes = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 3], [1, 1]])
    sid = disambiguate(codes)
    assert sid[:, :2].tolist() == codes.tolist()
    assert sid[:, 2].tolist() == [0, 1, 2, 0, 0]
    assert len(torch.unique(sid, dim=0)) == 5
    stats = semantic_id_stats(codes, codebook_size=4)
    assert stats["collision_rate"] == pytest.approx(3 / 5)
    assert stats["max_collision_group"] == 3 and stats["unique_ids"] == 3
    assert stats["usage_l0"] == pytest.approx(3 / 4) and stats["usage_l1"] == pytest.approx(2 / 4)


def test_rqvae_learns_to_reconstruct_and_uses_its_codebooks():
    x, _ = _planted(n_per=30, centers=8, dim=16)
    x = F.normalize(x, dim=-1)
    vae, final = train_rqvae(x, RQVAEConfig(input_dim=16, latent_dim=8, hidden_dim=32, num_levels=2,
                                            codebook_size=8), epochs=400, lr=3e-3)
    with torch.no_grad():
        out = vae(x)
    stats = semantic_id_stats(out["codes"], 8, x, out["x_hat"])
    assert stats["relative_reconstruction_error"] < 0.2
    assert stats["usage_l0"] >= 0.75
    assert final["recon_loss"] == pytest.approx(float(out["recon_loss"]), rel=1e-5)


def test_semantic_ids_are_tokens_of_the_unified_token_space():
    space = add_semantic_id_kinds(TokenSpace.build(num_items=10, num_actions=5), [4, 4, 3])
    tokens = semantic_id_tokens(space, torch.tensor([[0, 3, 2], [1, 0, 0]]))
    assert space.kind_of(tokens.flatten()) == ["sid0", "sid1", "sid2"] * 2
    assert space.is_kind(tokens.flatten(), "sid1").tolist() == [False, True, False] * 2
    assert space.size == 4 + 10 + 5 + 11
    with pytest.raises(ValueError, match="sid2"):
        semantic_id_tokens(space, torch.tensor([[0, 0, 3]]))


# ------------------------------------------------------------------ MUSE
def test_gsu_top_k_matches_brute_force_over_padded_histories():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 0, 12, 3])
    history = torch.randn(int(lengths.sum()), 6, generator=g)
    request_index = torch.tensor([0, 2, 2, 1, 3, 0])
    target = torch.randn(len(request_index), 6, generator=g)
    top = gsu_top_k(target, history, lengths, request_index, k=4)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    for c, r in enumerate(request_index.tolist()):
        rows = torch.arange(offsets[r], offsets[r + 1])
        sims = F.normalize(history[rows], dim=-1) @ F.normalize(target[c], dim=-1)
        k = min(4, len(rows))
        ref, where = sims.topk(k) if k else (sims, sims.long())
        assert top.valid[c].sum() == k
        torch.testing.assert_close(top.similarity[c, :k], ref)
        assert top.index[c, :k].tolist() == rows[where].tolist()


def test_simtier_bins_and_sata_fused_score():
    tier = SimTier()
    assert tier.num_bins == 21
    sims = torch.tensor([[1.0, -1.0, 0.05, 0.05, 0.3]])
    valid = torch.tensor([[True, True, True, True, False]])
    hist = tier.histogram(sims, valid)[0]
    assert hist[20] == 1 and hist[0] == 1 and hist[10] == 2 and hist.sum() == 4
    with torch.no_grad():
        tier.weight.fill_(2.0)
    torch.testing.assert_close(tier(sims, valid), 2.0 * torch.log1p(tier.histogram(sims, valid)))

    torch.manual_seed(0)
    sata = SimilarityAwareTargetAttention(8)
    with torch.no_grad():
        sata.gamma.copy_(torch.tensor([0.5, 2.0, 1.5]))
        sata.bias.fill_(0.3)
    q, k, r = torch.randn(2, 8), torch.randn(2, 5, 8), torch.rand(2, 5)
    alpha = torch.einsum("cd,ckd->ck", sata.query(q), sata.key(k)) / 8 ** 0.5
    torch.testing.assert_close(sata.scores(q, k, r), 0.5 * alpha + 2.0 * r + 1.5 * alpha * r + 0.3)
    # No history: a zero vector, not NaN.
    out = sata(q, k, r, torch.zeros(2, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 8))


def test_gsu_then_sata_equals_full_attention_when_k_covers_the_history():
    torch.manual_seed(0)
    sata = SimilarityAwareTargetAttention(8)
    lengths = torch.tensor([7, 4])
    ids, content = torch.randn(11, 8), torch.randn(11, 5)
    target_id, target_content = torch.randn(2, 8), torch.randn(2, 5)
    top = gsu_top_k(target_content, content, lengths, torch.tensor([0, 1]), k=50)
    via_gsu = sata(target_id, ids[top.index], top.similarity, top.valid)
    padded_ids = torch.zeros(2, 7, 8)
    padded_content = torch.zeros(2, 7, 5)
    valid = torch.zeros(2, 7, dtype=torch.bool)
    padded_ids[0], padded_content[0], valid[0] = ids[:7], content[:7], True
    padded_ids[1, :4], padded_content[1, :4], valid[1, :4] = ids[7:], content[7:], True
    reference = target_attention_reference(sata, target_id, target_content, padded_ids, padded_content, valid)
    torch.testing.assert_close(via_gsu, reference, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ DAS
def test_das_trains_all_losses_and_exports_codes_and_fused_vectors():
    torch.manual_seed(0)
    users, items = 30, 40
    item_content = F.normalize(torch.randn(items, 16), dim=-1)
    user_content = F.normalize(torch.randn(users, 16), dim=-1)
    cfg = DASConfig(content_dim=16, latent_dim=8, num_levels=2, codebook_size=4, cf_dim=8, popularity_buckets=3)
    das = DAS(cfg, users, items, torch.randint(0, 3, (items,)))
    das.init_codebooks(item_content, user_content)
    opt = torch.optim.Adam(das.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    # Planted behaviour: user u likes items u and u + 1 (mod 30).
    def batch():
        u = torch.randint(0, users, (32,), generator=g)
        return DASBatch(u, u % items, (u + 1) % items, (u + 1) % users, item_content[u % items], user_content[u])
    first = das(batch())
    assert set(cfg.views) <= {k[len("align_"):] for k in first if k.startswith("align_")}
    for _ in range(150):
        losses = das(batch())
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert float(losses["cf"]) < float(first["cf"]) and float(losses["align"]) < float(first["align"])
    out = das.export(item_content, user_content)
    assert out["item_codes"].shape == (items, 2) and int(out["item_codes"].max()) < 4
    assert out["item_fused"].shape == (items, 8) and out["user_fused"].shape == (users, 8)
    # Alignment views can be dropped (ablation).
    only = DAS(DASConfig(content_dim=16, latent_dim=8, num_levels=2, codebook_size=4, cf_dim=8,
                         popularity_buckets=3, views=("i2i",)), users, items, torch.zeros(items, dtype=torch.long))
    assert [k for k in only(batch()) if k.startswith("align_")] == ["align_i2i"]


def test_fusion_mixes_widths_and_info_nce_prefers_matches():
    fusion = SIDFusion(sid_dim=6, cf_dim=10, num_levels=3)
    assert fusion(torch.randn(4, 3, 6), torch.randn(4, 10)).shape == (4, 10)
    x = torch.randn(16, 8)
    assert float(info_nce(x, x, 0.1)) < float(info_nce(x, torch.randn(16, 8), 0.1))


# ------------------------------------------------------------------ leakage
def test_behaviour_models_see_only_events_before_the_validation_cutoff(ml100k):
    log = pipeline.behaviour_log(ml100k, 0.1, 0.1)
    valid_start, _ = GlobalTimeSplit(0.1, 0.1).cutoffs(ml100k)
    assert log.cutoff == valid_start and int(log.timestamp.max()) < valid_start
    data = RankingData.build(ml100k.path, RankingConfig())
    # Exactly the ranking task's training events: nothing from validation or test.
    assert len(log.item) == len(data.samples(Split.TRAIN))
    a, b = log.consecutive_pairs()
    assert len(a) == len(b) <= len(log.item)
    with pytest.raises(ValueError, match="before its cutoff"):
        pipeline.BehaviourLog(log.user, log.item, log.timestamp, int(log.timestamp.max()), log.num_users,
                              log.num_items)
    # A user content vector reads only pre-cutoff history: users with none get zeros.
    content = torch.randn(ml100k.num_items, 4)
    users = pipeline.user_content(log, content)
    no_history = np.setdiff1d(np.arange(ml100k.num_users), log.user)
    assert len(no_history) > 0 and float(users[torch.from_numpy(no_history)].abs().sum()) == 0


def test_co_consumption_lift_separates_collaborative_codes_from_random(ml100k):
    log = pipeline.behaviour_log(ml100k)
    g = torch.Generator().manual_seed(0)
    random_codes = torch.randint(0, 16, (ml100k.num_items, 1), generator=g)
    assert abs(pipeline.co_consumption_lift(log, random_codes)["lift"] - 1.0) < 0.1
    # Codes from the behaviour itself (clusters of the item-user incidence) lift it far above 1.
    x = torch.zeros(ml100k.num_items, ml100k.num_users)
    x[torch.from_numpy(log.item), torch.from_numpy(log.user)] = 1.0
    codes, _ = rq_kmeans(F.normalize(x, dim=1), 1, 16, seed=0, iters=10)
    assert pipeline.co_consumption_lift(log, codes)["lift"] > 1.5


# ------------------------------------------------------------------ ranker
@pytest.fixture(scope="module")
def data(ml100k):
    return RankingData.build(ml100k.path, RankingConfig(max_seq_len=8, lifelong_len=40))


def _side(data, g):
    v = data.vocab_sizes
    return {"content": F.normalize(torch.randn(v["item"], 12, generator=g), dim=-1),
            "item_codes": torch.randint(0, 6, (v["item"], 3), generator=g),
            "user_codes": torch.randint(0, 5, (v["user"], 2), generator=g),
            "item_fused": torch.randn(v["item"], 8, generator=g), "user_fused": torch.randn(v["user"], 8, generator=g),
            "lum_interest": torch.randn(v["user"] * 4, 12, generator=g),
            "lum_item": torch.randn(v["item"], 12, generator=g),
            "lum_item_condition": torch.randint(0, 4, (v["item"],), generator=g)}


@pytest.mark.parametrize("overrides", [
    {"name": "dlrm", "sid": "s", "das": "d", "content": "c", "muse": "both"},
    {"name": "dlrm", "sid": "s", "item_ids": "none"},
    {"name": "onetrans", "sid": "s", "item_ids": "hashed", "item_hash_rows": 50, "content": "c", "muse": "both",
     "onetrans": OneTransRankerConfig(ns_tokenizer="group_wise")},
    {"name": "hstu", "content": "c", "muse": "simtier", "das": "d"},
    {"name": "dlrm", "lum": "l"},
    {"name": "onetrans", "lum": "l", "sid": "s", "onetrans": OneTransRankerConfig(ns_tokenizer="group_wise")},
])
def test_rankers_with_content_features_score_alone_like_grouped(data, overrides):
    """SID / DAS / MUSE features keep a grouped request's one pass equal to each
    candidate alone, and a training step reaches the SID tables and MUSE's weights."""
    grouped = RankingDataset(data, Split.TEST, grouped=True)
    torch.manual_seed(0)
    side = _side(data, torch.Generator().manual_seed(0))
    if "content" not in overrides:
        side.pop("content")
    if "das" not in overrides:
        side.pop("item_fused"), side.pop("user_fused")
    if "sid" not in overrides:
        side.pop("item_codes"), side.pop("user_codes")
    if "lum" not in overrides:
        side.pop("lum_interest"), side.pop("lum_item"), side.pop("lum_item_condition")
    cfg = RankerConfig(embedding_dim=8, tower_dims=(16,), dropout=0.0, muse_top_k=5, **overrides)
    model = Ranker(cfg, data.vocab_sizes, grouped.num_genres, 8, device=torch.device("cpu"), side=side).eval()
    for name, weight in model.frozen_table_weights().items():
        module = {"content": model.content_embeddings, "das": model.das_embeddings, "lum": model.lum_embeddings}[name]
        with torch.no_grad():
            module.embeddings[name].weight.copy_(weight)
    sizes = grouped.candidates_per_request()
    requests = [int(r) for r in np.nonzero((sizes >= 2) & (grouped.history_end > grouped.history_start + 6))[0][:2]]
    batch = grouped[requests]
    assert int(batch.sequence_lengths("lifelong").min()) > 5  # GSU has more than top-k to choose from
    together = model.predict(batch)
    torch.testing.assert_close(together, predict_each_candidate_alone(model, grouped, requests), atol=1e-5, rtol=1e-5)
    model.train()
    loss, _ = model(batch)
    loss.backward()
    if "sid" in overrides:
        assert float(model.sid_embeddings.embeddings["sid_l0"].weight.grad.abs().sum()) > 0
    if overrides.get("muse") in ("both", "simtier"):
        assert float(model.simtier.weight.grad.abs().sum()) > 0
    if overrides.get("muse") in ("both", "sata"):
        assert float(model.sata.gamma.grad.abs().sum()) > 0
    if "content" in overrides:
        assert model.content_embeddings.embeddings["content"].weight.grad is None or float(
            model.content_embeddings.embeddings["content"].weight.grad.abs().sum()) == 0
    params = count_table_parameters(model)
    if overrides.get("item_ids") == "none":
        assert "item" not in params and params["item_representation"] == sum(
            params[k] for k in params if k.startswith("sid_"))


def test_ranker_refuses_missing_or_mismatched_side_inputs(data):
    v = data.vocab_sizes
    with pytest.raises(ValueError, match="needs model.content"):
        RankerConfig(muse="sata")
    with pytest.raises(ValueError, match="model.sid"):
        RankerConfig(item_ids="none")
    with pytest.raises(ValueError, match="no such side input"):
        Ranker(RankerConfig(name="dlrm", sid="s"), v, 19, 8, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="rows"):
        Ranker(RankerConfig(name="dlrm", sid="s"), v, 19, 8, device=torch.device("cpu"),
               side={"item_codes": torch.zeros(3, 2, dtype=torch.long)})


def test_frozen_tables_of_any_width_rebuild_from_a_saved_state(data):
    """Frozen tables are stored padded to a multiple of 4 columns; the saved widths cut
    the padding off again, so a 10-d DAS vector rebuilds the same projections."""
    v = data.vocab_sizes
    g = torch.Generator().manual_seed(0)
    side = {"content": torch.randn(v["item"], 10, generator=g), "item_fused": torch.randn(v["item"], 10, generator=g),
            "user_fused": torch.randn(v["user"], 10, generator=g), "item_codes": torch.zeros(v["item"], 2,
                                                                                        dtype=torch.long)}
    config = RankerConfig(name="dlrm", content="c", das="d", muse="simtier", embedding_dim=8)
    model = Ranker(config, v, 19, 8, device=torch.device("cpu"), side=side)
    state = model.state_dict()
    assert state["das_embeddings.embeddings.das.weight"].shape[1] == 12
    rebuilt = Ranker(config, v, 19, 8, device=torch.device("cpu"),
                     side=Ranker.side_inputs_from_state(state, v, model.side_widths()))
    rebuilt.load_state_dict(state)
    assert rebuilt.side_widths() == model.side_widths() == {"content": 10, "das": 10, "lum": 0}
    with pytest.raises(RuntimeError, match="das_projections"):  # what the widths prevent
        Ranker(config, v, 19, 8, device=torch.device("cpu"),
               side=Ranker.side_inputs_from_state(state, v)).load_state_dict(state)


def test_recipe_loads_content_into_a_frozen_sharded_table(ml100k, tmp_path):
    """genrec content embed/sid + genrec rank with SIDs and MUSE: the frozen table holds
    the content vectors after training, the metrics record the sets used."""
    from torchrec_genrec import cli
    from torchrec_genrec.config import load_config
    from torchrec_genrec.train.ranking import RankingRecipeConfig, run_ranking_recipe

    assert cli.main(["content", "embed", "--dataset", ml100k.path, "--encoder", "tfidf", "--dim", "16",
                     "--name", "t16"]) == 0
    assert cli.main(["content", "sid", "--dataset", ml100k.path, "--content", "t16", "--levels", "2",
                     "--codebook-size", "8", "--name", "sid_t16"]) == 0
    assert cli.main(["content", "das", "--dataset", ml100k.path, "--content", "t16", "--levels", "2",
                     "--codebook-size", "8", "--epochs", "1", "--name", "das_t16"]) == 0
    # A LUM set of the hour condition (random vectors: what matters here is that serving
    # reads the interest under the request's hour bucket exactly as training did).
    from torchrec_genrec.data.lum import REQUEST_CONDITION_CODES

    g = torch.Generator().manual_seed(0)
    cutoff = int(GlobalTimeSplit(0.1, 0.1).cutoffs(ml100k)[0])
    pre_cutoff = torch.from_numpy(np.nonzero(np.asarray(ml100k.timestamp) < cutoff)[0])
    save_side_features(ml100k.path, "lum_hour_t", {
        "lum_interest": torch.randn(ml100k.num_users * 8, 8, generator=g),
        "lum_item": torch.randn(ml100k.num_items, 8, generator=g),
        "lum_item_condition": torch.full((ml100k.num_items,), REQUEST_CONDITION_CODES["hour"]),
        # Point-in-time interests of the training events (the exported ranker leaves them out).
        "lum_event": pre_cutoff, "lum_event_interest": torch.randn(len(pre_cutoff), 8, generator=g)},
        {"kind": "lum", "condition": "hour", "behaviour_cutoff": cutoff})
    out = tmp_path / "run"
    cfg = load_config(RankingRecipeConfig, "apps/configs/ranking_ml100k.toml", [
        f"data.dataset={ml100k.path}", "model.name=dlrm", "model.embedding_dim=8", "model.content=t16",
        "model.muse=both", "model.sid=sid_t16", "model.das=das_t16", "model.lum=lum_hour_t",
        "data.task.lifelong_len=100",
        "data.task.max_seq_len=8",
        "train.max_steps=3", "train.batch_size=64", f"train.output_dir={out}", "train.progress=false",
        "train.tensorboard=false"])
    payload = run_ranking_recipe(cfg)
    assert payload["side_features"]["content"]["encoder"] == "tfidf"
    assert payload["side_features"]["sid"]["method"] == "rqkmeans"
    assert payload["side_features"]["das"]["kind"] == "das"
    assert payload["side_features"]["lum"]["condition"] == "hour"
    assert payload["training"]["table_parameters"]["sid_l0"] == 8 * 8
    import torch.distributed.checkpoint as dcp

    content = load_side_features(ml100k.path, "t16")["item"]
    key = "model.content_embeddings.embeddings.content.weight"
    state = {key: torch.zeros_like(content)}
    dcp.load(state, checkpoint_id=str(out / "checkpoints" / "best"))
    torch.testing.assert_close(state[key], content)
    key = "model.lum_event_embeddings.embeddings.lum_event.weight"  # the point-in-time rows, frozen
    state = {key: torch.zeros(len(pre_cutoff), 8)}
    dcp.load(state, checkpoint_id=str(out / "checkpoints" / "best"))
    torch.testing.assert_close(state[key], load_side_features(ml100k.path, "lum_hour_t")["lum_event_interest"])
    report = json.loads(json.dumps(payload["side_features"]))
    assert report["sid"]["item_stats"]["items"] == ml100k.num_items

    # Serving: the artifact carries the codes and frozen tables; the predictor (history
    # from raw ids, lifelong sequence included) scores like the trained model.
    from torchrec_genrec.inference.predictor import History
    from torchrec_genrec.export import export_ranker, load_trained_ranker
    from torchrec_genrec.inference.ranker import RankerPredictor

    export_ranker(str(out), str(tmp_path / "artifact"), precision="fp32")
    predictor = RankerPredictor.load(str(tmp_path / "artifact"))
    model, _, data = load_trained_ranker(str(out))
    dataset = RankingDataset(data, Split.TEST)
    store = data.store
    raw_items, raw_users = store.item_raw_ids(), store.user_raw_ids()
    values = np.asarray(store.action_values)
    with torch.no_grad():
        lengths = data.history_end[dataset.events] - data.history_start[dataset.events]
        for r in np.nonzero(lengths > 20)[0][[0, -1]].tolist():
            expected = torch.sigmoid(model.predict(dataset[[r]])).numpy()
            e = int(dataset.events[r])
            past = np.arange(data.history_start[e], data.history_end[e])
            # More history than the two sequences keep (8 each): the lifelong one matters.
            history = History(items=raw_items[data.item[past]].tolist(),
                              actions=values[np.asarray(store.action)[past]].tolist(),
                              timestamps=data.timestamp[past].tolist())
            got = predictor.score(raw_users[data.user[e]], history, [raw_items[data.item[e]]], int(data.timestamp[e]))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # int8: the id, semantic-ID and frozen content / DAS / LUM tables quantised; the
    # predictor scores exactly like the model quantised in memory, and close to fp32.
    from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC

    from torchrec_genrec.inference.ranker import quantize_ranker_tables

    manifest = export_ranker(str(out), str(tmp_path / "int8"), precision="int8")
    assert {t["precision"] for t in manifest["tables"].values()} == {"int8"}
    assert {"item", "sid_l0", "content", "das", "lum"} <= set(manifest["tables"])
    assert "lum_event" not in manifest["tables"]  # training samples only: not served
    predictor = RankerPredictor.load(str(tmp_path / "int8"))
    assert all(isinstance(getattr(predictor.model, f"{name}_embeddings"), QuantEC) for name in ("content", "das", "lum"))
    quantized, _, _ = load_trained_ranker(str(out))
    quantize_ranker_tables(quantized, "int8")
    with torch.no_grad():
        batch = dataset[list(range(0, len(dataset), 101))]
        got = torch.sigmoid(predictor.model.predict(batch))
        torch.testing.assert_close(got, torch.sigmoid(quantized.predict(batch)), rtol=0, atol=0)
        assert float((got - torch.sigmoid(model.predict(batch))).abs().max()) < 0.02


def test_moco_adaptation_pulls_co_consumed_items_together():
    """Items engaged with one after another (planted: 8 groups of 10 items, users stay in a
    group) end up closer after MoCo adaptation; their raw content vectors are random."""
    g = np.random.default_rng(0)
    users, per_user = 200, 30
    group_of_user = g.integers(0, 8, users)
    items = np.concatenate([group_of_user[u] * 10 + g.integers(0, 10, per_user) for u in range(users)])
    log = pipeline.BehaviourLog(np.repeat(np.arange(users), per_user), items.astype(np.int64),
                                np.tile(np.arange(per_user), users).astype(np.int64), per_user, users, 80)
    content = F.normalize(torch.randn(80, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    adapted, stats = pipeline.adapt_content_moco(log, content, epochs=20, batch_size=128, queue_size=512, lr=3e-3,
                                                 seed=0)
    assert stats["pairs"] > 0 and adapted.shape == content.shape
    same = torch.arange(80).unsqueeze(0) // 10 == torch.arange(80).unsqueeze(1) // 10
    off = ~torch.eye(80, dtype=torch.bool)

    def gap(x):
        cos = x @ x.T
        return float(cos[same & off].mean() - cos[~same].mean())

    assert gap(adapted) > gap(content) + 0.2


@pytest.mark.parametrize("condition", ["genre", "hour", "weekday"])
def test_ranker_reads_the_lum_interest_under_the_items_or_the_requests_condition(data, condition):
    """A LUM set of an item condition is indexed by the target's condition; one of an event
    condition (hour bucket, weekday) by the request's, read off the batch."""
    from torchrec_genrec.data.lum import HOUR_BUCKET, REQUEST_CONDITION_CODES

    v = data.vocab_sizes
    g = torch.Generator().manual_seed(0)
    conditions = {"genre": 4, "hour": 8, "weekday": 7}[condition]
    item_condition = (torch.randint(0, 4, (v["item"],), generator=g) if condition == "genre"
                      else torch.full((v["item"],), REQUEST_CONDITION_CODES[condition]))
    side = {"lum_interest": torch.randn(v["user"] * conditions, 12, generator=g),
            "lum_item": torch.randn(v["item"], 12, generator=g), "lum_item_condition": item_condition}
    model = Ranker(RankerConfig(name="dlrm", embedding_dim=8, tower_dims=(16,), lum="l"), v, 19, 8,
                   device=torch.device("cpu"), side=side).eval()
    with torch.no_grad():
        model.lum_embeddings.embeddings["lum"].weight.copy_(model.frozen_table_weights()["lum"])
    dataset = RankingDataset(data, Split.TEST, grouped=True)
    batch = dataset[list(range(3))]
    target = batch.sequence.to_dict()["target_item"]
    per_target = lambda key: torch.repeat_interleave(batch.pooled[key].values(), target.lengths())  # noqa: E731
    expected_condition = {"genre": item_condition[target.values()], "hour": per_target("event_hour") // HOUR_BUCKET,
                          "weekday": per_target("event_weekday")}[condition]
    assert int(expected_condition.min()) >= 0 and int(expected_condition.max()) < conditions
    rows = per_target("user_id") * conditions + expected_condition
    torch.testing.assert_close(model._frozen_lookup(batch)["lum_interest"], side["lum_interest"][rows])


def test_training_samples_read_their_events_point_in_time_lum_interest(data):
    """With per-event interests in the set, a sample of a listed (training) event reads its
    event's row; any other sample (validation, test, serving: event -1) its user's row. The
    exported model is built without them."""
    v = data.vocab_sizes
    g = torch.Generator().manual_seed(0)
    train = RankingDataset(data, Split.TRAIN)
    batch = train[list(range(0, 40, 2))]
    listed = batch.event[::3].sort().values  # a third of the batch's events have a row
    side = {"lum_interest": torch.randn(v["user"] * 4, 12, generator=g),
            "lum_item": torch.randn(v["item"], 12, generator=g),
            "lum_item_condition": torch.randint(0, 4, (v["item"],), generator=g),
            "lum_event": listed, "lum_event_interest": torch.randn(len(listed), 12, generator=g)}
    model = Ranker(RankerConfig(name="dlrm", embedding_dim=8, tower_dims=(16,), lum="l"), v, 19, 8,
                   device=torch.device("cpu"), side=side).eval()
    assert "lum_event" in {t.name for t in model.table_specs()}
    with torch.no_grad():
        for name, table in (("lum", model.lum_embeddings), ("lum_event", model.lum_event_embeddings)):
            table.embeddings[name].weight.copy_(model.frozen_table_weights()[name])
    target = batch.sequence.to_dict()["target_item"]
    user_rows = side["lum_interest"][batch.pooled["user_id"].values() * 4 + side["lum_item_condition"][target.values()]]
    got = model._frozen_lookup(batch)["lum_interest"]
    hit = torch.isin(batch.event, listed)
    assert int(hit.sum()) == len(listed) and not bool(hit.all())
    torch.testing.assert_close(got[~hit], user_rows[~hit])
    torch.testing.assert_close(got[hit], side["lum_event_interest"][torch.searchsorted(listed, batch.event[hit])])
    with pytest.raises(ValueError, match="ascending"):
        Ranker(RankerConfig(name="dlrm", lum="l"), v, 19, 8, device=torch.device("cpu"),
               side={**side, "lum_event": listed.flip(0)})


def test_a_cross_fitted_lum_set_reads_each_users_fold(data):
    """Users of fold k read fold k's item table (rows after the interests, fold after fold)
    and their interest goes through fold k's projection; the set rebuilds from a state."""
    v = data.vocab_sizes
    g = torch.Generator().manual_seed(0)
    fold = torch.arange(v["user"]) % 2
    side = {"lum_interest": torch.randn(v["user"] * 4, 12, generator=g),
            "lum_item": torch.randn(2 * v["item"], 12, generator=g),
            "lum_item_condition": torch.randint(0, 4, (v["item"],), generator=g), "lum_user_fold": fold}
    config = RankerConfig(name="dlrm", embedding_dim=8, tower_dims=(16,), lum="l")
    model = Ranker(config, v, 19, 8, device=torch.device("cpu"), side=side).eval()
    assert {"lum_interest_fold0", "lum_interest_fold1"} <= set(model.lum_projections)
    with torch.no_grad():
        model.lum_embeddings.embeddings["lum"].weight.copy_(model.frozen_table_weights()["lum"])
    batch = RankingDataset(data, Split.TEST)[list(range(0, 300, 7))]
    user, target = batch.pooled["user_id"].values(), batch.sequence.to_dict()["target_item"].values()
    assert set(fold[user].tolist()) == {0, 1}
    got = model._frozen_lookup(batch)["lum_item"]
    torch.testing.assert_close(got, side["lum_item"][fold[user] * v["item"] + target])
    state = model.state_dict()
    rebuilt = Ranker(config, v, 19, 8, device=torch.device("cpu"),
                     side=Ranker.side_inputs_from_state(state, v, model.side_widths()))
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().predict(batch), model.predict(batch))
    with pytest.raises(ValueError, match="rows"):
        Ranker(config, v, 19, 8, device=torch.device("cpu"), side={**side, "lum_item": side["lum_item"][:v["item"]]})


def test_the_ranker_refuses_a_side_set_learned_under_another_split(ml100k, data):
    from torchrec_genrec.train.ranking import load_ranker_side_inputs

    v = data.vocab_sizes
    cutoff = int(GlobalTimeSplit(0.1, 0.1).cutoffs(ml100k)[0])
    tensors = {"lum_interest": torch.zeros(v["user"] * 2, 4), "lum_item": torch.zeros(v["item"], 4),
               "lum_item_condition": torch.zeros(v["item"], dtype=torch.int64)}
    for name, learned in (("lum_same", cutoff), ("lum_later", cutoff + 1), ("lum_earlier", cutoff - 1)):
        save_side_features(ml100k.path, name, tensors, {"kind": "lum", "behaviour_cutoff": learned})
    side, meta = load_ranker_side_inputs(ml100k.path, RankerConfig(name="dlrm", lum="lum_same"), v, cutoff)
    assert side["lum_interest"].shape == (v["user"] * 2, 4) and meta["lum"]["behaviour_cutoff"] == cutoff
    with pytest.raises(DataError, match="read events this ranker validates or tests on"):
        load_ranker_side_inputs(ml100k.path, RankerConfig(name="dlrm", lum="lum_later"), v, cutoff)
    with pytest.raises(DataError, match="misses training events"):
        load_ranker_side_inputs(ml100k.path, RankerConfig(name="dlrm", lum="lum_earlier"), v, cutoff)
