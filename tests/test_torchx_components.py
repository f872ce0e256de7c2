"""The TorchX component builds the right AppDef and is registered for `torchx run genrec.train`."""

import importlib.metadata
import os
import subprocess
import sys

from torchx_components.genrec import train


def test_train_appdef_two_nodes_eight_gpus():
    app = train("train.epochs=3", "data.dataset=movielens-1m", config="apps/configs/hstu_ml1m.toml",
                nnodes=2, nproc_per_node=8, gpu=8, cpu=32)
    (role,) = app.roles
    assert role.num_replicas == 2
    assert role.resource.gpu == 8 and role.resource.cpu == 32
    cmd = " ".join([role.entrypoint, *role.args])
    assert "--nnodes 2" in cmd and "--nproc_per_node 8" in cmd
    assert "-m torchrec_genrec.cli train --config apps/configs/hstu_ml1m.toml" in cmd
    assert "--set train.epochs=3 --set data.dataset=movielens-1m" in cmd
    assert role.env["OMP_NUM_THREADS"] == "4"


def test_registered_entry_points():
    groups = {e.name: e.value for e in importlib.metadata.entry_points(group="torchx.components")}
    assert groups.get("genrec") == "torchx_components.genrec"
    assert groups.get("torchx") == "torchx.components"  # built-ins stay reachable
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("genrec") == "torchrec_genrec.cli:main"


def test_torchx_cli_dryrun_finds_the_component():
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    out = subprocess.run(
        [torchx, "run", "--dryrun", "-s", "local_cwd", "genrec.train", "--nproc_per_node", "2",
         "--config", "apps/configs/hstu_ml100k.toml", "train.epochs=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "torchrec_genrec.cli" in text and "--nproc_per_node" in text
