"""``dinokit bench``: images/s, the time split of a step, peak memory and MFU on this machine."""

from __future__ import annotations

import json
import sys

import click

from dinokit.cli import UserError, friendly_errors, main, with_overrides
from dinokit.config import TrainConfig, load_yaml

# option name -> TrainConfig key
_WORKLOAD_OPTIONS = {
    "arch": "arch", "patch_size": "patch_size", "batch_size": "batch_size", "out_dim": "out_dim",
    "global_size": "global_crops_size", "local_size": "local_crops_size", "local_crops": "local_crops_number",
    "device": "device", "precision": "precision", "workers": "num_workers", "data": "data",
}


@main.command()
@click.option("--config", default=None, help="preset or YAML file to start from [default: laptop on a CPU, "
                                             "paper at batch 128 on a GPU]")
@click.option("--arch", default=None, help="vit_tiny | vit_small | vit_base | resnet50 | timm:<name>")
@click.option("--patch-size", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="source images per step")
@click.option("--out-dim", type=int, default=None, help="K, prototypes of the head")
@click.option("--global-size", type=int, default=None, help="side of the 2 global views (px)")
@click.option("--local-size", type=int, default=None, help="side of the local views (px)")
@click.option("--local-crops", type=int, default=None, help="number of local views")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="auto: bf16 autocast on CUDA, fp32 elsewhere")
@click.option("--compile", "compile_", type=click.Choice(["off", "loss", "all"]), is_flag=False, flag_value="all",
              default=None, help="torch.compile, as dinokit train --compile: loss (the loss alone, seconds to compile) "
                                 "or all (also the backbones and heads; minutes on a CPU), compiled in the first "
                                 "steps; --compile alone: all [default: off]")
@click.option("--data", default=None, help="image folder for the data pipeline [default: the built-in textures]")
@click.option("--synthetic", is_flag=True, help="random views instead of the data pipeline: the step alone")
@click.option("--workers", type=int, default=None, help="DataLoader processes [default: as dinokit train]")
@click.option("--steps", type=int, default=20, show_default=True,
              help="timed steps (--data-only: a quarter as many batches on one core, half with the workers, "
                   "at least enough to start them)")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed steps (batches) before them")
@click.option("--data-only", is_flag=True, help="measure the data pipeline alone (decode + multi-crop)")
@click.option("--results", "results_dir", default="bench/results", show_default=True,
              help="folder of the results files (<machine>-<date>.json), relative to the working directory")
@click.option("--no-save", is_flag=True, help="print only")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.argument("overrides", nargs=-1)
@friendly_errors
def bench(config: str | None, compile_: str | None, synthetic: bool, steps: int, warmup: int, data_only: bool,
          results_dir: str, no_save: bool, as_json: bool, overrides: tuple[str, ...], **options) -> None:
    """Time the real training step on this machine and append to <results>/<machine>-<date>.json.

    OVERRIDES are key=value pairs of the training config (e.g. head_hidden_dim=2048).

    \b
    dinokit bench
    dinokit bench --arch vit_small --patch-size 16 --batch-size 128 --steps 50 --compile
    dinokit bench --data-only --workers 4
    """
    from dinokit.train import bench as lib
    from dinokit.train.devices import resolve_device
    from dinokit.train.distributed import launcher_env
    from dinokit.train.loop import training_loader_workers

    env = launcher_env()
    if env.distributed:
        raise UserError(f"dinokit bench measures one process; this is {env} of a launcher (torchrun, srun): "
                        "run it without one")
    if steps < 1 or warmup < 1:
        raise UserError("--steps and --warmup must be at least 1")
    values = {_WORKLOAD_OPTIONS[k]: v for k, v in options.items() if v is not None}
    if compile_ is not None:
        values["compile"] = compile_
    values = with_overrides(values, overrides, _option)
    if data_only and synthetic:
        raise UserError("--data-only times the data pipeline alone, --synthetic the step alone: choose one")
    unused = [key for key in (("compile", "precision") if data_only else ("data", "num_workers") if synthetic else ())
              if key in values]
    if unused:
        what = "--data-only times the data pipeline alone" if data_only else "--synthetic reads no images"
        raise UserError(f"{what}: leave out {' and '.join(map(_option, unused))}, which would play no part")
    device = resolve_device(values.get("device", "auto"))  # a ConfigError for friendly_errors
    base = load_yaml(config) if config else lib.default_config(device).to_dict()
    cfg = TrainConfig.build({**base, "device": str(device)}, values)

    if data_only:
        workers = training_loader_workers(cfg, device)
        per_core = lib.measure_pipeline(cfg, batches=max(1, steps // 4), workers=0, warmup=warmup)
        record = {"kind": "data_pipeline", "machine": lib.describe_machine(device),
                  "workload": lib.describe_pipeline(cfg, workers), "images_per_s_per_core": per_core}
        views = cfg.local_crops_number + 2
        work = f"decode + {views} views" if cfg.views_on == "host" else f"decode + canvas + {views} views' parameters"
        text = f"data pipeline: {per_core:.1f} images/s per core ({work})"
        if workers:
            timed, untimed = lib.pipeline_batches(max(1, steps // 2), warmup, workers)
            record["images_per_s"] = lib.measure_pipeline(cfg, batches=timed, workers=workers, warmup=untimed)
            record["worker_batches"] = timed
            text += (f"; {record['images_per_s']:.1f} images/s with {workers} worker{'s' * (workers > 1)} "
                     f"({timed} batches after {untimed})")
    else:
        result = lib.run_bench(cfg, steps=steps, warmup=warmup, data="synthetic" if synthetic else "pipeline")
        record = {"kind": "train_step", **result.to_dict()}
        text = lib.format_result(result)
    click.echo(json.dumps(record, indent=1) if as_json else text)
    if not no_save:
        path = lib.save_result(record, results_dir)
        click.echo(f"saved to {path}", err=as_json)
    sys.stdout.flush()


def _option(key: str) -> str:
    """The option of config key ``key``: ``num_workers`` -> ``--workers``, ``compile`` -> ``--compile``."""
    name = next((option for option, k in _WORKLOAD_OPTIONS.items() if k == key), key)
    return "--" + name.replace("_", "-")
