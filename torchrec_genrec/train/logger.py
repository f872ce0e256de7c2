"""One place where training reports: TensorBoard scalars, tqdm progress bars and log lines.

Only rank 0 writes TensorBoard events and shows bars; every rank may log. TensorBoard is
imported only when enabled.

Example::

    metrics = MetricsLogger(output_dir="runs/x", tensorboard=True, progress=True, is_main=ctx.is_main)
    for batch in metrics.bar(loader, desc="epoch 0"):
        ...
        metrics.scalars("train", {"loss": 0.5}, step)
    metrics.close()
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, Iterator, Optional

from tqdm import tqdm

__all__ = ["MetricsLogger"]

logger = logging.getLogger("torchrec_genrec.train")


class MetricsLogger:
    """Args:
        output_dir (Optional[str]): TensorBoard events go to ``<output_dir>/tensorboard``.
        tensorboard (bool): write TensorBoard scalars (rank 0 only).
        progress (bool): show tqdm bars (rank 0 only).
        is_main (bool): whether this is rank 0.
    """

    def __init__(self, output_dir: Optional[str], tensorboard: bool, progress: bool, is_main: bool = True) -> None:
        self.is_main = is_main
        self.progress = progress and is_main
        self._writer = None
        self._bar: Any = None
        if tensorboard and is_main and output_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def bar(self, iterable: Iterable[Any], desc: str, total: Optional[int] = None) -> Iterator[Any]:
        """``iterable`` wrapped in a progress bar (shown on rank 0 when progress is on);
        :meth:`postfix` annotates the newest bar."""
        self._bar = tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=not self.progress)
        return self._bar

    def postfix(self, **values: str) -> None:
        """Shows ``values`` beside the newest progress bar."""
        if self._bar is not None and self.progress:
            self._bar.set_postfix(**values)

    def scalars(self, prefix: str, values: Dict[str, Any], step: int) -> None:
        """Writes ``<prefix>/<name>`` for every number (rank 0, TensorBoard on); a nested
        dict's numbers go under ``<prefix>/<name>/<key>``."""
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, dict):
                self.scalars(f"{prefix}/{name}", value, step)
            elif isinstance(value, (int, float)):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def info(self, message: str, *args: Any) -> None:
        if self.is_main:
            logger.info(message, *args)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
