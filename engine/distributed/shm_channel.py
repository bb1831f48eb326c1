"""A single-writer, multi-reader broadcast ring in POSIX shared memory (same node only).

The Ray executor uses one ring to send every step call to its workers (one writer, N readers)
and one ring per worker for the reply (one writer, one reader), instead of one Ray actor call
per worker per step. Messages are pickled objects (protocol 5); a message larger than a slot
is split into chunks over consecutive slots (the overflow path), so any size goes through,
the writer waiting for readers to drain slots as it goes.

Layout of one segment (``num_slots`` slots, each ``slot_stride`` bytes)::

    slot 0                                                         slot 1 ...
    +---------+-----------+-----+-----------+--------+---------+----------------------+----
    | written | read[0]   | ... | read[R-1] | pad->8 | nbytes  | is_last | payload ... |
    |  u8     |  u8       |     |  u8       |        | u32 LE  |  u8     | slot_bytes  |
    +---------+-----------+-----+-----------+--------+---------+----------------------+----
    ^ flags: one byte each, so a store is never torn       ^ header_len

Protocol (each flag byte has one writer at a time):

* writer, for the next slot ``i`` (round robin): wait until ``written == 0`` or every
  ``read[r] == 1`` (all readers are done with it); then ``written = 0``, all ``read[r] = 0``,
  payload and header, and last ``written = 1``;
* reader ``r``, for its next slot ``i``: wait until ``read[r] == 0`` and then ``written == 1``
  (checked in that order: seeing ``read[r] == 0`` means the writer's ``written = 0`` came
  before, so a later ``written == 1`` is the new message, never the old one); copy the payload
  out, then ``read[r] = 1``.

Memory ordering: stores become visible in program order and loads are not reordered with
other loads on x86 (TSO), and CPython performs each flag store/load as a plain one-byte
memory access in statement order, so "payload before flag" holds without fences. On weakly
ordered CPUs (ARM) this would need barriers; the executor only uses the ring between
processes of one node, and we run on x86 hosts.

Waiting: spin (``time.sleep(0)``, which releases the GIL) for ``spin_s``, then sleep with a
doubling interval up to ``max_sleep_s`` (~1 ms), so an idle box is not pegged while a busy
GPU host (spin covering a step) sees tens of microseconds of latency. Waits take an optional
``timeout_s`` and a ``poll`` callback run every ``poll_interval_s`` (the executor checks
worker liveness there; it may raise to end the wait).

The creator owns the segment and must ``unlink`` it; attaching processes only ``close``.
No Ray and no torch here.
"""

from __future__ import annotations

import pickle
import mmap
import os
import struct
import sys
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Callable, Optional

DEFAULT_NUM_SLOTS = 4
DEFAULT_SLOT_BYTES = 4 << 20  # 4 MiB: a SchedulerOutput of thousands of requests fits one slot
_CHUNK_HEADER = struct.Struct("<IB")  # payload bytes in this slot, 1 if the message's last chunk


@dataclass(frozen=True)
class RingHandle:
    """What another process needs to attach to a ring (picklable, sent through Ray once)."""

    name: str  # the shared-memory segment, chosen by the OS (no hard-coded names)
    num_readers: int
    num_slots: int
    slot_bytes: int  # payload capacity of one slot


@dataclass
class Backoff:
    """Spin, then sleep with a doubling interval: latency when busy, little CPU when idle."""

    spin_s: float = 0.0005
    first_sleep_s: float = 0.00002
    max_sleep_s: float = 0.001
    poll: Optional[Callable[[], None]] = None  # liveness check; may raise to end the wait
    poll_interval_s: float = 0.2
    timeout_s: Optional[float] = None  # None: wait forever

    def waiter(self) -> "_Wait":
        return _Wait(self)


class _Wait:
    """One wait under a ``Backoff``: call ``pause()`` each time the condition is still false."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.start = self.next_poll = time.monotonic()
        self.next_poll += backoff.poll_interval_s
        self.sleep_s = backoff.first_sleep_s

    def pause(self) -> None:
        now = time.monotonic()
        b = self.backoff
        if b.poll is not None and now >= self.next_poll:
            self.next_poll = now + b.poll_interval_s
            b.poll()
        if b.timeout_s is not None and now - self.start > b.timeout_s:
            raise TimeoutError(f"no progress on the shared-memory ring within {b.timeout_s:.1f}s")
        if now - self.start < b.spin_s:
            time.sleep(0)  # yields the GIL and the core
            return
        time.sleep(self.sleep_s)
        self.sleep_s = min(self.sleep_s * 2, b.max_sleep_s)


class ShmRing:
    """The shared segment and its slot layout; ``create`` in the owner, ``attach`` elsewhere."""

    def __init__(self, shm: "shared_memory.SharedMemory | _AttachedSegment", handle: RingHandle,
                 is_owner: bool) -> None:
        self.shm = shm
        self.handle = handle
        self.is_owner = is_owner
        self.chunk_header_offset = _align8(1 + handle.num_readers)  # within a slot
        self.header_len = self.chunk_header_offset + _align8(_CHUNK_HEADER.size)
        self.slot_stride = self.header_len + handle.slot_bytes

    @classmethod
    def create(cls, num_readers: int, num_slots: int = DEFAULT_NUM_SLOTS,
               slot_bytes: int = DEFAULT_SLOT_BYTES) -> "ShmRing":
        if num_readers < 1 or num_slots < 2 or slot_bytes < 64:
            raise ValueError(f"bad ring shape: num_readers={num_readers} (>= 1), "
                             f"num_slots={num_slots} (>= 2), slot_bytes={slot_bytes} (>= 64)")
        stride = _align8(1 + num_readers) + _align8(_CHUNK_HEADER.size) + slot_bytes
        shm = shared_memory.SharedMemory(create=True, size=num_slots * stride)  # zeroed: all unwritten
        return cls(shm, RingHandle(shm.name, num_readers, num_slots, slot_bytes), is_owner=True)

    @classmethod
    def attach(cls, handle: RingHandle) -> "ShmRing":
        # Not through SharedMemory(name=...): before Python 3.13 that registers the segment with
        # this process's resource tracker, which unlinks it when this process exits (and a
        # spawned child shares its parent's tracker); the owner alone unlinks it.
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(name=handle.name, track=False)
        else:
            shm = _AttachedSegment(handle.name)
        return cls(shm, handle, is_owner=False)

    def slot_offset(self, index: int) -> int:
        return index * self.slot_stride

    def close(self) -> None:
        """Unmaps the segment in this process (every process; the owner then unlinks)."""
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with the process
            pass

    def unlink(self) -> None:
        """Owner only: removes the segment from /dev/shm (idempotent)."""
        if self.is_owner:
            self.is_owner = False
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class RingWriter:
    """The one writer of a ring. ``write`` blocks (under ``backoff``) while the next slot is unread."""

    def __init__(self, ring: ShmRing, backoff: Optional[Backoff] = None) -> None:
        self.ring = ring
        self.backoff = backoff or Backoff()
        self._next_slot = 0

    def write(self, obj: Any) -> None:
        data = memoryview(pickle.dumps(obj, protocol=5))
        capacity = self.ring.handle.slot_bytes
        start = 0
        while True:  # one chunk per slot; a message that fits is one chunk
            chunk = data[start:start + capacity]
            start += len(chunk)
            self._write_chunk(chunk, is_last=start >= len(data))
            if start >= len(data):
                return

    def _write_chunk(self, chunk: memoryview, is_last: bool) -> None:
        ring, buf = self.ring, self.ring.shm.buf
        base = ring.slot_offset(self._next_slot)
        num_readers = ring.handle.num_readers
        wait = None
        while buf[base] == 1 and any(buf[base + 1 + r] == 0 for r in range(num_readers)):
            wait = wait or self.backoff.waiter()
            wait.pause()
        buf[base] = 0
        buf[base + 1:base + 1 + num_readers] = bytes(num_readers)
        payload = base + ring.header_len
        buf[payload:payload + len(chunk)] = chunk
        _CHUNK_HEADER.pack_into(buf, base + ring.chunk_header_offset, len(chunk), int(is_last))
        buf[base] = 1  # publish: after the payload and header (see the module doc on ordering)
        self._next_slot = (self._next_slot + 1) % ring.handle.num_slots


class RingReader:
    """Reader ``reader_index`` of a ring: ``read`` blocks for the next message, ``try_read`` doesn't."""

    EMPTY = object()  # try_read's "no complete message yet"

    def __init__(self, ring: ShmRing, reader_index: int, backoff: Optional[Backoff] = None) -> None:
        if not 0 <= reader_index < ring.handle.num_readers:
            raise ValueError(f"reader_index {reader_index} not in [0, {ring.handle.num_readers})")
        self.ring = ring
        self.reader_index = reader_index
        self.backoff = backoff or Backoff()
        self._next_slot = 0
        self._chunks: list[bytes] = []  # a message's chunks read so far (overflow path)

    def read(self) -> Any:
        wait = None
        while True:
            obj = self.try_read()
            if obj is not RingReader.EMPTY:
                return obj
            wait = wait or self.backoff.waiter()
            wait.pause()

    def try_read(self) -> Any:
        """The next message if all of it has arrived, else ``RingReader.EMPTY`` (never blocks)."""
        ring, buf = self.ring, self.ring.shm.buf
        while True:
            base = ring.slot_offset(self._next_slot)
            flag = base + 1 + self.reader_index
            if buf[flag] != 0 or buf[base] != 1:  # this order: see the module doc
                return RingReader.EMPTY
            nbytes, is_last = _CHUNK_HEADER.unpack_from(buf, base + ring.chunk_header_offset)
            payload = base + ring.header_len
            obj = RingReader.EMPTY
            try:
                if is_last and not self._chunks:  # the common case: one slot, unpickled in place
                    with buf[payload:payload + nbytes] as view:
                        obj = pickle.loads(view)  # copies into new objects; the slot is free after
                else:
                    self._chunks.append(bytes(buf[payload:payload + nbytes]))
                    if is_last:
                        chunks, self._chunks = self._chunks, []
                        obj = pickle.loads(b"".join(chunks))
            finally:  # the slot is consumed even if unpickling failed (that error is raised)
                buf[flag] = 1
                self._next_slot = (self._next_slot + 1) % ring.handle.num_slots
            if obj is not RingReader.EMPTY:
                return obj


class _AttachedSegment:
    """An existing segment mapped without the resource tracker (what ``track=False`` does in 3.13)."""

    def __init__(self, name: str) -> None:
        import _posixshmem  # the module SharedMemory itself opens segments with

        fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDWR, mode=0o600)
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.name = name
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()


def _align8(n: int) -> int:
    return (n + 7) & ~7
