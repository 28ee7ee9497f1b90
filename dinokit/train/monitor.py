"""What a run tells its user: a progress bar, ``metrics.jsonl`` and TensorBoard events.

Only the main process writes. Per-step values are buffered as tensors and written every
``log_every`` steps, so the GPU is not synchronised each step for logging. A resumed run first
drops what was logged after the checkpoint it resumes from, so each step is in the record once.

Steps are counted two ways: ``metrics.jsonl``'s ``step`` is the step's index (0 for the first),
TensorBoard's x-axis the number of steps done (1 after the first). On TensorBoard's axis a step's
values and the events after it (a k-NN result after an epoch of N steps, at N) fall at the same
point, and a resume from the checkpoint taken after N steps hides everything after N (its
``purge_step``): the redone steps' old values, not the events of the checkpoint itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


#: Share of a logging window spent waiting for the data loader from which the run says what to try.
DATA_BOUND_SHARE = 0.25


class Monitor:
    def __init__(self, out: Path, total_steps: int, start_step: int, images_per_step: int, enabled: bool = True,
                 tensorboard: bool = True, data_bound_hint: str | None = None) -> None:
        """``data_bound_hint``: what to try when the step waits for data (``DATA_BOUND_SHARE`` of a
        logging window or more, after the first window, where the loader starts); said once."""
        self.enabled = enabled
        self.data_bound_hint = data_bound_hint
        self.windows = 0
        self.images_per_step = images_per_step
        self.pending: list[dict[str, Any]] = []
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not enabled,
                        dynamic_ncols=True)
        self.metrics_file = None
        if enabled:
            forget_after(out / "metrics.jsonl", start_step)
            self.metrics_file = open(out / "metrics.jsonl", "a")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard hides what an earlier attempt logged after the resumed checkpoint
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)  # steps done
            except ImportError:
                tqdm.write("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        self.window_start = time.perf_counter()
        self.window_steps = 0
        self.window_data_wait = 0.0

    def step(self, step: int, epoch: int, values: dict[str, Any], data_wait: float) -> None:
        """Record one step's values (floats or 0-d tensors)."""
        if not self.enabled:
            return
        self.pending.append({"step": step, "epoch": epoch, **values})
        self.window_steps += 1
        self.window_data_wait += data_wait
        self.bar.update(1)

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        rows = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()} for row in self.pending]
        rows = [row for row in rows if row.pop("finite", 1.0)]  # a skipped step updated nothing: not a row
        for row in rows:
            self.metrics_file.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for key, value in row.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        self.tb.add_scalar(f"train/{key}", value, row["step"] + 1)  # steps done: see above
        self.metrics_file.flush()
        if rows:
            last = rows[-1]
            self.bar.set_postfix(
                loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", T_t=f"{last['teacher_temp']:.3f}",
                m=f"{last['momentum']:.4f}", H_t=f"{last['teacher_entropy']:.2f}",
                H_batch=f"{last['teacher_batch_entropy']:.2f}",
                img_s=f"{self.window_steps * self.images_per_step / elapsed:.1f}",
                data=f"{100 * self.window_data_wait / elapsed:.0f}%",
            )
        self.windows += 1
        waited = self.window_data_wait / elapsed
        if self.data_bound_hint and self.windows > 1 and waited >= DATA_BOUND_SHARE:
            self.write(f"hint: the step waited for data {waited:.0%} of the time over the last {self.window_steps} "
                       f"steps; {self.data_bound_hint}")
            self.data_bound_hint = None
        self.pending.clear()
        self.window_start, self.window_steps, self.window_data_wait = time.perf_counter(), 0, 0.0

    def event(self, name: str, values: dict[str, Any], step: int) -> None:
        """A non-step record (k-NN result, bad-file summary): written at once."""
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"event": name, "step": step, **values}) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{name}/{key}", value, step)

    def write(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        self.flush()
        self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()


def forget_after(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` for a run resuming from the checkpoint taken after ``step`` steps:
    step rows from ``step`` on (they are about to be redone), events after it (an evaluation of a
    later checkpoint that was never saved) and a line torn by a kill go; the rest is kept, in order."""
    if not path.exists():
        return
    tmp, changed = path.with_name(f".{path.name}.tmp"), False
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            try:
                row = json.loads(line)
                keep = line.endswith("\n") and (row["step"] <= step if "event" in row else row["step"] < step)
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                dst.write(line)
            changed |= not keep
    if changed:
        os.replace(tmp, path)
    else:
        tmp.unlink()


class StallWatch:
    """Says so when no batch has arrived for ``after`` seconds (a slow or hung network disk),
    from a background thread, so that a stalled run is never silent. ``tick()`` after each batch."""

    def __init__(self, write, after: float = 120.0) -> None:
        self.write, self.after = write, after
        self.last = time.monotonic()
        self.warned = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "StallWatch":
        self.thread.start()
        return self

    def tick(self) -> None:
        if self.warned:
            self.write(f"data arrived again after {time.monotonic() - self.last:.0f} s")
        self.last, self.warned = time.monotonic(), False

    def _watch(self) -> None:
        while not self.done.wait(min(10.0, self.after / 4)):
            waited = time.monotonic() - self.last
            if waited > self.after and not self.warned:
                self.warned = True
                self.write(f"warning: no batch for {waited:.0f} s: is the data folder on a slow or unreachable "
                           "disk? (the run goes on when images arrive)")

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=1)
