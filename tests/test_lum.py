"""The LUM model: packed rows and jagged batches equal separate users, group queries equal
single queries, generation extends the branches, runs save and load."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from torchrec_genrec.data.lum import block_causal_mask, condition_item_sequences, pack_sequences
from torchrec_genrec.modules.lum import LUM, LUMConfig
from torchrec_genrec.train.content import behaviour_log


def recipe(model=None, epochs=3, seed=0, output_dir="", **data):
    """A LUM recipe from the data settings given flat (the tests' shorthand)."""
    from torchrec_genrec.train.lum import LUMDataConfig, LUMRecipeConfig, _lum_train_defaults

    train = _lum_train_defaults()
    train.epochs, train.seed, train.output_dir = epochs, seed, output_dir
    train.checkpoint = bool(output_dir)
    return LUMRecipeConfig(data=LUMDataConfig(**data), model=model or LUMConfig(), train=train)


@pytest.fixture(scope="module")
def sequences(ml100k):
    return condition_item_sequences(ml100k, behaviour_log(ml100k), "genre", max_events=20)


def _model(space):
    torch.manual_seed(0)
    return LUM(LUMConfig(embedding_dim=16, num_layers=2, num_heads=2, max_positions=64, num_negatives=32,
                         dropout=0.0), space).eval()


def test_a_packed_row_computes_each_user_as_if_alone(sequences):
    model = _model(sequences.space)
    lengths = sequences.lengths()
    rows = [r for r in pack_sequences(lengths, 64) if len(r) >= 2][:2]
    packed = sequences.packed_rows(rows, 64)
    with torch.no_grad():
        together = model.encode(packed.tokens, packed.position, block_causal_mask(packed.segment))
        for r, row in enumerate(rows):
            for s in row:
                alone = sequences.packed_rows([[s]], int(lengths[s]))
                out = model.encode(alone.tokens, alone.position, block_causal_mask(alone.segment))[0]
                torch.testing.assert_close(together[r][packed.segment[r] == s], out, atol=1e-5, rtol=1e-5)


def test_group_query_equals_one_query_per_condition(sequences):
    model = _model(sequences.space)
    u = int(np.argmax(sequences.lengths()))
    prefix = torch.from_numpy(sequences.tokens[sequences.offsets[u]:sequences.offsets[u + 1]])
    conditions = model.space.to_tokens("condition", torch.tensor([1, 4, 7, 9]))
    with torch.no_grad():
        together = model.query(prefix, conditions)
        alone = torch.cat([model.query(prefix, c.view(1)) for c in conditions])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])  # the condition changes the interest
    assert model.item_scores(together).shape == (4, sequences.space.count("item"))


def test_next_condition_item_training_lowers_the_loss(sequences):
    model = _model(sequences.space).train()
    rows = pack_sequences(sequences.lengths(), 64)[:16]
    batch = sequences.packed_rows(rows, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first, stats = model.loss(batch.tokens, batch.segment, batch.position, g)
    assert stats["positions"] == int((sequences.lengths()[sum(rows, [])] // 2).sum())
    for _ in range(40):
        loss, _ = model.loss(batch.tokens, batch.segment, batch.position, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < float(first.detach()) - 0.5


def test_conditioned_retrieval_uses_only_pre_cutoff_training_and_scores_test_events(ml100k):
    """A short pre-training run (jagged and packed layouts) and the retrieval test: the true
    condition must beat a wrong one (the condition carries the genre), the unconditioned
    model's prior is exactly a genre filter, and every metric is a rate."""
    from torchrec_genrec.train.lum import conditioned_retrieval, pretrain_lum

    small = LUMConfig(embedding_dim=16, num_layers=1, num_heads=2, max_positions=64, num_negatives=32)
    for layout in ("packed", "jagged"):
        cfg = recipe(model=small, epochs=3, dataset=ml100k.path, condition="genre", max_events=30, row_len=64,
                     layout=layout)
        model, seqs, history = pretrain_lum(cfg)
        assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
        assert int(seqs.timestamps.max()) < seqs.cutoff  # nothing at or after the validation cutoff
        right = conditioned_retrieval(model, seqs, cfg, per_event=True)
        wrong = conditioned_retrieval(model, seqs, cfg, wrong_condition=True)
        assert right["events"] == wrong["events"] > 0 and 0.0 <= right["recall@10"] <= 1.0
        assert right["recall@10"] > wrong["recall@10"]
        assert sum(right["event_hit"]) == pytest.approx(right["recall@10"] * right["events"])
    pooled = conditioned_retrieval(model, seqs, cfg, steps=3)
    assert pooled["events"] == right["events"]
    with pytest.raises(ValueError, match="trained on condition 'genre'"):
        conditioned_retrieval(model, seqs, cfg, "hour")
    none_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, condition="none"))
    none_model, none_seqs, _ = pretrain_lum(none_cfg)
    with pytest.raises(ValueError, match="condition to evaluate"):
        conditioned_retrieval(none_model, none_seqs, none_cfg)
    plain = conditioned_retrieval(none_model, none_seqs, none_cfg, "genre")
    filtered = conditioned_retrieval(none_model, none_seqs, none_cfg, "genre", condition_prior=True)
    assert filtered["recall@10"] > plain["recall@10"]  # the filter removes other genres' items


def test_jagged_causal_attention_equals_the_per_sequence_reference_forward_and_backward():
    from torchrec_genrec.ops.jagged import JaggedAttentionPlan, jagged_causal_attention, reference_causal_attention

    torch.manual_seed(0)
    lengths = torch.tensor([3, 0, 17, 5, 120, 40, 41, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    qkv = torch.randn(int(offsets[-1]), 3, 2, 8, requires_grad=True)
    plan = JaggedAttentionPlan(offsets)
    assert len(plan.buckets) >= 2  # several buckets, so the reordering is exercised
    fast = plan.to_input_order(jagged_causal_attention(plan.to_plan_order(qkv), plan))
    ref = reference_causal_attention(qkv, offsets)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(fast, qkv, grad)[0], torch.autograd.grad(ref, qkv, grad)[0],
                               atol=1e-5, rtol=1e-5)
    computed, useful = plan.attention_cells()
    assert useful == int((lengths * (lengths + 1) // 2).sum()) and computed >= useful
    # The plan order keeps every sequence whole, contiguous and in order: positions line up.
    from torchrec_genrec.ops.jagged import positions_in_sequence

    total = int(offsets[-1])
    assert torch.equal(plan.to_plan_order(positions_in_sequence(offsets, total)),
                       positions_in_sequence(plan.offsets, total))
    assert sorted((plan.offsets[1:] - plan.offsets[:-1]).tolist()) == sorted(lengths[lengths > 0].tolist())


def test_the_jagged_layout_computes_what_packed_rows_compute(sequences):
    """Same users, same order: the jagged loss equals the packed loss (same positions, same
    negatives), and each user's jagged outputs equal the user encoded alone."""
    model = _model(sequences.space)
    rows = [r for r in pack_sequences(sequences.lengths(), 64) if len(r) >= 2][:3]
    packed = sequences.packed_rows(rows, 64)
    tokens, offsets = sequences.jagged_batch(sum(rows, []))
    with torch.no_grad():
        dense_loss, dense_stats = model.loss(packed.tokens, packed.segment, packed.position,
                                             torch.Generator().manual_seed(3))
        jagged_loss, jagged_stats = model.loss_jagged(tokens, offsets, torch.Generator().manual_seed(3))
        assert jagged_stats["positions"] == dense_stats["positions"] > 0
        torch.testing.assert_close(jagged_loss, dense_loss, atol=1e-5, rtol=1e-5)
        out = model.encode_jagged(tokens, offsets)
        for i, s in enumerate(sum(rows, [])):
            alone = sequences.packed_rows([[s]], int(sequences.lengths()[s]))
            ref = model.encode(alone.tokens, alone.position, block_causal_mask(alone.segment))[0]
            torch.testing.assert_close(out[offsets[i]:offsets[i + 1]], ref, atol=1e-5, rtol=1e-5)


def test_batch_by_tokens_places_every_user_once_within_the_budget(sequences):
    from torchrec_genrec.data.lum import batch_by_tokens

    lengths = sequences.lengths()
    order = np.random.default_rng(0).permutation(len(lengths))
    batches = batch_by_tokens(lengths, order, 128)
    placed = sum(batches, [])
    assert sorted(placed) == sorted(np.nonzero(lengths)[0].tolist())
    assert placed == [int(s) for s in order if lengths[s] > 0]  # the given order is kept
    assert all(lengths[b].sum() <= 128 or len(b) == 1 for b in batches)


def test_branches_see_the_prefix_and_themselves_only_and_generation_extends_them(sequences):
    model = _model(sequences.space)
    u = int(np.argmax(sequences.lengths()))
    prefix = torch.from_numpy(sequences.tokens[sequences.offsets[u]:sequences.offsets[u + 1]])[-20:]
    conditions = model.space.to_tokens("condition", torch.tensor([2, 5, 8]))
    items = model.space.to_tokens("item", torch.tensor([[10, 11], [12, 13], [14, 15]]))
    branches = torch.stack([conditions, items[:, 0], conditions, items[:, 1], conditions], 1)
    with torch.no_grad():
        together = model.query_branches(prefix, branches)
        for b in range(3):  # each branch alone = prefix + branch as one causal sequence
            seq = torch.cat([prefix, branches[b]]).unsqueeze(0)
            alone = model.encode(seq, torch.arange(seq.shape[1]).unsqueeze(0),
                                 torch.ones(1, seq.shape[1], seq.shape[1], dtype=torch.bool).tril())
            torch.testing.assert_close(together[b], alone[0, prefix.numel():], atol=1e-5, rtol=1e-5)
    seen = model.space.from_tokens("item", prefix[1::2])
    outputs, generated = model.generate(prefix, conditions, steps=4, exclude=seen)
    assert outputs.shape == (3, 4, 16) and generated.shape == (3, 4)
    torch.testing.assert_close(outputs[:, 0], model.query(prefix, conditions), atol=1e-5, rtol=1e-5)
    for row in generated.tolist():
        assert len(set(row)) == 4 and not set(row) & set(seen.tolist())
    # Step 2's output is the query after <c, generated item 1>: recompute it explicitly.
    step2 = torch.stack([conditions, model.space.to_tokens("item", generated[:, 0]), conditions], 1)
    torch.testing.assert_close(outputs[:, 1], model.query_branches(prefix, step2)[:, -1], atol=1e-5, rtol=1e-5)
    scores, top = model.retrieve(prefix, conditions, k=5, steps=3, exclude=seen)
    assert top.shape == (3, 5) and not set(top.flatten().tolist()) & set(seen.tolist())
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    with pytest.raises(ValueError, match="max_positions"):
        model.generate(torch.cat([prefix, prefix, prefix, prefix]), conditions, steps=3)


def test_condition_given_item_is_a_filter_for_genre_and_a_smoothed_frequency_for_hour(ml100k):
    from torchrec_genrec.data.lum import condition_given_item

    log = behaviour_log(ml100k)
    genre = condition_given_item(ml100k, log, "genre")
    assert set(np.unique(genre)) == {0.0, 1.0} and (genre.sum(1) == 1).all()
    hour = condition_given_item(ml100k, log, "hour")
    assert hour.shape == (ml100k.num_items, 8) and np.allclose(hour.sum(1), 1.0) and (hour > 0).all()
    # The most frequent hour bucket of the most rated item is where its pre-cutoff events are.
    top = int(np.bincount(log.item).argmax())
    seconds = log.timestamp[log.item == top] // 1
    assert int(hour[top].argmax()) == int(np.bincount((seconds // 3600) % 24 // 3, minlength=8).argmax())


def test_lum_runs_save_and_load_and_bad_configs_are_refused(ml100k, tmp_path):
    from torchrec_genrec.train.lum import WEIGHTS, load_lum, pretrain_lum

    small = LUMConfig(embedding_dim=16, num_layers=1, num_heads=2, max_positions=64, num_negatives=16)
    with pytest.raises(ValueError, match="unknown LUM condition 'genres'"):
        recipe(condition="genres").validate()
    with pytest.raises(ValueError, match="layout"):
        recipe(layout="ragged").validate()
    with pytest.raises(ValueError, match="max_positions"):
        recipe(max_events=100, model=small).validate()
    with pytest.raises(ValueError, match="block-diagonal"):
        recipe(layout="packed", model=LUMConfig(encoder="hstu")).validate()
    cfg = recipe(model=small, epochs=1, output_dir=str(tmp_path / "run"), dataset=ml100k.path, condition="hour",
                 max_events=20)
    model, seqs, history = pretrain_lum(cfg)
    run = tmp_path / "run"
    assert (run / "tensorboard").is_dir() and not list(run.glob("*.tmp"))
    assert os.path.isdir(run / "checkpoints") and any(d.startswith("step-") for d in os.listdir(run / "checkpoints"))
    # The weights mark a finished run: written after config.json and history.json.
    assert (run / WEIGHTS).stat().st_mtime_ns >= (run / "config.json").stat().st_mtime_ns
    loaded, loaded_seqs, loaded_cfg = load_lum(str(tmp_path / "run"))
    assert loaded_cfg == cfg and np.array_equal(loaded_seqs.tokens, seqs.tokens)
    prefix = torch.from_numpy(seqs.tokens[seqs.offsets[1]:seqs.offsets[2]])
    conditions = seqs.space.to_tokens("condition", torch.arange(8))
    torch.testing.assert_close(loaded.query(prefix, conditions), model.query(prefix, conditions))
    with pytest.raises(FileNotFoundError, match="not a finished LUM run"):
        load_lum(str(tmp_path))


def test_genrec_lum_cli_trains_evaluates_caches_features_and_retrieves(ml100k, tmp_path, capsys):
    import json

    from torchrec_genrec import cli
    from torchrec_genrec.data.content import load_side_features

    run = str(tmp_path / "lum")
    small = ["train.epochs=1", "data.max_events=20", "model.embedding_dim=16", "model.num_layers=1",
             "model.max_positions=64", "model.num_negatives=16", f"data.dataset={json.dumps(ml100k.path)}"]
    assert cli.main(["lum", "train", "--out", run, "--set", "data.condtion=hour"]) != 0  # a config typo is named
    assert "did you mean 'data.condition'" in capsys.readouterr().err
    assert cli.main(["lum", "train", "--out", run] + sum((["--set", s] for s in small), [])) == 0
    assert "lum.safetensors" in capsys.readouterr().out
    assert cli.main(["lum", "eval", "--run", run]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["true"]["events"] > 0 and 0 <= report["wrong"]["recall@10"] <= 1
    assert cli.main(["lum", "features", "--run", run, "--name", "lum_cli", "--k", "5"]) == 0
    capsys.readouterr()
    side = load_side_features(ml100k.path, "lum_cli")
    c = side.meta["conditions"]
    assert side["lum_topk"].shape == (ml100k.num_users * c, 5) and side.meta["behaviour_cutoff"] > 0
    # The top-k never holds an item of the user's pre-cutoff log, even beyond the 20 events kept.
    log = behaviour_log(ml100k)
    counts = np.bincount(log.user, minlength=ml100k.num_users)
    long_user = int(np.argmax(counts))
    assert counts[long_user] > 20
    history = set(log.item[log.user == long_user].tolist())
    assert not history & set(side["lum_topk"][long_user * c:(long_user + 1) * c].flatten().tolist())
    user = str(ml100k.user_raw_ids()[1])
    assert cli.main(["lum", "retrieve", "--run", run, "--user", user, "--conditions", "1", "8", "--k", "3"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert list(top) == ["genre=1", "genre=8"] and all(len(v) == 3 for v in top.values())
    with pytest.raises(SystemExit, match="out of range"):
        cli.main(["lum", "retrieve", "--run", run, "--user", user, "--conditions", "99"])
    with pytest.raises(SystemExit, match="not in"):
        cli.main(["lum", "retrieve", "--run", run, "--user", "no-such-user", "--conditions", "1"])
    with pytest.raises(SystemExit, match="--conditions"):
        cli.main(["lum", "retrieve", "--run", run, "--user", user])
    with pytest.raises(SystemExit, match="steps must be >= 1"):
        cli.main(["lum", "retrieve", "--run", run, "--user", user, "--conditions", "1", "--steps", "0"])
    with pytest.raises(SystemExit, match="trained on condition 'genre'"):
        cli.main(["lum", "eval", "--run", run, "--condition", "hour"])
    # Cross-fitting: two runs, each without one fold of users, make one set (in holdout order).
    folds = [str(tmp_path / f"lum_f{k}") for k in (0, 1)]
    for k, out in enumerate(folds):
        assert cli.main(["lum", "train", "--out", out] + sum((["--set", s] for s in small + [
            "data.folds=2", f"data.holdout_fold={k}"]), [])) == 0
    with pytest.raises(SystemExit, match="holdout order"):
        cli.main(["lum", "features", "--run", folds[1], folds[0], "--name", "lum_xfit_cli"])
    with pytest.raises(SystemExit, match="are for .features. only"):
        cli.main(["lum", "eval", "--run", folds[0], folds[1]])
    assert cli.main(["lum", "features", "--run", *folds, "--name", "lum_xfit_cli", "--k", "3", "--point-in-time"]) == 0
    side = load_side_features(ml100k.path, "lum_xfit_cli")
    assert side.meta["folds"] == 2 and side["lum_item"].shape[0] == 2 * ml100k.num_items
    assert side["lum_event"].numel() == len(log.user)


def test_lum_on_the_hstu_encoder_trains_jagged_and_its_group_query_is_the_target_aware_pass(sequences):
    """LUM on the library's HSTU layers: the group query (HSTURankerEncoder's target-aware
    mask) equals each condition appended to the prefix as its own jagged sequence
    (HSTUEncoder); packed rows are refused; the jagged loss trains."""
    torch.manual_seed(0)
    model = LUM(LUMConfig(embedding_dim=16, num_layers=2, num_heads=2, max_positions=64, num_negatives=32,
                          dropout=0.0, encoder="hstu"), sequences.space)
    u = int(np.argmax(sequences.lengths()))
    prefix = torch.from_numpy(sequences.tokens[sequences.offsets[u]:sequences.offsets[u + 1]])[-30:]
    conditions = model.space.to_tokens("condition", torch.tensor([1, 4, 7]))
    with torch.no_grad():
        together = model.query(prefix, conditions)
        alone = model.query_branches(prefix, conditions.view(-1, 1))[:, -1]
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(together[0], together[1])
        outputs, generated = model.generate(prefix, conditions, steps=3,
                                            exclude=model.space.from_tokens("item", prefix[1::2]))
        torch.testing.assert_close(outputs[:, 0], together, atol=1e-5, rtol=1e-5)
    rows = pack_sequences(sequences.lengths(), 64)[:8]
    packed = sequences.packed_rows(rows, 64)
    with pytest.raises(ValueError, match="block-diagonal mask"):
        model.loss(packed.tokens, packed.segment, packed.position)
    tokens, offsets = sequences.jagged_batch(sum(rows, []))
    # Padded rows (one user each) compute what the jagged batch computes.
    users = sum(rows, [])
    padded = sequences.packed_rows([[s] for s in users], int(sequences.lengths()[users].max()))
    with torch.no_grad():
        torch.testing.assert_close(model.loss(padded.tokens, padded.segment, padded.position,
                                              torch.Generator().manual_seed(1))[0],
                                   model.loss_jagged(tokens, offsets, torch.Generator().manual_seed(1))[0],
                                   atol=1e-5, rtol=1e-5)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first, stats = model.loss_jagged(tokens, offsets, g)
    assert stats["positions"] == int((sequences.lengths()[sum(rows, [])] // 2).sum())
    for _ in range(30):
        loss, _ = model.loss_jagged(tokens, offsets, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < float(first.detach()) - 0.5
    with pytest.raises(ValueError, match="encoder"):
        LUMConfig(encoder="mamba").validate()


@pytest.mark.parametrize("condition", ["hour", "weekday"])
def test_point_in_time_event_interests_equal_one_query_per_event(tmp_path, condition):
    """Each pre-cutoff event's interest == LUM.query of the user's at most max_events
    events strictly earlier in time (ties left out), under the event's own condition."""
    import pyarrow as pa

    from torchrec_genrec.data.store import SequenceStore, write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate
    from torchrec_genrec.train.lum import event_interests

    inter = generate(SyntheticConfig(num_users=12, num_items=30, num_events=300, min_seq_len=4, seed=2))
    hours = pa.array((inter.events.column("timestamp").to_numpy() // 7200) * 7200)  # ties within a user
    inter = dataclasses.replace(inter, events=inter.events.set_column(
        inter.events.schema.get_field_index("timestamp"), "timestamp", hours))
    write_store(inter, str(tmp_path / "store"))
    store = SequenceStore.open(str(tmp_path / "store"))
    log = behaviour_log(store)
    full = condition_item_sequences(store, log, condition, max_events=10**6)  # pair j = event j of the log
    torch.manual_seed(0)
    model = LUM(LUMConfig(embedding_dim=16, num_layers=2, num_heads=2, max_positions=16, num_negatives=8,
                          dropout=0.0), full.space).eval()
    events, got = event_interests(model, store, log.cutoff, condition, max_events=5, batch_tokens=64)
    assert len(events) == len(log.user) and (np.asarray(store.timestamp)[events] < log.cutoff).all()
    some = np.arange(store.num_users) % 3 == 1  # only these users' events: the same rows
    kept, rows = event_interests(model, store, log.cutoff, condition, max_events=5, batch_tokens=64, users=some)
    mask = some[log.user]
    np.testing.assert_array_equal(kept, events[mask])
    torch.testing.assert_close(rows, got[torch.from_numpy(mask)])
    ties = 0
    with torch.no_grad():
        for j in range(len(events)):
            same_user = np.nonzero(log.user == log.user[j])[0]
            earlier = same_user[log.timestamp[same_user] < log.timestamp[j]][-5:]  # cap: min(5, room 15 // 2)
            ties += int(((log.timestamp[same_user] == log.timestamp[j]) & (same_user < j)).sum())
            if len(earlier) == 0:  # no past: zeros, like a user without history in the per-user cache
                assert not got[j].any()
                continue
            prefix = torch.from_numpy(np.stack([full.tokens[2 * earlier], full.tokens[2 * earlier + 1]], 1).reshape(-1))
            expected = model.query(prefix, torch.from_numpy(full.tokens[2 * j:2 * j + 1]))[0]
            torch.testing.assert_close(got[j], expected, atol=1e-5, rtol=1e-5)
    assert ties > 0  # the strictly-earlier rule was exercised


def test_cross_fitted_lums_never_train_on_and_serve_their_held_out_users(ml100k, sequences):
    """A LUM pre-trained with holdout_fold k sees no user of fold k; lum_features over K
    such models gives user u the vectors of model u % K, and K item tables."""
    from torchrec_genrec.data.lum import LUMEpochs
    from torchrec_genrec.train.lum import LUMTask, lum_features, user_folds

    cfg = recipe(model=LUMConfig(embedding_dim=16, num_heads=2, max_positions=64), dataset=ml100k.path,
                 max_events=20, row_len=64, folds=2, holdout_fold=1)
    for layout in ("jagged", "packed"):
        layout_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout=layout))
        epochs = LUMTask(layout_cfg, sequences).train_data(0, 1)
        assert isinstance(epochs, LUMEpochs)
        batches = epochs.batches(0)
        users = np.asarray([u for b in batches for u in (sum(b, []) if layout == "packed" else b)])
        assert len(users) and (users % 2 == 0).all()
        assert len(users) == int(((sequences.lengths() > 0) & (user_folds(len(sequences.lengths()), 2) == 0)).sum())
    with pytest.raises(Exception, match="holdout_fold"):
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_fold=2)).validate()
    models = [_model(sequences.space), _model(sequences.space)]
    with torch.no_grad():
        models[1].position.weight.add_(0.5)  # two different models
    out = lum_features(models, sequences, ml100k, None, top_k=3)
    c = sequences.space.count("condition")
    assert torch.equal(out["lum_user_fold"], torch.from_numpy(user_folds(ml100k.num_users, 2)))
    assert out["lum_item"].shape[0] == 2 * ml100k.num_items
    conditions = sequences.space.to_tokens("condition", torch.arange(c))
    with_history = np.nonzero(sequences.lengths() > 0)[0]
    chosen = [int(with_history[with_history % 2 == k][i]) for k in (0, 1) for i in (0, 1)]
    for u in chosen:
        prefix = torch.from_numpy(sequences.tokens[sequences.offsets[u]:sequences.offsets[u + 1]])
        with torch.no_grad():
            expected = models[u % 2].interests(prefix, conditions)
        torch.testing.assert_close(out["lum_interest"][u * c:(u + 1) * c], expected, atol=1e-5, rtol=1e-5)
