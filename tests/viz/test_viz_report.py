"""The run report: one self-contained HTML page, whatever the run folder holds."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from dinokit.data.folders import DataError, scan_folder
from dinokit.models.backbones import build_backbone
from dinokit.viz.report import read_metrics, write_report
from dinokit.viz.views import save_views_grid
from tests.conftest import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_run_checkpoint(out: Path, arch: str, cfg_dict: dict) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(arch, cfg_dict.get("patch_size", 16), cfg_dict.get("global_crops_size", 224))
    state = backbone.state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()},
                "student": {f"module.backbone.{k}": v for k, v in state.items()},
                "args": cfg_dict, "step": 20, "epoch": 2}, out / "checkpoint.pth")


def metrics_rows(steps: int = 20) -> list[dict]:
    rows = [{"step": s, "epoch": s // 10, "loss": 4.0 - 0.1 * s, "lr": 1e-4 * s, "weight_decay": 0.04,
             "momentum": 0.99, "teacher_temp": 0.04, "teacher_entropy": 3.0, "kl": 0.5, "freeze_last_layer": 0.0}
            for s in range(steps)]
    for name, step, top1 in (("untrained", 0, 12.5), ("raw pixels", 0, 20.0), ("epoch 1", 10, 30.0), ("final", 20, 40.0)):
        rows.append({"event": "knn", "step": step, "name": name, "top1_k10": top1, "top1_k20": top1 + 1})
    return rows


@pytest.fixture
def full_run(textures_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    cfg = tiny_config(textures_dir, out, val_fraction=0.25)
    cfg.to_yaml(out / "config.yaml")
    save_run_checkpoint(out, cfg.arch, cfg.to_dict())
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows()))
    knn = {name: {"10": {"top1": v, "top5": 90.0}, "20": {"top1": v + 1, "top5": 91.0}}
           for name, v in (("untrained", 12.5), ("raw pixels", 20.0), ("final", 40.0))}
    (out / "knn.json").write_text(json.dumps(knn))
    save_views_grid(cfg, scan_folder(textures_dir), out / "views.png")
    return out


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_full_report_is_self_contained(full_run):
    path = write_report(full_run)
    assert path == full_run / "report.html"
    page = path.read_text()
    for title in ("Summary", "Training curves", "Augmented views", "Attention maps", "Configuration"):
        assert f"<h2>{title}</h2>" in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 1 + 1 + 4  # curves, views, 4 attention figures
    assert all(p.startswith(PNG_MAGIC) for p in pngs)
    assert pngs[1] == (full_run / "views.png").read_bytes()
    # nothing outside the file: every src is a data URI, no scripts or stylesheets to fetch
    assert len(re.findall(r'src="', page)) == len(pngs)
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert "held-out images" in page
    assert "<td>41.0 / 91.0</td>" in page  # final, k=20
    assert re.search(r"<tr class=changed><th>arch</th><td>&quot;vit_tiny&quot;</td><td class='default'>"
                     r"&quot;vit_small&quot;</td>", page)
    assert "<tr><th>student_temp</th>" in page  # unchanged values are not marked


def test_sparse_run_folder_skips_what_is_missing(tmp_path):
    out = tmp_path / "convnet"
    out.mkdir()
    (out / "config.yaml").write_text("arch: resnet18\ndata: /nowhere\n")
    save_run_checkpoint(out, "resnet18", {"arch": "resnet18"})
    page = write_report(out).read_text()
    assert "need a ViT backbone, and this run trained a resnet18" in page
    assert "No k-NN results" in page
    assert "No views.png in the run folder" in page
    assert "No training steps logged" in page
    assert embedded_pngs(page) == []


def test_a_run_with_only_its_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows(4)))
    page = write_report(tmp_path).read_text()
    assert "No attention maps: " in page
    assert "No config.yaml in the run folder" in page


def test_what_is_not_a_run_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_report(tmp_path / "absent")
    (tmp_path / "backbone.json").write_text("{}")  # an export folder, say
    with pytest.raises(DataError, match="not a run folder of dinokit train: it holds none of config.yaml"):
        write_report(tmp_path)
    with pytest.raises(DataError, match="backbone.json is not a folder"):
        write_report(tmp_path / "backbone.json")
    assert not (tmp_path / "report.html").exists()


def test_attention_is_skipped_when_the_data_folder_is_gone(full_run, tmp_path):
    config = (full_run / "config.yaml").read_text()
    (full_run / "config.yaml").write_text(re.sub(r"(?m)^data: .*$", f"data: {tmp_path / 'moved'}", config))
    page = write_report(full_run).read_text()
    assert "the run&#x27;s data cannot be read" in page
    assert len(embedded_pngs(page)) == 2


def test_metrics_of_a_resumed_and_killed_run(tmp_path):
    rows = metrics_rows(6)
    lines = [json.dumps(r) for r in rows]
    repeated = json.dumps({**rows[4], "loss": -1.0})  # a resumed run logs step 4 again
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + [repeated, '{"step": 7, "lo']) + "\n")
    steps, events = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4, 5]
    assert steps[4]["loss"] == -1.0
    assert [e["name"] for e in events] == ["untrained", "raw pixels", "epoch 1", "final"]
