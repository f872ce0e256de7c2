"""Inference: load an artifact (written by :mod:`torchrec_genrec.export`) and predict from it.

Nothing here imports the training code or the dataset: an artifact carries everything a
predictor reads.

``Predictor`` and ``History`` are imported lazily so that importing the package does not
pull in torch.export or safetensors.
"""

from typing import Any

__all__ = ["History", "Predictor", "Recommendation", "RequestError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from torchrec_genrec.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(name)
