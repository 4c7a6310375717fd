"""Layer specs: a layer described by its class and arguments, built only by the stage
that owns it, and able to count its parameters without allocating them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LayerSpec", "TiedLayerSpec"]


class LayerSpec:
    """A layer to build later: ``cls(*args, **kwargs)``.

    Pipeline stages hold specs for the whole model but build only their own layers,
    so a model too large for one device is never materialised in one process.
    ``cls`` is normally an ``nn.Module`` subclass; any callable that returns an
    ``nn.Module`` is accepted (a factory function).
    """

    def __init__(self, cls: Callable[..., nn.Module], /, *args: Any, **kwargs: Any) -> None:
        if not callable(cls):
            raise TypeError(
                f"LayerSpec needs an nn.Module class (or a factory returning one) as its "
                f"first argument, got {type(cls).__name__} {cls!r}; "
                f"write LayerSpec(MyLayer, *args, **kwargs)"
            )
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self._num_parameters: int | None = None

    @property
    def typename(self) -> Callable[..., nn.Module]:
        """DeepSpeed's name for ``cls``, kept so DeepSpeed-style code reads it."""
        return self.cls

    @property
    def class_name(self) -> str:
        """The name matched by ``partition_method="type:REGEX"``."""
        return getattr(self.cls, "__name__", type(self.cls).__name__)

    def build(self) -> nn.Module:
        """Construct the layer on the current default device and dtype."""
        module = self.cls(*self.args, **self.kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"LayerSpec({self.class_name}) must build an nn.Module, got "
                f"{type(module).__name__}; put plain functions in the layer list "
                f"directly instead of wrapping them in a LayerSpec"
            )
        return module

    def num_parameters(self) -> int:
        """Parameter count, found by building on the meta device (no storage).

        The RNG state is forked so counting never changes what real builds draw.
        """
        if self._num_parameters is None:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                module = self.build()
            self._num_parameters = sum(p.numel() for p in module.parameters())
        return self._num_parameters

    def _arg_text(self) -> str:
        parts = [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return ", ".join([self.class_name, *parts])

    def __repr__(self) -> str:
        return f"LayerSpec({self._arg_text()})"


class TiedLayerSpec(LayerSpec):
    """A layer whose weights are shared by every layer with the same ``key``.

    Typical use: the input embedding and the output head. In one process all
    positions with the key use one module, built from the spec of the key's first
    position; each stage owning the key keeps its own copy, and the engine keeps the
    weights named by ``tied_weight_attr`` equal by all-reducing their gradients.

    ``forward_fn(module, x)``, when given, is how this position uses the shared
    module (e.g. ``Embed.logits``); otherwise the module is called.
    ``tied_weight_attr`` is an attribute name, a dotted path (``"head.weight"``) or
    a list of them.
    """

    def __init__(
        self,
        key: str,
        cls: Callable[..., nn.Module],
        /,
        *args: Any,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        tied_weight_attr: str | Sequence[str] = "weight",
        **kwargs: Any,
    ) -> None:
        super().__init__(cls, *args, **kwargs)
        if not isinstance(key, str):
            raise TypeError(f"TiedLayerSpec key must be a str, got {type(key).__name__}")
        if not key or "." in key:
            raise ValueError(
                f"TiedLayerSpec key must be a non-empty name without '.', got {key!r}; "
                f"use a name such as 'embed'"
            )
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(
                f"forward_fn must be callable as forward_fn(module, x), "
                f"got {type(forward_fn).__name__}"
            )
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attrs: tuple[str, ...] = _attr_paths(tied_weight_attr)

    @property
    def tied_weight_attr(self) -> str | tuple[str, ...]:
        """The attribute path(s) as given: one str, or a tuple for several."""
        attrs = self.tied_weight_attrs
        return attrs[0] if len(attrs) == 1 else attrs

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self._arg_text()})"


def _attr_paths(tied_weight_attr: str | Sequence[str]) -> tuple[str, ...]:
    paths = [tied_weight_attr] if isinstance(tied_weight_attr, str) else tied_weight_attr
    if not isinstance(paths, Sequence) or not all(isinstance(p, str) for p in paths):
        raise TypeError(
            f"tied_weight_attr must be a str or a list of str, got {tied_weight_attr!r}"
        )
    if not paths or any(not p or p.startswith(".") or p.endswith(".") for p in paths):
        raise ValueError(
            f"tied_weight_attr needs at least one attribute path such as 'weight' or "
            f"'head.weight', got {tied_weight_attr!r}"
        )
    return tuple(paths)
