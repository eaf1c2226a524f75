"""MicroBatcher on its own: batch size cap, bounded wait, parameter groups, fill wait, splitting on failure."""

from __future__ import annotations

import threading
import time

import pytest

from common.errors import EngineError
from worker.batcher import MicroBatcher


class Recorder:
    """A batch function that records the batches it was given and returns one output per item."""

    def __init__(self, fail_on: object = None, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[list[object], object]] = []
        self.fail_on = fail_on
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, items: list[object], params: object) -> list[str]:
        with self.lock:
            self.batches.append((list(items), params))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot do {self.fail_on}")
        return [f"{params}:{item}" for item in items]


@pytest.fixture
def make():
    made: list[MicroBatcher] = []

    def factory(run: Recorder, **kwargs: object) -> MicroBatcher:
        batcher = MicroBatcher(run, **{"max_batch": 4, "max_wait_s": 0.05, **kwargs})  # type: ignore[arg-type]
        made.append(batcher)
        return batcher

    yield factory
    for b in made:
        b.stop(timeout=5)


def test_outputs_go_back_to_their_own_callers_in_batches_of_at_most_max_batch(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=0.2)
    futures = [batcher.submit(i, "p") for i in range(10)]
    assert [f.result(timeout=30) for f in futures] == [f"p:{i}" for i in range(10)]
    assert [len(items) for items, _ in run.batches] == [4, 4, 2]


def test_a_lone_item_runs_once_max_wait_has_passed(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=0.05)
    # The batch never fills (max_batch 4): only the end of the wait can run it. The result's timeout is a bound
    # no slow machine misses, not a measure of the wait.
    assert batcher.submit("x", "p").result(timeout=30) == "p:x"
    assert run.batches == [(["x"], "p")]


def test_a_short_batch_waits_for_items_that_arrive_within_max_wait(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=60)  # longer than this test lasts on any machine
    first = batcher.submit(0, "p")
    with pytest.raises(TimeoutError):  # held for more items, not run at once
        first.result(timeout=0.5)
    later = [batcher.submit(i, "p") for i in (1, 2)]
    batcher.stop(timeout=30)  # stopping runs what waits at once
    assert [f.result(timeout=30) for f in [first, *later]] == ["p:0", "p:1", "p:2"]
    assert run.batches == [([0, 1, 2], "p")]


def test_items_of_different_parameters_never_share_a_batch(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=0.1)
    futures = [batcher.submit(i, "long" if i % 2 else "short") for i in range(6)]
    assert [f.result(timeout=30) for f in futures] == [f"{'long' if i % 2 else 'short'}:{i}" for i in range(6)]
    for items, params in run.batches:
        assert {("long" if i % 2 else "short") for i in items} == {params}


def test_a_group_of_its_own_runs_alone(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=0.1)
    shared = [batcher.submit(i, "p") for i in range(3)]
    alone = batcher.submit("suspect", "p", group=("alone", "suspect"))
    assert alone.result(timeout=30) == "p:suspect" and all(f.result(timeout=30) for f in shared)
    assert (["suspect"], "p") in run.batches


def test_announced_items_hold_a_short_batch_until_they_arrive(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=0.01, fill_wait_s=60)  # a fill wait no machine outlasts in this test
    batcher.expect(4)
    first = batcher.submit(0, "p", expected=True)
    # 50 times max_wait: without the announcement item 0 would have run alone long before this times out.
    with pytest.raises(TimeoutError):
        first.result(timeout=0.5)
    later = [batcher.submit(i, "p", expected=True) for i in (1, 2)]
    batcher.arrived()  # the fourth failed to decode: nothing more is coming, the batch of three runs now
    assert [f.result(timeout=30) for f in [first, *later]] == ["p:0", "p:1", "p:2"]
    assert [items for items, _ in run.batches] == [[0, 1, 2]]


def test_the_fill_wait_is_bounded(make) -> None:
    run = Recorder()
    batcher = make(run, max_wait_s=0.01, fill_wait_s=0.2)
    batcher.expect(10)  # announced, never delivered
    # Only the end of the fill wait can run it; the timeout is a bound no slow machine misses.
    assert batcher.submit("x", "p", expected=True).result(timeout=30) == "p:x"
    assert run.batches == [(["x"], "p")]


def test_a_failing_item_fails_alone_and_its_batch_mates_are_answered(make) -> None:
    run = Recorder(fail_on=2)
    batcher = make(run, max_wait_s=0.2)
    futures = [batcher.submit(i, "p") for i in range(4)]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(timeout=30))
        except EngineError as exc:
            outcomes.append(type(exc).__name__ + (" transient" if exc.transient else ""))
    assert outcomes == ["p:0", "p:1", "EngineError", "p:3"]
    assert batcher.stats.splits >= 2


def test_out_of_memory_halves_and_remembers_a_ceiling(make) -> None:
    def run(items: list[object], params: object) -> list[str]:
        if len(items) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return ["ok" for _ in items]

    batcher = make(run, max_wait_s=0.2)
    assert [f.result(timeout=30) for f in [batcher.submit(i, "p") for i in range(4)]] == ["ok"] * 4
    assert batcher.ceiling == 1


def test_out_of_memory_with_one_image_is_transient(make) -> None:
    def run(items: list[object], params: object) -> list[str]:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(EngineError) as info:
        make(run).submit("x", "p").result(timeout=30)
    assert info.value.transient


def test_a_wrong_number_of_outputs_is_caught_not_misaligned(make) -> None:
    """A batch function that returns fewer outputs than items: the mismatch is an error, the batch is split
    down to where outputs and items line up again, and no caller gets another caller's output."""

    def run(items: list[object], params: object) -> list[str]:
        return [f"out:{items[0]}"]  # always one output, whatever the batch size

    batcher = make(run, max_wait_s=0.2)
    futures = [batcher.submit(i, "p") for i in range(3)]
    assert [f.result(timeout=30) for f in futures] == ["out:0", "out:1", "out:2"]
    assert batcher.stats.splits >= 2


def test_the_decode_gate_holds_decoders_beside_a_running_batch_and_frees_them_while_the_model_waits() -> None:
    from worker.service import DecodeGate

    gate = DecodeGate(while_generating=1, idle=3)
    # The model waits: three decode together (the barrier breaks unless all three are inside at once).
    together = threading.Barrier(3, timeout=10)

    def decode_together() -> None:
        with gate.decoding():
            together.wait()

    threads = [threading.Thread(target=decode_together) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not together.broken and gate.active == 0
    # A batch runs: one decodes beside it, a second waits for it...
    first_in, release_first, second_in = threading.Event(), threading.Event(), threading.Event()
    batch_over = threading.Event()

    def first() -> None:
        with gate.decoding():
            first_in.set()
            release_first.wait(10)

    def second() -> None:
        first_in.wait(10)
        with gate.decoding():
            second_in.set()

    def batch() -> None:
        with gate.generation():
            batch_over.wait(10)

    runner = threading.Thread(target=batch)
    runner.start()
    while not gate.generating:
        time.sleep(0.001)
    helpers = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in helpers:
        t.start()
    assert first_in.wait(10)
    assert not second_in.wait(0.3)  # held while the first decodes beside the batch
    # ... until the batch ends: then it goes at once, while the first is still decoding.
    batch_over.set()
    assert second_in.wait(10) and not release_first.is_set()
    release_first.set()
    for t in (runner, *helpers):
        t.join(10)
    assert gate.active == 0 and not gate.generating
