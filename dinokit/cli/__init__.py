"""The ``dinokit`` command: thin subcommands that parse, build a config and call the library.

``main`` is the group; each concern adds its subcommands from its own module of this package
(``dinokit.cli.<module>``: train, eval, viz, export, bench), registered at the bottom of this
file. Here: what they share (one-line errors, settings given as options and as key=value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from dinokit.config import ConfigError, parse_overrides


class UserError(click.ClickException):
    """An error caused by the user's input: printed as one line, exit code 2."""

    exit_code = 2


def friendly_errors(fn):
    """Turn the library's input errors into one clear line instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dinokit.data.folders import DataError
        from dinokit.extras import MissingExtraError
        from dinokit.models.backbones import UnknownArchError
        from dinokit.train.checkpoint import CheckpointError
        from dinokit.train.distributed import DistributedError
        from dinokit.train.loop import TrainingError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, UnknownArchError, CheckpointError, MissingExtraError) as err:
            raise UserError(str(err)) from None
        except (TrainingError, DistributedError) as err:
            raise click.ClickException(str(err)) from None

    return wrapper


def with_overrides(values: dict[str, Any], overrides: tuple[str, ...],
                   option: Callable[[str], str] = lambda key: f"--{key.replace('_', '-')}") -> dict[str, Any]:
    """Settings given as options (``values``, by config key) with the ``key=value`` ``overrides``
    added. A setting given both ways with two values is a ``ConfigError`` naming ``option(key)``."""
    merged = dict(values)
    for key, value in parse_overrides(list(overrides)).items():
        if key in merged and merged[key] != value:
            raise ConfigError(f"{key}: given both as an option ({option(key)}) and as key=value ({key} given twice, "
                              f"as {option(key)} {merged[key]} and {key}={value}); give it once")
        merged[key] = value
    return merged


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dinokit")
def main() -> None:
    """Self-supervised pretraining of vision backbones with DINO."""


# Subcommands of the other concerns register themselves on ``main`` when imported.
for _module in ("train", "eval", "viz", "export", "bench"):
    __import__(f"dinokit.cli.{_module}")
