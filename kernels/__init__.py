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


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(where, *tensors):
    """Refuse inputs the kernels would not compute right: mixed devices, dtypes other than fp16 / bf16 / fp32 (the
    kernels keep fp32 buffers, so fp64 would come back rounded to fp32), and bf16 in Triton's interpreter (it gets
    bf16 arithmetic wrong). `where` names the calling file."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{where}: inputs on {device} and on {t.device}; all must be on one device")
        if t.dtype not in DTYPES:
            raise ValueError(f"{where}: a {t.dtype} input of shape {tuple(t.shape)}; the kernels compute in float16, "
                             "bfloat16 or float32 (for other dtypes use the torch reference, kernels='torch')")
    if device.type != "cuda" and any(t.dtype == torch.bfloat16 for t in tensors):
        raise ValueError(f"{where}: bfloat16 on {device.type}: Triton's interpreter computes bfloat16 wrongly; use "
                         "float32 or float16 there, or the torch reference (kernels='torch')")


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
