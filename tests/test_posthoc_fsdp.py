"""PostHocEMA under FSDP2: every rank writes its shards with torch.distributed.checkpoint, and the
snapshots synthesize in one process to what a single-process run gives.

Reuses test_distributed's bounded gloo spawner and its model; the ranks run ``scenario`` below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import TOLERANCES, fsdp_model, make_model, spawn, train_step

import fused_ema
from fused_ema import distributed, posthoc

STEPS = 12
SNAPSHOT_EVERY = 3
SIGMA_RELS = (0.05, 0.10)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


def train(model, rank: int | None, directory: Path, backend: str = "auto") -> fused_ema.PostHocEMA:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = fused_ema.PostHocEMA(model, sigma_rels=SIGMA_RELS, snapshot_every=SNAPSHOT_EVERY,
                               directory=directory, backend=backend)
    for step in range(STEPS):
        train_step(model, optimizer, step, rank)
        ema.update()
    return ema


def scenario(rank: int, directory: Path) -> None:
    model = fsdp_model(make_model())
    ema = train(model, rank, directory / "phema")
    ema.synthesize_into(model, 0.07)  # every rank: its own shards of the synthesized average
    state = distributed.full_state_dict(model)
    if rank == 0:
        torch.save(state, directory / "synthesized_into.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    sharded = tmp_path_factory.mktemp("fsdp_posthoc")
    error = spawn("test_posthoc_fsdp:scenario", sharded)
    if error is not None:
        raise error
    single = tmp_path_factory.mktemp("single_posthoc")
    train(make_model(), None, single, backend="reference")
    return sharded / "phema", single


def test_each_snapshot_is_a_dcp_checkpoint_of_both_ranks(runs) -> None:
    sharded, _ = runs
    snapshots = posthoc.list_snapshots(sharded)
    assert [s.step for s in snapshots] == [3, 3, 6, 6, 9, 9, 12, 12]
    assert all(s.sharded and (s.path / ".metadata").exists() for s in snapshots)
    assert not [p for p in sharded.iterdir() if ".tmp-" in p.name]
    assert all(len(list(s.path.glob("*.distcp"))) == 2 for s in snapshots)  # one file per rank


@pytest.mark.parametrize("sigma_rel", [0.05, 0.07, 0.15])
@pytest.mark.parametrize("step", [None, 9])
def test_sharded_snapshots_synthesize_like_a_single_process(runs, sigma_rel: float, step: int | None) -> None:
    sharded, single = runs
    actual, expected = posthoc.synthesize(sharded, sigma_rel, step), posthoc.synthesize(single, sigma_rel, step)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        # Training differs only by the order of gradient sums (as in test_distributed).
        torch.testing.assert_close(actual[key], value, **TOLERANCES[torch.float32])
    assert actual.fit_error == pytest.approx(expected.fit_error, rel=1e-12)


def test_synthesize_into_a_sharded_model(runs) -> None:
    sharded, single = runs
    loaded = torch.load(sharded.parent / "synthesized_into.pt", weights_only=True)
    expected = posthoc.synthesize(single, 0.07)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, **TOLERANCES[torch.float32])
