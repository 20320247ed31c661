"""The averages of the digits run: what each remembers, and how each is evaluated.

Averages are evaluated the way a user does it: ``with ema.swap(model): evaluate(model)``; SWA gets
BatchNorm statistics of its own from ``update_bn`` first, as in torch's SWA recipe.

Example::

    from fused_ema import rules
    from fused_ema.examples.digits import forget_steps
    forget_steps(rules.ConstantEMA(0.99), 10_000)  # 100: updates until the start weighs less than 1/e
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

import fused_ema
from fused_ema import rules
from fused_ema.examples.digits.config import Config, ema_averages
from fused_ema.examples.digits.data import Data, batches, evaluate


def forget_steps(rule: rules.Rule, steps: int) -> int | None:
    """Updates the rule needs to shrink the start's share of the average to 1/e (None: never
    within ``steps`` updates); for a constant decay this is ~1/(1 - decay)."""
    remaining = 1.0
    for step in range(steps):
        remaining *= 1.0 - rule(step)
        if remaining <= math.exp(-1.0):
            return step + 1
    return None


def evaluate_averages(
    model: nn.Module,
    ema: fused_ema.EMA | None,
    ema_labels: Sequence[str],
    swa_model: fused_ema.AveragedModel | None,
    data: Data,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Evaluate every average through the public API; the training weights come back unchanged."""
    results = {}
    if ema is not None:
        for index, label in enumerate(ema_labels):
            # swap puts the average's weights and BatchNorm statistics into the live model.
            with ema.swap(model, index=index):
                results[label] = evaluate(model, data.test_images, data.test_labels)
    if swa_model is not None:
        # An average of weights needs BatchNorm statistics of its own: one pass over the training data.
        fused_ema.update_bn(batches(data.train_images, data.train_labels, batch_size), swa_model)
        results["swa"] = evaluate(swa_model, data.test_images, data.test_labels)
    return results


def short_repr(rule: rules.Rule) -> str:
    """``WarmupEMA(decay=0.99, power=0.6667)``: the rule's settings with 4 significant digits."""
    settings = {key: value for key, value in rule.state_dict().items() if key != "rule"}
    return f"{type(rule).__name__}(" + ", ".join(f"{key}={value:.4g}" for key, value in settings.items()) + ")"


def describe_averages(config: Config, steps_per_epoch: int) -> list[str]:
    """One line per average: its rule, how long it remembers the weights it started from, and how
    many recent updates it effectively averages at the end of the run (1 / weight)."""
    total = steps_per_epoch * config.epochs
    averages = [(label, rule, short_repr(rule)) for label, rule in ema_averages(config)]
    width = max([3, *(len(label) for label, _, _ in averages)])
    rule_width = max([13, *(len(text) for _, _, text in averages)])
    lines = []
    for label, rule, text in averages:
        steps = forget_steps(rule, total)
        memory = (
            f"start forgotten after {steps} updates ({steps / steps_per_epoch:.1f} epochs)"
            if steps is not None
            else f"start not forgotten within the run's {total} updates"
        )
        window = f"window at the end ~{1 / rule(total - 1):.0f} updates"
        lines.append(f"  {label:<{width}}  {text:<{rule_width}}  {memory}; {window}")
    if "swa" in config.rules:
        first = config.first_swa_epoch()
        equal = f"equal average of the weights at the ends of epochs {first + 1}..{config.epochs}"
        lines.append(f"  {'swa':<{width}}  {'AveragedModel':<{rule_width}}  {equal}")
    return lines
