"""Test harness shared by the test suite and by feature modules: multi-process gloo runs and the
single-rank-versus-parallel training comparison."""

import contextlib


def stub_mamba1_extension() -> bool:
    """Lets ``import mamba_ssm`` succeed where mamba_ssm was built without its Mamba-1 CUDA
    extension (``selective_scan_cuda``), as on our H200 image: the Mamba-2 SSD Triton kernels that
    Megatron's ``MambaMixer`` uses do not need it, but the package's ``__init__`` imports it. The stub
    has no attributes: anything that reaches into it fails with an AttributeError saying why. Test/benchmark harness only; returns True if stubbed.
    """
    import importlib.util
    import sys
    import types

    if "selective_scan_cuda" in sys.modules or importlib.util.find_spec("mamba_ssm") is None:
        return False
    if importlib.util.find_spec("selective_scan_cuda") is not None:
        return False

    def _missing(name):
        raise AttributeError(f"selective_scan_cuda.{name}: the Mamba-1 CUDA extension is not built here")

    stub = types.ModuleType("selective_scan_cuda")
    stub.__getattr__ = _missing
    sys.modules["selective_scan_cuda"] = stub
    return True


@contextlib.contextmanager
def aux_loss_scale(scale):
    """Megatron's auxiliary-loss backward scale set as a schedule sets it (``MoEAuxLossAutoScaler``,
    which MoD and FlexiDepth read at backward time); unset afterwards."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoEAuxLossAutoScaler.set_loss_scale(scale)
    try:
        yield
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
