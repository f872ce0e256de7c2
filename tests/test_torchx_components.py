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


def _torchx(*args, timeout=120):
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run([torchx, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout  # the dry run's spec; torchx logs to stderr


def test_slurm_dryrun_two_nodes_eight_gpus_with_restarts():
    text = _torchx("run", "--dryrun", "-s", "slurm", "genrec.train", "--nnodes", "2", "--nproc_per_node", "8",
                   "--gpu", "8", "--cpu", "32", "--max_restarts", "2", "--config", "apps/configs/hstu_ml1m.toml")
    assert text.count("--gpus-per-task=8") == 2  # one het-job group per node
    assert "--rdzv_backend c10d" in text and "--nnodes 2 --nproc_per_node 8" in text
    assert "torchrun --max_restarts 2" in text
    assert "-m torchrec_genrec.cli train --config apps/configs/hstu_ml1m.toml" in text


def test_kubernetes_dryrun_two_nodes_eight_gpus():
    import yaml

    text = _torchx("run", "--dryrun", "--workspace", "", "-s", "kubernetes", "genrec.train", "--nnodes", "2",
                   "--nproc_per_node", "8", "--gpu", "8", "--cpu", "32", "--config", "apps/configs/hstu_ml1m.toml")
    job = yaml.safe_load(text[text.index("apiVersion:"):])
    assert job["kind"] == "Job" and len(job["spec"]["tasks"]) == 2
    for task in job["spec"]["tasks"]:
        (container,) = task["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        command = " ".join(container["command"])
        assert "--rdzv_backend c10d" in command and "--nnodes 2 --nproc_per_node 8" in command


def test_two_simulated_nodes_train_together(tmp_path):
    # Two torchrun agents, one "node" each, joined by c10d rendezvous on localhost.
    from torchrec_genrec.data.store import write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate

    store = str(tmp_path / "store")
    write_store(generate(SyntheticConfig(num_users=64, num_items=40, num_events=900, min_seq_len=5, seed=5)), store)
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "run"
    recipe = ["-m", "torchrec_genrec.cli", "train", "--config", "apps/configs/hstu_ml100k.toml"]
    for setting in (f"data.dataset={store}", "data.max_seq_len=12", f"train.output_dir={out}", "train.epochs=1",
                    "train.batch_size=8", "train.progress=false", "model.embedding_dim=16",
                    "model.attention_dim=8", "model.linear_dim=8", "model.num_negatives=8"):
        recipe += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "sim",
                               *recipe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    results = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, results):
        assert p.returncode == 0, err[-3000:]
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["test"]["count"] > 0
    assert "row_wise on ranks [0, 1]" in results[0][1] + results[1][1]
