"""The shared-memory step channel (engine/distributed/shm_channel.py, engine/step_channel.py).

What matters, and is asserted:
- every reader of the broadcast ring gets every message, in order, across many wrap-arounds,
  also when the readers are other processes;
- the writer never overwrites a slot a reader has not read: it blocks (here: times out) on a
  slow reader and goes on once that reader reads;
- a message larger than a slot goes through in chunks (the overflow path), in both directions;
- a worker's exception comes back to the executor's end with its traceback text;
- closing the channel unlinks every segment (nothing left in /dev/shm);
- on Ray, a worker killed during a step on the shm path ends the step with ``WorkerDiedError``
  within a few seconds, and no segment leaks; KV export/import go through the channel.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest
import torch

from engine.distributed.shm_channel import Backoff, RingReader, RingWriter, ShmRing
from engine.step_channel import StepChannel, StepMethod, WorkerCallFailed
from engine.worker import Worker


def _segment_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name.lstrip('/')}")


@pytest.fixture
def ring():
    rings = []

    def make(**shape) -> ShmRing:
        rings.append(ShmRing.create(**shape))
        return rings[-1]
    yield make
    for r in rings:
        r.close()
        r.unlink()


def test_every_reader_gets_every_message_in_order_across_wrap_around(ring):
    shared = ring(num_readers=3, num_slots=3, slot_bytes=128)
    writer = RingWriter(shared)
    messages = [{"i": i, "tokens": list(range(i % 7))} for i in range(200)]  # 66 laps of 3 slots
    received: list[list] = [[] for _ in range(3)]

    def read(index: int) -> None:
        reader = RingReader(ShmRing.attach(shared.handle), index)
        for _ in messages:
            received[index].append(reader.read())
        reader.ring.close()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for m in messages:
        writer.write(m)
    for t in threads:
        t.join(timeout=30)
    assert received == [messages] * 3


def test_writer_blocks_on_a_slow_reader_and_never_overwrites(ring):
    shared = ring(num_readers=2, num_slots=2, slot_bytes=64)
    writer = RingWriter(shared, Backoff(spin_s=0, timeout_s=0.2))
    fast, slow = RingReader(shared, 0), RingReader(shared, 1)
    writer.write("a")
    writer.write("b")
    assert (fast.read(), fast.read()) == ("a", "b")
    assert fast.try_read() is RingReader.EMPTY
    with pytest.raises(TimeoutError):  # slot 0 still holds "a" for the slow reader
        writer.write("c")
    assert slow.read() == "a"  # untouched by the blocked write
    writer.write("c")  # slot 0 is free now
    assert [slow.read(), slow.read(), fast.read()] == ["b", "c", "c"]


def test_a_message_larger_than_a_slot_goes_in_chunks(ring):
    shared = ring(num_readers=1, num_slots=2, slot_bytes=1024)
    writer, reader = RingWriter(shared), RingReader(shared, 0)
    big = torch.arange(10_000, dtype=torch.float32)  # 40 kB: ~40 chunks through 2 slots
    done = threading.Thread(target=lambda: [writer.write(big), writer.write("after")])
    done.start()
    got = reader.read()
    assert reader.read() == "after"
    done.join(timeout=10)
    assert torch.equal(got, big)


def _read_in_child(handle, index: int, count: int, queue) -> None:
    reader = RingReader(ShmRing.attach(handle), index)
    queue.put([reader.read() for _ in range(count)])
    reader.ring.close()


def test_readers_in_other_processes(ring):
    shared = ring(num_readers=2, num_slots=4, slot_bytes=256)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    messages = [b"x" * (i * 37 % 1000) for i in range(50)]  # some span several slots
    children = [ctx.Process(target=_read_in_child, args=(shared.handle, i, len(messages), queue))
                for i in range(2)]
    for c in children:
        c.start()
    writer = RingWriter(shared, Backoff(timeout_s=60))
    for m in messages:
        writer.write(m)
    results = [queue.get(timeout=60) for _ in children]
    for c in children:
        c.join(timeout=10)
    assert results == [messages, messages]
    assert _segment_exists(shared.handle.name), "a reader's exit must not unlink the owner's segment"


class _FakeWorker(Worker):
    """The real step loop over a stand-in for the runner calls (no model)."""

    def __init__(self, can_fail: bool) -> None:  # noqa: D107 - none of Worker's set-up
        self.can_fail = can_fail
        self.device = torch.device("cpu")
        self._step_thread = None
        self.calls: list[StepMethod] = []

    def run_step_call(self, call):
        self.calls.append(call.method)
        if call.method is StepMethod.EXECUTE_MODEL:
            if call.args[0] == "boom" and self.can_fail:
                raise ValueError("boom in the runner")
            return call.args[0] * 2
        if call.method is StepMethod.EXPORT_KV:
            return torch.ones(3 << 20, dtype=torch.uint8)  # 3 MiB reply: > one 1 MiB reply slot
        return None


def test_step_channel_round_trip_errors_with_traceback_and_unlink():
    channel = StepChannel(2, spin_s=0.001, poll=lambda: None, write_timeout_s=10)
    names = [channel.calls_ring.handle.name] + [r.handle.name for r in channel.reply_rings]
    workers = [_FakeWorker(can_fail=False), _FakeWorker(can_fail=True)]
    for i, w in enumerate(workers):
        w.start_step_loop(channel.handles(i))
    try:
        assert [r.value for r in channel.gather(channel.send(StepMethod.EXECUTE_MODEL, 21), 10)] == [42, 42]
        channel.send(StepMethod.EXECUTE_MODEL, 1)  # pipelined: two in flight
        second = channel.send(StepMethod.EXECUTE_MODEL, 2)
        assert [r.value for r in channel.gather(second, 10)] == [4, 4]  # the older reply is dropped
        exported = channel.gather(channel.send(StepMethod.EXPORT_KV, [0]), 10)
        assert all(r.value.numel() == 3 << 20 for r in exported)
        with pytest.raises(WorkerCallFailed) as info:
            channel.gather(channel.send(StepMethod.EXECUTE_MODEL, "boom"), 10)
        assert info.value.worker_index == 1 and "ValueError: boom in the runner" in str(info.value)
        assert "Traceback" in info.value.reply.traceback and "run_step_call" in info.value.reply.traceback
        channel.gather(channel.send(StepMethod.SHUTDOWN), 10)
        for w in workers:
            w._step_thread.join(timeout=10)
            assert not w._step_thread.is_alive()
        assert workers[0].calls[-1] is StepMethod.SHUTDOWN
    finally:
        channel.close()
    assert not any(_segment_exists(n) for n in names)


def test_gather_times_out_and_poll_can_end_the_wait():
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a worker died")

    channel = StepChannel(1, spin_s=0, poll=poll, write_timeout_s=1, poll_interval_s=0.05)
    try:
        seq = channel.send(StepMethod.FLUSH)  # nobody reads it
        with pytest.raises(RuntimeError, match="a worker died"):
            channel.gather(seq, timeout_s=30)
        with pytest.raises(TimeoutError):
            channel.gather(seq, timeout_s=0.1, poll=lambda: None)
    finally:
        channel.close()


# ---- on Ray: a worker killed mid-step -------------------------------------------------------------

def _slow_steps(worker) -> None:
    """Runs in a worker actor: every later execute_model takes a minute (a step to die in)."""
    worker.execute_model = lambda scheduler_output: time.sleep(60)


def test_killed_worker_mid_step_on_shm_path_fails_fast_and_leaks_nothing(ray_cluster, tmp_path):
    from engine.config import EngineConfig
    from engine.executor_ray import WorkerDiedError
    from engine.llm_engine import LLMEngine
    from engine.scheduler_output import SchedulerOutput
    from tests.engine_helpers import checkpoint_with_tokenizer

    path = checkpoint_with_tokenizer("llama", tmp_path / "llama")[0]
    engine = LLMEngine(EngineConfig.create(model=path, dtype="float32", device="cpu", block_size=4,
                                           num_blocks=16, max_model_len=64, tensor_parallel_size=2))
    executor = engine.executor
    try:
        channel = executor._channel
        assert channel is not None, "both workers are on this node: the shm channel must be on"
        names = [channel.calls_ring.handle.name] + [r.handle.name for r in channel.reply_rings]
        assert all(_segment_exists(n) for n in names)

        kv = executor.export_kv([0, 1])  # KV export/import through the channel, one tensor per rank
        assert len(kv) == 2
        executor.import_kv([2, 3], [t + 1 for t in kv])
        assert all(torch.equal(a + 1, b) for a, b in zip(kv, executor.export_kv([2, 3])))

        ray_cluster.get([w.__ray_call__.remote(_slow_steps) for w in executor.workers], timeout=60)
        victim = executor.workers[1]
        killed_at = []

        def kill_soon():
            time.sleep(1.0)
            killed_at.append(time.monotonic())
            ray_cluster.kill(victim)
        threading.Thread(target=kill_soon, daemon=True).start()
        with pytest.raises(WorkerDiedError, match="worker"):
            executor.execute_model(SchedulerOutput())
        assert time.monotonic() - killed_at[0] < 5, "the death must be noticed while waiting"
        with pytest.raises(WorkerDiedError):
            executor.check_health()
        assert executor._channel is None
        assert not any(_segment_exists(n) for n in names), "the dead replica's segments must be unlinked"
    finally:
        engine.shutdown()
