"""Point-to-point transfer of stage activations and gradients, posted in groups.

``post(sends, receives)`` puts one group of transfers on the wire at once (one
``batch_isend_irecv``) and returns a handle per receive, waited for only where its data
is read, so compute overlaps communication. On NCCL every transfer goes through a
batch, which keeps them all on the group's one communicator and stream: the order the
schedule validator proves deadlock-free (``pipegrid.schedules.transports``). A lone
``isend`` would go to a separate two-rank communicator, and the two ends of a message
must meet on the same one.

The first activation a stage sends carries a header with the tensors' dtypes and
shapes (every one does with ``dynamic_shapes``). Headers travel on a channel of their
own, a gloo tag or a gloo group beside NCCL, so they never sit in the data stream's
order; a changed shape is caught by the sender. A tuple travels as one flat message, a
single tensor as itself with no copy. A buffer handed to the transport stays referenced
until its work completes (``wait_all``), as torch's own send path requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipegrid import kernels

__all__ = ["MessageMeta", "Outgoing", "Incoming", "Received", "P2P"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
_HEADER_TAG = 1  # on a gloo data group, headers take their own tag: a FIFO channel of their own


@dataclass(frozen=True)
class MessageMeta:
    """What a receiver must know to allocate an activation message."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    was_tuple: bool

    @classmethod
    def of(cls, tensors: tuple[torch.Tensor, ...], was_tuple: bool) -> MessageMeta:
        for t in tensors:
            if t.dtype not in _CODE:
                raise TypeError(f"cannot send a {t.dtype} tensor between stages; supported: {_DTYPES}")
        return cls(tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors), was_tuple)

    def encode(self) -> torch.Tensor:
        values = [int(self.was_tuple), len(self.shapes)]
        for shape, dtype in zip(self.shapes, self.dtypes):
            values += [_CODE[dtype], len(shape), *shape]
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def decode(cls, header: torch.Tensor) -> MessageMeta:
        values = header.tolist()
        was_tuple, count, pos = bool(values[0]), values[1], 2
        shapes, dtypes = [], []
        for _ in range(count):
            dtype, ndim = _DTYPES[values[pos]], values[pos + 1]
            shapes.append(tuple(values[pos + 2:pos + 2 + ndim]))
            dtypes.append(dtype)
            pos += 2 + ndim
        return cls(tuple(shapes), tuple(dtypes), was_tuple)

    def describe(self) -> str:
        return ", ".join(f"{str(d).replace('torch.', '')}{list(s)}" for s, d in zip(self.shapes, self.dtypes))


@dataclass(frozen=True)
class Outgoing:
    """One message to send: a stage's output ("act") or its input's gradient ("grad")."""

    kind: str
    stage: int
    """The sending model stage."""
    tensors: tuple[torch.Tensor, ...]
    was_tuple: bool
    dst: int
    """Global rank of the receiver."""


@dataclass(frozen=True)
class Incoming:
    """One message to receive; a gradient is sized by the local activation it belongs to."""

    kind: str
    stage: int
    """For "act" the sending stage; for "grad" the receiving stage (whose output it is for)."""
    src: int
    """Global rank of the sender."""
    activation: tuple[torch.Tensor, ...] = ()
    meta: MessageMeta | None = None
    """Shapes both ends know (generation's decode messages): no header is waited for."""


class Received:
    """A posted receive: ``wait()`` blocks (on CUDA: the current stream) until it arrived."""

    def __init__(self, work: dist.Work | None, buffer: torch.Tensor | None, layout: kernels.FlatLayout | None,
                 was_tuple: bool, backend: str) -> None:
        self._work, self._buffer, self._layout = work, buffer, layout
        self._was_tuple, self._backend = was_tuple, backend
        self._tensors: tuple[torch.Tensor, ...] | None = None if buffer is not None else ()

    def wait(self) -> tuple[tuple[torch.Tensor, ...], bool]:
        if self._tensors is None:
            if self._work is not None:
                self._work.wait()
            buffer, layout = self._buffer, self._layout
            self._tensors = ((buffer,) if layout is None  # type: ignore[assignment]
                             else tuple(kernels.unpack(buffer, layout, backend=self._backend)))
            self._work = self._buffer = None
        return self._tensors, self._was_tuple  # type: ignore[return-value]


class P2P:
    """Activation and gradient messages between this rank's stages and their neighbours."""

    def __init__(self, device: torch.device, dynamic_shapes: bool = False, kernels_backend: str = "torch",
                 rank: int = 0, group: dist.ProcessGroup | None = None,
                 header_group: dist.ProcessGroup | None = None) -> None:
        if device.type == "cuda" and header_group is None:
            raise ValueError("P2P on CUDA needs header_group, a gloo group for the message headers "
                             "(NCCL ignores tags, so headers cannot share its channel)")
        self.device = device
        self.dynamic_shapes = dynamic_shapes
        self.kernels_backend = kernels_backend
        self.rank = rank
        self.group = group
        # headers: a gloo group of their own beside NCCL; else the data group's own header tag
        self._header_group = header_group if header_group is not None else group
        self._header_tag = 0 if header_group is not None else _HEADER_TAG
        self._sent_meta: dict[int, MessageMeta] = {}
        self._recv_meta: dict[int, MessageMeta] = {}
        self._layouts: dict[MessageMeta, kernels.FlatLayout] = {}
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def with_dynamic_shapes(self) -> P2P:
        """A P2P on the same groups whose every activation message carries its header: what
        generation needs, where the prefill and each decode step differ in shape."""
        return P2P(self.device, True, self.kernels_backend, self.rank, self.group,
                   self._header_group if self._header_tag == 0 else None)

    # --- one group of transfers --------------------------------------------
    def post(self, sends: list[Outgoing], receives: list[Incoming]) -> list[Received]:
        """Put ``sends`` and ``receives`` on the wire as one group; a handle per receive.

        Headers go first on their own channel (sends never wait; a receive that needs
        one waits for it here, as it cannot be sized without). Then every payload moves
        in one ``batch_isend_irecv``.
        """
        payloads = [(s, self._outgoing_payload(s)) for s in sends]
        metas = [self._incoming_meta(r) for r in receives]
        ops: list[dist.P2POp] = []
        for send, payload in payloads:
            if payload is not None:
                ops.append(dist.P2POp(dist.isend, payload, send.dst, group=self.group))
        handles: list[tuple[int, torch.Tensor, kernels.FlatLayout | None, bool] | None] = []
        for receive, meta in zip(receives, metas):
            if meta is None:
                handles.append(None)
                continue
            buffer, layout = self._receive_buffer(meta)
            handles.append((len(ops), buffer, layout, meta.was_tuple))
            ops.append(dist.P2POp(dist.irecv, buffer, receive.src, group=self.group))
        works = self._start(ops)
        for work, op in zip(works, ops):
            if op.op is dist.isend:
                self._keep(work, op.tensor)
        return [Received(None, None, None, True, self.kernels_backend) if h is None
                else Received(works[h[0]], h[1], h[2], h[3], self.kernels_backend) for h in handles]

    def _start(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        if not ops:
            return []
        if len(ops) == 1 and self.device.type != "cuda":  # gloo: a lone op needs no batch
            op = ops[0]
            return [op.op(op.tensor, op.peer, group=self.group)]
        return dist.batch_isend_irecv(ops)

    def _outgoing_payload(self, send: Outgoing) -> torch.Tensor | None:
        if not send.tensors:
            return None  # a gradient for inputs that need none: the receiver expects nothing
        meta = MessageMeta.of(send.tensors, send.was_tuple)
        if send.kind == "act":
            known = self._sent_meta.get(send.stage)
            if known is None or self.dynamic_shapes:
                self._send_header(meta, send.dst)
                self._sent_meta[send.stage] = meta
            elif known != meta:
                raise ValueError(
                    f"rank {self.rank}: stage {send.stage} sends [{meta.describe()}] to stage {send.stage + 1}, "
                    f"which was set up for [{known.describe()}] by the first micro-batch; keep micro-batch "
                    "shapes fixed (pad to one length) or set comm.dynamic_shapes=true")
        return self._flatten(send.tensors, meta)

    def needs_header(self, receive: Incoming) -> bool:
        """Whether posting ``receive`` first waits for its header (its sender posts it with the send)."""
        return receive.kind == "act" and receive.meta is None and (self.dynamic_shapes or receive.stage not in self._recv_meta)

    def _incoming_meta(self, receive: Incoming) -> MessageMeta | None:
        if receive.meta is not None:
            return receive.meta
        if receive.kind == "act":
            meta = self._recv_meta.get(receive.stage)
            if meta is None or self.dynamic_shapes:
                meta = self._recv_meta[receive.stage] = self._recv_header(receive.src)
            return meta
        floats = tuple(t for t in receive.activation if t.is_floating_point() or t.is_complex())
        if not floats:
            return None
        return MessageMeta(tuple(tuple(t.shape) for t in floats), tuple(t.dtype for t in floats), True)

    # --- headers: their own channel, never in the data stream's order --------
    def _send_header(self, meta: MessageMeta, dst: int) -> None:
        header = meta.encode()
        length = torch.tensor([header.numel()], dtype=torch.int64)
        for tensor in (length, header):
            self._keep(dist.isend(tensor, dst, group=self._header_group, tag=self._header_tag), tensor)

    def _recv_header(self, src: int) -> MessageMeta:
        length = torch.empty(1, dtype=torch.int64)
        dist.recv(length, src, group=self._header_group, tag=self._header_tag)
        header = torch.empty(int(length.item()), dtype=torch.int64)
        dist.recv(header, src, group=self._header_group, tag=self._header_tag)
        return MessageMeta.decode(header)

    # --- plumbing ----------------------------------------------------------
    def _receive_buffer(self, meta: MessageMeta) -> tuple[torch.Tensor, kernels.FlatLayout | None]:
        if len(meta.shapes) == 1:
            return torch.empty(meta.shapes[0], dtype=meta.dtypes[0], device=self.device), None
        layout = self._layout(meta)
        return torch.empty(layout.total, dtype=layout.flat_dtype, device=self.device), layout

    def _flatten(self, tensors: tuple[torch.Tensor, ...], meta: MessageMeta) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].detach().contiguous()
        return kernels.pack([t.detach() for t in tensors], layout=self._layout(meta),
                            backend=self.kernels_backend)

    def _layout(self, meta: MessageMeta) -> kernels.FlatLayout:
        if meta not in self._layouts:
            self._layouts[meta] = kernels.FlatLayout.from_shapes(meta.shapes, meta.dtypes)
        return self._layouts[meta]

    def _keep(self, work: dist.Work, tensor: torch.Tensor) -> None:
        """Hold a sent buffer until its work completes: the transport reads it until then."""
        self._pending.append((work, tensor))
        if len(self._pending) > 16:  # keep the list short without waiting on fresh sends
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def wait_all(self) -> None:
        """Block until every send of this step has left; their buffers may then be reused."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            work.wait()

    def abandon(self) -> None:
        """Forget unfinished sends without waiting: after a failure, waiting could only add
        the transport's own error on top of the one that ended the step."""
        self._pending.clear()
