"""The settings of one digits run and the averages they ask for (checked before anything trains).

Example::

    from fused_ema.examples.digits import Config, check_config, ema_averages
    config = Config(rules=["ema", "swa"], decays=[0.999], epochs=10)
    check_config(config)
    ema_averages(config)  # [("ema 0.999", rules.ConstantEMA(0.999))]: swa is an AveragedModel, not a rule
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fused_ema import rules

RULE_NAMES = ("ema", "ema-warmup", "swa", "t_adema", "bias-corrected", "power")


SCHEDULES = ("step", "cosine", "swa")


# Rules that take a decay get one average per --decays value; swa and power take none.
DECAY_RULES = {
    "ema": rules.ConstantEMA,
    "ema-warmup": rules.WarmupEMA,
    "t_adema": rules.TADEMA,
    "bias-corrected": rules.BiasCorrectedEMA,
}


@dataclass
class Config:
    """Everything that decides a run; the defaults are the run the README shows."""

    rules: list[str] = field(default_factory=lambda: ["ema", "t_adema", "swa"])
    decays: list[float] = field(default_factory=lambda: [0.99, 0.999])
    sigma_rel: float = 0.10
    schedule: str = "swa"
    epochs: int = 60
    lr: float = 0.1
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 5e-4
    swa_start: int | None = None  # first epoch (0-based) whose end SWA averages; None: epochs // 2
    swa_lr: float = 0.05
    width: int = 16
    seed: int = 0
    threads: int | None = 1  # torch threads during the run (results depend on it); None: torch's default
    augment: bool = True  # shift training images by up to a pixel
    train_limit: int | None = None  # use only this many training images (for quick tests)

    def first_swa_epoch(self) -> int:
        return self.epochs // 2 if self.swa_start is None else self.swa_start


def make_rule(name: str, decay: float | None, sigma_rel: float) -> rules.Rule:
    """The fused_ema rule behind a ``--rules`` name (swa excepted: it is an AveragedModel)."""
    if name in DECAY_RULES:
        return DECAY_RULES[name](decay)
    if name == "power":
        return rules.PowerEMA(sigma_rel=sigma_rel)
    raise ValueError(f"no EMA rule for {name!r}; rules are {', '.join(RULE_NAMES)}")


def ema_averages(config: Config) -> list[tuple[str, rules.Rule]]:
    """(label, rule) for every EMA-style average the config asks for, in table order."""
    averages = []
    for name in config.rules:
        if name in DECAY_RULES:
            averages += [(f"{name} {decay:g}", make_rule(name, decay, config.sigma_rel)) for decay in config.decays]
        elif name == "power":
            averages.append((f"power {config.sigma_rel:g}", make_rule(name, None, config.sigma_rel)))
    return averages


def check_config(config: Config) -> None:
    """ValueError naming the first bad setting."""
    unknown = [name for name in config.rules if name not in RULE_NAMES]
    if unknown or not config.rules:
        raise ValueError(f"rules must be among {', '.join(RULE_NAMES)}, got {config.rules}")
    if any(name in DECAY_RULES for name in config.rules) and not config.decays:
        raise ValueError("give at least one decay with --decays")
    for decay in config.decays:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decays must be in [0, 1), got {decay}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"batch-size must be >= 1, got {config.batch_size}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    if ("swa" in config.rules or config.schedule == "swa") and not 0 <= config.first_swa_epoch() < config.epochs:
        raise ValueError(f"swa-start must be an epoch in [0, {config.epochs}), got {config.first_swa_epoch()}")
    ema_averages(config)  # the rules check their own settings (e.g. sigma_rel)
