"""Inference: export a trained run (``genrec export``) and predict from the artifact.

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
