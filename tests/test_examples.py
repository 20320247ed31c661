"""The worked examples: the digits demo runs, reports the averaged weights' accuracy, and leaves the
training weights as they were.

Every run here trains on a few dozen images for an epoch or two, so the file takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_ema
from fused_ema import examples, rules
from fused_ema.examples import digits

REPOSITORY = Path(__file__).resolve().parents[1]
ALL_RULES = list(digits.RULE_NAMES)
# A few seconds at most: 64 images, batches of 16, two epochs; SWA averages from the first epoch.
TINY = ["--epochs", "2", "--train-limit", "64", "--batch-size", "16", "--swa-start", "0", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    """The demo trains on one thread (see Config.threads); evaluations here match it, and on a busy
    machine two threads on these tiny tensors mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**changes) -> digits.Config:
    settings = dict(
        rules=ALL_RULES, decays=[0.9, 0.5], epochs=2, train_limit=64, batch_size=16, swa_start=0, threads=1
    )
    settings.update(changes)
    return digits.Config(**settings)


def floating_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating buffers (what an average holds), cloned."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items() if tensor.is_floating_point()}


def same_bits(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal calls -0.0 and 0.0 equal and nan unequal)."""
    if first.dtype != second.dtype or first.shape != second.shape:
        return False
    if first.is_floating_point():
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}  # an integer of the same width
        first, second = first.view(bits[first.element_size()]), second.view(bits[second.element_size()])
    return torch.equal(first, second)


def independent_evaluation(state: dict[str, torch.Tensor], data: digits.Data, width: int) -> dict[str, float]:
    """Accuracy and loss of a fresh network loaded with ``state``: no swap, no EMA object involved."""
    network = digits.SmallCNN(width)
    network.load_state_dict(state, strict=False)  # integer buffers (batches seen) play no part in eval
    network.eval()
    with torch.no_grad():
        logits = network(data.test_images)
    return {
        "accuracy": 100.0 * (logits.argmax(dim=1) == data.test_labels).double().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, data.test_labels).item(),
    }


def assert_same_evaluation(reported: dict[str, float], independent: dict[str, float]) -> None:
    assert reported["accuracy"] == independent["accuracy"]
    assert math.isclose(reported["loss"], independent["loss"], rel_tol=1e-6)


@pytest.mark.parametrize("entry", ["examples.main", "digits.main"])
def test_demo_completes_and_writes_table_plot_and_json(entry, tmp_path, capsys):
    plot, results = tmp_path / "digits.png", tmp_path / "digits.json"
    argv = [*TINY, "--rules", *ALL_RULES, "--decays", "0.9", "0.99", "--plot", str(plot), "--json", str(results)]
    code = examples.main(["digits", *argv]) if entry == "examples.main" else digits.main(argv)
    assert code == 0
    output = capsys.readouterr().out
    rules_with_decay = ("ema", "ema-warmup", "t_adema", "bias-corrected")
    labels = [f"{rule} {decay}" for rule in rules_with_decay for decay in ("0.9", "0.99")]
    labels += ["power 0.1", "swa"]
    for label in labels:
        assert label in output
    assert "final test accuracy" in output
    assert plot.stat().st_size > 10_000  # a real figure, not an empty file
    saved = json.loads(results.read_text())
    assert [record["epoch"] for record in saved["epochs"]] == [1, 2]
    assert sorted(saved["epochs"][-1]["averages"]) == sorted(saved["averages"]) == sorted(labels)


def test_demo_is_the_default_example(capsys):
    assert examples.main([*TINY, "--rules", "ema"]) == 0
    assert "ema 0.99" in capsys.readouterr().out


def test_module_runs_with_python_dash_m():
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path}
    completed = subprocess.run(
        [sys.executable, "-m", "fused_ema.examples.digits", *TINY, "--rules", "ema", "swa"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "final test accuracy" in completed.stdout


@pytest.mark.parametrize("schedule", digits.SCHEDULES)
def test_reported_accuracy_is_that_of_the_averaged_weights(schedule):
    result = digits.run(tiny_config(schedule=schedule), show_progress=False)
    last = result.records[-1]
    plain_state = floating_state(result.model)
    plain = independent_evaluation(result.model.state_dict(), result.data, result.config.width)
    assert_same_evaluation(last["plain"], plain)
    for index, label in enumerate(result.ema_labels):
        average = result.ema.averages[index]
        # Evaluated with the average's weights and BatchNorm statistics...
        independent = independent_evaluation(floating_state(average), result.data, result.config.width)
        assert_same_evaluation(last["averages"][label], independent)
        # ...which are not the training weights (else this test could not tell them apart).
        assert not all(same_bits(plain_state[name], tensor) for name, tensor in floating_state(average).items())
    swa_state = floating_state(result.swa_model.module)
    assert_same_evaluation(last["averages"]["swa"], independent_evaluation(swa_state, result.data, result.config.width))
    assert not all(same_bits(plain_state[name], tensor) for name, tensor in swa_state.items())


def test_swap_puts_the_average_in_the_model_and_the_training_weights_back():
    result = digits.run(tiny_config(), show_progress=False)
    model, ema = result.model, result.ema
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    seen: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    evaluate = digits.evaluate

    def record_evaluation(network, inputs):
        if not network.training:  # evaluation, not update_bn's passes over the training data
            seen.append((network, floating_state(network)))

    hooks = [network.register_forward_pre_hook(record_evaluation) for network in (model, result.swa_model)]
    try:
        reported = digits.evaluate_averages(model, ema, result.ema_labels, result.swa_model, result.data, 16)
    finally:
        for hook in hooks:
            hook.remove()

    assert len(seen) == len(result.ema_labels) + 1
    for index, (label, (network, state)) in enumerate(zip(result.ema_labels, seen)):
        assert network is model  # evaluated the way users do it: the live model, inside ema.swap
        average = floating_state(ema.averages[index])
        assert state.keys() == average.keys()
        assert all(same_bits(state[name], average[name]) for name in state), label
        assert not all(same_bits(state[name], before[name]) for name in state), label
        expected = evaluate(ema.averages[index], result.data.test_images, result.data.test_labels)
        assert_same_evaluation(reported[label], expected)
    network, state = seen[-1]
    assert network is result.swa_model
    # Every tensor of the live model, integer buffers included, is back bit for bit.
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(same_bits(after[name], before[name]) for name in before)


def test_averaging_and_evaluating_never_touch_the_training_run():
    with_all = digits.run(tiny_config(), show_progress=False)
    with_one = digits.run(tiny_config(rules=["power"]), show_progress=False)
    assert [r["plain"] for r in with_all.records] == [r["plain"] for r in with_one.records]
    first, second = with_all.model.state_dict(), with_one.model.state_dict()
    assert all(same_bits(first[name], second[name]) for name in first)


def test_rules_map_to_fused_ema_rules():
    config = tiny_config(rules=["ema", "ema-warmup", "t_adema", "bias-corrected", "power"], decays=[0.99])
    built = dict(digits.ema_averages(config))
    assert built == {
        "ema 0.99": rules.ConstantEMA(0.99),
        "ema-warmup 0.99": rules.WarmupEMA(0.99),
        "t_adema 0.99": rules.TADEMA(0.99),
        "bias-corrected 0.99": rules.BiasCorrectedEMA(0.99),
        "power 0.1": rules.PowerEMA(sigma_rel=0.1),
    }
    result = digits.run(tiny_config(rules=["swa", "ema"], decays=[0.99], epochs=1), show_progress=False)
    assert isinstance(result.ema, fused_ema.EMA) and result.ema.rules == [rules.ConstantEMA(0.99)]
    assert isinstance(result.swa_model, fused_ema.AveragedModel)


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.999])
def test_forget_steps_is_about_one_over_one_minus_decay(decay):
    # decay ** n <= 1/e first at n = ceil(1 / -ln(decay)), about 1 / (1 - decay)
    assert digits.forget_steps(rules.ConstantEMA(decay), 100_000) == math.ceil(-1.0 / math.log(decay))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rules", "nonsense"], "invalid choice"),
        (["--decays", "1.5"], "decays must be in [0, 1)"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--epochs", "4", "--swa-start", "4"], "swa-start"),
        (["--rules", "power", "--sigma-rel", "0.5"], "sigma_rel must be <"),
        (["--batch-size", "0"], "batch-size must be >= 1"),
    ],
)
def test_bad_options_are_named(argv, message, capsys):
    assert digits.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_example_is_named(capsys):
    assert examples.main(["mnist"]) == 2
    assert "unknown example 'mnist'" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["sklearn", "matplotlib"])
def test_missing_optional_dependency_says_what_to_install(module, monkeypatch, capsys):
    for name in [module, *(f"{module}.{sub}" for sub in ("datasets", "model_selection"))]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    package = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}[module]
    assert digits.main([*TINY, "--plot", "unused.png"]) == 1
    assert f"pip install {package}" in capsys.readouterr().err
    if module == "sklearn":
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            digits.load_data()
