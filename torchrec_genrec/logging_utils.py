"""One place that quiets third-party messages users cannot act on, so they see their own output."""

from __future__ import annotations

import logging
import os
import warnings


def silence_known_noise() -> None:
    """Quiets TorchRec / torch.fx / fbgemm messages that fire on every run.

    - ``is_fx_tracing will return true ...`` (torch.fx, on every KeyedJaggedTensor).
    - DistributedModelParallel's DDP ``broadcast_buffers`` FutureWarning.
    - ShardedTensor deprecation and fbgemm import-time deprecation messages.
    - torch.ao.quantization's deprecation (TorchRec's inference quantisation uses it) and
      DCP's "load in a single process" note (export loads checkpoints that way).
    """
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*ShardedTensor.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="fbgemm_gpu")
    # TorchRec's inference quantisation still goes through torch.ao.quantization.
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*", category=DeprecationWarning)
    # torch.distributed.checkpoint loading into one process (export) says so every time.
    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
    # An fbgemm older than its compatibility table warns on every library it loads (a dozen
    # times per process); `genrec doctor` reports the untested combination once instead.
    if not any(isinstance(f, _DropMessages) for f in logging.getLogger().filters):
        logging.getLogger().addFilter(_DropMessages("_fbgemm_torch_compat_table has no entry"))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


class _DropMessages(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)
