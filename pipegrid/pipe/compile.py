"""Compiled stages: each pipeline layer ``torch.compile``d on its own, in place, as torchtitan
compiles each block, with its weight matmuls left eager where a split backward must defer them.

    layer (a LayerSpec's module, a decoder layer, the embedding, the norm, the head)
      eager_linear off:  [──────────── one compiled region ────────────]
      eager_linear on:   [norm ─] Linear [─ attention core ─] Linear [─ act ─] Linear ...
                                  eager                       eager           eager

A compiled region's backward is one autograd node that computes its input and weight
gradients together, so zero-bubble's W (``split_backward.py``) cannot defer the weights
inside it. With ``eager_linear`` each weight matmul runs outside the compiled regions and
keeps its own ``AddmmBackward``/``MmBackward`` node: I takes its input half, W its weight
half, exactly as uncompiled. Only the weights inside compiled regions (norm scales and
shifts: cheap) are accumulated by I, and ``split_backward`` says so once per stage.

``module.compile()`` compiles a module's call in place, so parameter names, tied modules,
ZeRO's flat buffers and checkpoints see the same module. Dynamo compiles one graph per
code object and guards on types and shapes, not on which layer runs it, so the L layers of
a class share their compiled code; a layer that sees another shape (or grad mode) compiles
again, and the first time that happens for a layer one log line says so.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from pipegrid.conf.schema import CompileConfig
    from pipegrid.pipe.module import PipelineModule

__all__ = ["StageCompiler", "compile_stages", "eager_linear_wanted"]

log = logging.getLogger("pipegrid")


def eager_linear_wanted(config: CompileConfig, split_backward: bool) -> bool:
    """``compile.eager_linear``, with None resolved: on under a split backward unless fullgraph."""
    if config.eager_linear is not None:
        return config.eager_linear
    return split_backward and not config.fullgraph


def compile_stages(module: PipelineModule, config: CompileConfig, split_backward: bool,
                   rank: int = 0) -> StageCompiler | None:
    """Compile every layer of this rank's stages in place; None when ``compile.enabled`` is off."""
    if not config.enabled:
        return None
    _donate_buffers(not split_backward)
    compiler = StageCompiler(config, eager_linear_wanted(config, split_backward), rank)
    for stage_id, chunk in module.stages.items():
        chunk.compile_layers(functools.partial(compiler.compile_layer, int(stage_id)))
    return compiler


def _donate_buffers(wanted: bool) -> None:
    """AOTAutograd's donated buffers (a compiled backward reusing its saved tensors' memory) refuse
    ``retain_graph=True``, which a split backward's I needs for W: off under zb_h1, zb_v, dualpipev.

    Compiled code keeps the setting it was made with and dynamo's cache does not guard on it, so a
    change drops every compiled graph of the process (``torch._dynamo.reset``)."""
    import torch._dynamo
    import torch._functorch.config as functorch_config

    if functorch_config.donated_buffer != wanted:
        functorch_config.donated_buffer = wanted
        torch._dynamo.reset()  # (also clears other compilers' recompile notices: said once, not never)


def _check_backend(name: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ValueError(f"compile.backend={name!r} is not a torch.compile backend here; the known ones are "
                         f"{', '.join(sorted(known))}")


def _is_weight_matmul(module: nn.Module) -> bool:
    """A module that multiplies by a 2-D weight of its own (nn.Linear, tensor-parallel linears,
    transformers' Conv1D), whose weight gradient a split backward defers; embeddings gather instead."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding)


class StageCompiler:
    """Compiles one rank's layers and says, once per layer, when one compiles again.

    Holds what it compiled for the engine's report (``compiled``: global layer index -> name).
    """

    def __init__(self, config: CompileConfig, eager_linear: bool, rank: int) -> None:
        _check_backend(config.backend)
        self.config = config
        self.eager_linear = eager_linear
        self.rank = rank
        self.compiled: dict[int, str] = {}
        self._running: tuple[int, int, str, Any] | None = None  # (stage, index, name, input) now in a layer
        self._said: set[int] = set()
        self._listen_for_recompiles()

    # --- compiling -------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        c = self.config
        options: dict[str, Any] = {"backend": c.backend, "fullgraph": c.fullgraph, "dynamic": c.dynamic}
        if c.mode is not None:
            options["mode"] = c.mode
        return options

    def compile_layer(self, stage: int, index: int, layer: Any, call: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The call that runs position ``index``, compiled: the module in place when the position
        calls it, else the position's own call (a tied head's ``forward_fn``). Plain callables stay."""
        if not isinstance(layer, nn.Module):
            return call
        if type(layer).__module__.startswith("torch.") and call is layer:
            return call  # dynamo runs torch's own modules (nn.LayerNorm as a layer) eagerly as a top frame
        name = type(layer).__name__
        if call is layer:
            if self.eager_linear:
                self._keep_matmuls_eager(layer)
            # a layer may name the parts worth compiling (pipegrid.hf's DecoderLayer: the transformers
            # layer inside, whose code all layers share, not its wrapper that reads its own index)
            for target in getattr(layer, "compile_targets", lambda: [layer])():
                if getattr(target, "_compiled_call_impl", None) is None:  # a tied module is compiled once
                    target.compile(**self._options())
            compiled = call
        else:  # forward_fn: e.g. Embed.logits, the tied head reading the embedding's weight
            name = f"{name}.{getattr(getattr(call, 'func', call), '__name__', 'call')}"
            compiled = torch.compile(call, **self._options())
        self.compiled[index] = name
        return functools.partial(self._run, stage, index, name, compiled)

    def _keep_matmuls_eager(self, layer: nn.Module) -> None:
        for sub in layer.modules():
            if _is_weight_matmul(sub) and not getattr(type(sub), "runs_eagerly", False):
                # a subclass, not a patched instance: dynamo guards on a submodule's type, so code
                # compiled for a model without eager_linear is never reused for this one (or back)
                sub.__class__ = _eager_class(type(sub))

    def _run(self, stage: int, index: int, name: str, compiled: Callable[[Any], Any], x: Any) -> Any:
        self._running = (stage, index, name, x)
        try:
            return compiled(x)
        finally:
            self._running = None

    # --- saying when a layer compiles again --------------------------------------------
    def _listen_for_recompiles(self) -> None:
        try:
            from torch._dynamo.callback import CallbackTrigger, callback_handler
        except ImportError:  # pragma: no cover - an older torch: compile without the notice
            return
        this = weakref.ref(self)

        def on_start(args: Any) -> None:
            compiler = this()
            if compiler is not None and args.callback_trigger == CallbackTrigger.DYNAMO:
                compiler._on_compile_start(str(args.compile_id))

        callback_handler.register_start_callback(on_start)
        weakref.finalize(self, _remove_callback, callback_handler, on_start)

    def _on_compile_start(self, compile_id: str) -> None:
        """Dynamo numbers compiles ``frame/attempt``: attempt > 0 is a frame compiled again."""
        frame_attempt = compile_id.strip("[]").split("/")[-1].split("_")[0]
        if self._running is None or not frame_attempt.isdigit() or int(frame_attempt) == 0:
            return
        stage, index, name, x = self._running
        if index in self._said:
            return
        self._said.add(index)
        import torch._dynamo.config as dynamo_config

        limit = getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", "?"))
        # an eval under no_grad compiles each layer once more, as expected: said at INFO, not as a warning
        say = log.warning if torch.is_grad_enabled() else log.info
        say(f"compile: rank {self.rank} model stage {stage} layer {index} ({name}) compiles again "
                    f"(dynamo compile {compile_id}) for input {_describe(x)} with grad "
                    f"{'on' if torch.is_grad_enabled() else 'off'}: a new shape or dtype, grad mode, training flag, "
                    f"or a layer of its class built otherwise. Each code object compiles at most torch._dynamo.config.recompile_limit={limit} times, "
                    "then runs eagerly; compile.dynamic=true compiles for any shape up front")


@functools.cache
def _eager_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with its forward left out of every compiled graph (same state_dict, same isinstance)."""
    forward = torch.compiler.disable(cls.forward, recursive=True)
    return type(cls.__name__, (cls,), {"forward": forward, "runs_eagerly": True, "__module__": __name__,
                                       "__qualname__": f"eager {cls.__qualname__}"})


def _remove_callback(handler: Any, callback: Callable[[Any], None]) -> None:
    try:
        handler.remove_start_callback(callback)
    except ValueError:  # pragma: no cover - already cleared
        pass


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(item) for item in x) + ")"
    return type(x).__name__
