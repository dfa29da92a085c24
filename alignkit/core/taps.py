"""Feature taps: hidden states by layer index through forward hooks on stable module paths.

A tap is given the model's ordered blocks (and its final norm). Layer ``0`` is captured as the
input of block 1, layer ``i`` as the output of block ``i``, layer ``-1`` as the output of the
final norm. With ``stop_early`` the forward is aborted (``StopForward``) as soon as the deepest
requested layer has been captured, so a teacher never computes layers (or a head) nobody reads.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from torch import Tensor, nn

from alignkit.core.adapter import resolve_layer


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; caught by ``run_tapped``."""


def _first_tensor(value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state  # type: ignore[attr-defined]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(value).__name__}")


@contextmanager
def tap_layers(
    blocks: Sequence[nn.Module],
    final_norm: nn.Module | None,
    layers: Sequence[int],
    stop_early: bool = False,
) -> Iterator[dict[int, Tensor]]:
    """Context manager: while active, forward passes fill the yielded dict {layer: Tensor}.

    Keys are the layer indices as asked (so ``-1`` stays ``-1``)."""
    captured: dict[int, Tensor] = {}
    num_layers = len(blocks)
    wanted: dict[int, list[int]] = {}  # resolved position -> requested indices
    for layer in layers:
        wanted.setdefault(resolve_layer(layer, num_layers), []).append(layer)
    if -1 in wanted and final_norm is None:
        raise ValueError("layer -1 requested but the adapter gave no final norm module")
    deepest = num_layers + 1 if -1 in wanted else max(wanted, default=0)
    handles = []

    def store(position: int, tensor: Tensor) -> None:
        for requested in wanted[position]:
            captured[requested] = tensor
        if stop_early and position == deepest:
            raise StopForward

    def input_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        store(0, hidden)

    def output_hook(position: int) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            store(position, _first_tensor(output))

        return hook

    try:
        if 0 in wanted:
            handles.append(blocks[0].register_forward_pre_hook(input_hook, with_kwargs=True))
        for position in wanted:
            if position >= 1:
                handles.append(blocks[position - 1].register_forward_hook(output_hook(position)))
        if -1 in wanted:
            # position num_layers + 1 stands for "after the final norm"
            wanted[num_layers + 1] = wanted.pop(-1)
            handles.append(final_norm.register_forward_hook(output_hook(num_layers + 1)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_tapped(
    forward: Callable[[], object],
    blocks: Sequence[nn.Module],
    final_norm: nn.Module | None,
    layers: Sequence[int],
    stop_early: bool = False,
) -> tuple[object | None, dict[int, Tensor]]:
    """Run ``forward()`` with taps on; returns (its output or None if stopped early, features)."""
    with tap_layers(blocks, final_norm, layers, stop_early) as captured:
        try:
            output = forward()
        except StopForward:
            output = None
    return output, captured
