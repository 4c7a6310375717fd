"""P2P's rules without a GPU: two ranks in one process over a fake transport.

What NCCL needs and CPU tests can still hold: on CUDA every transfer goes through one
``batch_isend_irecv`` (a lone isend would use another communicator than its receive);
headers never enter the data channel's order; a sent buffer stays referenced until its
work completes; a receive is waited for (and unpacked) only where it is read.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pipegrid.pipe.p2p import P2P, Incoming, MessageMeta, Outgoing


@dataclass
class FakeOp:
    op: Any
    tensor: torch.Tensor
    peer: int
    group: Any = None
    tag: int = 0


class FakeWork:
    def __init__(self, finish=None) -> None:
        self.finish, self.waited = finish, 0

    def wait(self) -> bool:
        self.waited += 1
        if self.finish is not None:
            self.finish()
            self.finish = None
        return True

    def is_completed(self) -> bool:
        return self.finish is None


class FakeNet:
    """FIFO channels keyed (src, dst, group, tag); ``rank`` is whoever calls next."""

    def __init__(self) -> None:
        self.channels: dict[tuple, deque] = defaultdict(deque)
        self.batches: list[list[str]] = []
        self.rank = 0

    def isend(self, tensor, dst, group=None, tag=0):
        self.channels[(self.rank, dst, group, tag)].append(tensor.clone())
        return FakeWork()

    def irecv(self, tensor, src, group=None, tag=0):
        key = (src, self.rank, group, tag)

        def finish() -> None:
            assert self.channels[key], f"receive on {key} before its send: it would block forever"
            tensor.copy_(self.channels[key].popleft())
        return FakeWork(finish)

    def recv(self, tensor, src, group=None, tag=0):
        self.irecv(tensor, src, group, tag).wait()

    def batch_isend_irecv(self, ops):
        self.batches.append([op.op.__name__ for op in ops])
        return [op.op(op.tensor, op.peer, group=op.group, tag=op.tag) for op in ops]


@pytest.fixture
def net(monkeypatch):
    fake = FakeNet()
    for name in ("isend", "irecv", "recv", "batch_isend_irecv"):
        monkeypatch.setattr(dist, name, getattr(fake, name))
    monkeypatch.setattr(dist, "P2POp", FakeOp)
    return fake


def _as(net: FakeNet, rank: int, p2p: P2P, *args):
    net.rank = rank
    return p2p.post(*args)


def test_a_group_moves_together_and_receives_unpack_where_read(net):
    left, right = P2P(torch.device("cpu"), rank=0), P2P(torch.device("cpu"), rank=1)
    hidden, mask = torch.randn(2, 3, 4), torch.rand(2, 3) > 0.5
    activation = (hidden.clone().requires_grad_(),)
    # rank 1 first posts its receive (and a send of an earlier gradient) as one group
    _as(net, 0, left, [Outgoing("act", 0, (hidden, mask), True, 1)], [])
    [got] = _as(net, 1, right, [], [Incoming("act", 0, 0)])
    (received_hidden, received_mask), was_tuple = got.wait()
    assert was_tuple and torch.equal(received_hidden, hidden) and torch.equal(received_mask, mask)
    assert got.wait()[0][0] is received_hidden  # unpacked once
    grad = torch.randn(2, 3, 4)
    [pending] = _as(net, 0, left, [], [Incoming("grad", 0, 1, activation + (mask,))])  # posted early...
    _as(net, 1, right, [Outgoing("grad", 1, (grad,), True, 0)], [])
    assert torch.equal(pending.wait()[0][0], grad)  # ...read late: the bool mask gets no gradient


def test_headers_travel_on_their_own_channel_once_per_stage(net):
    sender, receiver = P2P(torch.device("cpu"), rank=0), P2P(torch.device("cpu"), rank=1)
    for step in range(3):
        _as(net, 0, sender, [Outgoing("act", 0, (torch.full((2, 5), float(step)),), False, 1)], [])
    header_messages = len(net.channels[(0, 1, None, 1)])
    assert header_messages == 2  # length and header, on tag 1, only with the first message
    assert len(net.channels[(0, 1, None, 0)]) == 3  # the data channel holds payloads only
    for step in range(3):
        [got] = _as(net, 1, receiver, [], [Incoming("act", 0, 0)])
        assert torch.equal(got.wait()[0][0], torch.full((2, 5), float(step)))
    dynamic = P2P(torch.device("cpu"), dynamic_shapes=True, rank=0)
    for length in (3, 4):
        _as(net, 0, dynamic, [Outgoing("act", 0, (torch.zeros(2, length),), False, 1)], [])
    assert len(net.channels[(0, 1, None, 1)]) == 2 * 2  # dynamic shapes: a header every time


def test_a_changed_shape_is_caught_by_the_sender_naming_the_fix(net):
    p2p = P2P(torch.device("cpu"), rank=3)
    p2p.post([Outgoing("act", 2, (torch.zeros(2, 6, 8),), False, 4)], [])
    with pytest.raises(ValueError, match=r"rank 3: stage 2 sends \[float32\[2, 4, 8\]\] to stage 3, which was set up "
                                         r"for \[float32\[2, 6, 8\]\].*pad to one length.*comm.dynamic_shapes=true"):
        p2p.post([Outgoing("act", 2, (torch.zeros(2, 4, 8),), False, 4)], [])


def test_sent_buffers_stay_referenced_until_their_work_completes(net, monkeypatch):
    pending_work = FakeWork(finish=lambda: None)  # a send the transport has not finished
    monkeypatch.setattr(dist, "isend", lambda tensor, dst, group=None, tag=0: pending_work)
    p2p = P2P(torch.device("cpu"), rank=0)
    payload = torch.randn(4, 4)
    p2p.post([Outgoing("grad", 1, (payload,), True, 1)], [])
    assert [t.data_ptr() for _, t in p2p._pending] == [payload.data_ptr()]  # held, not copied
    p2p.wait_all()
    assert pending_work.waited == 1 and p2p._pending == []
    p2p.post([Outgoing("grad", 1, (payload,), True, 1)], [])
    p2p.abandon()  # after a failure: forget, never wait (waiting would raise over the real error)
    assert p2p._pending == [] and pending_work.waited == 1


def test_on_cuda_every_transfer_goes_through_a_batch_and_headers_need_a_gloo_group(net):
    with pytest.raises(ValueError, match="needs header_group, a gloo group"):
        P2P(torch.device("cuda", 0))
    p2p = P2P(torch.device("cuda", 0), header_group="gloo-group")
    works = p2p._start([FakeOp(dist.isend, torch.zeros(1), 1)])  # a lone send: still a batch
    assert net.batches == [["isend"]] and len(works) == 1
    p2p._send_header(MessageMeta.of((torch.zeros(2, 3),), False), 1)
    assert len(net.channels[(0, 1, "gloo-group", 0)]) == 2  # NCCL ignores tags: headers go on gloo
    cpu = P2P(torch.device("cpu"))
    cpu._start([FakeOp(dist.isend, torch.zeros(1), 1)])
    assert len(net.batches) == 1  # gloo: a lone op skips the batch (cheaper, same semantics)
