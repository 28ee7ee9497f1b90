"""A run's report: one self-contained HTML page (pictures embedded as base64 PNG) that opens in
any browser without a server.

``write_report(run_dir)`` reads what a run folder holds and writes ``run_dir/report.html``:

* a summary and the k-NN table (``knn.json``),
* the training curves from ``metrics.jsonl``: loss, KL(teacher || student), teacher entropy
  (with ln K, its value when the output collapses to uniform; collapse onto one prototype takes
  it to 0), teacher temperature, lr, weight decay, teacher momentum, and k-NN top-1 over
  training (from the untrained network on, with raw pixels as a line to beat),
* the augmented views (``views.png``, written by ``dinokit train`` at the start of a run),
* attention maps of a few held-out (else training) images from the run's data, for ViTs, with
  the shorter side at twice the global-view size (the official visualisations use 480 px for 224),
* the configuration, with the values that differ from the DINO defaults in bold.

Whatever is missing (no k-NN, no views, a convnet, a moved data folder) is skipped with a note.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from dinokit.config import TrainConfig
from dinokit.data.folders import BadImageError, DataError, hold_out, load_rgb, scan_folder
from dinokit.data.public import resolve_data
from dinokit.files import write_text_atomically
from dinokit.hub.load import load_backbone
from dinokit.models.backbones import UnknownArchError, is_vit
from dinokit.train.checkpoint import LATEST, CheckpointError
from dinokit.train.knn_monitor import RAW_PIXELS
from dinokit.viz.attention import DEFAULT_THRESHOLD, attention_figure, attention_maps

REPORT_NAME = "report.html"
RUN_FILES = ("config.yaml", "metrics.jsonl", LATEST)  # a run folder has at least one of them
CURVES = (  # metrics.jsonl key, plot title
    ("loss", "loss"),
    ("kl", "KL(teacher || student)"),
    ("teacher_entropy", "teacher entropy (nats): per image, of the batch mean"),
    ("teacher_temp", "teacher temperature"),
    ("lr", "learning rate"),
    ("weight_decay", "weight decay"),
    ("momentum", "teacher EMA momentum"),
)


def write_report(run_dir: Path, num_attention_images: int = 4) -> Path:
    """Write ``run_dir/report.html`` from whatever the run folder holds; returns its path.

    A ``DataError`` when ``run_dir`` is not a folder of ``dinokit train`` (it has none of
    ``RUN_FILES``)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a folder: give the run folder of dinokit train (e.g. {run_dir.parent})")
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise DataError(f"{run_dir} is not a run folder of dinokit train: it holds none of {', '.join(RUN_FILES)}")
    config = _read_config(run_dir / "config.yaml")
    steps, events = read_metrics(run_dir / "metrics.jsonl")
    knn = json.loads((run_dir / "knn.json").read_text()) if (run_dir / "knn.json").exists() else {}
    sections = [
        ("Summary", _summary(run_dir, config, steps, knn)),
        ("Training curves", _curves_section(steps, events, config)),
        ("Augmented views", _views_section(run_dir / "views.png")),
        ("Attention maps", _attention_section(run_dir, config, num_attention_images)),
        ("Configuration", _config_section(config)),
    ]
    body = "\n".join(f"<section><h2>{title}</h2>\n{content}</section>" for title, content in sections)
    page = _PAGE.format(title=html.escape(f"dinokit run {run_dir.resolve().name}"), body=body,
                        created=datetime.now().strftime("%Y-%m-%d %H:%M"))
    return write_text_atomically(run_dir / REPORT_NAME, page)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(step rows sorted by step, event rows)`` of a ``metrics.jsonl``. A step logged twice (a
    resumed run repeats the steps after its last checkpoint) keeps its latest row; unreadable
    lines (a run killed mid-write) are skipped."""
    if not path.exists():
        return [], []
    by_step: dict[int, dict[str, Any]] = {}
    events = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "step" not in row:
            continue
        if "event" in row:
            events.append(row)
        else:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)], events


def png_base64(figure: Figure, dpi: int = 100) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str, css_class: str = "") -> str:
    extra = f' class="{css_class}"' if css_class else ""
    return f'<img{extra} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return values if isinstance(values, dict) else {}


def _setting(config: dict[str, Any], key: str) -> Any:
    return config.get(key, TrainConfig.model_fields[key].default)


def _summary(run_dir: Path, config: dict[str, Any], steps: list[dict], knn: dict) -> str:
    facts = [("run folder", str(run_dir.resolve()))]
    if config:
        facts.append(("backbone", f"{_setting(config, 'arch')}, patch {_setting(config, 'patch_size')}"))
        facts.append(("data", str(_setting(config, "data") or "built-in textures")))
    if steps:
        last = steps[-1]
        facts.append(("trained", f"{last['step'] + 1} steps, epoch {last.get('epoch', 0) + 1} of "
                                 f"{_setting(config, 'epochs')}"))
        if isinstance(last.get("loss"), (int, float)):
            facts.append(("last loss", f"{last['loss']:.4f}"))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return f"<table class='facts'>{rows}</table>\n" + _knn_table(knn)


def _knn_table(knn: dict) -> str:
    if not knn:
        return _note("No k-NN results (knn.json): the data had no class sub-folders, or val_fraction was 0.")
    ks = list(next(iter(knn.values())).keys())
    head = "".join(f"<th>k={html.escape(k)}</th>" for k in ks)
    rows = []
    for name, scores in knn.items():
        cells = "".join(f"<td>{scores[k]['top1']:.1f} / {scores[k]['top5']:.1f}</td>" if k in scores else "<td></td>"
                        for k in ks)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return ("<p>k-NN accuracy on held-out images, top-1 / top-5 (%):</p>"
            f"<table class='grid'><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def _curves_section(steps: list[dict], events: list[dict], config: dict[str, Any]) -> str:
    if not steps:
        return _note("No training steps logged (metrics.jsonl is missing or empty).")
    x = np.array([row["step"] for row in steps])
    fig = Figure(figsize=(13, 6), layout="constrained")
    axes = list(fig.subplots(2, 4).flat)
    for ax, (key, title) in zip(axes, CURVES):
        y = np.array([row.get(key, np.nan) for row in steps], dtype=float)
        ax.plot(x, y, lw=1, label="per image" if key == "teacher_entropy" else None)
        ax.set_title(title, fontsize=10)
        if key == "teacher_entropy":
            batch = np.array([row.get("teacher_batch_entropy", np.nan) for row in steps], dtype=float)
            if not np.isnan(batch).all():
                ax.plot(x, batch, lw=1, label="batch mean")
            ln_k = math.log(_setting(config, "out_dim"))
            ax.axhline(ln_k, color="grey", ls="--", lw=1, label=f"ln K = {ln_k:.2f} (uniform)")
            ax.legend(fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    _knn_curve(axes[len(CURVES)], events)
    axes[len(CURVES)].set_xlim(axes[0].get_xlim())
    return _img(png_base64(fig), "training curves")


def _knn_curve(ax, events: list[dict]) -> None:
    ax.set_title("k-NN top-1 (%)", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.set_xlabel("step", fontsize=8)
    knn = [e for e in events if e.get("event") == "knn"]
    keys = sorted({k for e in knn for k in e if k.startswith("top1_k")}, key=lambda k: int(k.removeprefix("top1_k")))
    if not keys:
        ax.text(0.5, 0.5, "no k-NN results", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    key = "top1_k20" if "top1_k20" in keys else keys[0]
    trained = sorted((e["step"], e[key]) for e in knn if e.get("name") != RAW_PIXELS and key in e)
    if trained:
        ax.plot(*zip(*trained), marker="o", label=f"teacher ({key.removeprefix('top1_')})")
    for e in knn:
        if e.get("name") == RAW_PIXELS and key in e:
            ax.axhline(e[key], color="grey", ls="--", lw=1, label=RAW_PIXELS)
    ax.legend(fontsize=7)


def _views_section(path: Path) -> str:
    if not path.exists():
        return _note(f"No {path.name} in the run folder (dinokit train writes it at the start of a run).")
    return _img(base64.b64encode(path.read_bytes()).decode("ascii"), "augmented views")


def _attention_section(run_dir: Path, config: dict[str, Any], num_images: int) -> str:
    try:
        backbone = load_backbone(run_dir)
    except (CheckpointError, UnknownArchError) as err:
        return _note(f"No attention maps: {err}")
    if not is_vit(backbone):
        return _note(f"No attention maps: they need a ViT backbone, and this run trained a "
                     f"{_setting(config, 'arch')}.")
    try:
        images = scan_folder(resolve_data(_setting(config, "data")))
    except DataError as err:
        return _note(f"No attention maps: the run's data cannot be read ({err}).")
    which = "training"
    _, held_out = hold_out(images, _setting(config, "val_fraction"), _setting(config, "seed"))  # as the run did
    if held_out is not None:
        images, which = held_out, "held-out"
    picks = dict.fromkeys(np.linspace(0, len(images) - 1, num=min(num_images, len(images))).round().astype(int).tolist())
    items = []
    for i in picks:
        try:
            items.append((images.paths[i].name, load_rgb(images.paths[i])))
        except BadImageError:
            continue
    size = 2 * _setting(config, "global_crops_size")
    figures = [_img(png_base64(attention_figure(maps, title=name), dpi=72), f"attention of {name}", "inline")
               for name, maps in attention_maps(backbone, items, image_size=size, mean=tuple(_setting(config, "mean")),
                                                std=tuple(_setting(config, "std")), batch_size=1)]
    text = (f"Last block, [CLS] to patches, per head, on {len(figures)} {which} images resized to {size} px "
            f"(shorter side: twice the global views) and cropped to the patch grid. Bottom rows: the patches "
            f"holding the top {DEFAULT_THRESHOLD:.0%} of each head's attention.")
    return (f"<p>{html.escape(text)} Any image, any checkpoint: <code>dinokit attention IMAGE --checkpoint "
            f"RUN</code>.</p>\n<div>" + "\n".join(figures) + "</div>")


def _config_section(config: dict[str, Any]) -> str:
    if not config:
        return _note("No config.yaml in the run folder.")
    rows = []
    for key, value in config.items():
        field = TrainConfig.model_fields.get(key)
        default = _jsonable(field.default) if field is not None else None
        changed = field is not None and _jsonable(value) != default
        cell = html.escape(json.dumps(value))
        rows.append(f"<tr{' class=changed' if changed else ''}><th>{html.escape(key)}</th><td>{cell}</td>"
                    f"<td class='default'>{html.escape(json.dumps(default)) if changed else ''}</td></tr>")
    return ("<p>Values in bold differ from the DINO defaults (shown on the right).</p>"
            f"<table class='config'>{''.join(rows)}</table>")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(list(value) if isinstance(value, tuple) else value))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1320px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }}
img {{ max-width: 100%; display: block; margin: .5em 0; }}
img.inline {{ display: inline-block; vertical-align: top; margin: .3em .6em .3em 0; }}
table {{ border-collapse: collapse; font-size: .9em; }}
th, td {{ padding: .2em .8em; text-align: left; border-bottom: 1px solid #eee; }}
table.grid td {{ text-align: right; }}
tr.changed th, tr.changed td {{ font-weight: bold; }}
td.default {{ color: #888; font-weight: normal !important; }}
.note {{ color: #777; font-style: italic; }}
footer {{ color: #999; font-size: .8em; margin-top: 2em; }}
</style></head>
<body><h1>{title}</h1>
{body}
<footer>written by dinokit on {created}</footer>
</body></html>
"""
