"""Opt-in engine-core process: the ``LLMEngine`` and its step loop in a child process.

In-process, ``AsyncLLM``'s engine thread shares the GIL with the server's threads (Ray
Serve streams each item on a thread of its own): under many streams the engine thread,
back from a device wait, queues for the GIL and every decode step grows. Here the engine
gets a process (and a GIL) of its own; the API process keeps only prompt validation and
the per-request streams::

    API process (ProcessAsyncLLM)                        engine-core process (spawn, engine_core.py)
    generate / abort ──AddMsg/AbortMsg────▶ pipe ──▶ drain commands, LLMEngine.step()
    reader thread ◀──── one StepBatch per step ────── outputs, add errors, abort acks, stats
      └─ fans the outputs into the per-request RequestStreams (AsyncLLM._publish)

    engine = AsyncLLM.from_config(config, engine_process=True)  # replicas: KVMESH_ENGINE_PROCESS=1

Invariants:
- The child owns the ``LLMEngine``; the parent loads only the tokenizer and the model's
  limits, so a bad prompt fails in the caller as in-process, before anything is sent.
- One message per engine step carries that step's outputs of all requests (pickle protocol 5
  over a ``multiprocessing`` pipe); an abort is acknowledged once its blocks are free, with a
  stats snapshot, so ``abort`` and ``get_stats`` mean what they mean in-process.
- The child is started with the "spawn" context (safe under a Ray actor's threads; the
  environment, CUDA_VISIBLE_DEVICES included, passes through unchanged).
- If the child dies or its loop fails, the reader sees the pipe close or the process
  sentinel at once: every open stream ends with ``EngineDeadError`` and ``check_health``
  raises. If the parent dies, the child sees its pipe close and exits.
- Not supported yet: disaggregated serving (``generate_with_remote_prefill``, ``prefill``,
  ``deliver_kv`` need the KV tensors in the API process: ``ValueError``; the prefill and
  decode pools stay in-process) and parallel replicas (their Ray workers are placed from the
  replica actor's context: ``ValueError`` at start).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
from multiprocessing import connection as mp_connection
from typing import Any, Optional

from engine.async_engine import AsyncLLM, EngineDeadError
from engine.async_streams import AbortCommand, AddCommand, name_native_thread, set_result, set_switch_interval
from engine.config import EngineConfig
from engine.executor import resolve_max_model_len
from engine.engine_core import (AbortMsg, AddMsg, Failed, Ready, ShutdownMsg, StepBatch, engine_core_main,
                                recv_message, send_message)
from engine.llm_engine import LLMEngine
from engine.models.spec import ModelSpec
from engine.tiny_model import resolve_model_path
from engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint and profiling the KV cache
SHUTDOWN_TIMEOUT_S = 10.0
NOT_SUPPORTED = "not supported with the engine process yet (AsyncLLM engine_process=True)"


# ---- the parent -----------------------------------------------------------------------------------
class _PromptFrontend:
    """What the API process needs of the engine: its config, tokenizer and prompt checks.

    Validates exactly like ``LLMEngine`` (its methods, on this object's tokenizer and limits).
    """

    tokenize_prompt = LLMEngine.tokenize_prompt
    _validate_prompt = LLMEngine._validate_prompt

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model.model)  # creates kvmesh-tiny before the child
        self.spec = ModelSpec.from_hf_config(self.model_path)
        self.max_model_len = resolve_max_model_len(config, self.spec)
        self.tokenizer = load_tokenizer(config.model.tokenizer or self.model_path)
        self.num_blocks: Optional[int] = None  # the child's, once it is ready


class ProcessAsyncLLM(AsyncLLM):
    """``AsyncLLM`` whose ``LLMEngine`` runs in an engine-core child process.

    Same public API (``generate``, ``abort``, ``get_stats``, ``check_health``, ``shutdown``);
    ``.engine`` is a ``_PromptFrontend``, not an ``LLMEngine``.
    """

    def __init__(self, config: EngineConfig, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        if config.parallel.uses_ray_workers:
            raise ValueError("replicas with Ray workers (tensor/pipeline/expert parallel > 1, or "
                             "distributed_executor_backend: ray) are " + NOT_SUPPORTED)
        set_switch_interval()
        self.engine = _PromptFrontend(config)
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self._streams = {}
        self._dead: Optional[BaseException] = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # _dead vs _pending_aborts
        self._send_lock = threading.Lock()
        self._process_lock = threading.Lock()  # one thread at a time may reap the child (waitpid)
        self._ack_ids = itertools.count()
        self._pending_aborts: dict[int, AbortCommand] = {}
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=engine_core_main, args=(config, child_conn),
                                    name="kvmesh-engine-core", daemon=True)
        self._process.start()
        child_conn.close()  # so the child's death closes the pipe for us
        try:
            ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            self._stop_process()
            raise
        self.engine_pid = ready.pid
        self.engine.num_blocks = ready.num_blocks
        self.engine_cuda_visible_devices = ready.cuda_visible_devices
        self._stats = ready.stats
        self._thread = threading.Thread(target=self._read_loop, name="kvmesh-engread", daemon=True)
        self._thread.start()

    def _wait_ready(self, timeout_s: float) -> Ready:
        ready = mp_connection.wait([self._conn, self._process.sentinel], timeout=timeout_s)
        if not ready:
            raise EngineDeadError(f"engine process did not start within {timeout_s:.0f}s")
        try:
            message = recv_message(self._conn)
        except (EOFError, OSError):
            mp_connection.wait([self._process.sentinel], timeout=5)
            raise EngineDeadError(f"engine process exited at start (exit code {self._exitcode()})")
        if isinstance(message, Failed):
            raise EngineDeadError(message.error)
        assert isinstance(message, Ready), message
        return message

    # ---- not supported yet ---------------------------------------------------------------------
    def generate_with_remote_prefill(self, *args: Any, **kwargs: Any):
        raise ValueError("disaggregated serving (generate_with_remote_prefill) is " + NOT_SUPPORTED)

    async def prefill(self, *args: Any, **kwargs: Any):
        raise ValueError("disaggregated serving (prefill) is " + NOT_SUPPORTED)

    def deliver_kv(self, arrival: Any) -> None:
        raise ValueError("disaggregated serving (deliver_kv) is " + NOT_SUPPORTED)

    # ---- commands ------------------------------------------------------------------------------
    def _submit(self, command: object) -> None:
        if isinstance(command, AddCommand):
            if command.kv_mode is not None:
                raise ValueError("disaggregated serving is " + NOT_SUPPORTED)
            try:
                self._send_or_die(AddMsg(command.request_id, command.prompt, command.params, command.priority,
                                          command.stream_interval, command.max_outputs_per_step))
            except EngineDeadError:
                self._streams.pop(command.request_id, None)
                raise
        elif isinstance(command, AbortCommand):
            with self._lock:
                if self._dead is not None:
                    _resolve_abort(command)
                    return
                ack_id = next(self._ack_ids)
                self._pending_aborts[ack_id] = command
            try:
                self._send_or_die(AbortMsg(command.request_id, ack_id))
            except EngineDeadError:
                with self._lock:
                    self._pending_aborts.pop(ack_id, None)
                _resolve_abort(command)
        else:
            raise TypeError(f"unknown command {type(command).__name__}")

    def _send_or_die(self, message: object) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        try:
            with self._send_lock:
                send_message(self._conn, message)
        except OSError as exc:  # the child is gone; the reader ends the streams
            raise EngineDeadError(f"engine process is gone: {exc!r}") from exc

    # ---- health and lifetime -----------------------------------------------------------------
    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {self._dead!r}")
        exitcode = self._exitcode()
        if exitcode is not None:
            raise EngineDeadError(f"engine process exited (exit code {exitcode})")

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._exitcode() is None

    def _exitcode(self) -> Optional[int]:
        """The child's exit code, None while it runs (reaps it; never two threads at once,
        or one ``waitpid`` steals the other's answer)."""
        with self._process_lock:
            return self._process.exitcode

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self._send_or_die(ShutdownMsg())
        except EngineDeadError:
            pass
        self._stop_process()
        self._thread.join(timeout=SHUTDOWN_TIMEOUT_S)
        self._conn.close()

    def _stop_process(self) -> None:
        sentinel = self._process.sentinel
        if not mp_connection.wait([sentinel], timeout=SHUTDOWN_TIMEOUT_S):
            logger.warning("engine process %s did not stop; terminating it", self._process.pid)
            self._process.terminate()
            if not mp_connection.wait([sentinel], timeout=5):
                self._process.kill()
                mp_connection.wait([sentinel], timeout=5)
        with self._process_lock:
            self._process.join(timeout=5)  # reaps it (no zombie)

    # ---- the reader thread -------------------------------------------------------------------
    def _read_loop(self) -> None:
        name_native_thread(self._thread.name)
        reason = "engine process exited"
        try:
            while True:
                ready = mp_connection.wait([self._conn, self._process.sentinel])
                if self._conn not in ready:  # exited with nothing left to read
                    reason = f"engine process exited (exit code {self._exitcode()})"
                    break
                try:
                    message = recv_message(self._conn)
                except (EOFError, OSError):
                    mp_connection.wait([self._process.sentinel], timeout=1)
                    reason = f"engine process exited (exit code {self._exitcode()})"
                    break
                if isinstance(message, Failed):
                    reason = message.error
                    break
                self._on_batch(message)
        except BaseException as exc:  # noqa: BLE001 - any reader failure ends the streams
            logger.exception("engine process reader died")
            reason = f"engine process reader died: {exc!r}"
        if self._stopping.is_set():
            reason = "engine shut down"
        else:
            logger.error("engine process died: %s", reason)
        self._on_death(reason)

    def _on_batch(self, batch: StepBatch) -> None:
        if batch.stats is not None:  # first: a caller woken by these outputs sees their stats
            self._stats = batch.stats
        for request_id, error in batch.errors:
            self._publish_item(request_id, ValueError(error))
        self._publish(batch.outputs)
        if batch.abort_acks:
            with self._lock:
                done = [self._pending_aborts.pop(ack_id, None) for ack_id in batch.abort_acks]
            for command in done:
                if command is not None:
                    _resolve_abort(command)

    def _on_death(self, reason: str) -> None:
        with self._lock:
            self._dead = EngineDeadError(reason)
            pending, self._pending_aborts = list(self._pending_aborts.values()), {}
        for command in pending:
            _resolve_abort(command)
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError(f"engine loop died: {reason}"))


def _resolve_abort(command: AbortCommand) -> None:
    try:
        command.loop.call_soon_threadsafe(set_result, command.done)
    except RuntimeError:  # the caller's loop is closed
        pass

