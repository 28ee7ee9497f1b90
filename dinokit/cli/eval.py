"""``dinokit knn``, ``dinokit linear``, ``dinokit embed`` and ``dinokit plot-embeddings``.

Each parses its options, opens the backbone (``dinokit.eval.source.open_source``), reads the
image folders and calls the library; k-NN and linear results are printed as a table and
written as JSON next to the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import click

from dinokit.cli import UserError, friendly_errors, main
from dinokit.files import write_text_atomically
from dinokit.viz.embeddings import METHODS, MIN_ROWS

SOURCE_HELP = ("run folder, checkpoint or export file (ours or official DINO), official name (dino_vits16, ...), "
               "or a baseline: 'pixels' (the image itself) or 'random:<arch>[/<patch>]' (untrained, e.g. "
               "random:vit_tiny/4)")


class ListOptionCommand(click.Command):
    """A command whose ``--k`` takes several values in a row (``--k 10 20 100``) as well as repeated."""

    list_options = ("--k",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        expanded: list[str] = []
        current = None
        for arg in args:
            if arg.startswith("-") and not _is_number(arg):
                current = arg if arg in self.list_options else None
            elif current is not None and expanded[-1] != current:
                expanded.append(current)
            expanded.append(arg)
        return super().parse_args(ctx, expanded)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _source_options(fn):
    options = [
        click.option("--checkpoint", "checkpoint", required=True, metavar="SOURCE", help=SOURCE_HELP),
        click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True,
                     help="which backbone of a training checkpoint"),
        click.option("--image-size", type=int, default=None,
                     help="evaluation crop in pixels [default: the checkpoint's global_crops_size, else 224]"),
        click.option("--arch", default=None, help="architecture of a bare state dict (default: inferred)"),
        click.option("--patch-size", type=int, default=None, help="ViT patch size of a bare state dict"),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps"),
        click.option("--num-workers", type=click.IntRange(min=0), default=None,
                     help="image loading processes [default: 0 on a CPU; on a GPU the cores of this process's "
                          "share but one, at most 32]"),
        click.option("--weights", type=click.Path(), default=None, help="local copy of an official name's file"),
        click.option("--trust-checkpoint", is_flag=True, help="allow checkpoints holding arbitrary Python objects"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _labelled_data_options(fn):
    options = [
        click.option("--train-data", required=True, type=click.Path(), help="labelled folder: DIR/<class>/images"),
        click.option("--test-data", type=click.Path(), default=None, help="labelled test folder (classes as in train)"),
        click.option("--val-fraction", type=float, default=None,
                     help="without --test-data: share of each class held out for testing [default: 0.2]"),
        click.option("--seed", type=int, default=0, show_default=True, help="seeds the split, the probe and random:<arch> weights"),
        click.option("--out-dir", type=click.Path(), default=None,
                     help="folder for the JSON results and the feature cache [default: the run folder or the "
                          "checkpoint's folder; runs/baseline-<name> for baselines]"),
        click.option("--no-cache", is_flag=True, help="neither read nor write cached features"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open(checkpoint: str, which: str, arch: str | None, patch_size: int | None, weights: str | None, trust: bool,
          image_size: int | None, out_dir: str | None = None, seed: int = 0):
    """The feature source and the evaluation crop size, checked against the patch size."""
    from dinokit.eval.source import open_source

    if image_size is not None and image_size < 1:  # checked before the weights are read
        raise UserError(f"--image-size must be positive, got {image_size}")
    source = open_source(checkpoint, which, arch, patch_size, trust, seed, weights)
    if out_dir is not None:
        source.home = Path(out_dir)
    size = source.image_size if image_size is None else image_size
    source.check_image_size(size)
    return source, size


@contextlib.contextmanager
def _processes(spec: str):
    """``(device, DistEnv)``: under torchrun or srun the process group is joined for the command's
    duration (each process extracts a share of the features); otherwise one process."""
    from dinokit.train.devices import resolve_device
    from dinokit.train.distributed import init_distributed, launcher_env, shutdown_distributed

    device = resolve_device(spec, launcher_env().local_rank)
    env = init_distributed(device)
    try:
        yield device, env
    finally:
        shutdown_distributed()


def _workers(num_workers: int | None, device) -> int:
    """``--num-workers``, or ``default_loader_workers``: all but one of the process's cores on a
    GPU; none on a CPU (the model needs the cores)."""
    if num_workers is not None:
        return num_workers
    from dinokit.train.devices import default_loader_workers

    return default_loader_workers(device, on_cpu="none")


def _labelled_data(train_data: str, test_data: str | None, val_fraction: float | None, seed: int):
    """(train images, test images, a description of the test set)."""
    from dinokit.data.folders import scan_folder, split_train_val

    if test_data is not None and val_fraction is not None:
        raise UserError("give either --test-data or --val-fraction, not both")
    train = scan_folder(train_data)
    train.require_labels(f"evaluation on {train_data}")
    if test_data is not None:
        return train, scan_folder(test_data), {"test_data": str(test_data)}
    fraction = 0.2 if val_fraction is None else val_fraction
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {fraction}")
    train, test = split_train_val(train, fraction, seed)
    if not len(test) or not len(train):
        raise UserError(f"{train_data}: too few images per class to hold out {fraction:.0%} for testing")
    return train, test, {"val_fraction": fraction, "split_seed": seed}


def _write_json(path: Path, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=1))


def _describe(source, size: int, train, test) -> str:
    return (f"{source.label}, {size} px; {len(train)} train / {len(test)} test images, "
            f"{len(train.classes)} classes")


@main.command(cls=ListOptionCommand)
@_source_options
@_labelled_data_options
@click.option("--k", "ks", multiple=True, type=int, help="neighbour counts, e.g. --k 10 20 100 200 [default: those]")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="vote weight exp(similarity / T)")
@friendly_errors
def knn(checkpoint, which, image_size, arch, patch_size, batch_size, device, num_workers, weights, trust_checkpoint,
        train_data, test_data, val_fraction, seed, out_dir, no_cache, ks, temperature) -> None:
    """Weighted k-NN accuracy of frozen [CLS] features (the DINO protocol).

    Features are cached in the results folder's features/, so running again is fast.
    """
    from dinokit.eval.knn import knn_evaluate

    ks = tuple(ks) or (10, 20, 100, 200)
    if min(ks) < 1 or temperature <= 0:
        raise UserError("every --k must be at least 1 and --temperature positive")
    start = time.perf_counter()
    source, size = _open(checkpoint, which, arch, patch_size, weights, trust_checkpoint, image_size, out_dir, seed)
    train, test, split = _labelled_data(train_data, test_data, val_fraction, seed)
    with _processes(device) as (dev, env):
        scores = knn_evaluate(source.backbone, train, test, size, ks, temperature, source.mean, source.std,
                              batch_size, dev, _workers(num_workers, dev), progress=True,
                              cache_dir=None if no_cache else source.cache_dir, cache_tag=source.tag, env=env)
    if scores is None:  # not process 0: it reports
        return
    seconds = time.perf_counter() - start
    path = source.result_path("knn")
    _write_json(path, {
        "checkpoint": source.name, "which": source.which, "image_size": size, "train_data": str(train_data),
        **split, "train_images": len(train), "test_images": len(test), "classes": len(train.classes),
        "temperature": temperature, "results": {str(k): v for k, v in scores.items()}, "seconds": round(seconds, 1),
    })
    click.echo(f"k-NN accuracy (%) - {_describe(source, size, train, test)}, T={temperature}")
    click.echo(f"  {'k':>6} {'top-1':>8} {'top-5':>8}")
    for k, v in scores.items():
        click.echo(f"  {k:>6} {v['top1']:>8.2f} {v['top5']:>8.2f}")
    if above := [str(k) for k in ks if k not in scores]:
        click.echo(f"  (k = {', '.join(above)}: more than the {scores.memory} memory images, scored as "
                   f"k = {scores.memory})")
    click.echo(f"dinokit: wrote {path} ({seconds:.0f} s)")


@main.command()
@_source_options
@_labelled_data_options
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=0.001, show_default=True, help="base learning rate, scaled by batch/256")
@click.option("--n-last-blocks", type=int, default=4, show_default=True,
              help="ViT: concatenate the [CLS] token of this many last blocks")
@click.option("--avgpool", is_flag=True, help="ViT: also append the mean patch token of the last block")
@click.option("--cached-features/--augment", "cached", default=None,
              help="train on features computed once (no augmentation; fast), or on random-resized-crop + flip "
                   "views every epoch (the recipe) [default: cached on CPU, augment on GPU]")
@friendly_errors
def linear(checkpoint, which, image_size, arch, patch_size, batch_size, device, num_workers, weights, trust_checkpoint,
           train_data, test_data, val_fraction, seed, out_dir, no_cache, epochs, lr, n_last_blocks, avgpool,
           cached) -> None:
    """Linear-probe accuracy of frozen features (the DINO protocol: SGD, cosine lr, best and last epoch)."""
    from dinokit.eval.linear import linear_probe
    from dinokit.train.devices import resolve_device

    if epochs < 1 or lr <= 0:
        raise UserError("--epochs must be at least 1 and --lr positive")
    start = time.perf_counter()
    source, size = _open(checkpoint, which, arch, patch_size, weights, trust_checkpoint, image_size, out_dir, seed)
    train, test, split = _labelled_data(train_data, test_data, val_fraction, seed)
    dev = resolve_device(device)
    augment = dev.type != "cpu" if cached is None else not cached
    result = linear_probe(source.backbone, train, test, epochs, lr, batch_size, n_last_blocks, avgpool, augment,
                          size, source.mean, source.std, dev, _workers(num_workers, dev), seed,
                          progress=True, cache_dir=None if no_cache else source.cache_dir, cache_tag=source.tag)
    seconds = time.perf_counter() - start
    path = source.result_path("linear")
    _write_json(path, {
        "checkpoint": source.name, "which": source.which, "image_size": size, "train_data": str(train_data),
        **split, "train_images": len(train), "test_images": len(test), "classes": len(train.classes),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "n_last_blocks": n_last_blocks, "avgpool": avgpool,
        **result.to_dict(), "seconds": round(seconds, 1),
    })
    mode = "augmented views" if augment else "cached features"
    click.echo(f"Linear probe accuracy (%) - {_describe(source, size, train, test)}")
    click.echo(f"  {result.feature_dim} features, {epochs} epochs on {mode}")
    click.echo(f"  best top-1 {result.best_top1:8.2f}  (epoch {result.best_epoch})")
    click.echo(f"  last top-1 {result.last_top1:8.2f}  top-5 {result.last_top5:.2f}")
    click.echo(f"dinokit: wrote {path} ({seconds:.0f} s)")


@main.command()
@_source_options
@click.option("--data", required=True, type=click.Path(), help="image folder (labels from sub-folders if any)")
@click.option("--out", required=True, type=click.Path(), help="output file: .npz, .pt or .parquet")
@friendly_errors
def embed(checkpoint, which, image_size, arch, patch_size, batch_size, device, num_workers, weights, trust_checkpoint,
          data, out) -> None:
    """Write one feature row per image (with its path and label) to an .npz, .pt or .parquet file."""
    from dinokit.data.folders import scan_folder
    from dinokit.eval.embed import check_writable, embed_images
    from dinokit.extras import MissingExtraError

    try:  # before any work: the name and the packages its format needs
        check_writable(out)
    except (ValueError, MissingExtraError) as err:
        raise UserError(f"--out {out}: {err}") from None
    start = time.perf_counter()
    source, size = _open(checkpoint, which, arch, patch_size, weights, trust_checkpoint, image_size)
    images = scan_folder(data)
    with _processes(device) as (dev, env):
        embeddings = embed_images(source.backbone, images, size, source.mean, source.std, env=env,
                                  batch_size=batch_size, device=dev, num_workers=_workers(num_workers, dev),
                                  desc="embeddings")
    if embeddings is None:  # not process 0: it writes the file
        return
    embeddings.save(out)
    skipped = len(images) - len(embeddings)
    seconds = time.perf_counter() - start
    click.echo(f"dinokit: wrote {len(embeddings)} embeddings of {embeddings.features.shape[1]} dimensions"
               f"{' with labels' if embeddings.labels is not None else ''} to {out} ({seconds:.0f} s"
               f"{f'; {skipped} unreadable file(s) skipped' if skipped else ''})")


@main.command("plot-embeddings")
@click.argument("embeddings_file", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="image file to write (.png, .pdf, .svg)")
@click.option("--method", type=click.Choice(METHODS), default="tsne", show_default=True)
@click.option("--max-points", type=click.IntRange(min=MIN_ROWS), default=5000, show_default=True,
              help="plot a random subset of this size")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def plot_embeddings_command(embeddings_file, out, method, max_points, seed) -> None:
    """Draw a file written by `dinokit embed` in 2-D (t-SNE, UMAP or PCA), coloured by label."""
    from dinokit.eval.embed import Embeddings
    from dinokit.viz.embeddings import plot_embeddings

    try:
        embeddings = Embeddings.load(embeddings_file)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise UserError(f"{embeddings_file}: not an embeddings file written by `dinokit embed` ({err})") from None
    try:
        path = plot_embeddings(embeddings, out, method, max_points, seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    click.echo(f"dinokit: wrote {path} ({method} of {min(len(embeddings), max_points)} of {len(embeddings)} rows)")
