"""``zero.stage: 0``: every data rank holds the whole optimizer state; gradients are
all-reduced over the data axis in flat buckets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipegrid.pipe.zero.common import (MASTER, Factory, ParamState, accumulate_in_fp32, ensure_grads, load_torch_state, state_tensors, all_reduce_flat,
                                       storage_bytes)


class ReplicatedOptimizer:
    """Every data rank holds the whole optimizer state (``zero.stage: 0``)."""

    sharded = False

    def __init__(self, params: list[torch.nn.Parameter], factory: Factory, data_group: Any, data_size: int,
                 backend: str = "auto") -> None:
        self.params, self.group, self.data_size, self.backend = params, data_group, data_size, backend
        self._index = {id(p): i for i, p in enumerate(params)}
        low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in params)
        self.master = ([torch.nn.Parameter(p.detach().float().clone()) for p in params]
                       if low_precision else params)
        if low_precision:  # the master copy's .grad is the fp32 gradient, made by the first micro-batch
            def start(i: int, grad: torch.Tensor) -> None:
                self.master[i].grad = grad
            self._hooks = accumulate_in_fp32(params, lambda i: self.master[i].grad, start)
        self.optimizer = factory(self.master)
        self._step_memory: dict[str, int] | None = None
        self._measured_states = -1

    def grad_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The tensor holding ``param``'s gradient of this step (fp32 in 16-bit training)."""
        return ensure_grads([self.master[self._index[id(param)]]])[0]

    def reduce_grads(self) -> None:
        """Average the gradients (the master copy's, fp32, in 16-bit training) over the data group."""
        grads = ensure_grads(self.master)
        if self.data_size > 1:
            all_reduce_flat(grads, self.group, scale=1.0 / self.data_size, backend=self.backend)

    def gather_params(self) -> None:
        """The whole parameters are always in place (ZeRO-3 gathers them here)."""

    def begin_step(self) -> None:
        """Nothing to gather: the whole parameters are always in place."""

    def parameters_needed(self, params: list[torch.Tensor], following: list[torch.Tensor]) -> None:
        """The whole parameters are always in place."""

    def weight_grads_done(self) -> None:
        """A model stage finished a micro-batch's parameter gradients: nothing to do before the step's end."""

    def grads(self, counted: set[int] | None = None) -> list[torch.Tensor]:
        """Master gradients (of the parameters whose ``id`` is in ``counted``, if given)."""
        pairs = zip(self.params, ensure_grads(self.master))
        return [g for p, g in pairs if counted is None or id(p) in counted]

    def step(self, grad_coef: float = 1.0) -> None:
        if grad_coef != 1.0:
            torch._foreach_mul_(self.grads(), grad_coef)
        self.optimizer.step()
        if len(self.optimizer.state) != self._measured_states:  # gradients are alive only now
            self._step_memory, self._measured_states = self._allocated(), len(self.optimizer.state)
        if self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.master is not self.params:
            for p in self.master:
                p.grad = None

    def sync_master_from_params(self) -> None:
        """After loading model weights alone: the fp32 master copy follows them."""
        if self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.master, self.params)

    def memory(self) -> dict[str, int]:
        """Storage bytes by kind; gradients exist only within a step, so after the first
        step this is what the last step that changed the state layout held."""
        return dict(self._step_memory) if self._step_memory is not None else self._allocated()

    def _allocated(self) -> dict[str, int]:
        master = [] if self.master is self.params else self.master
        return storage_bytes({"parameters": self.params, "gradients": [p.grad for p in self.master],
                              "optimizer": state_tensors(self.optimizer), "master_weights": master,
                              "buffers": []})

    # --- checkpoints: state per parameter --------------------------------------------
    def elementwise_keys(self) -> list[str]:
        keys = {k for p in self.master for k, v in self.optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape}
        return sorted(keys | ({MASTER} if self.master is not self.params else set()))

    def local_param_states(self) -> list[tuple[int, int, int, ParamState]]:
        """(parameter index, first element, end element, its state flattened) for every
        parameter: views, no copies."""
        keys, pieces = self.elementwise_keys(), []
        for i, master in enumerate(self.master):
            state = {**self.optimizer.state.get(master, {}), MASTER: master.detach()}
            pieces.append((i, 0, master.numel(), ParamState({k: state[k].reshape(-1) for k in keys if k in state},
                                            {k: v for k, v in state.items() if k not in keys and k != MASTER})))
        return pieces

    def load_param_states(self, read: Callable[[int], ParamState], hyperparameters: dict[str, Any]) -> None:
        """Load every parameter's state from ``read(index)`` (saved at any sharding); the
        values read may be views of a memory-mapped file, so only copies are kept."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for i, (param, master) in enumerate(zip(self.params, self.master)):
                saved = read(i)
                elementwise = dict(saved.elementwise)
                fp32 = elementwise.pop(MASTER, None)
                if master is not param:
                    master.copy_(fp32.view_as(master) if fp32 is not None else param)
                if elementwise or saved.scalars:  # copies: ``read`` may hand out views of a mapped file
                    values = {**saved.scalars, **{k: v.view_as(master) for k, v in elementwise.items()}}
                    state[i] = {k: v.clone() for k, v in values.items()}
        load_torch_state(self.optimizer, state, hyperparameters)
        self._measured_states = -1

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints of format 1 (one file per rank), at the layout that wrote them."""
        self.optimizer.load_state_dict(state["optimizer"])
        if "master" in state and self.master is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.master, state["master"])


