"""The planner's topology (``trainer.runtime.sharding.cluster_topology``): hosts, memory and
bandwidth reach TorchRec's planner, from the config or the launcher's environment.

Planner only: ``EmbeddingShardingPlanner.plan`` is non-collective and its enumeration and cost
estimates are pure computation, so a simulated multi-host CUDA cluster plans on this CPU
machine with the tables on the meta device (no process group, no GPU).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import ShardingPlan

from config import ConfigError, ShardingConfig, ShardingType, load_config
from trainer.runtime.sharding import (
    allowed_sharding_types,
    cluster_topology,
    local_world_size,
    sharders,
    table_constraints,
)

CUDA = torch.device("cuda")  # only a name here: nothing is allocated on it
GIB = 1024**3
GIB_PER_S = GIB / 1000  # TorchRec's bandwidth unit is bytes per millisecond
# (name, rows): large enough that splitting rows across ranks pays off, small enough for HBM.
TABLES = (("item_id", 4_000_000), ("user_id", 1_000_000), ("category", 200_000))

# table name -> (sharding type, compute kernel, shard ranks in order)
Plan = dict[str, tuple[str, str, tuple[int, ...]]]


def _model() -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=name, embedding_dim=64, num_embeddings=rows, feature_names=[name]
            )
            for name, rows in TABLES
        ],
        device=torch.device("meta"),
    )


def _config(**cluster: float | int | None) -> ShardingConfig:
    return ShardingConfig(
        sharding_types=[ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE],
        **cluster,  # type: ignore[arg-type]
    )


def _sharding_plan(topology: Topology, config: ShardingConfig) -> ShardingPlan:
    model = _model()
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=table_constraints(model, allowed_sharding_types(config, CUDA)),
        debug=False,
    )
    return planner.plan(model, sharders())


def _plan(topology: Topology, config: ShardingConfig) -> Plan:
    module_plan = _sharding_plan(topology, config).plan[""]
    result: Plan = {}
    for name, parameter in module_plan.items():
        assert parameter.ranks is not None
        result[name] = (parameter.sharding_type, parameter.compute_kernel, tuple(parameter.ranks))
    return result


def _plan_for(world_size: int, config: ShardingConfig, env: dict[str, str]) -> Plan:
    return _plan(cluster_topology(config, CUDA, world_size, env), config)


@pytest.mark.parametrize(("world_size", "ranks_per_host"), [(4, 2), (8, 2), (8, 4)])
def test_table_row_wise_shards_stay_within_one_host(world_size: int, ranks_per_host: int) -> None:
    config = _config()
    topology = cluster_topology(config, CUDA, world_size, {"LOCAL_WORLD_SIZE": str(ranks_per_host)})
    assert topology.local_world_size == ranks_per_host
    plan = _plan(topology, config)
    assert set(plan) == {name for name, _ in TABLES}
    table_row_wise = {n: ranks for n, (kind, _, ranks) in plan.items() if kind == "table_row_wise"}
    assert table_row_wise, f"no table was planned table-row-wise: {plan}"
    for name, ranks in table_row_wise.items():
        hosts = {rank // ranks_per_host for rank in ranks}
        assert len(hosts) == 1, f"{name}: shards on ranks {ranks} span hosts {sorted(hosts)}"
        # A table-row-wise table uses every device of its host.
        (host,) = hosts
        assert sorted(ranks) == list(range(host * ranks_per_host, (host + 1) * ranks_per_host))
    # Several hosts hold tables: table-row-wise spreads the load over the cluster.
    used_hosts = {ranks[0] // ranks_per_host for ranks in table_row_wise.values()}
    assert len(used_hosts) > 1 or len(table_row_wise) == 1


def test_shard_placements_name_the_local_device() -> None:
    """Placements are ``rank:r/cuda:(r % local_world_size)``: with every rank taken for one
    host, rank 3 of a 2-host job would be told to use cuda:3 on a host with 2 devices."""
    config = _config()
    topology = cluster_topology(config, CUDA, 4, {"LOCAL_WORLD_SIZE": "2"})
    plan = _sharding_plan(topology, config)
    placements = [
        str(shard.placement)
        for parameter in plan.plan[""].values()
        for shard in parameter.sharding_spec.shards
    ]
    assert placements
    for placement in placements:
        rank, device = placement.removeprefix("rank:").split("/")
        assert device == f"cuda:{int(rank) % 2}", placement


def test_plan_changes_with_local_world_size() -> None:
    plans = {ranks: _plan_for(4, _config(local_world_size=ranks), {}) for ranks in (1, 2, 4)}
    assert plans[1] != plans[2] != plans[4] != plans[1]
    # One rank per host: a table-row-wise table is one rank's table.
    for kind, _, ranks in plans[1].values():
        assert kind == "table_row_wise" and len(ranks) == 1, plans[1]
    # Two hosts of two: every table on exactly one host (table-row-wise across its 2 ranks).
    for _, _, ranks in plans[2].values():
        assert len({rank // 2 for rank in ranks}) == 1, plans[2]
    # One host of four: nothing crosses hosts, so row-wise over all four ranks is as cheap.
    assert any(len(ranks) == 4 for _, _, ranks in plans[4].values()), plans[4]
    # Without a config key or launcher variable, every rank is on one host (TorchRec's default).
    assert _plan_for(4, _config(), {}) == plans[4]


def test_inter_host_bandwidth_reaches_the_planner() -> None:
    """TopologyFactory drops HardwareConfig bandwidths unless use_hardware_based_bandwidth is
    set; a fast network (NVLink-class between hosts) makes row-wise across hosts worth it."""
    env = {"LOCAL_WORLD_SIZE": "2"}
    slow = cluster_topology(_config(), CUDA, 4, env)
    fast_config = _config(intra_host_bw_gib_per_s=600.0, inter_host_bw_gib_per_s=600.0)
    fast = cluster_topology(fast_config, CUDA, 4, env)
    assert slow.inter_host_bw == pytest.approx(12.5 * GIB_PER_S)  # TorchRec's default
    assert fast.inter_host_bw == pytest.approx(600 * GIB_PER_S)
    assert fast.intra_host_bw == pytest.approx(600 * GIB_PER_S)
    slow_plan, fast_plan = _plan(slow, _config()), _plan(fast, fast_config)
    assert all(len({rank // 2 for rank in ranks}) == 1 for _, _, ranks in slow_plan.values())
    assert any(len({rank // 2 for rank in ranks}) == 2 for _, _, ranks in fast_plan.values())


def test_memory_capacities_reach_the_planner() -> None:
    env = {"LOCAL_WORLD_SIZE": "2"}
    default = cluster_topology(_config(), CUDA, 4, env)
    assert {d.storage.hbm for d in default.devices} == {32 * GIB}  # TorchRec's default
    sized = cluster_topology(_config(hbm_cap_gib=141.0, ddr_cap_gib=64.0), CUDA, 4, env)
    assert {d.storage.hbm for d in sized.devices} == {141 * GIB}
    assert {d.storage.ddr for d in sized.devices} == {64 * GIB}
    # item_id (4M x 64 fp32 = 1 GiB, 0.5 GiB per shard) no longer fits 0.3 GiB of HBM.
    small_config = _config(hbm_cap_gib=0.3)
    small = _plan(cluster_topology(small_config, CUDA, 4, env), small_config)
    assert _plan(default, _config())["item_id"][1] == "fused"
    assert small["item_id"][1] in {"fused_uvm", "fused_uvm_caching"}, small


@pytest.mark.parametrize(
    ("config_value", "env", "expected", "source"),
    [
        (
            2,
            {"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "4"},
            2,
            "sharding.local_world_size",
        ),
        (None, {"LOCAL_WORLD_SIZE": "2", "SLURM_NTASKS_PER_NODE": "1"}, 2, "LOCAL_WORLD_SIZE=2"),
        (None, {"SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "4"}, 2, "SLURM_NTASKS"),
        (None, {"SLURM_TASKS_PER_NODE": "2(x2)"}, 2, "SLURM_TASKS_PER_NODE=2(x2)"),
        (None, {"SLURM_TASKS_PER_NODE": "2,2"}, 2, "SLURM_TASKS_PER_NODE=2,2"),
        (None, {"LOCAL_WORLD_SIZE": "", "SLURM_TASKS_PER_NODE": "1(x4)"}, 1, "SLURM_TASKS"),
        (None, {"LOCAL_WORLD_SIZE": "8"}, 4, "exceeds the world size"),
        (None, {}, 4, "no launcher setting"),
    ],
)
def test_local_world_size_precedence(
    config_value: int | None, env: dict[str, str], expected: int, source: str
) -> None:
    config = _config(local_world_size=config_value)
    ranks, chosen_from = local_world_size(config, 4, env)
    assert (ranks, source in chosen_from) == (expected, True), chosen_from
    assert cluster_topology(config, CUDA, 4, env).local_world_size == expected


def test_topology_is_logged_once_at_info(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer.runtime.sharding"):
        cluster_topology(_config(inter_host_bw_gib_per_s=50.0), CUDA, 4, {"LOCAL_WORLD_SIZE": "2"})
    ours = [r for r in caplog.records if r.name == "trainer.runtime.sharding"]
    assert len(ours) == 1 and ours[0].levelno == logging.INFO
    message = ours[0].getMessage()
    assert "4 rank(s) = 2 host(s) x 2 (LOCAL_WORLD_SIZE=2)" in message, message
    assert "32.0 GiB/device" in message and "50.0 GiB/s between hosts" in message, message


def test_config_local_world_size_must_divide_world_size() -> None:
    with pytest.raises(ConfigError, match=r"'sharding.local_world_size'.*divide the world size 4"):
        cluster_topology(_config(local_world_size=3), CUDA, 4, {"LOCAL_WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCAL_WORLD_SIZE": "3"}, r"LOCAL_WORLD_SIZE=3: 3 ranks per host must divide"),
        ({"SLURM_NTASKS_PER_NODE": "two"}, r"SLURM_NTASKS_PER_NODE='two'"),
        ({"LOCAL_WORLD_SIZE": "0"}, r"LOCAL_WORLD_SIZE='0'"),
        ({"SLURM_TASKS_PER_NODE": "2(x1),1(x2)"}, r"different numbers of ranks \[1, 2\]"),
    ],
)
def test_bad_launcher_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_topology(_config(), CUDA, 4, env)
    # The config key overrides a launcher variable the planner cannot use.
    assert cluster_topology(_config(local_world_size=2), CUDA, 4, env).local_world_size == 2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sharding.local_world_size=0", "sharding.local_world_size"),
        ("sharding.local_world_size=two", "sharding.local_world_size"),
        ("sharding.hbm_cap_gib=0", "sharding.hbm_cap_gib"),
        ("sharding.ddr_cap_gib=-1", "sharding.ddr_cap_gib"),
        ("sharding.intra_host_bw_gib_per_s=nan", "sharding.intra_host_bw_gib_per_s"),
        ("sharding.inter_host_bw_gib_per_s=inf", "sharding.inter_host_bw_gib_per_s"),
    ],
)
def test_bad_cluster_keys_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, [override])


def test_cluster_keys_load_typed_and_default_to_null() -> None:
    defaults = load_config(None).sharding
    assert (defaults.local_world_size, defaults.hbm_cap_gib, defaults.inter_host_bw_gib_per_s) == (
        None,
        None,
        None,
    )
    sharding = load_config(
        None, ["sharding.local_world_size=8", "sharding.hbm_cap_gib=141", "sharding.ddr_cap_gib=64"]
    ).sharding
    assert sharding.local_world_size == 8
    assert sharding.hbm_cap_gib == 141.0 and isinstance(sharding.hbm_cap_gib, float)
