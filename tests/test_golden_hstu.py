"""Golden run: the first training losses of the default recipe on ML-100K match a recorded curve.

A change to the data path, the token layout, the model, the loss or the optimisers moves
these numbers; the tolerance only absorbs floating-point differences between CPUs.
Re-record deliberately (and say why in the commit) with::

    .venv/bin/python tests/test_golden_hstu.py --record
"""

from __future__ import annotations

import json
import os
import sys
from typing import List

import numpy as np
import pytest
import torch

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "hstu_ml100k_loss.json")
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps", "configs",
                      "hstu_ml100k.toml")
STEPS = 5


def first_losses(store_path: str, steps: int = STEPS, pipeline: str = "none") -> List[float]:
    """The first ``steps`` losses of the default recipe, through the trainer's step."""
    import tempfile

    from torchrec_genrec.config import load_config
    from torchrec_genrec.train.retrieval import RetrievalRecipeConfig, RetrievalTask
    from torchrec_genrec.train.trainer import Trainer, seed_everything

    out = tempfile.mkdtemp(prefix="golden-")
    cfg = load_config(RetrievalRecipeConfig, RECIPE, [
        f"data.dataset={store_path}", f"train.output_dir={out}", "train.checkpoint=false", "train.tensorboard=false",
        "train.progress=false", f"train.pipeline={pipeline}", f"train.max_steps={steps}"])
    seed_everything(cfg.train.seed)
    trainer = Trainer(RetrievalTask(cfg, store_path), cfg.train)
    if pipeline == "none":
        data = trainer.task.train_data(0, 1)
        data.set_epoch(0)
        losses = []
        trainer.model.train()
        for batch in data:
            loss, _, _ = trainer.train_step(batch)
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        return losses
    result = trainer.fit()
    return [h["train_item_loss"] for h in result.history]


def _tested_stack() -> bool:
    from torchrec_genrec.stack import run_checks

    return not any(c.untested for c in run_checks())


@pytest.mark.skipif(not _tested_stack(), reason="the golden curve is recorded on the tested torch / fbgemm / "
                                                "torchrec versions; another stack draws other random numbers")
def test_default_recipe_matches_golden_losses(ml100k):
    with open(GOLDEN) as f:
        golden = json.load(f)
    losses = first_losses(ml100k.path, len(golden["losses"]))
    np.testing.assert_allclose(losses, golden["losses"], rtol=2e-3,
                               err_msg="the default recipe's loss curve moved; see this file's docstring")
    # The recipe learns: the loss falls over the first steps.
    assert losses[-1] < losses[0]


if __name__ == "__main__" and "--record" in sys.argv:
    from torchrec_genrec.data import datasets
    from torchrec_genrec.logging_utils import silence_known_noise

    silence_known_noise()
    datasets.prepare("movielens-100k")
    values = first_losses(datasets.dataset_dir("movielens-100k"))
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump({"recipe": "apps/configs/hstu_ml100k.toml", "steps": STEPS, "losses": values,
                   "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=2)
    print(values)
