"""Point-to-point transfer of stage activations and gradients, with shape negotiation.

The first activation on a channel (model stage s -> s+1) carries a small header
with the tensors' dtypes and shapes; later ones reuse it, and a changed shape is
caught by the sender (or renegotiated every time with ``dynamic_shapes``). A tuple
travels as one flat message; a single tensor travels as itself, with no copy.
Messages on one directed rank pair are matched in issue order (FIFO), as NCCL does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipegrid import kernels

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


@dataclass(frozen=True)
class MessageMeta:
    """What a receiver must know to allocate an activation message."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    was_tuple: bool

    @classmethod
    def of(cls, tensors: tuple[torch.Tensor, ...], was_tuple: bool) -> "MessageMeta":
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
    def decode(cls, header: torch.Tensor) -> "MessageMeta":
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


class P2P:
    """Activation and gradient messages between this rank's stages and their neighbours."""

    def __init__(self, device: torch.device, dynamic_shapes: bool = False, kernels_backend: str = "torch",
                 rank: int = 0, group: dist.ProcessGroup | None = None) -> None:
        self.device = device
        self.dynamic_shapes = dynamic_shapes
        self.kernels_backend = kernels_backend
        self.rank = rank
        self.group = group
        self._sent_meta: dict[int, MessageMeta] = {}
        self._recv_meta: dict[int, MessageMeta] = {}
        self._layouts: dict[MessageMeta, kernels.FlatLayout] = {}
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    # --- activations -------------------------------------------------------
    def send_activation(self, stage: int, tensors: tuple[torch.Tensor, ...], was_tuple: bool, dst: int) -> None:
        meta = MessageMeta.of(tensors, was_tuple)
        known = self._sent_meta.get(stage)
        if known is None or self.dynamic_shapes:
            header = meta.encode()
            self._isend(torch.tensor([header.numel()], dtype=torch.int64), dst)
            self._isend(header, dst)
            self._sent_meta[stage] = meta
        else:
            self._check_same(stage, meta)
        self._isend(self._flatten(tensors, meta), dst)

    def _check_same(self, stage: int, meta: MessageMeta) -> None:
        known = self._sent_meta[stage]
        if known != meta:
            raise ValueError(
                f"rank {self.rank}: stage {stage} sends [{meta.describe()}] to stage {stage + 1}, which was set "
                f"up for [{known.describe()}] by the first micro-batch; keep micro-batch shapes fixed "
                "(pad to one length) or set comm.dynamic_shapes=true")

    def recv_activation(self, src_stage: int, src: int) -> tuple[tuple[torch.Tensor, ...], bool]:
        meta = self._recv_meta.get(src_stage)
        if meta is None or self.dynamic_shapes:
            length = torch.empty(1, dtype=torch.int64)
            self._recv(length, src, host=True)
            header = torch.empty(int(length.item()), dtype=torch.int64)
            self._recv(header, src, host=True)
            meta = self._recv_meta[src_stage] = MessageMeta.decode(header)
        return self._receive_message(meta, src), meta.was_tuple

    # --- gradients (layout known from the local activation: no header) -----------
    def send_grad(self, stage: int, grads: tuple[torch.Tensor, ...], dst: int) -> None:
        if grads:
            self._isend(self._flatten(grads, MessageMeta.of(grads, True)), dst)

    def recv_grad(self, stage: int, activation: tuple[torch.Tensor, ...], src: int) -> tuple[torch.Tensor, ...]:
        meta = self._incoming_meta("grad", stage, activation)
        return () if meta is None else self._receive_message(meta, src)

    # --- a send and a receive with the same peer, posted together ------------
    def exchange(self, send: tuple[str, int, tuple[torch.Tensor, ...], bool], dst: int,
                 recv: tuple[str, int, tuple[torch.Tensor, ...] | None], src: int,
                 ) -> tuple[tuple[torch.Tensor, ...], bool] | None:
        """Post a send and the next receive in one ``batch_isend_irecv`` (as Megatron does).

        ``send`` is (kind, stage, tensors, was_tuple); ``recv`` is (kind, stage, activation):
        for a gradient, the local activation it belongs to. NCCL needs the pair in one
        group call when both ranks send first; gloo gains one fewer trip through Python.
        Returns None (nothing posted) when a header must travel first: the caller then
        runs the two one after the other.
        """
        kind, stage, tensors, was_tuple = send
        if not tensors:
            return None
        out_meta = MessageMeta.of(tensors, was_tuple)
        in_meta = self._incoming_meta(*recv)
        if in_meta is None or (kind == "act" and self._sent_meta.get(stage) is None) or self.dynamic_shapes:
            return None
        if kind == "act":
            self._check_same(stage, out_meta)
        payload = self._flatten(tensors, out_meta)
        buffer, layout = self._receive_buffer(in_meta)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, payload, dst, group=self.group),
                                        dist.P2POp(dist.irecv, buffer, src, group=self.group)])
        self._pending.append((works[0], payload))
        works[1].wait()
        received = (buffer,) if layout is None else tuple(kernels.unpack(buffer, layout,
                                                                         backend=self.kernels_backend))
        return received, in_meta.was_tuple

    def can_exchange(self) -> bool:
        """Paired posting needs both sides' shapes known up front: not with dynamic shapes."""
        return not self.dynamic_shapes

    def _incoming_meta(self, kind: str, stage: int, activation: tuple[torch.Tensor, ...] | None,
                       ) -> MessageMeta | None:
        if kind == "act":
            return self._recv_meta.get(stage)
        floats = tuple(t for t in activation or () if t.is_floating_point() or t.is_complex())
        if not floats:
            return None
        return MessageMeta(tuple(tuple(t.shape) for t in floats), tuple(t.dtype for t in floats), True)

    def _receive_buffer(self, meta: MessageMeta) -> tuple[torch.Tensor, kernels.FlatLayout | None]:
        if len(meta.shapes) == 1:
            return torch.empty(meta.shapes[0], dtype=meta.dtypes[0], device=self.device), None
        layout = self._layout(meta)
        return torch.empty(layout.total, dtype=layout.flat_dtype, device=self.device), layout

    # --- plumbing ----------------------------------------------------------
    def _flatten(self, tensors: tuple[torch.Tensor, ...], meta: MessageMeta) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0].detach().contiguous()
        return kernels.pack([t.detach() for t in tensors], layout=self._layout(meta),
                            backend=self.kernels_backend)

    def _receive_message(self, meta: MessageMeta, src: int) -> tuple[torch.Tensor, ...]:
        buffer, layout = self._receive_buffer(meta)
        self._recv(buffer, src)
        if layout is None:
            return (buffer,)
        return tuple(kernels.unpack(buffer, layout, backend=self.kernels_backend))

    def _layout(self, meta: MessageMeta) -> kernels.FlatLayout:
        if meta not in self._layouts:
            self._layouts[meta] = kernels.FlatLayout.from_shapes(meta.shapes, meta.dtypes)
        return self._layouts[meta]

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        if tensor.device != self.device:  # headers are built on the host
            tensor = tensor.to(self.device)
        work = dist.isend(tensor, dst, group=self.group)
        self._pending.append((work, tensor))
        if len(self._pending) > 16:  # keep the list short without waiting on fresh sends
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def _recv(self, tensor: torch.Tensor, src: int, host: bool = False) -> None:
        if host and self.device.type == "cuda":
            staged = tensor.to(self.device)
            dist.recv(staged, src, group=self.group)
            tensor.copy_(staged)
        else:
            dist.recv(tensor, src, group=self.group)

    def wait_all(self) -> None:
        """Block until every send of this step has left; their buffers may then be reused."""

        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
