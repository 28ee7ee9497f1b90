"""``dinokit train``: the recipe's settings as options and key=value pairs, a preset or YAML file
(or, when resuming, the run folder's config.yaml) below them; then ``dinokit.train``."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from dinokit.cli import friendly_errors, main, with_overrides
from dinokit.config import TrainConfig, parse_setting, presets

DEFAULT_PRESET = "laptop"


def _config_options(fn):
    """One ``--field-name`` option per TrainConfig field (values read by ``parse_setting``, validated by
    the config); the defaults shown are the recipe's, before a preset or a run's config.yaml."""
    for name, field in reversed(list(TrainConfig.model_fields.items())):
        help_text = (field.description or "").replace("%", "%%")
        default = field.default
        shown = ",".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in default) \
            if isinstance(default, tuple) else default  # as typed: 0.4,1.0
        fn = click.option(f"--{name.replace('_', '-')}", name, default=None, metavar="VALUE",
                          help=f"{help_text} [default: {shown}]".strip())(fn)
    return fn


def build_train_config(config: str | None, flags: dict[str, str | None], overrides: tuple[str, ...]) -> TrainConfig:
    """Defaults <- preset/YAML (or the run folder's saved config when resuming) <- flags <- key=value."""
    values = with_overrides({k: parse_setting(k, v) for k, v in flags.items() if v is not None}, overrides)
    base: str | Path | None = config
    if base is None:
        out = Path(values.get("out", TrainConfig.model_fields["out"].default))
        if (out / "config.yaml").exists():
            base = out / "config.yaml"
        elif values.get("data") is None:
            base = DEFAULT_PRESET
            click.echo(f"dinokit: built-in textures data with the '{DEFAULT_PRESET}' preset "
                       f"(pass --config paper for the full recipe)", err=True)
    return TrainConfig.build(base, values)


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "config", default=None, help=f"YAML file or preset ({', '.join(presets())})")
@_config_options
@click.argument("overrides", nargs=-1)
@friendly_errors
def train(config: str | None, overrides: tuple[str, ...], **flags: str | None) -> None:
    """Pretrain a backbone with DINO. OVERRIDES are key=value pairs (e.g. epochs=300 teacher_temp=0.07).

    With no arguments: the built-in textures data and the laptop preset, a few minutes on a CPU.
    Running again with the same --out resumes the run where it stopped.

    The defaults below are the DINO recipe's; --config (a preset or YAML file) or, when resuming,
    the run folder's config.yaml changes them. Every setting is also KEY=VALUE.
    """
    from dinokit.train.loop import train as run_training

    cfg = build_train_config(config, flags, overrides)
    try:
        result = run_training(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C (the loop said what it means), or one before training
        sys.exit(128 + signal.SIGINT)  # the shell's code for a process ended by Ctrl-C, as the first one gives
    if not result.main:  # another process of a distributed run: the main one reports
        sys.exit(128 + int(result.stop_signal or 0) if result.interrupted else 0)
    if result.interrupted:
        again = ("the same launcher command again" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                 else f"dinokit train --out {result.out}")
        click.echo(f"dinokit: stopped at step {result.steps}; checkpoint saved. Resume with: {again}", err=True)
        sys.exit(128 + int(result.stop_signal or 0))
    _print_knn_summary(result.knn)
    click.echo(f"dinokit: done, {result.steps} step{'s' * (result.steps != 1)}; run folder {result.out}")


def _print_knn_summary(results: dict) -> None:
    if not results:
        return
    ks = list(next(iter(results.values())).keys())
    click.echo("\nk-NN top-1 accuracy on held-out images (%):")
    click.echo(f"  {'':<14}" + "".join(f"{f'k={k}':>9}" for k in ks))
    for name, scores in results.items():
        click.echo(f"  {name:<14}" + "".join(f"{scores[k]['top1']:>9.1f}" for k in ks))
