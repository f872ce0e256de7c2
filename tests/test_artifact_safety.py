"""Artifacts are data, never code: every kind of tampered artifact is refused with a clear
message, and none of them runs anything (each payload would create a marker file).

Each tampered copy has its manifest's size and sha256 updated, as an attacker who can write
the artifact would do: the loader's structure checks, not the checksums, must stop it.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch

from torchrec_genrec import cli
from torchrec_genrec.inference import artifact as art
from torchrec_genrec.inference.predictor import Predictor


class _Exploit:
    """Anything a full unpickler would build: here, a call that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_pickle(marker):
    buffer = io.BytesIO()
    torch.save(_Exploit(marker), buffer)
    return buffer.getvalue()


def _code(marker):
    """Python that creates the marker when evaluated."""
    return f"__import__('builtins').open({str(marker)!r}, 'w')"


def _rehash(directory, name):
    manifest_path = os.path.join(directory, art.MANIFEST)
    manifest = json.load(open(manifest_path))
    data = open(os.path.join(directory, name), "rb").read()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(manifest, open(manifest_path, "w"))


def _copy(src, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _members(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def _write_members(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in members:
            z.writestr(name, data)


def _edit_json(members, suffix, edit):
    out = []
    for name, data in members:
        if name.endswith(suffix):
            doc = json.loads(data)
            edit(doc)
            data = json.dumps(doc).encode()
        out.append((name, data))
    return out


def _first_config_entry(doc):
    return next(iter(doc["config"].values()))


# Each case: (id, edit(members, marker) -> members, the message the refusal must contain).
def _legacy(members, marker):
    program = next(d for n, d in members if n.endswith("models/model.json"))
    return [("version", b"8.20"), ("serialized_exported_program.json", program),
            ("serialized_state_dict.json", _torch_pickle(marker)), ("serialized_constants.json", _torch_pickle(marker)),
            ("serialized_example_inputs.json", _torch_pickle(marker))]


def _root_level_entry(members, marker):
    return members + [("serialized_state_dict.json", _torch_pickle(marker))]


def _legacy_weights(members, marker):
    root = members[0][0].split("/")[0]
    return members + [(f"{root}/data/weights/model.pt", _torch_pickle(marker))]


def _pickled_weight(members, marker):
    def edit(doc):
        _first_config_entry(doc)["use_pickle"] = True
    out = _edit_json(members, "model_weights_config.json", edit)
    return [(n, _torch_pickle(marker) if n.endswith("/weight_0") else d) for n, d in out]


def _constant(path_name, payload):
    def edit(members, marker):
        def add(doc):
            doc["config"]["evil"] = {"path_name": path_name, "is_param": False, "use_pickle": path_name == "tensor_0",
                                     "tensor_meta": None}
        root = members[0][0].split("/")[0]
        return _edit_json(members, "model_constants_config.json", add) + [
            (f"{root}/data/constants/{path_name}", payload(marker))]
    return edit


def _sample_inputs(members, marker):
    return [(n, _torch_pickle(marker) if "/sample_inputs/" in n else d) for n, d in members]


def _program_edit(edit):
    def apply(members, marker):
        return _edit_json(members, "models/model.json", lambda doc: edit(doc, marker))
    return apply


def _sympy(doc, marker):
    values = doc["graph_module"]["graph"]["sym_int_values"]
    next(iter(values.values()))["as_expr"]["expr_str"] = _code(marker)


def _guard(doc, marker):
    doc["guards_code"].append(f"{_code(marker)} is None")


def _guard_escaping_string(doc, marker):
    doc["guards_code"].append("L['lengths'].size()[0] == 1 and '\"); " + _code(marker) + "; (\"'")


def _target(name):
    def edit(doc, marker):
        doc["graph_module"]["graph"]["nodes"][3]["target"] = name
    return edit


def _custom_obj_value(doc, marker):
    doc["graph_module"]["graph"]["custom_obj_values"] = {"obj": {"class_fqn": "builtins.open"}}


def _subgraph(doc, marker):
    node = doc["graph_module"]["graph"]["nodes"][3]
    node["inputs"].append({"name": "body", "arg": {"as_graph": {"graph": {}, "name": "x"}}, "kind": 1})


def _range_constraint(doc, marker):
    doc["range_constraints"][_code(marker)] = {"min_val": 1, "max_val": 2}


def _add_member(name_in_root, payload=lambda m: b"x"):
    def edit(members, marker):
        root = members[0][0].split("/")[0]
        return members + [(f"{root}/{name_in_root}" if not name_in_root.startswith("/") else name_in_root[1:],
                           payload(marker))]
    return edit


def _duplicate(members, marker):
    name = next(n for n, _ in members if n.endswith("/weight_0"))
    return members + [(name, _torch_pickle(marker))]


ENCODER_CASES = [
    ("legacy_layout", _legacy, "legacy torch.export layout"),
    ("root_level_entry", _root_level_entry, "outside one root directory"),
    ("legacy_weights_file", _legacy_weights, "unexpected member"),
    ("pickled_weight", _pickled_weight, "is pickled"),
    ("pickled_constant", _constant("tensor_0", _torch_pickle), "is pickled"),
    ("custom_object_constant", _constant("custom_obj_0", lambda m: pickle.dumps(_Exploit(m))), "unexpected member"),
    ("opaque_object_constant", _constant("opaque_obj_0", lambda m: pickle.dumps(_Exploit(m))), "unexpected member"),
    ("pickled_sample_inputs", _sample_inputs, "sample inputs must be empty"),
    ("sympy_expression", _program_edit(_sympy), "symbolic expression"),
    ("guard_code", _program_edit(_guard), "guard"),
    ("guard_breaking_its_string", _program_edit(_guard_escaping_string), "guard"),
    ("target_python_builtin", _program_edit(_target("torch.os.system")), "only ATen operators"),
    ("target_reads_files", _program_edit(_target("torch.ops.aten.from_file.default")), "touches files"),
    ("target_extension_op", _program_edit(_target("#custom_op.evil")), "only ATen operators"),
    ("custom_object_value", _program_edit(_custom_obj_value), "custom objects"),
    ("subgraph_argument", _program_edit(_subgraph), "as_graph"),
    ("range_constraint_key", _program_edit(_range_constraint), "not a symbol name"),
    ("aotinductor_library", _add_member("data/aotinductor/model/model.so"), "unexpected member"),
    ("extra_file", _add_member("extra/notes.txt"), "unexpected member"),
    ("second_program", _add_member("models/other.json", lambda m: b"{}"), "unexpected member"),
    ("duplicate_member", _duplicate, "appears twice"),
    ("path_traversal_member", _add_member("/encoder/../../evil.py"), "unexpected member"),
]


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "code from the artifact ran"


@pytest.mark.parametrize("case,edit,message", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_tampered_exported_program_is_refused_without_running_code(tiny_artifacts, tmp_path, marker, case, edit,
                                                                   message):
    bad = _copy(tiny_artifacts["fp32"], tmp_path, case)
    encoder = os.path.join(bad, art.ENCODER)
    _write_members(encoder, edit(_members(encoder), marker))
    _rehash(bad, art.ENCODER)
    with pytest.raises(art.ArtifactError, match=message) as info:
        Predictor.load(bad)
    assert art.ENCODER in str(info.value) and "refusing" in str(info.value)


def test_compressed_and_non_zip_programs_are_refused(tiny_artifacts, tmp_path, marker):
    bad = _copy(tiny_artifacts["fp32"], tmp_path, "deflated")
    encoder = os.path.join(bad, art.ENCODER)
    _write_members(encoder, _members(encoder), compression=zipfile.ZIP_DEFLATED)
    _rehash(bad, art.ENCODER)
    with pytest.raises(art.ArtifactError, match="compressed"):
        Predictor.load(bad)
    with open(encoder, "wb") as f:
        f.write(pickle.dumps(_Exploit(marker)))
    _rehash(bad, art.ENCODER)
    with pytest.raises(art.ArtifactError, match="not a torch.export archive"):
        Predictor.load(bad)


def test_the_genuine_program_loads_and_a_program_without_metadata_still_runs(tiny_artifacts, tmp_path):
    """The positive control: the checks accept what `genrec export` writes; the metadata the
    loader drops (stack traces, module paths) is not needed to run."""
    from torchrec_genrec.inference.exported_program import load_exported_program

    path = os.path.join(tiny_artifacts["fp32"], art.ENCODER)
    module = load_exported_program(open(path, "rb").read(), path).module()
    reference = torch.export.load(path).module()  # our own file: safe to load the usual way here
    x, lengths, times = torch.randn(2, 5, 16), torch.tensor([5, 3]), torch.arange(10).reshape(2, 5)
    torch.testing.assert_close(module(x, lengths, times), reference(x, lengths, times), rtol=0, atol=0)


def _manifest_edit(edit):
    def apply(directory, marker):
        path = os.path.join(directory, art.MANIFEST)
        manifest = json.load(open(path))
        edit(manifest, marker)
        json.dump(manifest, open(path, "w"))
    return apply


def _unlisted_encoder(directory, marker):
    encoder = os.path.join(directory, art.ENCODER)
    _write_members(encoder, _legacy(_members(encoder), marker))
    _manifest_edit(lambda m, _: m["files"].pop(art.ENCODER))(directory, marker)


def _symlink(name, target_outside=True):
    def apply(directory, marker):
        path = os.path.join(directory, name)
        outside = os.path.join(os.path.dirname(directory), f"outside-{name}")
        shutil.move(path, outside)
        os.symlink(outside if target_outside else os.path.basename(outside), path)
    return apply


def _fifo(directory, marker):
    path = os.path.join(directory, art.VOCAB)
    os.remove(path)
    os.mkfifo(path)


def _file_edit(name, content):
    def apply(directory, marker):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content if isinstance(content, bytes) else content(marker))
        if name != art.MANIFEST:
            _rehash(directory, name)
    return apply


def _vocab(edit):
    def apply(directory, marker):
        path = os.path.join(directory, art.VOCAB)
        vocab = json.load(open(path))
        vocab = edit(vocab)
        json.dump(vocab, open(path, "w"))
        _rehash(directory, art.VOCAB)
    return apply


def _set(key, value):
    def edit(manifest, marker):
        target = manifest
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return _manifest_edit(edit)


DIRECTORY_CASES = [
    ("encoder_not_in_manifest", _unlisted_encoder, "does not list encoder.pt2"),
    ("manifest_names_parent_file", _manifest_edit(lambda m, _: m["files"].update(
        {"../manifest.json": m["files"][art.VOCAB]})), "outside the artifact"),
    ("manifest_names_absolute_file", _manifest_edit(lambda m, _: m["files"].update(
        {"/etc/passwd": m["files"][art.VOCAB]})), "outside the artifact"),
    ("vocab_symlink_outside", _symlink(art.VOCAB), "is a symlink"),
    ("encoder_symlink", _symlink(art.ENCODER, target_outside=False), "is a symlink"),
    ("embeddings_symlink", _symlink(art.EMBEDDINGS), "is a symlink"),
    ("manifest_symlink", _symlink(art.MANIFEST), "is a symlink"),
    ("vocab_is_a_fifo", _fifo, "not a regular file"),
    ("manifest_oversized", _file_edit(art.MANIFEST, b" " * (art.MAX_MANIFEST_BYTES + 1) + b"{}"),
     "more than the"),
    ("manifest_nested_deeply", _file_edit(art.MANIFEST, b"[" * 100000 + b"]" * 100000), "nested too deeply"),
    ("manifest_not_json", _file_edit(art.MANIFEST, b'{"format": "torchrec-genrec/retrieval",\n x'),
     "manifest.json:2: malformed JSON"),
    ("manifest_not_utf8", _file_edit(art.MANIFEST, b'{"format": "\xff\xfe"}'), "not UTF-8"),
    ("manifest_a_list", _file_edit(art.MANIFEST, b"[1, 2]"), "format is 'list'"),
    ("manifest_without_table", _set("table", KeyError), "key 'table' is missing"),
    ("manifest_precision_int4", _set("precision", "int4"), "expected one of"),
    ("manifest_rows_a_string", _set("table.rows", "68"), "key 'table.rows'"),
    ("manifest_negative_items", _set("num_items", -5), "key 'num_items'"),
    ("manifest_files_entry_malformed", _manifest_edit(lambda m, _: m["files"].update({art.VOCAB: "abc"})),
     "needs 'bytes'"),
    ("manifest_versions_not_object", _set("versions", ["torch"]), "'versions' is not an object"),
    ("vocab_nested_deeply", _file_edit(art.VOCAB, b"[" * 100000 + b"]" * 100000), "nested too deeply"),
    ("vocab_not_an_object", _vocab(lambda v: v["item_ids"]), "expected an object"),
    ("vocab_ids_nested", _vocab(lambda v: {**v, "item_ids": [[i] for i in v["item_ids"]]}), "flat list"),
    ("vocab_ids_missing", _vocab(lambda v: {k: x for k, x in v.items() if k != "item_ids"}),
     "key 'item_ids' is missing"),
    ("vocab_ids_repeated", _vocab(lambda v: {**v, "item_ids": [v["item_ids"][0]] * len(v["item_ids"])}),
     "repeats an id"),
    ("vocab_actions_strings", _vocab(lambda v: {**v, "action_values": ["x"] * len(v["action_values"])}),
     "list of numbers"),
    ("embeddings_not_safetensors", _file_edit(art.EMBEDDINGS, lambda m: pickle.dumps(_Exploit(m))),
     "cannot read the token table"),
]


@pytest.mark.parametrize("case,edit,message", DIRECTORY_CASES, ids=[c[0] for c in DIRECTORY_CASES])
def test_tampered_artifact_directory_is_refused(tiny_artifacts, tmp_path, marker, case, edit, message):
    bad = _copy(tiny_artifacts["int8"], tmp_path, case)
    edit(bad, marker)
    with pytest.raises(art.ArtifactError, match=message):
        Predictor.load(bad)


def test_vocab_larger_than_the_limit_is_refused(tiny_artifacts, tmp_path, monkeypatch):
    bad = _copy(tiny_artifacts["int8"], tmp_path, "big_vocab")
    monkeypatch.setattr(art, "MAX_JSON_BYTES", 100)
    with pytest.raises(art.ArtifactError, match="vocab.json: .* more than the 100"):
        Predictor.load(bad)


def test_genrec_serve_refuses_a_tampered_artifact_before_listening(tiny_artifacts, tmp_path, marker, capsys):
    bad = _copy(tiny_artifacts["fp32"], tmp_path, "serve")
    encoder = os.path.join(bad, art.ENCODER)
    _write_members(encoder, _legacy(_members(encoder), marker))
    _rehash(bad, art.ENCODER)
    assert cli.main(["serve", bad, "--port", "1"]) == 2
    assert "legacy torch.export layout" in capsys.readouterr().err


RANKER_CASES = [
    ("vocab_symlink", _symlink(art.VOCAB), "is a symlink"),
    ("weights_not_in_manifest", _manifest_edit(lambda m, _: m["files"].pop("ranker.safetensors")),
     "does not list ranker.safetensors"),
    ("features_not_safetensors", _file_edit("features.safetensors", lambda m: pickle.dumps(_Exploit(m))),
     "not a readable safetensors"),
    ("task_missing", _set("task", KeyError), "key 'task' is missing"),
    ("precision_int4", _set("precision", "int4"), "fp32, fp16 or int8"),
    ("model_unknown_key", _set("model.evil", 1), "do not fit this library's ranker"),
    ("vocab_sizes_negative", _set("vocab_sizes.item", -1), "positive table sizes"),
    ("vocab_nested_deeply", _file_edit(art.VOCAB, b"[" * 100000 + b"]" * 100000), "nested too deeply"),
    ("vocab_user_ids_nested", _vocab(lambda v: {**v, "user_ids": [[u] for u in v["user_ids"]]}), "flat list"),
]


@pytest.fixture(scope="module")
def ranker_artifact(ml100k, tmp_path_factory):
    from torchrec_genrec.config import load_config
    from torchrec_genrec.export import export_ranker
    from torchrec_genrec.train.ranking import RankingRecipeConfig, run_ranking_recipe

    root = tmp_path_factory.mktemp("ranker_safety")
    cfg = load_config(RankingRecipeConfig, "apps/configs/ranking_ml100k.toml", [
        f"data.dataset={ml100k.path}", "model.name=dlrm", "model.embedding_dim=8", "train.max_steps=1",
        "train.batch_size=64", f"train.output_dir={root / 'run'}", "train.progress=false", "train.tensorboard=false",
        "data.task.max_seq_len=4"])
    run_ranking_recipe(cfg)
    export_ranker(str(root / "run"), str(root / "artifact"), precision="int8")
    return str(root / "artifact")


@pytest.mark.parametrize("case,edit,message", RANKER_CASES, ids=[c[0] for c in RANKER_CASES])
def test_tampered_ranker_artifact_is_refused(ranker_artifact, tmp_path, marker, case, edit, message):
    from torchrec_genrec.inference.ranker import RankerPredictor

    bad = _copy(ranker_artifact, tmp_path, case)
    edit(bad, marker)
    with pytest.raises(art.ArtifactError, match=message):
        RankerPredictor.load(bad)
    if case == "vocab_symlink":  # the genuine artifact still loads
        assert RankerPredictor.load(ranker_artifact).model is not None
