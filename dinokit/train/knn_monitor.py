"""The k-NN monitor of a training run: the teacher's backbone scored by weighted k-NN on the
held-out labelled images, at the start (with the raw-pixel and untrained baselines), every
``knn_every`` epochs and at the end; results in the run folder's ``knn.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dinokit.config import TrainConfig
from dinokit.data.folders import ImageList
from dinokit.eval.knn import knn_evaluate
from dinokit.files import write_text_atomically
from dinokit.train.distributed import DistEnv
from dinokit.train.monitor import Monitor

KNN_FILE = "knn.json"
#: Names of the evaluations in ``knn.json`` besides ``"epoch N"``.
UNTRAINED, RAW_PIXELS, FINAL = "untrained", "raw pixels", "final"


class KnnMonitor:
    """``knn.json``: ``{name: {k: {"top1": %, "top5": %}}}`` (k as a string), read back on resume
    so that no evaluation is made twice. Disabled (``enabled`` False) without held-out images."""

    def __init__(self, cfg: TrainConfig, train_images: ImageList, val_images: ImageList | None, out: Path,
                 device: torch.device) -> None:
        self.cfg, self.train_images, self.val_images, self.device = cfg, train_images, val_images, device
        self.path = out / KNN_FILE
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {}

    @property
    def enabled(self) -> bool:
        return self.val_images is not None

    def baselines(self, backbone: Callable[[], nn.Module], monitor: Monitor, step: int, env: DistEnv) -> None:
        """The untrained backbone (``backbone()``) and the raw pixels, once per run."""
        if self.enabled and UNTRAINED not in self.results:
            self.run(UNTRAINED, backbone(), monitor, step, env)
            self.run(RAW_PIXELS, nn.Flatten(), monitor, step, env)

    def due(self, epochs_done: int, total_epochs: int) -> str | None:
        """The name of the periodic evaluation not yet made after ``epochs_done`` whole epochs
        (None when none is due; the last epoch has the final one instead)."""
        every = self.cfg.knn_every
        name = f"epoch {epochs_done}"
        if self.enabled and every and 0 < epochs_done < total_epochs and epochs_done % every == 0 \
                and name not in self.results:
            return name
        return None

    def final(self, backbone: Callable[[], nn.Module], monitor: Monitor, step: int, env: DistEnv) -> None:
        if self.enabled and FINAL not in self.results:
            self.run(FINAL, backbone(), monitor, step, env)

    def run(self, name: str, backbone: nn.Module, monitor: Monitor, step: int, env: DistEnv) -> None:
        """Called on every process: each extracts the features of its share of the images; the
        main process gathers them, scores and writes."""
        cfg = self.cfg
        scores = knn_evaluate(backbone, self.train_images, self.val_images, cfg.global_crops_size, cfg.knn_k,
                              cfg.knn_temperature, cfg.mean, cfg.std, cfg.eval_batch_size, self.device,
                              progress=monitor.enabled, env=env)
        if scores is None:  # not the main process
            return
        self.results[name] = {str(k): v for k, v in scores.items()}
        write_text_atomically(self.path, json.dumps(self.results, indent=1))  # a kill never leaves half of it
        k = 20 if 20 in scores else next(iter(scores))  # a k above the memory size is scored as that size
        monitor.event("knn", {"name": name, **{f"top1_k{kk}": v["top1"] for kk, v in scores.items()}}, step)
        monitor.write(f"k-NN ({name}): top-1 {scores[k]['top1']:.1f}%  top-5 {scores[k]['top5']:.1f}%  (k={k}, "
                      f"{scores.memory} memory / {scores.queries} held-out images)")

    def scores(self) -> dict[str, dict[int, dict[str, float]]]:
        """The results so far with ``k`` as an int, as ``knn_classify`` gives them."""
        return {name: {int(k): v for k, v in by_k.items()} for name, by_k in self.results.items()}
