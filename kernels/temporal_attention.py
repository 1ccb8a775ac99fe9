"""T-MSA: multi-head self-attention across the T frames, independently at every patch position.

The fused kernel reads q, k, v straight from the qkv projection's (B, T, N, 3, H, D) layout by strides and
writes (B, T, N, H*D): no (b t) n -> (b n) t transposes, and the T x T attention lives only in registers.
One program handles BLOCK_B (clip, position, head) problems as a batch of 3-D tiles (batched tl.dot); T <= 64
and D <= 128 are padded to powers of two and masked.
The backward recomputes the attention from q and k (nothing T x T is stored) and writes dqkv in the layout of qkv.
Bytes at the S2D shape (B=8, T=16, N=196, H=8, D=24, bf16): qkv 28.9 MB, output 9.6 MB.
    reference forward: SDPA reads qkv (28.9) and writes (B, N, H, T, D) (9.6), the permute + reshape copies it
        (9.6 + 9.6): >= 57.8 MB, more if SDPA copies q, k, v or takes the math path (T x T matrix: 6.4 MB each way)
    fused forward: read qkv, write the output: 38.5 MB
    reference backward: copy dout (19.3), SDPA reads q, k, v, out, dout (48.2) and writes dq, dk, dv (28.9),
        stacking them into the qkv layout (57.8): >= 154 MB
    fused backward: read qkv and dout, write dqkv: 67.4 MB
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import autocast_like, check_inputs, dot_precision, for_device


# ---------------------------------------------------------------- reference (the kernel's contract; model.py's TMA
# writes the same Eq. (10) on its own, and tests/test_model.py checks that the two agree)
def temporal_attention_ref(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """qkv (B, T, N, 3, H, D) -> (B, T, N, H*D).

    Eq. (10): head_j = softmax(Q_j K_j^T * scale) V_j, with the T x T attention per position and head;
    the heads are concatenated (the Concat of Eq. (11)); W^O is applied by the caller.
    Memory traffic: the (b t) n -> (b n) t transposes read and write qkv once more, and the
    attention matrix (B*N*H, T, T) is materialised.
    """
    B, T, N, three, H, D = qkv.shape
    q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)  # each (B, N, H, T, D)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, N, H, T, D)
    return out.permute(0, 3, 1, 2, 4).reshape(B, T, N, H * D)  # (B, T, N, H*D)


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _temporal_attention_fwd_kernel(
    qkv_ptr, out_ptr, scale, total, N, H, T, D,  # total = B * N * H attention problems
    qkv_b, qkv_t, qkv_n, qkv_3, qkv_h, qkv_d,  # qkv strides, (B, T, N, 3, H, D)
    out_b, out_t, out_n, out_c,  # out strides, (B, T, N, H*D)
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # BLOCK_B consecutive (b, n, h), head fastest
    h = i % H
    n = (i // H) % N
    b = (i // (H * N)).to(tl.int64)
    t = tl.arange(0, BLOCK_T)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (i < total)[:, None, None] & (t < T) & (d < D)  # (BB, BT, BD)
    ptrs = qkv_ptr + (b * qkv_b + n * qkv_n + h * qkv_h)[:, None, None] + t * qkv_t + d * qkv_d  # q tiles (BB, BT, BD)
    q = tl.load(ptrs, mask=mask, other=0.0)
    k = tl.load(ptrs + qkv_3, mask=mask, other=0.0)
    v = tl.load(ptrs + 2 * qkv_3, mask=mask, other=0.0)

    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION) * scale  # (BB, T, T) logits in fp32
    s = tl.where(tl.arange(0, BLOCK_T)[None, None, :] < T, s, float("-inf"))  # padded key frames: no weight
    p = tl.exp(s - tl.max(s, axis=2)[:, :, None])
    denom = tl.sum(p, axis=2)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / denom[:, :, None]  # (BB, T, D)

    out_ptrs = out_ptr + (b * out_b + n * out_n + h * D * out_c)[:, None, None] + t * out_t + d * out_c
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_attention_bwd_kernel(
    qkv_ptr, dout_ptr, dqkv_ptr, scale, total, N, H, T, D,
    qkv_b, qkv_t, qkv_n, qkv_3, qkv_h, qkv_d,  # qkv strides, (B, T, N, 3, H, D)
    dout_b, dout_t, dout_n, dout_c,  # dout strides, (B, T, N, H*D)
    dqkv_b, dqkv_t, dqkv_n, dqkv_3, dqkv_h,  # dqkv strides, contiguous (B, T, N, 3, H, D)
    BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    # Gradient of one (clip, position, head) problem, O = P V with P = softmax(S) row-wise, S = scale Q K^T
    # (T x T), given dO:
    #   dV = P^T dO;  dP = dO V^T
    #   dS = P * (dP - rowsum(P * dP))                    (softmax backward, row by row)
    #   dQ = scale dS K;  dK = scale dS^T Q               (the code folds scale into dS)
    # P is recomputed from Q and K, never stored. Strides by tensor and axis: qkv_*, dout_*, dqkv_* as named above.
    i = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    h = i % H
    n = (i // H) % N
    b = (i // (H * N)).to(tl.int64)
    t = tl.arange(0, BLOCK_T)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (i < total)[:, None, None] & (t < T) & (d < D)
    ptrs = qkv_ptr + (b * qkv_b + n * qkv_n + h * qkv_h)[:, None, None] + t * qkv_t + d * qkv_d
    q = tl.load(ptrs, mask=mask, other=0.0)
    k = tl.load(ptrs + qkv_3, mask=mask, other=0.0)
    v = tl.load(ptrs + 2 * qkv_3, mask=mask, other=0.0)
    do_ptrs = dout_ptr + (b * dout_b + n * dout_n + h * D * dout_c)[:, None, None] + t * dout_t + d * dout_c
    do = tl.load(do_ptrs, mask=mask, other=0.0)  # padded query frames have zero gradient

    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION) * scale  # recompute the attention
    s = tl.where(tl.arange(0, BLOCK_T)[None, None, :] < T, s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=2)[:, :, None])
    p = p / tl.sum(p, axis=2)[:, :, None]  # (BB, T, T)

    dv = tl.dot(tl.permute(p, (0, 2, 1)).to(do.dtype), do, input_precision=PRECISION)  # (BB, T, D)
    dp = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PRECISION)  # (BB, T, T)
    ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None]) * scale  # softmax backward; sum(p * dp) = rowsum(do * o)
    dq = tl.dot(ds.to(q.dtype), k, input_precision=PRECISION)
    dk = tl.dot(tl.permute(ds, (0, 2, 1)).to(q.dtype), q, input_precision=PRECISION)

    dqkv_ptrs = dqkv_ptr + (b * dqkv_b + n * dqkv_n + h * dqkv_h)[:, None, None] + t * dqkv_t + d
    dtype = dqkv_ptr.dtype.element_ty
    tl.store(dqkv_ptrs, dq.to(dtype), mask=mask)
    tl.store(dqkv_ptrs + dqkv_3, dk.to(dtype), mask=mask)
    tl.store(dqkv_ptrs + 2 * dqkv_3, dv.to(dtype), mask=mask)


# ---------------------------------------------------------------- launchers (torch.library custom ops)
TILE = 4096  # elements per (BLOCK_B, BLOCK_T, BLOCK_D) tile: BLOCK_B = 8 problems at T = 16, D = 24


def _launch_config(qkv):
    """(grid, kernel settings) for qkv (B, T, N, 3, H, D): B * N * H problems of T x D, BLOCK_B per program."""
    if qkv.dim() != 6 or qkv.shape[3] != 3 or qkv.shape[1] > 64 or qkv.shape[5] > 128:
        raise ValueError(f"kernels/temporal_attention.py: expected qkv (B, T, N, 3, H, D) with T <= 64 and "
                         f"D <= 128, got shape {tuple(qkv.shape)}")
    B, T, N, three, H, D = qkv.shape
    block_t, block_d = max(16, triton.next_power_of_2(T)), max(16, triton.next_power_of_2(D))
    block_b = max(1, min(TILE // (block_t * block_d), triton.next_power_of_2(B * N * H)))
    config = dict(BLOCK_B=block_b, BLOCK_T=block_t, BLOCK_D=block_d, PRECISION=dot_precision(qkv.dtype),
                  num_warps=4)
    return (triton.cdiv(B * N * H, block_b),), config


@torch.library.custom_op("s2d::temporal_attention_forward", mutates_args=())
def temporal_attention_forward(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    grid, config = _launch_config(qkv)
    B, T, N, _, H, D = qkv.shape
    out = qkv.new_empty(B, T, N, H * D)  # (B, T, N, H*D)
    if qkv.numel() == 0:  # nothing to attend over (an empty batch, say): nothing to launch
        return out
    kernel = for_device(_temporal_attention_fwd_kernel, qkv, __file__)
    kernel[grid](qkv, out, scale, B * N * H, N, H, T, D, *qkv.stride(), *out.stride(), **config)
    return out


@temporal_attention_forward.register_fake
def _(qkv, scale):
    B, T, N, _, H, D = qkv.shape
    return qkv.new_empty(B, T, N, H * D)


@torch.library.custom_op("s2d::temporal_attention_backward", mutates_args=())
def temporal_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, scale: float) -> torch.Tensor:
    grid, config = _launch_config(qkv)
    B, T, N, _, H, D = qkv.shape
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # contiguous (B, T, N, 3, H, D)
    if qkv.numel() == 0:
        return dqkv
    kernel = for_device(_temporal_attention_bwd_kernel, qkv, __file__)
    kernel[grid](qkv, dout, dqkv, scale, B * N * H, N, H, T, D, *qkv.stride(), *dout.stride(),
                 *dqkv.stride()[:5], **config)
    return dqkv


@temporal_attention_backward.register_fake
def _(dout, qkv, scale):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


# ---------------------------------------------------------------- autograd
class TemporalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, scale):
        ctx.save_for_backward(qkv)  # only qkv: the backward recomputes the attention
        ctx.scale = scale
        return torch.ops.s2d.temporal_attention_forward(qkv, scale)

    @staticmethod
    def backward(ctx, dout):
        (qkv,) = ctx.saved_tensors
        return torch.ops.s2d.temporal_attention_backward(dout, qkv, ctx.scale), None


# ---------------------------------------------------------------- public entry
def temporal_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused T-MSA, same contract as temporal_attention_ref: qkv (B, T, N, 3, H, D) -> (B, T, N, H*D)."""
    (qkv,) = autocast_like(qkv)
    check_inputs(__file__, qkv)
    return TemporalAttentionFunction.apply(qkv, float(scale))
