"""``dinokit attention``, ``dinokit pca`` and ``dinokit report``: pictures of what a network learned."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

from dinokit.cli import UserError, friendly_errors, main

if TYPE_CHECKING:
    from PIL import Image

_image_options = [
    click.argument("source", type=click.Path(path_type=Path)),
    click.option("--checkpoint", required=True,
                 help="run folder, checkpoint of ours, official DINO weights file, official name (dino_vits8, ...), "
                      "or random:<arch>[/<patch>] (untrained, to compare with)"),
    click.option("--out", type=click.Path(path_type=Path), required=True, help="folder for the pictures"),
    click.option("--weights", type=click.Path(dir_okay=False), default=None,
                 help="local copy of an official name's file, when --checkpoint is a name such as dino_vits8"),
    click.option("--image-size", type=click.IntRange(min=0), default=480, show_default=True,
                 help="shorter side in pixels, aspect ratio kept; 0 keeps each image's size"),
    click.option("--fit", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
                 help="centre-crop or pad each side to a multiple of the patch size"),
    click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True),
    click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                 help="images of one size per forward pass"),
    click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps"),
    click.option("--trust-checkpoint", is_flag=True, help="allow checkpoints that hold pickled Python objects"),
]


def image_options(fn):
    for option in reversed(_image_options):
        fn = option(fn)
    return fn


def _setup(source: Path, checkpoint: str, weights: str | None, which: str, device: str, trust: bool, what: str,
           reserved: tuple[str, ...] = ()):
    """(loaded backbone on its device, ``(image file, output name)`` pairs) for a command, or a
    one-line error. The output name is the file's path below SOURCE without its extension, unless
    another image's name or a ``reserved`` one would coincide (``x.jpg``, ``x.png``): see ``output_names``."""
    from dinokit.hub.load import open_backbone
    from dinokit.train.devices import resolve_device
    from dinokit.viz.inputs import NeedsViTError, require_vit
    from dinokit.viz.inputs import image_paths, output_names

    paths = image_paths(source)
    loaded = open_backbone(checkpoint, which=which, trust=trust, weights=weights)
    try:
        require_vit(loaded.model, what)
        loaded.model.to(resolve_device(device))
    except (NeedsViTError, ValueError, RuntimeError) as err:
        raise UserError(str(err)) from None
    root = source if source.is_dir() else source.parent
    return loaded, list(zip(paths, output_names([path.relative_to(root) for path in paths], reserved)))


def _load_images(files: list[tuple[Path, Path]], image_size: int) -> Iterator[tuple[Path, "Image.Image"]]:
    """``(output name, PIL image)`` for each readable ``(file, output name)``; unreadable ones are
    reported. Images whose short side is twice ``image_size`` or more are reduced towards it (``load_rgb``)."""
    from dinokit.data.folders import BadImageError, load_rgb

    for path, name in files:
        try:
            yield name, load_rgb(path, image_size)
        except BadImageError as err:
            click.echo(f"warning: skipped {err}", err=True)


@main.command()
@image_options
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=0.6, show_default=True,
              help="mask: keep the patches holding this share of each head's attention")
@friendly_errors
def attention(source: Path, checkpoint: str, out: Path, weights: str | None, image_size: int, fit: str, which: str,
              batch_size: int, device: str, trust_checkpoint: bool, threshold: float) -> None:
    """Attention maps of the last block's [CLS] token, per head, for an image or a folder of images.

    For each image, OUT/<image path without extension>/ gets image.png (what the network saw),
    attn-head<k>.png, mask-head<k>.png (the patches holding THRESHOLD of head k's attention) and
    heads.png (all heads). Images that differ only in extension keep it (OUT/x.jpg/, OUT/x.png/).
    """
    from dinokit.viz.attention import attention_maps, save_attention

    loaded, files = _setup(source, checkpoint, weights, which, device, trust_checkpoint, "attention maps")
    count = 0
    images = _load_images(files, image_size)
    for name, maps in attention_maps(loaded.model, images, threshold, image_size or None, fit, loaded.mean, loaded.std,
                                     batch_size):
        grid = save_attention(maps, out / name)
        count += 1
        click.echo(f"{grid}  ({maps.shares.shape[1]}x{maps.shares.shape[2]} patches, {maps.num_heads} heads)")
    click.echo(f"dinokit: attention maps of {count} image(s) in {out}")


@main.command()
@image_options
@click.option("--background-threshold", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="remove the background: black out patches whose first component (scaled to [0, 1]) is "
                   "at most this, and colour the rest by their own components (try 0.5)")
@friendly_errors
def pca(source: Path, checkpoint: str, out: Path, weights: str | None, image_size: int, fit: str, which: str,
        batch_size: int, device: str, trust_checkpoint: bool, background_threshold: float | None) -> None:
    """Patch features as colours: the first 3 principal components over all the given images together.

    OUT/<image path without extension>.png holds each image's map (red, green, blue: components
    1, 2, 3; images that differ only in extension keep it: OUT/x.jpg.png, OUT/x.png.png);
    OUT/overview.png shows the first 16 images over their maps.
    """
    from dinokit.viz.pca import patch_features, pca_figure, pca_rgb, save_pca

    loaded, files = _setup(source, checkpoint, weights, which, device, trust_checkpoint, "patch-feature maps",
                           reserved=("overview",))
    images = _load_images(files, image_size)
    results = list(patch_features(loaded.model, images, image_size or None, fit, loaded.mean, loaded.std, batch_size))
    if not results:
        raise UserError(f"none of the images under {source} could be read")
    try:
        colours = pca_rgb([features for _, _, features in results], background_threshold)
    except ValueError as err:
        raise UserError(f"--background-threshold {background_threshold}: {err}") from None
    for (name, picture, _), rgb in zip(results, colours):
        save_pca(picture, rgb, out / name.with_name(f"{name.name}.png"))
    overview = out / "overview.png"
    pca_figure([(name.name, picture, rgb) for (name, picture, _), rgb in list(zip(results, colours))[:16]]
               ).savefig(overview, dpi=100)
    click.echo(f"dinokit: feature maps of {len(results)} image(s) in {out}; overview {overview}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@friendly_errors
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.html: curves, k-NN, views, attention maps and configuration, one file."""
    from dinokit.viz.report import write_report

    click.echo(f"dinokit: report written to {write_report(run_dir)}")
