"""What eager torch work would cost a device, counted on any device (CPU included): operator calls
and bytes moved, at torch's dispatcher.

A decode step at small batch is bound by one of the two: by the host's operator calls when it runs
eagerly (each call costs the host ~10-20 us), by the bytes its kernels read and write when CUDA
graphs hide the host (a batch-1 step reads every weight it uses once, and a 1-token GEMM does
almost nothing else). So these counts compare two ways of computing a step on the CPU, before a
GPU times them.

The byte count is a model, not a measurement: every operator reads its tensor arguments whole and
writes its outputs (an ``out=`` argument is only written), except that views move nothing, an
in-place operator's output is its input (not counted twice), a gather (``index``, ``index_select``,
``gather``, ``embedding``) reads only what it writes, and an in-place scatter (``index_copy_``,
``index_put_``, ``scatter_``, ``index_add_``) reads and writes only its source's size. Caches are
ignored: a weight read twice counts twice.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GATHERS = frozenset({"index", "index_select", "gather", "embedding"})
_SCATTERS = frozenset({"index_copy_", "index_put_", "scatter_", "index_add_"})


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for value in values:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(_tensors(value))
    return out


def _size(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Traffic(TorchDispatchMode):
    """``with Traffic() as t: ...`` counts ``t.ops`` (operator calls) and ``t.bytes`` (the model
    of the module docstring) of the eager work inside.

    ``owners`` (a tensor storage's address -> a label, e.g. the weights of one part of a model):
    ``t.by_owner`` splits ``t.bytes`` by label; an operator's reads of a labelled tensor count
    for its label (a gather or scatter's whole figure for its labelled input's), the rest for
    ``"other"`` (activations, caches, states)."""

    def __init__(self, owners: dict[int, str] | None = None):
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.owners = owners
        self.by_owner: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        if not func.is_view:
            # an out= argument is where the output goes, not a read
            inputs = _tensors(args) + _tensors(v for k, v in kwargs.items() if k != "out")
            moved = self.moved(func._opname, inputs,
                               _tensors(out if isinstance(out, (list, tuple)) else (out,)))
            self.bytes += moved
            if self.owners is not None:
                self._attribute(func._opname, inputs, moved)
        return out

    def _attribute(self, name: str, inputs: list[torch.Tensor], moved: int) -> None:
        owned = [(self.owners.get(t.untyped_storage().data_ptr()), t) for t in inputs]
        if name in _GATHERS or name in _SCATTERS:
            self.by_owner[next((owner for owner, _ in owned if owner), "other")] += moved
            return
        rest = moved
        for owner, tensor in owned:
            if owner:
                size = _size([tensor])
                self.by_owner[owner] += size
                rest -= size
        self.by_owner["other"] += max(rest, 0)

    @staticmethod
    def moved(name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> int:
        """Bytes one call of operator ``name`` moves (the module docstring's model)."""
        if name in _GATHERS:
            return 2 * _size(outputs)
        if name in _SCATTERS:
            return 2 * _size(inputs[-1:])  # the source comes last
        if name.endswith("_"):  # in place: the output is the first input
            return _size(inputs)
        return _size(inputs) + _size(outputs)
