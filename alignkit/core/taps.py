"""Feature taps: hidden states by layer index through forward hooks on stable module paths.

A :class:`LayerTaps` is given a model's ordered blocks (and its final norm) once and registers
its hooks once: a pre-hook on block 1 (layer ``0`` = its input), a hook on every block (layer
``i`` = output of block ``i``) and one on the final norm (layer ``-1``). Each forward switches
them on for the layers it wants (:meth:`LayerTaps.run`); switched off, a hook returns at once.
No hook is added or removed per forward, so a student compiled with ``torch.compile`` does not
recompile because of the taps.

Stopping a teacher early: with ``stop_early`` the block list is temporarily *truncated* to the
deepest block needed (the ``nn.ModuleList`` attribute that holds the blocks is swapped for a
shorter one that shares the same modules), so the model's own forward runs only those blocks:
no exception ends the forward, and the blocks after the deepest one are never executed. The
output of such a truncated forward is meaningless and is not returned. Models whose block list
is not an attribute of a module under ``root`` fall back to running every block.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, Iterator, Sequence

from torch import Tensor, nn

from alignkit.core.adapter import resolve_layer


def _first_tensor(value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state  # type: ignore[attr-defined]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(value).__name__}")


def _owner_of(root: nn.Module | None, blocks: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent module, attribute name) holding ``blocks`` under ``root``, if any."""
    if root is None:
        return None
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is blocks:
                return parent, name
    return None


class LayerTaps:
    """Hooks on ``blocks`` (and ``final_norm``), registered once; see the module docstring.

    Positions: ``0`` = input of block 1, ``i`` = output of block ``i``, ``L + 1`` = output of
    the final norm (what layer ``-1`` means)."""

    def __init__(self, blocks: Sequence[nn.Module], final_norm: nn.Module | None, root: nn.Module | None = None) -> None:
        self.blocks = blocks
        self.final_norm = final_norm
        self.num_layers = len(blocks)
        self._wanted: dict[int, list[int]] = {}  # position -> requested indices; empty = off
        self._captured: dict[int, Tensor] = {}
        self._owner = _owner_of(root, blocks) if isinstance(blocks, nn.ModuleList) else None
        self._truncated: dict[int, nn.ModuleList] = {}
        self.handles = []
        if self.num_layers:
            self.handles.append(blocks[0].register_forward_pre_hook(self._input_hook, with_kwargs=True))
        for position, block in enumerate(blocks, start=1):
            self.handles.append(block.register_forward_hook(partial(self._output_hook, position)))
        if final_norm is not None:
            self.handles.append(final_norm.register_forward_hook(partial(self._output_hook, self.num_layers + 1)))

    def _store(self, position: int, tensor: Tensor) -> None:
        for requested in self._wanted.get(position, ()):
            self._captured[requested] = tensor

    def _input_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._wanted:
            self._store(0, args[0] if args else kwargs["hidden_states"])

    def _output_hook(self, position: int, _module: nn.Module, _args: tuple, output: object) -> None:
        # a bound method in a partial (not a closure), so a deep-copied model taps into its own copy
        if self._wanted:
            self._store(position, _first_tensor(output))

    def _positions(self, layers: Sequence[int]) -> dict[int, list[int]]:
        wanted: dict[int, list[int]] = {}
        for layer in layers:
            position = resolve_layer(layer, self.num_layers)
            wanted.setdefault(self.num_layers + 1 if position == -1 else position, []).append(layer)
        if self.num_layers + 1 in wanted and self.final_norm is None:
            raise ValueError("layer -1 requested but the adapter gave no final norm module")
        return wanted

    @contextmanager
    def _only_blocks(self, depth: int) -> Iterator[bool]:
        """Temporarily shorten the block list to ``depth`` blocks; yields whether it could."""
        if self._owner is None or depth >= self.num_layers:
            yield False
            return
        parent, name = self._owner
        if depth not in self._truncated:  # one list per depth: compiled teachers see a stable module
            self._truncated[depth] = nn.ModuleList(list(self.blocks)[:depth])
        setattr(parent, name, self._truncated[depth])
        try:
            yield True
        finally:
            setattr(parent, name, self.blocks)

    def run(self, forward: Callable[[], object], layers: Sequence[int], stop_early: bool = False) -> tuple[object | None, dict[int, Tensor]]:
        """Run ``forward()`` with the taps on for ``layers``; returns (its output, or None when
        the blocks were truncated for ``stop_early``, and {requested layer: Tensor})."""
        wanted = self._positions(layers)
        deepest = max(wanted, default=0)
        self._wanted, self._captured = wanted, {}
        try:
            with self._only_blocks(deepest) if stop_early else nullcontext(False) as truncated:
                output = forward()
            return (None if truncated else output), self._captured
        finally:
            self._wanted, self._captured = {}, {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
