"""Split one stage's backward into input gradients now (I) and parameter gradients later (W).

Zero-bubble schedules (zb_h1) need a stage's input gradients at once, because the
previous stage waits for them; the parameter gradients wait for nobody and fill bubbles.

    outputs ─► ... ─► X ─► ... ─► X' ─► ... ─► inputs   I: autograd down to the inputs only;
                      │           │                        a pre-hook on each branch point X
                      ▼           ▼                        keeps the gradient flowing into it
                   weight      weight                   W: from each X with that gradient,
                                                           down to its parameters only

A branch point X is a node on the input path with an edge toward parameters
(AddmmBackward for a Linear, NativeLayerNormBackward for a LayerNorm). Autograd computes
only the node outputs a call needs, so I does the input half of each branch point, W the
parameter half; no other node on the input path runs twice.

Fallbacks (their parameter gradients are accumulated by backward_input instead, and
``WeightGradState.early_reasons`` says why):

* a parameter reached from two branch points (a tied weight used twice): W from the upper
  one would run back down the input path through the lower one again;
* saved tensors packed by saved-tensor hooks at a branch point or below it (activation
  checkpointing with ``use_reentrant=False``, CPU offload): every extra backward call would
  unpack them again, which for checkpointing re-runs the checkpointed forward (an unpack hook
  marked ``unpacks_again_cheaply``, as sequence parallelism's re-gather, is no reason);
* a parameter inside a compiled region (``torch.compile``): the region's backward is one node
  (``CompiledFunctionBackward``) that computes its input and weight gradients in one call, so
  they are taken with the input gradients (``pipe/compile.py`` keeps weight matmuls outside);
* reentrant activation checkpointing (``use_reentrant=True``) anywhere in the stage refuses
  partial backward calls, so I runs the whole plain backward and W has nothing to do.

Leaves that require grad but are neither ``inputs`` nor ``params`` get no gradient.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils.checkpoint import CheckpointFunction

__all__ = ["WeightGradState", "backward_input", "backward_weight"]


@dataclass(eq=False)
class _WeightCall:
    """One backward call of W: from ``roots`` with ``grads`` down to ``params`` only."""

    branch_point: Node | None
    """the node W starts at; None: the stage outputs themselves (they do not depend on inputs)"""
    params: list[Tensor]
    """the parameters only this branch point leads to"""
    roots: list[GradientEdge] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


@dataclass(eq=False)
class WeightGradState:
    """What backward_weight needs for one micro-batch; states of different micro-batches are independent."""

    calls: list[_WeightCall]
    """the deferred backward calls, one per branch point; emptied by backward_weight"""
    early_params: list[Tensor]
    """parameters whose gradients backward_input already accumulated (the fallbacks)"""
    early_reasons: list[str]
    """why those could not wait; empty when the split is complete"""
    done: bool = False
    """whether backward_weight has run"""

    @property
    def deferred_params(self) -> list[Tensor]:
        """Parameters whose gradients backward_weight will accumulate."""
        return [p for call in self.calls for p in call.params]


@dataclass
class _Plan:
    calls: list[_WeightCall]
    early_params: list[Tensor]
    early_reasons: list[str]
    whole_backward: bool = False
    """I runs one plain backward: the graph cannot be split at all"""


def backward_input(outputs: Sequence[Tensor], grad_outputs: Sequence[Tensor | None],
                   inputs: Sequence[Tensor], params: Iterable[nn.Parameter],
                   ) -> tuple[list[Tensor | None], WeightGradState]:
    """Input gradients now (returned, one per input, None if unused); what W needs kept in the state.

    ``outputs`` are the stage outputs (or its scalar loss, whose gradient None means 1);
    outputs that do not require grad are skipped. ``inputs`` must be leaves (the received
    activations); as ``.backward()`` does, their ``.grad`` is accumulated, and that ``.grad``
    is what is returned. The autograd graph stays alive until backward_weight; drop
    ``outputs`` after this call so only the part W needs is kept.
    """
    if len(outputs) != len(grad_outputs):
        raise ValueError(f"backward_input needs one gradient per output, got {len(outputs)} outputs "
                         f"and {len(grad_outputs)} gradients; pass None for outputs without one")
    roots, root_grads = _differentiable_outputs(outputs, grad_outputs)
    grad_inputs = _checked_inputs(inputs)
    if not roots:
        return [None] * len(inputs), WeightGradState([], [], [])
    root_edges = [get_gradient_edge(t) for t in roots]
    plan = _plan(root_edges, root_grads, grad_inputs, _unique_params(params))
    captured: dict[Node, tuple[Tensor | None, ...]] = {}
    handles = [call.branch_point.register_prehook(partial(_keep_grads, captured, call.branch_point))
               for call in plan.calls if call.branch_point is not None]
    try:
        targets = [*grad_inputs, *plan.early_params]
        if plan.whole_backward:
            torch.autograd.backward(roots, root_grads)
        elif targets:  # backward() refuses an empty inputs=; then W does everything
            torch.autograd.backward(roots, root_grads, inputs=targets, retain_graph=bool(plan.calls))
    finally:
        for handle in handles:
            handle.remove()
    _fill_roots(plan.calls, captured)
    state = WeightGradState([c for c in plan.calls if c.roots], plan.early_params, plan.early_reasons)
    return [t.grad if t.requires_grad else None for t in inputs], state


def backward_weight(state: WeightGradState,
                    before_call: Callable[[list[Tensor], list[Tensor]], None] | None = None) -> None:
    """Accumulate the parameter gradients into param.grad and release the graph.

    Parameters the stage did not use keep their ``.grad`` (None stays None), as with
    ``.backward()``. Each call runs a disjoint part of the graph, so none needs to retain it.
    ``before_call(params, next_params)``, when given, runs before each call with the parameters
    it computes gradients for and those of the call after it (ZeRO-3 gathers them layer by layer).
    """
    if state.done:
        raise RuntimeError("backward_weight already ran for this micro-batch's state; each state from "
                           "backward_input is used exactly once")
    state.done = True
    calls, state.calls = state.calls, []  # drop the graph even if a call below fails
    for i, call in enumerate(calls):
        if before_call is not None:
            before_call(call.params, calls[i + 1].params if i + 1 < len(calls) else [])
        torch.autograd.backward(call.roots, call.grads, inputs=call.params)


# --- arguments --------------------------------------------------------------------


def _differentiable_outputs(outputs: Sequence[Tensor], grad_outputs: Sequence[Tensor | None],
                            ) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs autograd can go through, each with a gradient (None for a scalar means 1)."""
    roots, grads = [], []
    for i, (output, grad) in enumerate(zip(outputs, grad_outputs)):
        if not isinstance(output, Tensor):
            raise TypeError(f"backward_input: output {i} is a {type(output).__name__}, expected a Tensor")
        if not output.requires_grad:  # an index or mask sent along with the activations
            continue
        if grad is None:
            if output.numel() != 1:
                raise ValueError(f"backward_input: output {i} has shape {tuple(output.shape)} and gradient "
                                 "None; None means 1 and is only allowed for a scalar (a loss)")
            grad = torch.ones_like(output)
        roots.append(output)
        grads.append(grad)
    return roots, grads


def _checked_inputs(inputs: Sequence[Tensor]) -> list[Tensor]:
    """The inputs that require grad; they must be leaves so the input path ends at them."""
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"backward_input: input {i} is a {type(t).__name__}, expected a Tensor")
        if t.requires_grad and t.grad_fn is not None:
            raise ValueError(f"backward_input: input {i} is not a leaf (grad_fn {type(t.grad_fn).__name__}); "
                             "pass the received activation, e.g. t.detach().requires_grad_()")
    return [t for t in inputs if t.requires_grad]


def _unique_params(params: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    unique = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


# --- the graph ---------------------------------------------------------------------


def _plan(root_edges: list[GradientEdge], root_grads: list[Tensor], inputs: list[Tensor],
          params: list[Tensor]) -> _Plan:
    """Find the branch points and decide, for each, whether its parameters can wait for W."""
    parents = _walk([e.node for e in root_edges])
    reentrant = [n for n in parents if getattr(n, "_forward_cls", None) is CheckpointFunction]
    if reentrant:
        return _Plan([], params, [f"{len(reentrant)} reentrant activation checkpoint(s) (use_reentrant=True) "
                                  "refuse partial backward calls: I runs the whole backward"], True)
    leaf_node = _leaf_nodes(parents)
    on_input_path = _ancestors([leaf_node[id(t)] for t in inputs if id(t) in leaf_node], parents)
    param_of = {leaf_node[id(p)]: p for p in params if id(p) in leaf_node}
    param_of = {node: p for node, p in param_of.items() if node not in on_input_path}  # also an input
    leads_to_param = _ancestors(list(param_of), parents) - on_input_path
    branches = _branches(root_edges, parents, on_input_path, leads_to_param)
    regions = {b: _descendants(kids, leads_to_param) for b, kids in branches.items()}
    owners = Counter(node for region in regions.values() for node in region)
    plan = _Plan([], [], [])
    early: dict[int, Tensor] = {}  # a shared parameter shows up under each of its branch points
    why: dict[tuple[str, str], list[int]] = {}  # (node name, reason) -> [parameters, branch points]
    for branch_point, region in regions.items():
        later, now, reason = _split_branch(branch_point, region, param_of, owners)
        if now:
            early.update((id(p), p) for p in now)
            counts = why.setdefault((_name(branch_point), reason), [0, 0])
            counts[0] += len(now)
            counts[1] += 1
        if later:
            call = _WeightCall(branch_point, later)
            if branch_point is None:  # W starts at the outputs that do not depend on the inputs
                call.roots = [e for e in root_edges if e.node in region]
                call.grads = [g for e, g in zip(root_edges, root_grads) if e.node in region]
            plan.calls.append(call)
    plan.early_params = list(early.values())
    plan.early_reasons = [f"{n} parameter(s) below {k} {name}{'s' if k > 1 else ''}: {reason}"
                          for (name, reason), (n, k) in why.items()]
    return plan


def _split_branch(branch_point: Node | None, region: set[Node], param_of: dict[Node, Tensor],
                  owners: Counter) -> tuple[list[Tensor], list[Tensor], str]:
    """This branch point's parameters: (for W, for I, why those go to I)."""
    mine = [(node, p) for node, p in param_of.items() if node in region]
    if branch_point is not None and _is_compiled_region(branch_point):
        # W from here would run the whole region's backward a second time
        return [], [p for _, p in mine], ("inside a compiled region, whose backward computes input and weight "
                                          "gradients in one node (compile.eager_linear=true keeps weight matmuls "
                                          "outside it)")
    for node in [branch_point, *region]:
        if node is not None and _packed_by_hooks(node):
            return [], [p for _, p in mine], (f"{_name(node)} saved tensors through saved-tensor hooks "
                                              "(activation checkpointing?)")
    # Only this branch point leads to a parameter of its own, so W from here runs nothing of the
    # input path; a parameter also reached from elsewhere would drag W back down through it.
    later = [p for node, p in mine if owners[node] == 1]
    now = [p for node, p in mine if owners[node] > 1]
    return later, now, "also reached from another branch point (a tied or shared parameter)"


def _branches(root_edges: list[GradientEdge], parents: dict[Node, list[Node]], on_input_path: set[Node],
              leads_to_param: set[Node]) -> dict[Node | None, list[Node]]:
    """Branch point -> its children toward parameters (key None: the outputs themselves)."""
    branches: dict[Node | None, list[Node]] = {}
    from_outputs = [e.node for e in root_edges if e.node in leads_to_param]
    if from_outputs:
        branches[None] = from_outputs
    for node in parents:  # in walk order, outputs first, so W goes layer by layer as backward does
        if node in on_input_path:
            kids = [kid for kid, _ in node.next_functions if kid in leads_to_param]
            if kids:
                branches[node] = kids
    return branches


def _walk(roots: list[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from roots (breadth first), mapped to its parents."""
    parents: dict[Node, list[Node]] = {node: [] for node in roots}
    queue = deque(parents)
    while queue:
        node = queue.popleft()
        for kid, _ in node.next_functions:
            if kid is None:
                continue
            if kid not in parents:
                parents[kid] = []
                queue.append(kid)
            parents[kid].append(node)
    return parents


def _leaf_nodes(parents: dict[Node, list[Node]]) -> dict[int, Node]:
    """id(leaf tensor) -> its AccumulateGrad node, for the leaves in the graph.

    Cheaper than get_gradient_edge per parameter, which builds a view to find the node.
    """
    return {id(node.variable): node for node in parents
            if not node.next_functions and hasattr(node, "variable")}


def _ancestors(starts: list[Node], parents: dict[Node, list[Node]]) -> set[Node]:
    """starts and every node with a path down to one of them."""
    found = set(starts)
    queue = deque(starts)
    while queue:
        for parent in parents[queue.popleft()]:
            if parent not in found:
                found.add(parent)
                queue.append(parent)
    return found


def _descendants(starts: list[Node], within: set[Node]) -> set[Node]:
    """starts and every node below them, staying inside ``within``."""
    found = set(starts)
    queue = deque(starts)
    while queue:
        for kid, _ in queue.popleft().next_functions:
            if kid in within and kid not in found:
                found.add(kid)
                queue.append(kid)
    return found


def _packed_by_hooks(node: Node) -> bool:
    """Whether a tensor this node saved for backward went through saved-tensor hooks."""
    for name in _saved_tensor_attributes(type(node)):
        saved = getattr(node, name)
        for item in saved if isinstance(saved, (tuple, list)) else (saved,):
            hook = getattr(item, "unpack_hook", None)
            if hook is not None and not getattr(hook, "unpacks_again_cheaply", False):  # sequence parallel's is
                return True
    return False


@cache  # a pure function of the node class; dir() is the slow part of planning
def _saved_tensor_attributes(node_type: type) -> tuple[str, ...]:
    return tuple(a for a in dir(node_type) if a.startswith("_raw_saved_"))


def _is_compiled_region(node: Node) -> bool:
    """AOTAutograd's node for a compiled graph: opaque to autograd, it cannot give one half alone."""
    return type(node).__name__ == "CompiledFunctionBackward"


def _keep_grads(store: dict[Node, tuple[Tensor | None, ...]], node: Node,
                grads: tuple[Tensor | None, ...]) -> None:
    store[node] = grads  # returns None: the gradient itself is left as it is


def _fill_roots(calls: list[_WeightCall], captured: dict[Node, tuple[Tensor | None, ...]]) -> None:
    """Give each branch point's W call the gradient that flowed into it during I."""
    for call in calls:
        if call.branch_point is None:
            continue  # starts at the outputs: its gradients were known before I
        grads = captured.get(call.branch_point, ())
        pairs = [(GradientEdge(call.branch_point, i), g) for i, g in enumerate(grads) if g is not None]
        call.roots = [e for e, _ in pairs]
        call.grads = [g for _, g in pairs]


def _name(node: Node | None) -> str:
    return "the stage outputs" if node is None else type(node).__name__
