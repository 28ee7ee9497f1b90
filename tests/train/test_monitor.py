import json
import time

import pytest

from dinokit.train.monitor import Monitor, StallWatch, forget_after


def test_a_stalled_data_source_is_reported_and_its_recovery_too():
    messages = []
    with StallWatch(messages.append, after=0.2) as watch:
        time.sleep(0.6)  # no batch arrives
        assert len(messages) == 1 and "no batch for" in messages[0] and "slow or unreachable disk" in messages[0]
        watch.tick()
        assert messages[-1].startswith("data arrived again after")
        watch.tick()
    assert len(messages) == 2


def test_a_healthy_data_source_is_silent():
    messages = []
    with StallWatch(messages.append, after=0.5) as watch:
        for _ in range(8):
            time.sleep(0.05)
            watch.tick()
    assert messages == []


def test_a_run_waiting_for_data_says_what_to_try_once(tmp_path, capsys):
    """Not in the first logging window (the loader starts then), not while the step is fed, once
    when a later window waits for data a quarter of its time or more."""
    monitor = Monitor(tmp_path, 100, 0, 8, tensorboard=False, data_bound_hint="try views_on=device")
    values = dict(loss=1.0, lr=1e-4, teacher_temp=0.04, momentum=0.996, teacher_entropy=1.0,
                  teacher_batch_entropy=2.0)
    step = 0

    def window(waiting: bool) -> str:
        nonlocal step
        for _ in range(2):
            time.sleep(0.05)
            monitor.step(step, 0, values, data_wait=0.05 if waiting else 0.0)
            step += 1
        monitor.flush()
        return capsys.readouterr().out

    assert "hint" not in window(waiting=True) + window(waiting=False)
    said = window(waiting=True) + window(waiting=True)
    monitor.close()
    assert said.count("hint: the step waited for data") == 1 and "try views_on=device" in said


def test_a_resumed_run_forgets_what_was_logged_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"event": "knn", "step": 0, "top1": 10.0}] + [{"step": s, "loss": 9.0 - s} for s in range(6)]
    rows += [{"event": "knn", "step": 4, "top1": 20.0}, {"event": "knn", "step": 6, "top1": 30.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # torn by a kill
    forget_after(path, 4)  # the checkpoint holds 4 steps: steps 4 and 5 are redone, the k-NN at 6 is gone
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:5] + [rows[7]]
    before = path.read_text()
    forget_after(path, 4)
    assert path.read_text() == before and not (tmp_path / ".metrics.jsonl.tmp").exists()
    forget_after(tmp_path / "absent.jsonl", 3)


def test_a_resumed_run_hides_in_tensorboard_what_was_logged_after_its_checkpoint(tmp_path):
    """The steps a killed attempt logged past the checkpoint, and a later k-NN result, vanish from
    TensorBoard when the run resumes from that checkpoint, each step in the record once (the first
    redone one showed twice before); what came before stays, a k-NN result at the checkpoint too."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    values = {"lr": 1e-4, "teacher_temp": 0.04, "momentum": 0.996, "teacher_entropy": 1.0, "teacher_batch_entropy": 2.0}

    def attempt(start: int, end: int, loss_offset: float, knn_steps=()) -> None:
        monitor = Monitor(tmp_path, 10, start, 8)
        for step in range(start, end):
            monitor.step(step, 0, {"loss": loss_offset + step, **values}, data_wait=0.0)
            monitor.flush()
            if step + 1 in knn_steps:
                monitor.event("knn", {"top1_k20": 10.0 * (step + 1)}, step + 1)
        monitor.close()

    attempt(0, 8, 0.0, knn_steps=(2, 4, 6))  # killed after step 7; its last checkpoint holds 4 steps
    [killed] = (tmp_path / "tensorboard").iterdir()
    killed.rename(killed.with_name("events.out.tfevents.0000000000.killed"))  # read first, as its time says
    attempt(4, 10, 100.0)  # resumed at step 4: steps 4 to 9 again

    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]  # on the axis of steps done
    assert losses == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)] + [(s + 1, 100.0 + s) for s in range(4, 10)]
    assert [(e.step, e.value) for e in events.Scalars("knn/top1_k20")] == [(2, 20.0), (4, 40.0)]  # not 6
