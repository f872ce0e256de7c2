"""The pinned dependency stack and the checks behind ``genrec doctor``.

torch, fbgemm-gpu and torchrec are compiled against each other: a mismatch shows up as
undefined symbols when fbgemm's operators load, or as missing operators at run time.
This module knows the combination the project is tested with and explains a mismatch.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
from typing import List, Optional

# The one combination the project is built and tested with (requirements/*.txt).
KNOWN_GOOD = {
    "torch": "2.13.0",
    "fbgemm-gpu": "1.8.0",  # fbgemm-gpu-cpu on machines without CUDA
    "torchrec": "1.8.0",
    "torchx": "0.7.0",
}
FIX = "run scripts/bootstrap.sh (or `make setup`), which installs the pinned stack into .venv"
# Older combinations known to load together (and checked by `scripts/gpu_check.sh` where no
# index can install the pinned one): the nearest CUDA 13.0 stack to torch 2.11.
KNOWN_TO_LOAD = [
    {"torch": "2.11.0", "fbgemm-gpu": "1.6.0", "torchrec": "1.6.1"},
]


@dataclasses.dataclass
class Check:
    """One line of ``genrec doctor``: ``ok``, or a problem (``fix`` says what to do).

    ``untested`` marks a version that differs from the tested combination but is not a
    failure by itself: whether the stack works is decided by the load-and-run checks."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    untested: bool = False


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _base(version: Optional[str]) -> Optional[str]:
    # "2.13.0+cpu" -> "2.13.0"
    return version.split("+")[0] if version else None


def run_checks() -> List[Check]:
    """Inspects the installed stack; never raises."""
    checks: List[Check] = [Check("python", True, platform.python_version())]
    fbgemm_dist = "fbgemm-gpu-cpu" if _dist_version("fbgemm-gpu-cpu") else "fbgemm-gpu"
    installed = {
        "torch": _dist_version("torch"),
        "fbgemm-gpu": _dist_version("fbgemm-gpu-cpu", "fbgemm-gpu"),
        "torchrec": _dist_version("torchrec"),
        "torchx": _dist_version("torchx"),
    }
    for name, want in KNOWN_GOOD.items():
        have = installed[name]
        label = fbgemm_dist if name == "fbgemm-gpu" else name
        if have is None:
            checks.append(Check(label, False, "not installed", f"{label}=={want} is needed; {FIX}"))
        elif _base(have) != want:
            known = any(_base(have) == combo.get(name) and all(_base(installed[k]) == v for k, v in combo.items())
                        for combo in KNOWN_TO_LOAD)
            checks.append(
                Check(label, True, f"{have} (tested: {want}; " + ("a combination known to load" if known else
                                                                   "an untried combination") + ")",
                      f"untested; {FIX}", untested=True)
            )
        else:
            checks.append(Check(label, True, have))

    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
        checks.append(Check("cuda", True, torch.version.cuda if cuda else "not available (CPU only)"))
    except Exception as e:  # a broken torch must still produce a report
        checks.append(Check("torch import", False, f"{type(e).__name__}: {e}", FIX))
        return checks

    if cuda and fbgemm_dist == "fbgemm-gpu-cpu":
        checks.append(Check("fbgemm variant", False, "fbgemm-gpu-cpu on a CUDA machine",
                            "install fbgemm-gpu==1.8.0 instead (scripts/bootstrap.sh picks it when nvidia-smi works)"))
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        out = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3]))
        ok = out.tolist() == [0, 1, 3, 6]
        checks.append(Check("fbgemm operators", ok, "load and run" if ok else f"wrong result {out.tolist()}",
                            "" if ok else FIX))
    except Exception as e:
        checks.append(Check("fbgemm operators", False, f"{type(e).__name__}: {str(e)[:200]}",
                            f"fbgemm does not fit this torch; {FIX}"))
    for module in ("torchrec", "torchx", "safetensors", "fastapi", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(module)
            checks.append(Check(f"{module} import", True, "ok"))
        except Exception as e:
            checks.append(Check(f"{module} import", False, f"{type(e).__name__}: {str(e)[:200]}", FIX))
    return checks
