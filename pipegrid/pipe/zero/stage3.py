"""``zero.stage: 3``: ZeRO-2 and the parameters sharded over the data group too.

Between steps a rank keeps only its fp32 master shard: the parameters are rebuilt from it at
the step's start (each rank casts its shard into a flat buffer of the model's dtype and the
data group all-gathers the rest) and freed after the optimizer step. One gather per step,
the stage's whole parameters at once, as torchtitan does under pipeline parallelism
(``reshard_after_forward=False``): gathering per micro-batch would repeat it m times.

Our own flat buffers rather than FSDP2's ``fully_shard``: FSDP2 reduces gradients in its own
post-backward hooks, which zero-bubble's split backward (W runs long after I) and the sum of
tied layers over pipe ranks (before the data reduction) would both have to bypass, and its
DTensor parameters do not mix with pipegrid's tensor-parallel layers, which shard plain tensors.

``gather="per_layer"`` (``zero.gather``) instead gathers each layer just before each use and frees
it after, the next layer's gather in flight meanwhile (layer_gather.py): the least memory, the
most traffic (every forward, backward and W of every micro-batch gathers again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipegrid import kernels
from pipegrid.pipe.zero.common import Factory
from pipegrid.pipe.zero.layer_gather import LayerGather
from pipegrid.pipe.zero.stage1 import _all_gather, _host_copy
from pipegrid.pipe.zero.stage2 import DEFAULT_BUCKET_ELEMENTS, Zero2Optimizer


class Zero3Optimizer(Zero2Optimizer):
    """ZeRO-3: parameters exist whole from ``gather_params`` to the optimizer step only."""

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 data_rank: int, backend: str = "auto", *, reduce_every_micro_batch: bool = False,
                 whole_grads: frozenset[int] = frozenset(), offload: bool = False, gather: str = "per_step",
                 chunks: Sequence[Any] = (), bucket_elements: int = DEFAULT_BUCKET_ELEMENTS) -> None:
        super().__init__(params, factory, data_group, data_size, data_rank, backend,
                         reduce_every_micro_batch=reduce_every_micro_batch, whole_grads=whole_grads, offload=offload,
                         bucket_elements=bucket_elements)
        self.param_dtype = self.param_flat.dtype
        self.step_parameter_bytes = self.param_flat.untyped_storage().nbytes()
        """Bytes of the whole parameters while a step runs."""
        self.layers: LayerGather | None = None
        if gather == "per_layer":
            self.layers = LayerGather(params, self.layout, self.shard, self._range[0], self.shard_size, data_group,
                                      data_size, data_rank, self.param_flat, chunks)
            self.param_flat = None  # the parameters now live in one buffer per layer
        else:
            self._release_params()

    @property
    def peak_parameter_bytes(self) -> int:
        """The most parameter bytes gathered at once during the last step (per step: all of them)."""
        return self.layers.peak_bytes if self.layers is not None else self.step_parameter_bytes

    def begin_step(self) -> None:
        if self.layers is None:
            self.gather_params()
        else:
            self.layers.reset_peak()

    def parameters_needed(self, params: list[torch.Tensor], following: list[torch.Tensor]) -> None:
        if self.layers is not None:
            self.layers.gather_for(params, following)

    def weight_grads_done(self) -> None:
        super().weight_grads_done()
        if self.layers is not None:  # (a first layer, whose input takes no gradient, is still whole)
            self.layers.release_all()

    def _master_copy(self, own: torch.Tensor) -> torch.Tensor:
        """The master shard is the parameters' only copy between steps: never a view of them."""
        if self.offload:
            return _host_copy(own)
        return own.detach().float().clone() if self.low_precision else own.detach().clone()

    def gather_params(self) -> None:
        """Rebuild the whole parameters from the master shards (a no-op while they are whole)."""
        if self.layers is not None:
            self.layers.gather_all()
            return
        if self.param_flat is not None:
            return
        self.param_flat = torch.empty(self.shard_size * self.data_size, dtype=self.param_dtype, device=self.device)
        lo, hi = self._range
        own = self.param_flat[lo:hi]
        self.host.to_device(own, self.shard.detach())
        if self.data_size > 1:
            _all_gather(self.param_flat, own, group=self.group)
        with torch.no_grad():
            for p, view in zip(self.params, kernels.views(self.param_flat, self.layout)):
                p.data = view

    def _release_params(self) -> None:
        """Free the whole parameters; each keeps an empty tensor of its dtype until the next gather."""
        if self.layers is not None:
            self.layers.release_all()
            return
        empty = torch.empty(0, dtype=self.param_dtype, device=self.device)
        for p in self.params:
            p.data = empty
        self.param_flat = None

    def step(self, grad_coef: float = 1.0) -> None:
        self._shard_grad()
        self.host.host_ready()
        if grad_coef != 1.0:
            self.shard.grad.mul_(grad_coef)
        self.optimizer.step()
        self._release_params()  # the next step's gather brings the updated values

    def _own_parameters(self) -> torch.Tensor:
        if self.layers is None:
            return super()._own_parameters()
        return self.layers.own_slice(torch.empty(self.shard_size, dtype=self.param_dtype, device=self.device))

    def sync_master_from_params(self) -> None:
        self.gather_params()
        with torch.no_grad():
            self.shard.copy_(self._own_parameters())

    def load_param_states(self, read, hyperparameters) -> None:  # type: ignore[no-untyped-def]
        self.gather_params()  # (a checkpoint without master weights starts them from the parameters)
        super().load_param_states(read, hyperparameters)
        self._release_params()

    def memory(self) -> dict[str, int]:
        """As ZeRO-2's; ``parameters`` counts the whole parameters only while they are gathered
        (``step_parameter_bytes`` has their size); the master shard is what stays."""
        return super().memory()
