"""Fused Triton kernels for S2D: TMA's temporal attention and MCP's spatial gating.

The kernels run compiled on CUDA tensors. On CPU tensors they run only in Triton's interpreter, which must be
switched on with TRITON_INTERPRET=1 before triton is first imported in the process (the test modules do so);
it is slow (about a millisecond per program instance) and meant for tests.
"""
import torch
from triton.runtime.interpreter import InterpretedFunction


def for_device(kernel, tensor, where):
    """`kernel`, after checking that it can run on `tensor`'s device; `where` names the calling file."""
    if not tensor.is_cuda and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(f"{where}: a {tensor.device.type} tensor needs Triton's interpreter, but triton was "
                           "imported without TRITON_INTERPRET=1; set it before the first import of triton, "
                           "or use the torch reference (kernels='torch')")
    return kernel


def dot_precision(dtype):
    """tl.dot's input precision: exact fp32 products for fp32 inputs (no TF32), tensor cores for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autocast_like(*tensors):
    """Cast floating inputs to the autocast dtype when autocast is on (as F.linear would), else leave them."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)
