"""The step channel: how the executor sends step calls to its workers' step loops on one node.

Messages (plain dataclasses, pickled onto the rings of ``engine/distributed/shm_channel.py``)::

    executor ── StepCall(seq, StepMethod, args) ──▶ broadcast ring (1 writer, N readers)
                                                        │ each worker's step-loop thread
    executor ◀── StepReply(seq, value | error) ──── reply ring per worker (1 writer, 1 reader)

``StepChannel`` is the executor's end (it creates and unlinks every segment); the worker's end
is ``Worker.start_step_loop`` (``engine/worker.py``). No Ray and no torch here: the executor
passes in its liveness check as ``poll``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional

from engine.distributed.shm_channel import Backoff, RingHandle, RingReader, RingWriter, ShmRing

REPLY_SLOT_BYTES = 1 << 20  # replies are small ModelOutputs; KV exports use the chunked path


class StepMethod(enum.Enum):
    """The worker calls that touch the runner, as sent on the step ring."""

    EXECUTE_MODEL = "execute_model"
    EXECUTE_MODEL_PIPELINED = "execute_model_pipelined"
    FLUSH = "flush"
    EXPORT_KV = "export_kv"
    IMPORT_KV = "import_kv"
    SHUTDOWN = "shutdown"  # the step loop ends after replying


@dataclass
class StepCall:
    seq: int  # increasing per executor; the reply carries it back
    method: StepMethod
    args: tuple = ()


@dataclass
class StepReply:
    seq: int
    value: Any = None  # the call's result (a ModelOutput on the output rank, else mostly None)
    error: Optional[str] = None  # "ExcType: message" when the call raised
    traceback: Optional[str] = None  # the worker-side traceback text of that exception


@dataclass(frozen=True)
class StepLoopHandles:
    """What a worker needs to join the step channel (sent once through Ray)."""

    calls: RingHandle  # the broadcast ring, read as reader ``reader_index``
    reader_index: int
    replies: RingHandle  # this worker's reply ring (it writes, the executor reads)
    spin_s: float  # how long a wait spins before it sleeps (Backoff.spin_s)


class WorkerCallFailed(RuntimeError):
    """A worker's step call raised; ``reply.traceback`` is the worker-side traceback."""

    def __init__(self, worker_index: int, reply: StepReply) -> None:
        super().__init__(f"worker {worker_index}: {reply.error}\n{reply.traceback or ''}")
        self.worker_index = worker_index
        self.reply = reply


class StepChannel:
    """The driver's end of the workers' step loops: ``StepCall``s out on one broadcast ring,
    one ``StepReply`` per worker and call back on each worker's own reply ring.

    Replies are matched to calls by ``seq`` (a worker answers calls in order); replies read
    while waiting for a later call, or while a write waits for room, are kept until asked for.
    Any error reply raises ``WorkerCallFailed`` at once (peers may be stuck in a collective).
    """

    def __init__(self, num_workers: int, spin_s: float, poll: Callable[[], None],
                 write_timeout_s: float, reply_slot_bytes: int = REPLY_SLOT_BYTES,
                 poll_interval_s: float = 0.2) -> None:
        """``poll`` runs every ``poll_interval_s`` of any wait (the executor's liveness check;
        it raises to end the wait); a write waiting longer than ``write_timeout_s`` for room
        raises ``TimeoutError``, as does a ``gather`` past its timeout."""
        self.spin_s = spin_s
        self.poll_interval_s = poll_interval_s
        self._poll = poll
        self.calls_ring = ShmRing.create(num_readers=num_workers)
        self.reply_rings: list[ShmRing] = []
        try:
            for _ in range(num_workers):
                self.reply_rings.append(ShmRing.create(num_readers=1, slot_bytes=reply_slot_bytes))
        except BaseException:
            self.close()
            raise
        self._writer = RingWriter(self.calls_ring, self._backoff(write_timeout_s, self._drain_and_poll))
        self._readers = [RingReader(ring, 0) for ring in self.reply_rings]
        self._next_seq = 0
        self._replies: list[dict[int, StepReply]] = [{} for _ in range(num_workers)]

    def handles(self, worker_index: int) -> StepLoopHandles:
        return StepLoopHandles(self.calls_ring.handle, worker_index,
                               self.reply_rings[worker_index].handle, self.spin_s)

    def send(self, method: StepMethod, *args: Any) -> int:
        """Broadcasts the call; its seq (for ``gather``). Blocks only while the ring is full."""
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._writer.write(StepCall(seq, method, args))
        return seq

    def gather(self, seq: int, timeout_s: float,
               poll: Optional[Callable[[], None]] = None) -> list[StepReply]:
        """Every worker's reply to call ``seq``, in worker order (older unclaimed ones are dropped).

        ``poll`` replaces the channel's liveness poll for this wait (e.g. a no-op at shutdown)."""
        wait = self._backoff(timeout_s, poll or self._poll).waiter()
        while True:
            self._drain()
            if all(seq in replies for replies in self._replies):
                break
            wait.pause()
        out = [replies.pop(seq) for replies in self._replies]
        for replies in self._replies:
            for old in [s for s in replies if s < seq]:
                del replies[old]
        return out

    def close(self) -> None:
        for ring in [self.calls_ring, *self.reply_rings]:
            ring.close()
            ring.unlink()

    def _drain(self) -> None:
        for index, reader in enumerate(self._readers):
            while (reply := reader.try_read()) is not RingReader.EMPTY:
                if reply.error is not None:
                    raise WorkerCallFailed(index, reply)
                self._replies[index][reply.seq] = reply

    def _drain_and_poll(self) -> None:
        self._drain()  # workers blocked on a full reply ring must not wait for our blocked write
        self._poll()

    def _backoff(self, timeout_s: float, poll: Callable[[], None]) -> Backoff:
        return Backoff(spin_s=self.spin_s, poll=poll, poll_interval_s=self.poll_interval_s, timeout_s=timeout_s)
