"""Process-group setup: the same code runs as one process or under torchrun / TorchX."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _job_store() -> dist.Store:
    """The job's key-value store, under a prefix of its own per (re)start of the workers.

    Under torchrun the workers share the agent's store, which outlives a restart: without
    a fresh prefix, restarted workers read the dead workers' gloo/nccl addresses and fail to
    connect ("Connection refused"), so ``--max-restarts`` could never recover. The prefix
    is a generation every worker agrees on: each joining worker bumps one counter in the
    shared store, and the world size of joins makes a generation. (The agents' restart
    counts would not do across nodes: each node counts its own, and a node that only saw
    the membership change does not count it.)
    """
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    host, port = os.environ.get("MASTER_ADDR", "localhost"), int(os.environ.get("MASTER_PORT", "29500"))
    from datetime import timedelta

    timeout = timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    generation = (store.add("torchrec_genrec/joins", 1) - 1) // world
    return dist.PrefixStore(f"torchrec_genrec/generation-{generation}", store)


def init_distributed() -> DistContext:
    """Joins (or creates) the default process group.

    Under torchrun (``RANK`` / ``WORLD_SIZE`` set) it joins the job's group; alone it
    makes a one-process group, so ``DistributedModelParallel`` runs unchanged on a
    laptop. The backend is nccl when CUDA is available, else gloo.
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, store=_job_store(), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
        else:
            # A file rendezvous needs no free port, so parallel single-process runs never collide.
            fd, path = tempfile.mkstemp(prefix="genrec-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistContext(rank, world, device, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
