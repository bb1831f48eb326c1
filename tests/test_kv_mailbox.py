"""The decode replica's KV mailbox over the stream channel (router/kv_mailbox.py)."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from engine.kv_transfer.base import KVTransportKind, create_backend
from engine.kv_transfer.plan import KVEndpoint, KVReservation, KVTransferHeader, KVTransferPlan, PairRendezvous
from engine.kv_transfer.transport import KVReceiver, KVSender
from router.kv_mailbox import ChannelMailbox
from router.stream_channel import StreamChannelError


def test_messages_arrive_in_order_and_only_the_owner_reads():
    async def main():
        mailbox = await ChannelMailbox.create("127.0.0.1")
        remote = pickle.loads(pickle.dumps(mailbox))  # what a prefill replica gets in a plan
        assert remote.address == mailbox.address
        for i in range(50):
            await remote.post(PairRendezvous(pair_id="p", tp_rank=0, info={"i": i}))
        got = [await mailbox.next(2.0) for _ in range(50)]
        assert [m.info["i"] for m in got] == list(range(50))
        assert await mailbox.next(0.05) is None  # nothing more: times out, no error
        with pytest.raises(RuntimeError, match="read only by the replica"):
            await remote.next(0.01)
        await mailbox.close()
    asyncio.run(main())


def test_posting_to_a_closed_mailbox_fails_instead_of_hanging():
    async def main():
        mailbox = await ChannelMailbox.create("127.0.0.1")
        remote = pickle.loads(pickle.dumps(mailbox))
        await mailbox.close()
        with pytest.raises(StreamChannelError):
            await asyncio.wait_for(remote.post("header"), 10)
    asyncio.run(main())


def test_kv_bytes_follow_a_header_sent_through_the_channel():
    """The whole transport with the channel mailbox: rendezvous, header, gloo bytes, arrival."""
    async def main():
        mailbox = await ChannelMailbox.create("127.0.0.1")
        arrivals = []
        receiver = KVReceiver(create_backend(KVTransportKind.GLOO, "cpu"), mailbox, arrivals.append, timeout_s=10)
        reading = asyncio.get_running_loop().create_task(receiver.run(poll_s=0.05))
        sender = KVSender(create_backend(KVTransportKind.GLOO, "cpu"), "prefill-0", timeout_s=10)
        endpoint = KVEndpoint("decode-0", pickle.loads(pickle.dumps(mailbox)))
        kvs = [torch.randn(2, 2, 1, 4, 2, 3) for _ in range(3)]
        for i, kv in enumerate(kvs):
            plan = KVTransferPlan(KVReservation(f"r{i}", f"t{i}", 0, (i,), 4, 20.0), endpoint)
            await sender.send(plan, kv, first_token_id=100 + i)
        while len(arrivals) < 3:
            await asyncio.sleep(0.01)
        assert [a.header.request_id for a in arrivals] == ["r0", "r1", "r2"]
        assert [a.header.first_token_id for a in arrivals] == [100, 101, 102]
        for arrival, kv in zip(arrivals, kvs):
            assert arrival.error is None and torch.equal(arrival.kv, kv)
        assert isinstance(arrivals[0].header, KVTransferHeader)
        sender.close()
        receiver.stop()
        reading.cancel()
        await mailbox.close()
    asyncio.run(main())
