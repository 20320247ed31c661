"""EMA and AveragedModel under DistributedDataParallel and FSDP2, checkpoints through DCP.

Each scenario runs once in two processes (gloo on 127.0.0.1, CPU) spawned by a module-scoped
fixture; the ranks write what they saw to files and the tests compare those, in this process,
against a single-process run of the same training with the reference backend. Spawning costs
seconds, so one spawn serves many tests. Every spawn is bounded: the process group times out
after ``COLLECTIVE_TIMEOUT`` and the fixture kills any rank still alive after ``SPAWN_DEADLINE``.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_ema
from fused_ema import distributed

WORLD_SIZE = 2
STEPS = 7
BATCH = 8  # global batch; each rank takes BATCH // WORLD_SIZE rows
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
SPAWN_DEADLINE = 150.0  # seconds for a whole spawn, imports included (2 slow cores)

# Where the ranks' results meet the single-process reference: float32 training differs only by
# the order of the gradient sums; bfloat16 averages also by stochastic rounding's bits.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=0.0, atol=2e-2),
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")


# ---------------------------------------------------------------- the model and the data


class Net(nn.Module):
    """Uneven shapes on purpose: 7 rows shard 4 + 3, the 1-row head leaves rank 1 an empty shard.

    ``seen`` (float) and ``calls`` (int) are buffers that change in every training forward the
    same way on every rank, so the ranks agree on them after each step. (BatchNorm's running
    statistics would not: under DDP each rank's come from its own batch until the next forward
    broadcasts rank 0's.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 6))
        self.head = nn.Linear(6, 1)
        self.register_buffer("seen", torch.zeros(3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.seen.mul_(0.5).add_(torch.arange(3.0))
                self.calls.add_(1)
        return self.head(self.blocks(inputs))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(BATCH, 5, generator=generator)
    return inputs, inputs.sum(1, keepdim=True).sin()


def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    rows = BATCH // WORLD_SIZE
    return tensor[rank * rows : (rank + 1) * rows]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int | None) -> None:
    """One SGD step; ``rank`` None is the single process that sees the whole batch."""
    inputs, targets = batch(step)
    if rank is not None:
        inputs, targets = shard(inputs, rank), shard(targets, rank)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()  # mean: DDP/FSDP average gradients
    optimizer.step()


def make_averages(model: nn.Module, backend: str = "auto") -> dict[str, nn.Module]:
    """Every averaging flavour the scenarios exercise, built from ``model`` (DDP/FSDP or plain)."""
    return {
        "ema": fused_ema.EMA(model, decay=0.8, update_after_step=2, update_every=2, backend=backend),
        "ema_bf16": fused_ema.EMA(model, decay=0.75, dtype=torch.bfloat16, seed=11, backend=backend),
        "swa": fused_ema.AveragedModel(model, use_buffers=True, backend=backend),
        "ema_avg": fused_ema.AveragedModel(
            model, multi_avg_fn=fused_ema.get_ema_multi_avg_fn(0.7), backend=backend
        ),
    }


def update_all(averages: dict[str, nn.Module], model: nn.Module) -> None:
    for average in averages.values():
        if isinstance(average, fused_ema.EMA):
            average.update(model)
        else:
            average.update_parameters(model)


def average_state(average: nn.Module) -> dict[str, torch.Tensor]:
    """The averaged tensors by name (the module's own, without wrapper bookkeeping)."""
    return {name: tensor.detach().clone() for name, tensor in average.module.state_dict().items()}


def evaluate(average: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The averaged module's output in eval mode (inputs cast to the average's dtype)."""
    module = average.module.eval()
    return module(inputs.to(next(module.parameters()).dtype)).float()


def counters(averages: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """Host-side update counts: (step, num_updates) of an EMA, n_averaged of an AveragedModel."""
    return {
        name: (average.step, average.num_updates) if isinstance(average, fused_ema.EMA)
        else (int(average.n_averaged),)
        for name, average in averages.items()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single-process run: the whole batch each step, every average on the reference backend."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averages = make_averages(model, backend="reference")
    for step in range(STEPS):
        train_step(model, optimizer, step, rank=None)
        update_all(averages, model)
    inputs, _ = batch(99)
    with torch.no_grad():
        outputs = {name: evaluate(average, inputs) for name, average in averages.items()}
    return {
        "averages": averages,
        "counters": counters(averages),
        "states": {name: average_state(average) for name, average in averages.items()},
        "outputs": outputs,
    }


# ---------------------------------------------------------------- spawning, bounded in time


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _entry(rank: int, scenario: str, port: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        torch.set_num_threads(1)
        SCENARIOS[scenario](rank, Path(directory)) if scenario in SCENARIOS else _imported(scenario)(rank, Path(directory))
        dist.barrier()
    except BaseException:
        (Path(directory) / f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # torch 2.13 on CPU: after FSDP2 ran, about one interpreter exit in five aborts in a C++
    # destructor ("terminate called without an active exception", seen with torchrun and no
    # fused_ema at all). Every result is on disk by now, so skip the interpreter's teardown.
    os._exit(0)


def _imported(scenario: str):
    """A scenario of another test module, named ``"module:function"`` (the ranks import it)."""
    module, function = scenario.split(":")
    return getattr(importlib.import_module(module), function)


def spawn(scenario: str, directory: Path) -> BaseException | None:
    """Run ``scenario`` on WORLD_SIZE ranks; return the first rank's exception (None if all passed).

    torch's ProcessContext terminates the other ranks as soon as one fails, so a rank blocked in
    a collective with a dead peer does not wait for the process group's timeout.
    """
    context = mp.start_processes(
        _entry, args=(scenario, _free_port(), str(directory)), nprocs=WORLD_SIZE, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_DEADLINE
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"scenario {scenario!r} still running after {SPAWN_DEADLINE} s")
    except mp.ProcessRaisedException as error:
        return error
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return None


def _save(directory: Path, name: str, rank: int, value: object) -> None:
    torch.save(value, directory / f"{name}.rank{rank}.pt")


def _load(directory: Path, name: str, rank: int = 0) -> object:
    return torch.load(directory / f"{name}.rank{rank}.pt", weights_only=False)


# ---------------------------------------------------------------- DDP


def ddp_scenario(rank: int, directory: Path) -> None:
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averages = make_averages(model)  # the DDP wrapper itself: the wrappers unwrap it
    for step in range(STEPS):
        train_step(model, optimizer, step, rank)
        update_all(averages, model)
    _save(directory, "averages", rank, {name: average_state(average) for name, average in averages.items()})
    _save(directory, "counters", rank, counters(averages))

    # Save on rank 0 only, load on every rank into fresh wrappers of the (trained) DDP model.
    if rank == 0:
        torch.save({name: average.state_dict() for name, average in averages.items()}, directory / "ddp.pt")
    dist.barrier()
    checkpoint = torch.load(directory / "ddp.pt", weights_only=True)
    restored = make_averages(model)
    for name, average in restored.items():
        average.load_state_dict(checkpoint[name])
    _save(directory, "restored", rank, {name: average.state_dict() for name, average in restored.items()})
    # The same without a shared file system: rank 0 broadcasts what it holds.
    broadcast = make_averages(model)
    for name, average in broadcast.items():
        distributed.load_full_state_dict(average, checkpoint[name] if rank == 0 else None)
    _save(directory, "broadcast", rank, {name: average.state_dict() for name, average in broadcast.items()})
    # After a resume, an update on every rank still agrees (EMA's step counters came back too).
    train_step(model, optimizer, STEPS, rank)
    update_all(restored, model)
    _save(directory, "resumed", rank, {name: average_state(average) for name, average in restored.items()})
    dist.barrier()

    # Rank 1 fails inside update (a model that does not match the average); rank 0 carries on
    # into the next step's gradient all-reduce, which would wait for rank 1 until the timeout.
    if rank == 1:
        averages["ema"].update(nn.Linear(2, 2))
    train_step(model, optimizer, STEPS + 1, rank)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BaseException | None]:
    directory = tmp_path_factory.mktemp("ddp")
    return directory, spawn("ddp", directory)


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_ddp_ranks_hold_identical_averages(ddp_run, name: str) -> None:
    directory, _ = ddp_run
    first, second = (_load(directory, "averages", rank)[name] for rank in range(WORLD_SIZE))
    for key in first:
        assert torch.equal(first[key], second[key]), f"{name}: {key} differs between rank 0 and rank 1"


def test_ddp_update_every_and_update_after_step_agree_on_every_rank(ddp_run, reference) -> None:
    directory, _ = ddp_run
    for rank in range(WORLD_SIZE):
        assert _load(directory, "counters", rank) == reference["counters"]
    assert reference["counters"]["ema"] == (STEPS, 3)  # steps 2, 4, 6 average; 0 and 1 copy


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_ddp_average_matches_single_process(ddp_run, reference, name: str) -> None:
    directory, _ = ddp_run
    ranks, expected = _load(directory, "averages", 0)[name], reference["states"][name]
    assert ranks.keys() == expected.keys()
    for key, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(ranks[key], tensor, **TOLERANCES[tensor.dtype], msg=f"{name}: {key}")
        else:
            assert torch.equal(ranks[key], tensor), f"{name}: {key}"


def test_ddp_checkpoint_saved_on_rank0_restores_on_every_rank(ddp_run) -> None:
    directory, _ = ddp_run
    saved = torch.load(directory / "ddp.pt", weights_only=True)
    for rank in range(WORLD_SIZE):
        for how in ("restored", "broadcast"):
            restored = _load(directory, how, rank)
            for name, state in saved.items():
                _assert_same_state(restored[name], state, f"rank {rank}, {how}: {name}")
    first, second = (_load(directory, "resumed", rank) for rank in range(WORLD_SIZE))
    for name in first:
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), f"after resume: {name}.{key}"


def test_ddp_rank_failing_in_update_does_not_hang_the_other(ddp_run) -> None:
    """Rank 1 raises in update; rank 0, waiting in the next all-reduce, is ended well before the
    process group's timeout: by gloo noticing the closed connection, or by the spawner's kill."""
    directory, error = ddp_run
    assert isinstance(error, mp.ProcessRaisedException), f"expected a rank to fail, got {error!r}"
    assert "the model has no parameter" in (directory / "error.rank1.txt").read_text()
    rank0 = directory / "error.rank0.txt"
    if rank0.exists():  # rank 0 saw the broken connection itself
        assert "timed out" not in rank0.read_text().lower(), rank0.read_text()


# ---------------------------------------------------------------- FSDP2 and DCP


def fsdp_model(module: Net) -> Net:
    from torch.distributed.fsdp import fully_shard

    for layer in (module.blocks[0], module.blocks[3], module.head):
        fully_shard(layer)
    return fully_shard(module)  # root: reshard_after_forward defaults to False for it


def _full(module: nn.Module) -> dict:
    return distributed.full_state_dict(module)


def fsdp_scenario(rank: int, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    model = fsdp_model(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averages = make_averages(model)
    ema = averages["ema"]
    placements = {
        name: (
            isinstance(p, DTensor) and p.placements == model.get_parameter(name).placements
            and p.device_mesh == model.get_parameter(name).device_mesh
        )
        for name, p in ema.module.named_parameters()
    }
    collectives = []
    for step in range(STEPS):
        train_step(model, optimizer, step, rank)
        with CommDebugMode() as counter:
            update_all(averages, model)
        collectives.append(counter.get_total_counts())
    inputs, _ = batch(99)
    with torch.no_grad():
        outputs = {name: evaluate(average, inputs) for name, average in averages.items()}  # sharded forward
        model.eval()
        training_output = model(inputs)  # leaves the root gathered (reshard_after_forward False)
        before = _full(model)
        with ema.swap(model):
            swapped_output = model(inputs)
        after_swap_output = model(inputs)
    after = _full(model)
    full = {name: _full(average) for name, average in averages.items()}
    plan_backends = ema._binding.plan(model).backend_names  # private: no public call names an EMA's backends
    if rank == 0:
        _save(directory, "fsdp", rank, {
            "placements": placements, "collectives": collectives, "outputs": outputs, "full": full,
            "training_output": training_output, "swapped_output": swapped_output,
            "after_swap_output": after_swap_output, "before": before, "after": after,
            "plan_backends": plan_backends,
        })

    _save(directory, "structure", rank, structure_checks())
    _save(directory, "hsdp", rank, hsdp_checks())
    _save(directory, "nonfinite", rank, nonfinite_checks(rank))

    # DCP: sharded save of every wrapper's state_dict (DTensors + _extra_state), world size 2.
    dcp.save(
        {name: average.state_dict() for name, average in averages.items()}, checkpoint_id=directory / "sharded"
    )

    # 1 -> 2: a checkpoint written by one plain process loads into sharded averages.
    resharded = make_averages(model)
    state = {name: average.state_dict() for name, average in resharded.items()}
    dcp.load(state, checkpoint_id=directory / "single")
    for name, average in resharded.items():
        average.load_state_dict(state[name])
    from_single = {name: _full(average) for name, average in resharded.items()}

    # A full state dict on rank 0 broadcast back into sharded averages.
    rebuilt = make_averages(model)
    for name, average in rebuilt.items():
        distributed.load_full_state_dict(average, full[name] if rank == 0 else None)
    from_full = {name: _full(average) for name, average in rebuilt.items()}
    if rank == 0:
        _save(directory, "loaded", rank, {"from_single": from_single, "from_full": from_full})


def structure_checks() -> dict:
    """A model with an ignored parameter, a mixed-precision policy and a user hook, copied and updated."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    model = make_model()
    calls = []
    model.blocks.register_forward_pre_hook(lambda module, args: calls.append(1))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, output_dtype=torch.float32)
    fully_shard(model.blocks[0], mp_policy=policy)
    fully_shard(model, ignored_params={model.head.bias})
    ema = fused_ema.EMA(model, decay=0.5)
    kinds = {name: isinstance(p, DTensor) for name, p in ema.module.named_parameters()}
    expected_kinds = {name: isinstance(p, DTensor) for name, p in model.named_parameters()}
    inputs, _ = batch(5)
    with torch.no_grad():
        # Same weights, same bfloat16 compute in blocks[0]: the copy has the model's policy.
        same_output = torch.equal(ema.module.eval()(inputs), model.eval()(inputs))
    # Cloned: like state_dict(), a full state dict shares the tensors that needed no gathering.
    before = {k: v.clone() for k, v in distributed.full_state_dict(ema.module, rank0_only=False).items()}
    distributed.reshard_(model)  # the root kept its gathered parameters after the forward
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # in place on the local shard (or the plain ignored tensor)
    ema.update()
    after = distributed.full_state_dict(ema.module, rank0_only=False)
    try:
        fused_ema.EMA(make_model()).update(model)  # an average built before sharding
        mismatch = ""
    except ValueError as error:
        mismatch = str(error)
    return {
        "kinds": kinds, "expected_kinds": expected_kinds, "before": before, "after": after,
        "same_output": same_output, "user_hook_calls": len(calls), "mismatch": mismatch,
    }


def hsdp_checks() -> dict:
    """HSDP (a 2-D mesh: replicate x shard, here 1 x 2): the copy keeps both placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    fully_shard(model.blocks[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = fused_ema.EMA(model, decay=0.5)
    before = {k: v.clone() for k, v in distributed.full_state_dict(ema.module, rank0_only=False).items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.update()
    return {
        "placements": {name: tuple(p.placements) for name, p in ema.module.named_parameters()},
        "expected_placements": {name: tuple(p.placements) for name, p in model.named_parameters()},
        "before": before,
        "after": distributed.full_state_dict(ema.module, rank0_only=False),
    }


def nonfinite_checks(rank: int) -> dict:
    """An inf in rank 1's shard only: with skip_nonfinite every rank must skip that update."""
    import warnings

    model = fsdp_model(make_model())
    ema = fused_ema.EMA(model, decay=0.5, skip_nonfinite=True)
    before = {k: v.clone() for k, v in distributed.full_state_dict(ema.module, rank0_only=False).items()}
    if rank == 1:
        with torch.no_grad():
            model.blocks[0].weight.to_local()[0, 0] = float("inf")
    error = ""
    try:  # recorded, not raised: the other scenarios of this spawn must still run
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ema.update()
    except Exception as raised:  # noqa: BLE001
        error = f"{type(raised).__name__}: {raised}"
    after = distributed.full_state_dict(ema.module, rank0_only=False)  # collective: every rank, always
    unchanged = all(torch.equal(after[k], v) for k, v in before.items())
    return {"error": error, "skipped": ema.skipped_updates, "unchanged": unchanged}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory, reference) -> Path:
    import torch.distributed.checkpoint as dcp

    directory = tmp_path_factory.mktemp("fsdp")
    # The world-size-1 checkpoint the ranks load (1 -> 2): the reference averages, saved by
    # this single process without a process group.
    dcp.save(
        {name: average.state_dict() for name, average in reference["averages"].items()},
        checkpoint_id=directory / "single",
    )
    error = spawn("fsdp", directory)
    if error is not None:
        raise error
    return directory


def _assert_same_state(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), f"{what}: {key}"
        else:
            assert actual[key] == value, f"{what}: {key}"


def test_fsdp_average_is_sharded_like_the_model(fsdp_run) -> None:
    results = _load(fsdp_run, "fsdp")
    assert results["placements"] and all(results["placements"].values()), results["placements"]
    assert results["collectives"] == [0] * STEPS  # each rank updates its own shards: no all-gather
    assert results["plan_backends"] and set(results["plan_backends"]) <= {"cpu", "triton", "cuda", "foreach"}


def test_fsdp_copy_keeps_ignored_parameters_policy_and_user_hooks(fsdp_run) -> None:
    for rank in range(WORLD_SIZE):
        results = _load(fsdp_run, "structure", rank)
        assert results["kinds"] == results["expected_kinds"]
        assert results["kinds"]["blocks.0.weight"] and not results["kinds"]["head.bias"]
        assert results["same_output"]
        assert results["user_hook_calls"] == 2  # the hook was copied: one call from each forward
        assert "DTensor only in the model's copy" in results["mismatch"]
        for key, value in results["before"].items():
            if value.is_floating_point():  # decay 0.5 towards value + 1: value + 0.5 (float64 closed form)
                expected = (value.double() + 0.5).float() if key in results["kinds"] else value
                torch.testing.assert_close(
                    results["after"][key], expected, **TOLERANCES[torch.float32], msg=key
                )


def test_fsdp_nonfinite_shard_on_one_rank_skips_the_update_on_every_rank(fsdp_run) -> None:
    for rank in range(WORLD_SIZE):
        assert _load(fsdp_run, "nonfinite", rank) == {"error": "", "skipped": 1, "unchanged": True}, f"rank {rank}"


def test_hsdp_copy_keeps_both_placements(fsdp_run) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for rank in range(WORLD_SIZE):
        results = _load(fsdp_run, "hsdp", rank)
        assert results["placements"] == results["expected_placements"]
        assert results["placements"]["blocks.0.weight"] == (Replicate(), Shard(0))
        for name in results["placements"]:  # decay 0.5 towards value + 1 (float64 closed form)
            expected = (results["before"][name].double() + 0.5).float()
            torch.testing.assert_close(results["after"][name], expected, **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_fsdp_gathered_average_matches_single_process(fsdp_run, reference, name: str) -> None:
    full, expected = _load(fsdp_run, "fsdp")["full"][name], reference["averages"][name].state_dict()
    assert full.keys() == expected.keys()
    for key, tensor in expected.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_floating_point():
            torch.testing.assert_close(full[key], tensor, **TOLERANCES[tensor.dtype], msg=f"{name}: {key}")
        else:
            assert torch.equal(full[key], tensor), f"{name}: {key}"
    assert full.get("_extra_state") == expected.get("_extra_state")  # step counters agree too


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_fsdp_average_runs_sharded(fsdp_run, reference, name: str) -> None:
    output, expected = _load(fsdp_run, "fsdp")["outputs"][name], reference["outputs"][name]
    dtype = next(reference["averages"][name].parameters()).dtype
    torch.testing.assert_close(output, expected, **TOLERANCES[dtype])


def test_fsdp_swap_on_the_sharded_model(fsdp_run) -> None:
    results = _load(fsdp_run, "fsdp")
    torch.testing.assert_close(results["swapped_output"], results["outputs"]["ema"], rtol=0, atol=0)
    _assert_same_state(results["after"], results["before"], "training weights after swap")
    # No gathered copy of the average may outlive the swap: the next forward uses training weights.
    torch.testing.assert_close(results["after_swap_output"], results["training_output"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_dcp_sharded_checkpoint_loads_in_one_process(fsdp_run, name: str) -> None:
    """2 -> 1: the sharded checkpoint restores the exact average into a plain, unsharded model."""
    import torch.distributed.checkpoint as dcp

    averages = make_averages(make_model(), backend="reference")
    state = {key: average.state_dict() for key, average in averages.items()}
    dcp.load(state, checkpoint_id=fsdp_run / "sharded")
    averages[name].load_state_dict(state[name])
    _assert_same_state(averages[name].state_dict(), _load(fsdp_run, "fsdp")["full"][name], name)


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_full_state_dict_on_rank0_loads_in_one_process(fsdp_run, name: str) -> None:
    full = _load(fsdp_run, "fsdp")["full"][name]
    average = make_averages(make_model(), backend="reference")[name]
    average.load_state_dict(full)
    _assert_same_state(average.state_dict(), full, name)


@pytest.mark.parametrize("name", ["ema", "ema_bf16", "swa", "ema_avg"])
def test_checkpoints_load_into_sharded_averages(fsdp_run, reference, name: str) -> None:
    """1 -> 2 through DCP, and a rank-0 full state dict broadcast into shards: both exact."""
    loaded = _load(fsdp_run, "loaded")
    expected = reference["averages"][name].state_dict()
    _assert_same_state(loaded["from_single"][name], expected, f"{name} (DCP 1 -> 2)")
    full = _load(fsdp_run, "fsdp")["full"][name]
    _assert_same_state(loaded["from_full"][name], full, f"{name} (full state dict)")


SCENARIOS = {"ddp": ddp_scenario, "fsdp": fsdp_scenario}
