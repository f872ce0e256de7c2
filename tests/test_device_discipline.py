"""Device discipline, checked on the CPU: a training step of every task creates no tensor
with a factory function (``torch.arange``, ``zeros``, ``full``, ``tensor``, ...) without
saying on which device. On a GPU such a tensor lands on the CPU next to CUDA inputs — the
crash a first CUDA run met (``uniform_negatives``' ``arange``, ``_lookup``'s zeros). The
watch covers the project's own code (TorchRec's and torch's are theirs to keep)."""

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import RANKING_RECIPE, RETRIEVAL_RECIPE, ROOT, synthetic_store
from torchrec_genrec.config import load_config
from torchrec_genrec.train.trainer import Trainer

_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.randint,
              torch.rand, torch.randn, torch.eye, torch.linspace, torch.as_tensor, torch.randperm}


class _FactoryWatch(TorchFunctionMode):
    """Records factory calls without ``device=`` made from torchrec_genrec's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        copies_a_tensor = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
        if func in _FACTORIES and "device" not in kwargs and not copies_a_tensor:
            # The direct caller only: a library's own factory calls under our frames (e.g. an
            # optimiser's CPU step counter on older torch) are the library's to place.
            where = traceback.extract_stack()[-2]
            if "/torchrec_genrec/" in where.filename:
                self.calls[f"{where.filename.split('/torchrec_genrec/')[-1]}:{where.lineno} {func.__name__}"] += 1
        return func(*args, **kwargs)


def _one_step(task, train_config) -> collections.Counter:
    trainer = Trainer(task, train_config)
    data = task.train_data(0, 1)
    data.set_epoch(0)
    batch = next(iter(data))
    watch = _FactoryWatch()
    with watch:
        trainer.train_step(batch)
    return watch.calls


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory, "device", num_users=60, num_items=40, num_events=1200, min_seq_len=5,
                           seed=5)


def _settings(store, tmp_path, *extra):
    return [f"data.dataset={store}", f"train.output_dir={tmp_path}", "train.checkpoint=false",
            "train.tensorboard=false", "train.progress=false", *extra]


@pytest.mark.parametrize("model,action_mode,loss", [("hstu", "summed", "sampled_softmax"),
                                                    ("hstu", "interleaved", "full_softmax"),
                                                    ("sasrec", "none", "sampled_softmax")])
def test_retrieval_step_creates_every_tensor_on_its_inputs_device(store, tmp_path, model, action_mode, loss):
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig, RetrievalTask

    cfg = load_config(RetrievalRecipeConfig, RETRIEVAL_RECIPE, _settings(
        store, tmp_path, f"model.name={model}", f"model.action_mode={action_mode}", f"model.loss={loss}",
        "data.max_seq_len=12", "train.batch_size=8", "model.embedding_dim=16", "model.num_negatives=8"))
    assert _one_step(RetrievalTask(cfg, store), cfg.train) == {}


@pytest.mark.parametrize("model", ["dlrm", "onetrans", "hstu"])
def test_ranking_step_creates_every_tensor_on_its_inputs_device(store, tmp_path, model):
    from torchrec_genrec.train.ranking import RankingRecipeConfig, RankingTask

    cfg = load_config(RankingRecipeConfig, RANKING_RECIPE, _settings(
        store, tmp_path, f"model.name={model}", "model.embedding_dim=8", "data.task.max_seq_len=6",
        "data.task.positive_threshold=1", "train.batch_size=32", "data.grouped=true"))
    assert _one_step(RankingTask(cfg, store), cfg.train) == {}


@pytest.mark.parametrize("layout,encoder", [("jagged", "transformer"), ("packed", "transformer"),
                                            ("jagged", "hstu")])
def test_lum_step_creates_every_tensor_on_its_inputs_device(store, tmp_path, layout, encoder):
    from torchrec_genrec.train.lum import LUMRecipeConfig, LUMTask, _sequences

    cfg = load_config(LUMRecipeConfig, f"{ROOT}/apps/configs/lum_ml100k.toml", _settings(
        store, tmp_path, f"data.layout={layout}", f"model.encoder={encoder}", "data.condition=hour",
        "data.max_events=10", "data.row_len=32", "data.batch_rows=4", "model.embedding_dim=16", "model.max_positions=32",
        "model.num_negatives=8")).validate()
    _, seqs = _sequences(cfg)
    assert _one_step(LUMTask(cfg, seqs), cfg.train) == {}


def test_content_steps_create_every_tensor_on_their_inputs_device(store):
    from torchrec_genrec.data.store import SequenceStore
    from torchrec_genrec.modules.das import DASConfig
    from torchrec_genrec.modules.semantic_ids import RQVAEConfig
    from torchrec_genrec.train.content import DASTask, MoCoTask, RQVAETask, _content_train_config, behaviour_log

    log = behaviour_log(SequenceStore.open(store))
    content = torch.nn.functional.normalize(torch.randn(log.num_items, 16, generator=torch.Generator().manual_seed(0)),
                                            dim=-1)
    train = _content_train_config(1, 32, 1e-3, 0, False)
    das = DASTask(log, content, DASConfig(content_dim=16, latent_dim=8, codebook_size=8, cf_dim=8), 1, 32, 0)
    assert _one_step(das, train) == {}
    assert _one_step(MoCoTask(log, content, 64, 0.99, 0.07, 32, 0), train) == {}
    assert _one_step(RQVAETask(content, RQVAEConfig(input_dim=16, latent_dim=8, hidden_dim=16, codebook_size=8), 1,
                               32, 0), train) == {}


def test_the_watch_sees_a_factory_without_device():
    """The watch itself: a factory call without a device from the project's code is caught."""
    from torchrec_genrec.ops import jagged

    watch = _FactoryWatch()
    with watch:
        jagged.lengths_to_offsets(torch.tensor([2, 3]))  # creates its leading zero on the lengths' device
        torch.arange(3)  # called from this test, not from torchrec_genrec: not counted
    assert all("ops/jagged.py" in k for k in watch.calls)
    original = jagged.lengths_to_offsets

    def careless(lengths):
        return torch.cat([torch.zeros(1, dtype=lengths.dtype), lengths.cumsum(0)])

    careless.__code__ = careless.__code__.replace(co_filename=original.__code__.co_filename)
    with watch:
        careless(torch.tensor([1, 2]))
    assert any("zeros" in k for k in watch.calls)
