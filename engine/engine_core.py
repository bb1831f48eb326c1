"""The engine-core child process of ``ProcessAsyncLLM`` (engine/engine_process.py): the messages
on its pipe, and its step loop (drain commands, step the ``LLMEngine``, send one batch).

    parent -> child: AddMsg, AbortMsg, ShutdownMsg
    child -> parent: Ready (once), then one StepBatch per engine step; Failed if it could not
                     start or its loop died
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Optional

from engine.async_engine import STATS_REFRESH_S
from engine.async_streams import name_native_thread
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # the idle child wakes this often (stats; a closed pipe wakes it at once)


# ---- messages: parent -> child ------------------------------------------------------------------
@dataclass
class AddMsg:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    priority: int
    stream_interval: int
    max_outputs_per_step: Optional[int]


@dataclass
class AbortMsg:
    request_id: str
    ack_id: int


@dataclass
class ShutdownMsg:
    pass


# ---- messages: child -> parent ------------------------------------------------------------------
@dataclass
class Ready:
    pid: int
    num_blocks: int
    stats: EngineStats
    cuda_visible_devices: Optional[str]


@dataclass
class StepBatch:
    """What one loop iteration of the child produced, for all requests."""

    outputs: list[RequestOutput] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (request id, ValueError message)
    abort_acks: list[int] = field(default_factory=list)
    stats: Optional[EngineStats] = None

    def is_empty(self) -> bool:
        return not (self.outputs or self.errors or self.abort_acks or self.stats is not None)


@dataclass
class Failed:
    """The engine could not start, or its loop died."""

    error: str


def send_message(conn: mp_connection.Connection, message: object) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=5))


def recv_message(conn: mp_connection.Connection) -> object:
    return pickle.loads(conn.recv_bytes())


# ---- the child ------------------------------------------------------------------------------------
def engine_core_main(config: EngineConfig, conn: mp_connection.Connection) -> None:
    """Entry point of the engine-core process."""
    name_native_thread("kvmesh-engcore")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - the parent must hear why
        send_message(conn, Failed(f"engine could not start: {exc!r}\n{traceback.format_exc()}"))
        return
    try:
        send_message(conn, Ready(os.getpid(), engine.num_blocks, engine.get_stats(with_block_hashes=True),
                           os.environ.get("CUDA_VISIBLE_DEVICES")))
        EngineCore(engine, conn).run()
    finally:
        engine.shutdown()


class EngineCore:
    """The child's step loop: drain commands, step, send one batch."""

    def __init__(self, engine: LLMEngine, conn: mp_connection.Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.batch = StepBatch()
        self.last_stats = 0.0

    def run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._drain(block=not engine.has_unfinished_requests()):
                    return  # shutdown asked
                if self.batch.abort_acks:
                    self._flush(with_stats=True)  # an abort returns once its blocks are free
                if engine.has_unfinished_requests():
                    self.batch.outputs.extend(engine.step())
                    now = time.monotonic()
                    self._flush(with_stats=(now - self.last_stats > STATS_REFRESH_S
                                            or not engine.has_unfinished_requests()))
                else:
                    self._flush(with_stats=time.monotonic() - self.last_stats > STATS_REFRESH_S)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return  # the parent is gone: nobody to serve
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            logger.exception("engine loop died")
            try:
                send_message(self.conn, Failed(f"engine loop died: {exc!r}"))
            except OSError:
                pass

    def _drain(self, block: bool) -> bool:
        """Handles every waiting command (waits up to IDLE_POLL_S for one if ``block``);
        False once shutdown is asked. A closed pipe raises EOFError."""
        if not self.conn.poll(IDLE_POLL_S if block else 0):
            return True
        while True:
            if not self._handle(recv_message(self.conn)):
                return False
            if not self.conn.poll(0):
                return True

    def _handle(self, message: object) -> bool:
        if isinstance(message, AddMsg):
            try:
                self.engine.add_request(message.request_id, message.prompt, message.params,
                                        priority=message.priority, stream_interval=message.stream_interval,
                                        max_outputs_per_step=message.max_outputs_per_step)
            except ValueError as exc:
                self.batch.errors.append((message.request_id, str(exc)))
        elif isinstance(message, AbortMsg):
            self.batch.outputs.extend(self.engine.abort_request(message.request_id))
            self.batch.abort_acks.append(message.ack_id)
        elif isinstance(message, ShutdownMsg):
            return False
        else:
            raise TypeError(f"unknown engine-core command {type(message).__name__}")
        return True

    def _flush(self, with_stats: bool) -> None:
        if with_stats:
            self.batch.stats = self.engine.get_stats(with_block_hashes=True)
            self.last_stats = time.monotonic()
        if not self.batch.is_empty():
            send_message(self.conn, self.batch)
            self.batch = StepBatch()
