import time

from dinokit.train.monitor import StallWatch


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
