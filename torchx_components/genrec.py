"""TorchX components: launch a torchrec-genrec recipe on one process, many, or many machines.

After ``pip install``, ``torchx run genrec.train ...`` finds these through the
``torchx.components`` entry point (setup.cfg), next to TorchX's own built-ins::

    torchx run -s local_cwd genrec.train --config apps/configs/hstu_ml100k.toml --nproc_per_node 2
    torchx run --dryrun -s slurm genrec.train --nnodes 2 --nproc_per_node 8 --gpu 8
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist


def train(
    *overrides: str,
    config: str = "apps/configs/hstu_ml100k.toml",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    name: str = "genrec-train",
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Trains and evaluates a torchrec-genrec recipe with torchrun on every node.

    Args:
        overrides: recipe overrides, each ``section.field=value`` (e.g. ``train.epochs=3``)
        config: the recipe TOML file, relative to the job's working directory
        nnodes: number of machines
        nproc_per_node: processes (ranks) per machine; one per GPU on GPU machines
        name: job name
        image: container image (for container schedulers; local_cwd ignores it)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables
        max_retries: scheduler-level retries of the whole job after a failure (e.g. Slurm requeue)
        max_restarts: torchrun restarts of a node's workers after a rank fails; the recipe
            resumes from its last checkpoint (train.resume=auto), nothing lost or repeated
        rdzv_port: rendezvous port on the first node
        mounts: volume mounts (scheduler-specific syntax, see torchx.specs.parse_mounts)
    """
    args = ["train", "--config", config]
    for override in overrides:
        args += ["--set", override]
    app = dist.ddp(
        *args,
        m="torchrec_genrec.cli",
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env={"OMP_NUM_THREADS": str(max(cpu // max(nproc_per_node, 1), 1)), **(env or {})},
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    if max_restarts:
        for role in app.roles:
            # dist.ddp has no knob for torchrun's own restarts; its command is one shell string.
            role.args = [a.replace("torchrun ", f"torchrun --max_restarts {max_restarts} ", 1) for a in role.args]
    return app
