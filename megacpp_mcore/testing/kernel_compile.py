"""Compiles the package's Triton kernels for sm_90 (H100/H200) on a host without a GPU.

A kernel's launcher runs as the package calls it, on CPU tensors, with the ``@triton.jit`` kernel
swapped for a recorder (:func:`recorded`; nothing runs); each recorded :class:`Launch` is then
compiled by Triton's own compiler down to a cubin (:func:`compile_sm90`; Triton ships ptxas), and
:func:`resources` reads what ptxas allots it. Used by ``tests/test_kernel_compile.py`` (every
launched kernel compiles) and by kernel work that wants registers and spills before GPU time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
_POINTEE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8",
            torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}
_OPTIONS = ("num_warps", "num_stages")


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, kernel, log: list[Launch]):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.kernel, args, dict(kwargs)))


@contextlib.contextmanager
def recorded(module, *names: str):
    """Swaps ``module``'s kernels ``names`` for recorders; yields the list of launches."""
    log: list[Launch] = []
    saved = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in saved.items():
            if not isinstance(kernel, triton.runtime.JITFunction):
                raise TypeError(f"{name} is a {type(kernel).__name__}, not a compiled-mode "
                                "@triton.jit kernel (TRITON_INTERPRET set?)")
            setattr(module, name, _Recorder(kernel, log))
        yield log
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def _arg_type(name: str, value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"kernel argument {name}={value!r}: no Triton type for {type(value).__name__}")


def compile_sm90(launch: Launch):
    """The recorded launch compiled for sm_90 (the runtime's types: tensors as typed pointers, ints
    as i32/i64, floats as fp32; constexpr parameters as their values)."""
    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = dict(zip(kernel.arg_names, launch.args))
    bound.update(kwargs)
    for param in kernel.params:
        if param.name not in bound:
            if not param.has_default:
                raise TypeError(f"{launch.name}: no value for {param.name}")
            bound[param.name] = param.default
    constexpr = {p.name for p in kernel.params if p.is_constexpr}
    signature, constants = {}, {}
    for name in kernel.arg_names:
        value = bound[name]
        if name in constexpr:
            signature[name], constants[name] = "constexpr", value
        else:
            signature[name] = _arg_type(name, value)
    return triton.compile(ASTSource(kernel, signature, constexprs=constants), target=SM90,
                          options=options)


def resources(compiled) -> dict[str, int]:
    """Registers per thread, spill bytes (stores + loads) and shared memory of a compiled kernel,
    from the bundled ptxas's ``-v`` report on its PTX; plus its tensor-core instructions (mma)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(SM90.arch).path  # the one triton.compile used (Triton 3.9 picks CUDA 13's)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"),
            "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            "shared_bytes": compiled.metadata.shared,
            "mma": len(re.findall(r"\b(?:w?gmma|mma)\.", ptx))}
