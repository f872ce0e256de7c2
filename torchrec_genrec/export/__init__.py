"""``genrec export``: a finished training run -> an artifact the predictors load.

Writing an artifact reads the run (its checkpoint, config and dataset) and so imports the
training and data code; loading and serving it (:mod:`torchrec_genrec.inference`,
:mod:`torchrec_genrec.serving`) imports neither.

- :func:`export_run`: a retrieval run (HSTU, SASRec) -> the predictor artifact
  (``export_torchrec_package``: a torch.package for TorchRec's predictor instead).
- :func:`export_ranker`: a ranking run -> the ranker artifact.

Example::

    if is_ranking_run(run_dir):
        export_ranker(run_dir, "artifacts/ranker", precision="int8")
    else:
        export_run(run_dir, "artifacts/hstu_int8", precision="int8")
"""

from torchrec_genrec.export.checkpoint import load_trained_model
from torchrec_genrec.export.ranker import export_ranker, is_ranking_run, load_trained_ranker
from torchrec_genrec.export.retrieval import UserEncoder, export_run, export_torchrec_package, table_bytes

__all__ = ["UserEncoder", "export_ranker", "export_run", "export_torchrec_package", "is_ranking_run",
           "load_trained_model", "load_trained_ranker", "table_bytes"]
