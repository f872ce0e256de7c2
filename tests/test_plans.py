"""Module plans: table declarations -> ParameterConstraints -> TorchRec's planner."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_genrec import cli
from torchrec_genrec.models.tables import TOKEN_TABLE, onetrans_tables, retrieval_tables
from torchrec_genrec.plans.planner import cluster_topology, make_sharders, plan_tables
from torchrec_genrec.plans.spec import PlanError, TableSpec, parameter_constraints, parse_pins

GIB = 1024**3


def test_billion_item_hstu_table_is_row_wise_over_128_gpus():
    tables = retrieval_tables(num_items=10**9, num_actions=5, embedding_dim=256, max_seq_len=1024)
    topology = cluster_topology(nodes=16, gpus_per_node=8, hbm_gb=80)
    report = plan_tables(tables, topology, batch_size=128)
    (tokens,) = report.tables
    assert tokens.name == TOKEN_TABLE and tokens.sharding_type == "row_wise"
    assert sorted(tokens.ranks) == list(range(128))
    assert sum(rows for rows, _ in tokens.shard_shapes) == tables[0].num_embeddings
    assert {cols for _, cols in tokens.shard_shapes} == {256}
    weights_per_rank = tables[0].num_bytes / 128
    assert all(weights_per_rank < hbm < 80 * GIB for hbm in report.hbm_bytes)


def test_table_too_big_for_the_cluster_says_why_and_uvm_caching_fits_it():
    tables = retrieval_tables(num_items=10**9, num_actions=5, embedding_dim=256, max_seq_len=1024)
    topology = cluster_topology(nodes=1, gpus_per_node=8, hbm_gb=80, ddr_gb=256)
    with pytest.raises(PlanError, match="insufficient storage"):
        plan_tables(tables, topology, batch_size=128)
    cached = [TableSpec(**{**t.__dict__, "cache_load_factor": 0.2}) for t in tables]
    report = plan_tables(cached, topology, batch_size=128)
    assert report.tables[0].compute_kernel == "fused_uvm_caching"
    assert max(report.hbm_bytes) < 80 * GIB and max(report.ddr_bytes) > tables[0].num_bytes / 8


def test_onetrans_tables_on_two_cpu_ranks_every_table_placed():
    tables = onetrans_tables(num_items=3706, num_users=6040, embedding_dim=64, max_seq_len=200)
    report = plan_tables(tables, cluster_topology(1, 2, hbm_gb=1, ddr_gb=8, compute_device="cpu"), batch_size=128)
    placed = {t.name: t for t in report.tables}
    assert set(placed) == {t.name for t in tables}
    # Pooled row-wise is CUDA only: the per-token tables are whole tables on one rank here.
    for spec in tables:
        if spec.pooled:
            assert placed[spec.name].sharding_type in ("table_wise", "data_parallel"), spec.name
    assert placed["item"].sharding_type in ("row_wise", "table_wise")


def test_onetrans_dense_banks_match_the_module_and_can_be_planned_as_a_table():
    from torchrec_genrec.modules.onetrans import OneTrans, OneTransConfig
    from torchrec_genrec.models.tables import ns_bank_table, onetrans_dense_banks

    shared, per_token = onetrans_dense_banks(embedding_dim=16, num_ns_tokens=3, num_layers=2)
    module = OneTrans(OneTransConfig(embedding_dim=16, num_layers=2, num_heads=1, num_ns_tokens=3))
    assert shared.shape[0] + per_token.shape[0] * per_token.shape[1] == sum(p.numel() for p in module.parameters())
    assert per_token.shape[0] == 3 and per_token.placement == "data_parallel"
    table = ns_bank_table(per_token, num_layers=2)
    assert table.num_embeddings == 6 and table.embedding_dim * 2 >= per_token.shape[1]
    tables = onetrans_tables(num_items=100, num_users=50, embedding_dim=16, max_seq_len=8) + [table]
    report = plan_tables(tables, cluster_topology(1, 2, hbm_gb=1, ddr_gb=8, compute_device="cpu"), batch_size=16)
    assert "ns_token_weights" in {t.name for t in report.tables}


def test_cpu_drops_what_fbgemm_cannot_run_and_says_so_when_nothing_is_left():
    seq_dp = TableSpec("seq", 100, 8, ("f",), sharding_types=("data_parallel", "table_wise"))
    assert parameter_constraints([seq_dp], "cpu")["seq"].sharding_types == ["table_wise"]
    assert parameter_constraints([seq_dp], "cuda")["seq"].sharding_types == ["data_parallel", "table_wise"]
    only_dp = TableSpec("seq", 100, 8, ("f",), sharding_types=("data_parallel",))
    with pytest.raises(PlanError, match="PoolingMode.NONE"):
        parameter_constraints([only_dp], "cpu")


def test_frozen_table_carries_no_optimizer_state():
    trainable = TableSpec("a", 100_000, 128, ("fa",), sharding_types=("table_wise",))
    frozen = TableSpec("b", 100_000, 128, ("fb",), sharding_types=("table_wise",), trainable=False)
    sharders = make_sharders(EmbOptimType.EXACT_ADAGRAD)  # full Adagrad: state as big as the weights
    report = plan_tables([trainable, frozen], cluster_topology(1, 2, hbm_gb=16), batch_size=32, sharders=sharders)
    by_rank = {t.name: t.ranks[0] for t in report.tables}
    assert by_rank["a"] != by_rank["b"]
    a, b = report.hbm_bytes[by_rank["a"]], report.hbm_bytes[by_rank["b"]]
    assert a > 1.8 * b and b >= frozen.num_bytes
    assert "frozen" in report.plan.plan and "sequence" in report.plan.plan


def test_pins_override_the_declaration():
    tables = retrieval_tables(num_items=1000, num_actions=5, embedding_dim=32, max_seq_len=50)
    topology = cluster_topology(1, 2, hbm_gb=1, ddr_gb=4, compute_device="cpu")
    report = plan_tables(tables, topology, batch_size=16, pins=parse_pins(["tokens:table_wise"]))
    assert report.tables[0].sharding_type == "table_wise" and len(report.tables[0].ranks) == 1
    with pytest.raises(PlanError, match="not tables of this model"):
        plan_tables(tables, topology, batch_size=16, pins=parse_pins(["tokns:table_wise"]))
    with pytest.raises(PlanError, match="TABLE:SHARDING_TYPE"):
        parse_pins(["tokens"])
    with pytest.raises(PlanError, match="unknown sharding type"):
        parse_pins(["tokens:rowwise"])


def test_table_spec_validation():
    with pytest.raises(PlanError, match="multiple of 4"):
        TableSpec("t", 10, 50, ("f",))
    with pytest.raises(PlanError, match="sharding_types"):
        TableSpec("t", 10, 8, ("f",), sharding_types=("sideways",))


def test_model_declares_the_table_it_builds():
    from torchrec_genrec.models.retrieval import GenerativeRetrieval, RetrievalConfig

    model = GenerativeRetrieval(RetrievalConfig(embedding_dim=50, action_mode="interleaved"), 1682, 5, 200)
    (spec,) = model.table_specs()
    (config,) = model.token_embeddings.embedding_configs()
    assert (spec.name, spec.num_embeddings, spec.embedding_dim) == (config.name, config.num_embeddings,
                                                                    config.embedding_dim)
    assert set(spec.feature_names) == set(config.feature_names)
    assert spec.ids_per_sample == 2 * 200 + 128


def test_genrec_plan_dry_run(capsys):
    assert cli.main(["plan", "--model", "hstu", "--num-items", "1e9", "--embedding-dim", "256", "--nodes", "16",
                     "--gpus-per-node", "8", "--hbm-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "row_wise" in out and "0-127" in out and "per-rank HBM" in out
    assert cli.main(["plan", "--num-items", "1e9", "--nodes", "1", "--gpus-per-node", "2"]) == 2
    assert "insufficient storage" in capsys.readouterr().err
    assert cli.main(["plan", "--num-items", "many"]) == 2


def test_recipe_pin_reaches_the_job(tmp_path):
    from torchrec_genrec.data.store import SequenceStore, write_store
    from torchrec_genrec.data.synthetic import SyntheticConfig, generate
    from torchrec_genrec.models.retrieval import GenerativeRetrieval, RetrievalConfig
    from torchrec_genrec.train.distributed import init_distributed
    from torchrec_genrec.train.sharding import OptimConfig, shard

    path = str(tmp_path / "store")
    write_store(generate(SyntheticConfig(num_users=20, num_items=30, num_events=200, seed=1)), path)
    store = SequenceStore.open(path)
    torch.manual_seed(0)
    model = GenerativeRetrieval(RetrievalConfig(embedding_dim=8, num_blocks=1, attention_dim=4, linear_dim=4),
                                store.num_items, store.num_actions, 10)
    dmp = shard(model, init_distributed(), OptimConfig(), batch_size=4, pins=["tokens:table_wise"])
    (module_plan,) = dmp.plan.plan.values()
    assert module_plan[TOKEN_TABLE].sharding_type == "table_wise"


def test_declared_compute_kernels():
    uvm = TableSpec("big", 1000, 8, ("f",), compute_kernels=("fused_uvm_caching", "fused"))
    assert parameter_constraints([uvm], "cuda")["big"].compute_kernels == ["fused_uvm_caching", "fused"]
    assert parameter_constraints([uvm], "cpu")["big"].compute_kernels == ["fused"]
    with pytest.raises(PlanError, match="need CUDA"):
        parameter_constraints([TableSpec("big", 1000, 8, ("f",), compute_kernels=("fused_uvm",))], "cpu")


def test_plan_semantic_id_table_against_the_id_table(capsys):
    """`genrec plan --model hstu-sid`: the single token table holds the code levels, not the
    items, so at 1e9 items it is a few thousand rows where the ID table is 1e9."""
    from torchrec_genrec import cli
    from torchrec_genrec.tokens import TokenSpace

    assert cli.main(["plan", "--model", "hstu-sid", "--num-items", "1e9", "--levels", "4", "--codebook-size",
                     "1024", "--gpus-per-node", "2"]) == 0
    out = capsys.readouterr().out
    rows = TokenSpace.build(num_items=0, num_actions=5).size + 5 * 1024
    assert f"{rows:,} vs 1,000,000,00" in out and "semantic-ID token table vs the ID token table" in out
    assert cli.main(["plan", "--model", "hstu-sid", "--levels", "0"]) == 2
    assert "--levels must be >= 1" in capsys.readouterr().err
