"""Training on N ranks equals training on one: same tables whatever the plan, same
negatives whatever the rank, losses normalised over the global batch."""

import os
import subprocess
import sys

import pytest
import torch

from torchrec_genrec.data.store import write_store
from torchrec_genrec.data.synthetic import SyntheticConfig, generate

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "store")
    write_store(generate(SyntheticConfig(num_users=80, num_items=60, num_events=1600, min_seq_len=5, seed=2)), path)
    return path


def run_worker(store_path, tmp_path, nproc, batch_size, pin="tokens:row_wise"):
    out = str(tmp_path / f"w{nproc}_{pin.replace(':', '_')}.pt")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), WORKER, "--store", store_path,
                           "--batch-size", str(batch_size), "--pin", pin, "--out", out],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out)


def test_two_ranks_train_exactly_like_one_at_the_same_global_batch(store_path, tmp_path):
    one = run_worker(store_path, tmp_path, 1, 16)
    two = run_worker(store_path, tmp_path, 2, 8)
    two_table_wise = run_worker(store_path, tmp_path, 2, 8, pin="tokens:table_wise")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == 3
    # Training moves the loss: the comparison is not between three copies of the init.
    assert one["losses"][0] != one["losses"][-1]
    for other in (two, two_table_wise):
        assert torch.allclose(torch.tensor(one["losses"]), torch.tensor(other["losses"]), rtol=1e-5, atol=0)
        assert torch.allclose(one["table"], other["table"], atol=1e-6, rtol=0)
        # Evaluation is sharded over the ranks and gathered back in user order: 80 test
        # users in batches of 32 give 3 batches, 2 on rank 0 and 1 on rank 1 (which keeps
        # the sharded lookups in step with a throw-away batch).
        assert other["eval"]["count"] == one["eval"]["count"] == 80
        assert torch.equal(one["eval"]["ranks"], other["eval"]["ranks"])
