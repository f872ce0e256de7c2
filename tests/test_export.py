"""Export: the artifact reproduces the trained model, quantises the table, and refuses
truncated, corrupted, unsafe or incompatible files."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from torchrec_genrec import cli
from torchrec_genrec.data.batching import SequenceDataset
from torchrec_genrec.data.splits import LeaveOneOut, Split
from torchrec_genrec.data.store import SequenceStore
from torchrec_genrec.inference import artifact as art
from torchrec_genrec.export import export_torchrec_package, load_trained_model, table_bytes
from torchrec_genrec.inference.layout import lookup_tokens
from torchrec_genrec.inference.predictor import History, Predictor, RequestError
from torchrec_genrec.modules.hstu import HSTUConfig, HSTUEncoder
from torchrec_genrec.modules.sasrec import SASRecConfig, SASRecEncoder
from torchrec_genrec.train.evaluate import evaluate_retrieval


def _jagged_to_padded(x, lengths):
    b, width = len(lengths), int(lengths.max())
    rows = torch.repeat_interleave(torch.arange(b), lengths)
    pos = torch.cat([torch.arange(int(n)) for n in lengths])
    return x.new_zeros((b, width) + tuple(x.shape[1:])).index_put((rows, pos), x), rows, pos


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_padded_forward_equals_jagged_forward(encoder):
    torch.manual_seed(0)
    if encoder == "hstu":
        enc = HSTUEncoder(HSTUConfig(embedding_dim=12, num_heads=2, attention_dim=4, linear_dim=6, max_seq_len=20))
    else:
        enc = SASRecEncoder(SASRecConfig(embedding_dim=12, num_heads=2, max_seq_len=20))
    enc.eval()
    for lengths in ([5, 1, 20, 7], [3], [2, 2]):
        lengths = torch.tensor(lengths)
        x = torch.randn(int(lengths.sum()), 12)
        ts = torch.randint(0, 10**7, (int(lengths.sum()),))
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        jagged = enc(x, offsets, ts)
        x_pad, rows, pos = _jagged_to_padded(x, lengths)
        ts_pad, _, _ = _jagged_to_padded(ts, lengths)
        padded = enc.forward_padded(x_pad, lengths, ts_pad)
        torch.testing.assert_close(padded[rows, pos], jagged, atol=2e-6, rtol=1e-5)
        if encoder == "hstu":
            last = enc.forward_padded_last(x_pad, lengths, ts_pad)
            torch.testing.assert_close(last, jagged[offsets[1:] - 1], atol=2e-6, rtol=1e-5)


def _histories(store_path, split, max_seq_len, holdout, rows):
    """Test users' histories as raw ids and values, the way a client would send them."""
    ds = SequenceDataset(store_path, split, max_seq_len, LeaveOneOut(holdout), with_seen_items=True)
    batch = ds[list(rows)]
    raw = SequenceStore.open(store_path).item_raw_ids()
    seen = batch.seen_items
    seen_offsets = seen.offsets().numpy()
    return batch, [(History(**h), raw[seen.values().numpy()[seen_offsets[i]:seen_offsets[i + 1]]].tolist())
                   for i, h in enumerate(ds.raw_histories(batch))]


def test_fp32_artifact_reproduces_the_trained_models_scores_and_metrics(tiny_run, tiny_artifacts):
    run, store = tiny_run
    model, cfg = load_trained_model(run)
    predictor = Predictor.load(tiny_artifacts["fp32"])
    ds = SequenceDataset(store, Split.TEST, cfg.data.max_seq_len, LeaveOneOut(cfg.data.holdout), with_seen_items=True)
    rows = range(len(ds))
    batch, histories = _histories(store, Split.TEST, cfg.data.max_seq_len, cfg.data.holdout, rows)
    reference, _ = model.score(batch)
    users = predictor.user_vectors([predictor.prepare(h) for h, _ in histories])
    ours = predictor._index.cosine(users, torch.arange(predictor.num_items))
    assert (ours - reference).abs().max() <= 1e-4

    # The artifact's scores through the same evaluation give the run's recorded test metrics.
    def artifact_scores(b):
        return ours[torch.as_tensor(_row_of_user(ds, b.user))]

    metrics = evaluate_retrieval(artifact_scores, ds, cfg.eval.ks, 1000, progress=False)
    recorded = json.loads(open(os.path.join(run, "metrics.json")).read())["metrics"]["test"]
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-6)

    # recommend = the exact top-k of those scores with the full history excluded.
    recs = predictor.recommend([h for h, _ in histories[:5]], k=7, exclude=[seen for _, seen in histories[:5]])
    raw = SequenceStore.open(store).item_raw_ids()
    for row, rec in enumerate(recs):
        scores = reference[row].clone()
        dense_seen = [int(np.where(raw == s)[0][0]) for s in histories[row][1]]
        scores[dense_seen] = -float("inf")
        assert rec.scores == pytest.approx(torch.topk(scores, 7).values.tolist(), abs=1e-4)
        assert set(rec.items).isdisjoint(histories[row][1])


def _row_of_user(ds, users):
    where = {int(u): i for i, u in enumerate(ds.user)}
    return [where[int(u)] for u in users]


def test_int8_and_fp16_tables_are_smaller_and_rank_alike(tiny_run, tiny_artifacts):
    run, store = tiny_run
    fp32, int8, fp16 = (Predictor.load(tiny_artifacts[p]) for p in ("fp32", "int8", "fp16"))
    manifests = {p: art.read_manifest(tiny_artifacts[p]) for p in tiny_artifacts}
    # TorchRec's rows: fp32 = 16 * 4 = 64 bytes; int8 = 16 + 4 (fp16 scale, bias) aligned to 16 = 32.
    assert table_bytes(manifests["int8"]) / table_bytes(manifests["fp32"]) <= 0.5
    assert table_bytes(manifests["int8"], payload_only=True) / table_bytes(manifests["fp32"], payload_only=True) == 0.25
    assert table_bytes(manifests["fp16"], payload_only=True) * 2 == table_bytes(manifests["fp32"], payload_only=True)
    _, cfg = load_trained_model(run)
    _, histories = _histories(store, Split.TEST, cfg.data.max_seq_len, cfg.data.holdout, range(40))
    hs = [h for h, _ in histories]
    top_fp32 = [set(r.items) for r in fp32.recommend(hs, k=10)]
    for quantised, floor in ((int8, 0.8), (fp16, 0.95)):
        top = [set(r.items) for r in quantised.recommend(hs, k=10)]
        overlap = np.mean([len(a & b) / 10 for a, b in zip(top_fp32, top)])
        assert overlap >= floor


def test_item_index_dequantises_like_the_table_lookup(tiny_artifacts):
    for precision in ("int8", "fp16", "fp32"):
        p = Predictor.load(tiny_artifacts[precision])
        ids = torch.arange(p.num_items)
        looked_up = lookup_tokens(p._table, p._features, ids + p.space.offset("item"), None,
                                  torch.tensor([p.num_items]), p.dim)
        torch.testing.assert_close(p._index.rows(ids), looked_up, atol=1e-6, rtol=1e-6)


def test_score_matches_recommend_and_rejects_bad_requests(tiny_artifacts):
    p = Predictor.load(tiny_artifacts["int8"])
    items = p.item_ids[:3].tolist()
    h = History(items, [next(iter(p._actions))] * 3, [100, 200, 300])
    [rec] = p.recommend([h], k=5)
    assert p.score(h, rec.items) == pytest.approx(rec.scores, abs=1e-6)
    assert len(rec.items) == 5 and not set(rec.items) & set(items)
    with pytest.raises(RequestError, match="unknown item id"):
        p.recommend([History([10**9], [1], [1])], k=5)
    with pytest.raises(RequestError, match="empty history"):
        p.recommend([History([], [], [])])
    with pytest.raises(RequestError, match="k must be"):
        p.recommend([h], k=0)
    with pytest.raises(RequestError, match="k must be"):
        p.recommend([h], k=p.num_items + 1)
    with pytest.raises(RequestError, match="send history.actions"):
        p.recommend([History(items, None, [1, 2, 3])])
    with pytest.raises(RequestError, match="send history.timestamps"):
        p.recommend([History(items, h.actions, None)])
    with pytest.raises(RequestError, match="3 items but 2 actions"):
        p.recommend([History(items, h.actions[:2], [1, 2, 3])])
    with pytest.raises(RequestError, match="unknown candidate id"):
        p.score(h, [items[0], -5])
    long = History(p.item_ids[np.arange(p.max_history + 3) % p.num_items].tolist(), [h.actions[0]] * (p.max_history + 3),
                   list(range(p.max_history + 3)))
    with pytest.raises(RequestError, match=f"at most {p.max_history}"):
        p.recommend([long])
    kept = History(long.items[3:], long.actions[3:], long.timestamps[3:])
    assert p.recommend([long], truncate=True, k=3)[0].scores == pytest.approx(
        p.recommend([kept], exclude=[long.items[:3]], k=3)[0].scores, abs=1e-6)
    # Everything excluded: fewer than k, never an excluded item.
    [few] = p.recommend([h], k=p.num_items, exclude=[p.item_ids.tolist()])
    assert few.items == []


def _copy(src, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def test_refuses_truncated_corrupted_and_incompatible_artifacts(tiny_artifacts, tmp_path):
    good = tiny_artifacts["int8"]
    truncated = _copy(good, tmp_path, "truncated")
    with open(os.path.join(truncated, art.EMBEDDINGS), "r+b") as f:
        f.truncate(100)
    with pytest.raises(art.ArtifactError, match="truncated"):
        Predictor.load(truncated)

    corrupt = _copy(good, tmp_path, "corrupt")
    path = os.path.join(corrupt, art.ENCODER)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(art.ArtifactError, match="sha256"):
        Predictor.load(corrupt)

    missing = _copy(good, tmp_path, "missing")
    os.remove(os.path.join(missing, art.VOCAB))
    with pytest.raises(art.ArtifactError, match="missing"):
        Predictor.load(missing)

    malformed = _copy(good, tmp_path, "malformed")
    text = open(os.path.join(malformed, art.MANIFEST)).read().splitlines()
    text[2] = text[2].replace(":", "", 1)
    open(os.path.join(malformed, art.MANIFEST), "w").write("\n".join(text))
    with pytest.raises(art.ArtifactError, match=r"manifest.json:3: malformed JSON"):
        Predictor.load(malformed)

    other_torch = _copy(good, tmp_path, "other_torch")
    manifest = json.load(open(os.path.join(other_torch, art.MANIFEST)))
    manifest["versions"]["torch"] = "1.13.0"
    json.dump(manifest, open(os.path.join(other_torch, art.MANIFEST), "w"))
    with pytest.raises(art.ArtifactError, match="exported with torch 1.13.0"):
        Predictor.load(other_torch)
    assert Predictor.load(other_torch, check_versions=False).num_items > 0

    newer = _copy(good, tmp_path, "newer")
    manifest = json.load(open(os.path.join(newer, art.MANIFEST)))
    manifest["format_version"] = art.ARTIFACT_VERSION + 1
    json.dump(manifest, open(os.path.join(newer, art.MANIFEST), "w"))
    with pytest.raises(art.ArtifactError, match="format version"):
        Predictor.load(newer)


def test_cli_export_and_torchrec_package(tiny_run, tiny_artifacts, tmp_path, capsys):
    run, _ = tiny_run
    out = str(tmp_path / "cli_artifact")
    assert cli.main(["export", run, "--out", out, "--precision", "fp16"]) == 0
    assert "fp16" in capsys.readouterr().out
    assert cli.main(["export", run, "--out", out]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", run, "--out", out, "--overwrite"]) == 0
    assert art.read_manifest(out)["precision"] == "int8"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]

    from torchrec_genrec.inference.torchrec_package import load_predict_factory

    package = export_torchrec_package(run, str(tmp_path / "model.pt"), precision="fp32")
    with pytest.raises(PermissionError, match="trust=True"):  # a package is code: never loaded by default
        load_predict_factory(package)
    factory = load_predict_factory(package, trust=True)
    module = factory.create_predict_module()
    predictor = Predictor.load(tiny_artifacts["fp32"])
    items = predictor.item_ids[[1, 4, 9, 2]].tolist()
    prepared = predictor.prepare(History(items, [next(iter(predictor._actions))] * 4, [5, 6, 9, 20]))
    out = module({"item": torch.from_numpy(prepared.items), "action": torch.from_numpy(prepared.actions),
                  "timestamp": torch.from_numpy(prepared.timestamps), "lengths": torch.tensor([4])})
    torch.testing.assert_close(out["user_embedding"], predictor.user_vectors([prepared]), atol=1e-5, rtol=1e-5)
    assert out["scores"].shape == (1, predictor.num_items)


def test_export_never_deletes_what_the_user_did_not_name(tiny_run, tiny_artifacts, tmp_path, capsys):
    """--overwrite replaces an earlier artifact only: never the run, a directory holding it,
    or a directory of other files; a written artifact is readable by other users."""
    import stat

    run, store = tiny_run
    code = cli.main(["export", run, "--out", run, "--overwrite"])
    assert code == 2 and "inside the run" in capsys.readouterr().err
    assert os.path.exists(os.path.join(run, "metrics.json"))
    assert cli.main(["export", run, "--out", os.path.dirname(run), "--overwrite"]) == 2
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = cli.main(["export", run, "--out", str(mine), "--overwrite"])
    assert code == 2 and "not an artifact" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
    code = cli.main(["export", run, "--out", store, "--overwrite"])  # a store is not an artifact either
    assert code == 2 and os.path.exists(os.path.join(store, "manifest.json"))
    capsys.readouterr()
    out = tmp_path / "artifact"
    assert cli.main(["export", run, "--out", str(out)]) == 0
    assert cli.main(["export", run, "--out", str(out), "--overwrite"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(os.stat(out / f).st_mode) == 0o666 & ~umask for f in os.listdir(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["name"] == os.path.basename(run) and "dir" not in manifest["run"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]
