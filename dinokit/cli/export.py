"""``dinokit export``: write a trained backbone in a format other tools read."""

from __future__ import annotations

import click

from dinokit.cli import friendly_errors, main
from dinokit.hub.export import FORMATS


@main.command("export")
@click.argument("source")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="safetensors (state dict), torchscript, onnx (needs the 'export' extra), timm")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write into (created)")
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True,
              help="network of a training checkpoint to export")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="local copy of an official backbone's file, when SOURCE is a name such as dino_vits16")
@click.option("--trust-checkpoint", is_flag=True, help="allow full unpickling (only for files you trust)")
@friendly_errors
def export(source: str, fmt: str, out: str, which: str, weights: str | None, trust_checkpoint: bool) -> None:
    """Export the backbone of SOURCE (a run folder, a checkpoint, an official name such as dino_vits16).

    Writes the model file and backbone.json (architecture, patch and image size, feature width,
    normalisation) into --out.
    """
    from dinokit.hub.export import export_backbone

    files = export_backbone(source, out, fmt, which=which, trust=trust_checkpoint, weights=weights)
    click.echo(f"dinokit: exported the {which} backbone of {source} as {fmt}: {', '.join(str(f) for f in files)}")
