"""KV transfer on CPU: staging layout, gloo pairs through a mailbox, and the engine hooks.

Two in-process engines (kvmesh-tiny, fp32) play the prefill and decode replicas:
the decode engine reserves blocks under a lease, the prefill engine computes the
prompt and exports its KV, the KV crosses a gloo pair (or is handed over), and
the decode engine continues. Greedy (and seeded) output must equal the
colocated engine's token for token; leases that expire or transfers that fail
end the request with the same tokens (recompute) or a clear error (fail), and
no block leaks on either side.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kv_transfer.base import KVTransferError, KVTransportKind, create_backend
from engine.attention.base import allocate_kv_cache, copy_blocks, stacked_kv
from engine.kv_transfer.blocks import gather_blocks, scatter_blocks
from engine.kv_transfer.mailbox import LocalMailbox
from engine.kv_transfer.plan import (KVArrival, KVEndpoint, KVTransferHeader, KVTransferPlan,
                                     TransferFailurePolicy)
from engine.kv_transfer.transport import KVReceiver, KVSender
from engine.request import RequestStatus
from tests.engine_helpers import assert_no_leaks, gloo_connector_pair
from tests.polling import wait_for_async

BLOCK = 8
ENGINE_KW = dict(model="kvmesh-tiny", dtype="float32", device="cpu", block_size=BLOCK, num_blocks=64,
                 max_model_len=256, max_num_batched_tokens=32)  # 32: prompts are chunked
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=11)


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def engines():
    """(colocated, prefill, decode) engines of the same model."""
    return LLM(**ENGINE_KW), LLM(**ENGINE_KW), LLM(**ENGINE_KW)


def run(engine, until) -> list:
    outputs = []
    for _ in range(500):
        if until():
            return outputs
        outputs += engine.step()
    raise AssertionError("engine did not finish")


def disaggregated(prefill, decode, request_id, prompt, params, *, deliver=True, lease_s=30.0,
                  on_failure=TransferFailurePolicy.RECOMPUTE, endpoint=None):
    """One request through the engine hooks, KV handed over in memory; returns (outputs, reservation)."""
    pe, de = prefill.engine, decode.engine
    reservation = de.add_remote_prefill_request(request_id, prompt, params, lease_s, 1, on_failure)
    assert reservation is not None
    plan = KVTransferPlan(reservation, endpoint or KVEndpoint("decode-0", None))
    pe.add_prefill_request(request_id, prompt, params, plan)
    first = run(pe, lambda: not pe.has_unfinished_requests())
    exports = pe.take_kv_exports()
    assert len(exports) == 1 and first[-1].outputs[0].token_ids == [exports[0].first_token_id]
    assert not first[-1].finished
    export = exports[0]
    outputs = []
    if deliver:
        header = KVTransferHeader(request_id, reservation.transfer_id, "mem", 0, tuple(export.kv.shape),
                                  "float32", export.first_token_id, export.first_token_logprobs)
        outputs += de.import_remote_kv(KVArrival(header, kv=export.kv.clone(), num_bytes=1))
    outputs += run(de, lambda: not de.has_unfinished_requests() and not de.scheduler.remote_kv.leases)
    return first + outputs, reservation


# ---- staging layout ---------------------------------------------------------------------------
def test_gather_scatter_round_trip():
    caches = [torch.randn(2, 10, 4, 2, 3) for _ in range(3)]
    kv = gather_blocks(caches, [7, 2, 5])
    assert kv.shape == (3, 2, 3, 4, 2, 3) and kv.is_contiguous()
    assert torch.equal(kv[1, :, 0], caches[1][:, 7])
    other = [torch.zeros_like(c) for c in caches]
    scatter_blocks(other, [0, 1, 9], kv)
    assert torch.equal(other[2][:, 9], caches[2][:, 5]) and torch.equal(other[0][:, 1], caches[0][:, 2])
    with pytest.raises(ValueError, match="does not fit"):
        scatter_blocks(other, [0, 1], kv)


def test_stacked_caches_move_blocks_like_per_layer_ones():
    """allocate_kv_cache's layers are views of one tensor; gather, scatter and copy-on-write take
    one launch over all of them and must move exactly what the per-layer path moves."""
    stacked = allocate_kv_cache(3, 10, 4, 2, 3, torch.float32, torch.device("cpu"))
    assert stacked_kv(stacked) is not None and len(stacked) == 3
    torch.manual_seed(0)
    for cache in stacked:
        cache.copy_(torch.randn_like(cache))  # through the views: the stacked tensor sees it
    plain = [cache.clone() for cache in stacked]
    assert stacked_kv(plain) is None
    assert torch.equal(gather_blocks(stacked, [7, 2, 5]), gather_blocks(plain, [7, 2, 5]))
    kv = torch.randn(3, 2, 2, 4, 2, 3)
    scatter_blocks(stacked, [9, 0], kv)
    scatter_blocks(plain, [9, 0], kv)
    copy_blocks(stacked, [(9, 1), (3, 4)])
    copy_blocks(plain, [(9, 1), (3, 4)])
    for a, b in zip(stacked, plain):
        assert torch.equal(a, b)
    assert torch.equal(stacked[2][:, 1], kv[2, :, 0])  # the copy saw the scattered block
    assert stacked[1].data_ptr() == stacked.stacked[1].data_ptr()  # still views, nothing rebound
    with pytest.raises(ValueError, match="does not fit"):
        scatter_blocks(stacked, [0], kv)


# ---- the engine hooks, KV handed over in memory ----------------------------------------------
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_disaggregated_equals_colocated(engines, params):
    colocated, prefill, decode = engines
    batch = prompts([5, 8, 29, 40], seed=3)
    expected = [o.outputs[0].token_ids for o in colocated.generate(batch, params)]
    for i, prompt in enumerate(batch):
        outputs, _ = disaggregated(prefill, decode, f"eq-{params.temperature}-{i}", prompt, params)
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert outputs[-1].outputs[0].token_ids == expected[i]
        assert outputs[-1].metrics.kv_transfer_bytes == 1
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_prefix_hits_on_both_sides(engines):
    colocated, prefill, decode = engines
    shared = prompts([4 * BLOCK], seed=9)[0]
    a, b = shared + [11, 12, 13], shared + [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    expected = [o.outputs[0].token_ids for o in colocated.generate([a, b], GREEDY)]
    out_a, res_a = disaggregated(prefill, decode, "px-a", a, GREEDY)
    hits_before = prefill.engine.scheduler.kv_cache_manager.prefix_cache_hits
    out_b, res_b = disaggregated(prefill, decode, "px-b", b, GREEDY)
    # The decode side had the shared blocks: only the rest was reserved and sent.
    assert res_a.first_block_index == 0 and res_b.first_block_index == 4
    assert res_b.num_blocks == decode.engine.scheduler.kv_cache_manager.num_blocks_for(len(b)) - 4
    # The prefill side found the shared prefix in its own cache.
    assert prefill.engine.scheduler.kv_cache_manager.prefix_cache_hits - hits_before == 4 * BLOCK
    assert out_b[0].num_cached_tokens == 4 * BLOCK
    assert [out_a[-1].outputs[0].token_ids, out_b[-1].outputs[0].token_ids] == expected
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_lease_expiry_recompute_gives_same_tokens(engines):
    colocated, prefill, decode = engines
    prompt = prompts([21], seed=5)[0]
    expected = colocated.generate([prompt], GREEDY)[0].outputs[0].token_ids
    de = decode.engine
    reservation = de.add_remote_prefill_request("lease-r", prompt, GREEDY, 0.0, 1,
                                                TransferFailurePolicy.RECOMPUTE)
    assert de.scheduler.get_request("lease-r").status is RequestStatus.WAITING_FOR_KV
    de.scheduler.check_invariants()
    assert de.expire_kv_leases() == [] and de.num_kv_recomputes >= 1
    outputs = run(de, lambda: not de.has_unfinished_requests())
    assert outputs[-1].outputs[0].token_ids == expected
    # A late arrival for the expired lease is dropped without touching any block.
    header = KVTransferHeader("lease-r", reservation.transfer_id, "mem", 0, (1,), "float32", 0)
    assert de.import_remote_kv(KVArrival(header, kv=torch.zeros(1))) == []
    assert_no_leaks(decode)


def test_lease_expiry_fail_gives_clear_error(engines):
    _, _, decode = engines
    de = decode.engine
    de.add_remote_prefill_request("lease-f", prompts([30])[0], GREEDY, 0.0, 1, TransferFailurePolicy.FAIL)
    (out,) = de.expire_kv_leases()
    assert out.finished and out.outputs[0].finish_reason == "error"
    assert "did not arrive from the prefill replica within the lease" in out.error
    assert_no_leaks(decode)


def test_failed_arrival_and_abort_free_the_blocks(engines):
    _, _, decode = engines
    de = decode.engine
    res = de.add_remote_prefill_request("bad", prompts([30])[0], GREEDY, 30.0, 1, TransferFailurePolicy.FAIL)
    header = KVTransferHeader("bad", res.transfer_id, "mem", 0, (1,), "float32", 0)
    (out,) = de.import_remote_kv(KVArrival(header, error="peer died"))
    assert "KV transfer failed: peer died" in out.error
    de.add_remote_prefill_request("gone", prompts([30])[0], GREEDY, 30.0, 1)
    de.abort_request("gone")
    assert_no_leaks(decode)


def test_short_uncached_part_and_n_gt_1_run_locally(engines):
    _, _, decode = engines
    de = decode.engine
    assert de.add_remote_prefill_request("short", [5, 6, 7], GREEDY, 30.0, 16) is None
    n2 = SamplingParams(temperature=0.0, max_tokens=3, n=2)
    assert de.add_remote_prefill_request("n2", prompts([30])[0], n2, 30.0, 1) is None
    run(de, lambda: not de.has_unfinished_requests())
    assert_no_leaks(decode)


def test_first_token_that_stops_exports_nothing(engines):
    _, prefill, decode = engines
    params = SamplingParams(temperature=0.0, max_tokens=1)
    reservation = decode.engine.add_remote_prefill_request("one", prompts([20])[0], params, 30.0)
    pe = prefill.engine
    pe.add_prefill_request("one", prompts([20])[0], params, KVTransferPlan(reservation, KVEndpoint("d", None)))
    outputs = run(pe, lambda: not pe.has_unfinished_requests())
    assert outputs[-1].finished and pe.take_kv_exports() == [] and not pe._export_plans
    decode.engine.abort_request("one")  # what the router does when prefill finished the request
    assert_no_leaks(prefill)
    assert_no_leaks(decode)


def test_reservation_must_match_the_prompt(engines):
    _, prefill, decode = engines
    reservation = decode.engine.add_remote_prefill_request("mm", prompts([20])[0], GREEDY, 30.0)
    with pytest.raises(ValueError, match="does not match this prompt"):
        prefill.engine.add_prefill_request("mm", prompts([40])[0], GREEDY,
                                           KVTransferPlan(reservation, KVEndpoint("d", None)))
    decode.engine.abort_request("mm")
    assert_no_leaks(decode)


# ---- gloo pairs through a mailbox ----------------------------------------------------------------
def test_gloo_sender_receiver_reuse_one_pair_and_keep_order():
    async def main():
        mailbox = LocalMailbox()
        arrivals: list[KVArrival] = []
        receiver = KVReceiver(create_backend(KVTransportKind.GLOO, "cpu"), mailbox, arrivals.append, timeout_s=10)
        sender = KVSender(create_backend(KVTransportKind.GLOO, "cpu"), "prefill-0", timeout_s=10)
        task = asyncio.get_running_loop().create_task(receiver.run(poll_s=0.1))
        endpoint = KVEndpoint("decode-0", mailbox)
        tensors = [torch.randn(2, 2, n, 4, 2, 3, dtype=dt) for n, dt in
                   [(1, torch.float32), (3, torch.bfloat16), (2, torch.float16)]]
        for i, kv in enumerate(tensors):
            await sender.send(_plan(f"r{i}", endpoint), kv, first_token_id=100 + i)
        await wait_for_async(lambda: len(arrivals) == 3, timeout_s=5)
        receiver.stop()
        task.cancel()
        sender.close()
        return arrivals, sender, receiver

    arrivals, sender, receiver = asyncio.run(main())
    assert [a.header.request_id for a in arrivals] == ["r0", "r1", "r2"]
    assert all(a.error is None for a in arrivals)
    assert arrivals[1].kv.dtype == torch.bfloat16 and arrivals[2].header.first_token_id == 102
    assert len({a.header.pair_id for a in arrivals}) == 1  # one pair, created once, reused
    assert sender.stats.num_transfers == receiver.stats.num_transfers == 3
    assert receiver.stats.num_bytes == sum(a.num_bytes for a in arrivals) > 0


def test_gloo_receiver_reports_a_dead_sender():
    async def main():
        mailbox = LocalMailbox()
        arrivals: list[KVArrival] = []
        receiver = KVReceiver(create_backend(KVTransportKind.GLOO, "cpu"), mailbox, arrivals.append, timeout_s=5)
        sender = KVSender(create_backend(KVTransportKind.GLOO, "cpu"), "prefill-0", timeout_s=5)
        sender.stall_s = 30.0  # header posted, bytes never sent
        task = asyncio.get_running_loop().create_task(receiver.run(poll_s=0.1))
        send = asyncio.get_running_loop().create_task(
            sender.send(_plan("r0", KVEndpoint("decode-0", mailbox)), torch.ones(2, 2, 1, 4, 2, 3), 1))
        await asyncio.sleep(1.0)
        send.cancel()  # the sender "dies" mid-transfer: its pair is closed
        await wait_for_async(lambda: arrivals, timeout_s=10)
        receiver.stop()
        task.cancel()
        return arrivals

    (arrival,) = asyncio.run(main())
    assert arrival.kv is None and "receiving the KV failed" in arrival.error


def test_nccl_backend_needs_cuda():
    with pytest.raises((ValueError, KVTransferError)):
        create_backend(KVTransportKind.NCCL, torch.device("cpu"))


def _plan(request_id: str, endpoint: KVEndpoint) -> KVTransferPlan:
    from engine.kv_transfer.plan import KVReservation
    return KVTransferPlan(KVReservation(request_id, f"t-{request_id}", 0, (0,), 8, 30.0), endpoint)


# ---- two async engines and the connectors (what the replicas run) -------------------------------
def test_connectors_over_gloo_equal_colocated(engines):
    from engine import EngineConfig

    colocated = engines[0]
    batch = prompts([6, 25, 40], seed=21)
    expected = [o.outputs[0].token_ids for o in colocated.generate(batch, GREEDY)]
    config = EngineConfig.create(**ENGINE_KW)

    async def one(prefill, decode, request_id, prompt):
        stream = decode.generate(prompt, GREEDY, request_id, lease_timeout_s=30.0)
        plan = await stream.__anext__()
        assert plan is not None and plan.endpoint is decode.endpoint
        first, timings = await prefill.prefill(prompt, GREEDY, request_id, plan)
        assert len(first.outputs[0].token_ids) == 1 and timings.prefill_s > 0
        outputs = [first] + [out async for out in stream]
        return outputs

    async def main():
        async with gloo_connector_pair(config) as (prefill, decode):
            results = await asyncio.gather(*(one(prefill, decode, f"c{i}", p) for i, p in enumerate(batch)))
            while prefill.num_sends_in_flight:
                await asyncio.sleep(0.01)
            return results, prefill.engine, decode.engine, prefill, decode

    results, p_engine, d_engine, prefill, decode = asyncio.run(main())
    for outputs, want in zip(results, expected):
        assert outputs[-1].outputs[0].token_ids == want
        assert outputs[-1].metrics.kv_transfer_bytes > 0
    assert prefill.sender.stats.num_transfers == 3 == decode.receiver.stats.num_transfers
    for engine in (p_engine, d_engine):
        engine.shutdown()
        assert_no_leaks(engine.engine)


def test_deferred_plan_parks_the_kv_until_the_plan_comes(engines):
    """overlap_prefill's engine side: the prefill runs with no plan and parks every prompt block;
    the plan, delivered after, sends only the blocks the decode side lacks (here it has 3 of a
    shared prefix cached). A plan that never comes leaves nothing parked after the timeout."""
    from engine import EngineConfig
    from engine.kv_transfer.plan import DeferredPlan

    colocated = engines[0]
    shared = prompts([30], seed=31)[0]
    batch = [shared + [7, 8], shared[:27] + [9, 10, 11, 12]]  # the second hits 3 cached blocks of 8
    expected = [o.outputs[0].token_ids for o in colocated.generate(batch, GREEDY)]
    config = EngineConfig.create(**ENGINE_KW)

    async def one(prefill, decode, request_id, prompt, deliver=True):
        stream = decode.generate(prompt, GREEDY, request_id, lease_timeout_s=2.0)
        first, _ = await prefill.prefill(prompt, GREEDY, request_id, DeferredPlan(request_id))  # meanwhile
        plan = await stream.__anext__()
        assert prefill.num_parked == 1
        if deliver:
            assert prefill.deliver_plan(plan)
        return plan, [first] + [out async for out in stream]

    async def main():
        async with gloo_connector_pair(config) as (prefill, decode):
            plan0, out0 = await one(prefill, decode, "d0", batch[0])
            plan1, out1 = await one(prefill, decode, "d1", batch[1])
            assert plan0.reservation.first_block_index == 0 and plan1.reservation.first_block_index == 3
            prefill.timeout_s = 0.2  # the next parked KV is dropped if no plan comes in time
            _, out2 = await one(prefill, decode, "d2", batch[0], deliver=False)  # lease ends: recomputed
            await asyncio.sleep(0.3)
            prefill.drop_expired()
            assert prefill.num_parked == 0 and not prefill.deliver_plan(plan0)
            while prefill.num_sends_in_flight:
                await asyncio.sleep(0.01)
            return (out0, out1, out2), prefill, decode

    outs, prefill, decode = asyncio.run(main())
    for outputs, want in zip(outs, expected + expected[:1]):
        assert outputs[-1].outputs[0].token_ids == want
    assert outs[0][-1].metrics.kv_transfer_bytes > outs[1][-1].metrics.kv_transfer_bytes > 0  # 3 blocks fewer
    assert not outs[2][-1].metrics.kv_transfer_bytes  # the lease expired: computed on the decode side
    assert prefill.sender.stats.num_transfers == 2 == decode.receiver.stats.num_transfers
    for engine in (prefill.engine, decode.engine):
        engine.shutdown()
        assert_no_leaks(engine.engine)
