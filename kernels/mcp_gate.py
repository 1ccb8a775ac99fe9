"""MCP's spatial gating: both 1x1 down-projections, the Fovea gate and the landmark-branch add.

The fused path reads the token-major inputs (BT, N, C) by strides, without the reference's (BT, C, h, w)
feature-map views and its separate conv / softmax / mul / add kernels, and casts them tile by tile to the
compute dtype (the weights' dtype: the autocast dtype under autocast), so the fp32 LayerNorm outputs that feed
MCP under autocast are read once, never copied to bf16.
Two kernels per direction:
    _mcp_proj_fwd_kernel   one program per (frame, block of tokens): x0 = x W_x^T + b_x, x1 = a W_a^T + b_a (fp32)
    _mcp_gate_fwd_kernel   one program per frame: A = softmax over N of s * x0 (online, blocks of N), A * x0 + x1
    _mcp_gate_bwd_kernel   one program per frame: dx0 and the frame's part of ds
    _mcp_proj_bwd_kernel   one program per (frame, block of channels): dx, da and the frame's parts of dW_x, dW_a
Per-frame partial sums (dW, ds) go to buffers that torch sums, so the gradients are deterministic.
The up-projection (8 -> C) stays a matmul in model.py: fusing it was not measured (no GPU so far).
Bytes at the S2D shape (BT=128, N=196, C=768: BT N C = 19.3 M elements per input; bf16 autocast, x, a in fp32):
    reference forward: cast x, a to bf16 (read 4 + write 2 bytes), conv reads them (2): 16 B x BT N C = 308 MB
    fused forward: read x, a once (4 + 4 bytes): 154 MB, plus (BT, N, 8) fp32 intermediates (1.6 MB)
    reference backward: dx, da in bf16 (2), re-read of the bf16 copies (2), cast back (2 + 4): 385 MB
    fused backward: read x, a (4 + 4), write dx, da (4 + 4): 308 MB, plus (BT, 8, C) fp32 partials (6.3 MB)
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import autocast_like, check_inputs, dot_precision, for_device

BLOCK_N = 64  # tokens per block
BLOCK_C = 64  # channels per block


# ---------------------------------------------------------------- reference (the kernels' contract; model.py's MCP
# writes the same Eq. (3)-(6) on its own layers, and tests/test_model.py checks that the two agree)
def mcp_gate_ref(x, a, w_x, b_x, w_a, b_a, s):
    """x, a (BT, N, C) token-major; w_x, w_a (K, C); b_x, b_a (K,); s scalar -> (BT, N, K), K = 8.

    Eq. (3): x0 = Conv1x1(x), x1 = Conv1x1(a) on the feature map (BT, C, h, w)
    Eq. (4): A = softmax over the N = h*w positions of s * x0, per frame and channel
    Eq. (5): x0' = A * x0;  then x0' + x1 (the sum inside Eq. (6))
    Like the release, this works on feature maps: tokens -> (BT, C, h, w) -> 1x1 conv -> tokens.
    Memory traffic: reads x and a (2 BT N C); the (BT, C, h, w) maps are channels-last views of the tokens, which
    conv2d reads in place or first copies (4 BT N C more), depending on the backend; under autocast it also
    copies fp32 inputs to bf16 (4 BT N C written, read again).
    """
    BT, N, C = x.shape
    h = w = int(round(N ** 0.5))
    if h * w != N:
        raise ValueError(f"mcp_gate_ref: N={N} tokens is not a square grid")
    fmap_x = x.transpose(1, 2).reshape(BT, C, h, w)  # (BT, C, h, w)
    fmap_a = a.transpose(1, 2).reshape(BT, C, h, w)
    x0 = F.conv2d(fmap_x, w_x[:, :, None, None], b_x).flatten(2)  # Eq. (3)  (BT, K, N)
    x1 = F.conv2d(fmap_a, w_a[:, :, None, None], b_a).flatten(2)  # Eq. (3)  (BT, K, N)
    attn = torch.softmax(s.reshape(()) * x0, dim=-1)  # Eq. (4)  softmax over N
    gated = attn * x0  # Eq. (5)
    return (gated + x1).transpose(1, 2)  # (BT, N, K)


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _mcp_proj_fwd_kernel(
    x_ptr, a_ptr, wx_ptr, bx_ptr, wa_ptr, ba_ptr, x0_ptr, x1_ptr, N, C, K,
    x_bt, x_n, x_c, a_bt, a_n, a_c, wx_k, wx_c, wa_k, wa_c,  # strides of x, a (BT, N, C), w_x, w_a (K, C)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)  # bt * cdiv(N, BLOCK_N) + block of tokens
    n_blocks = tl.cdiv(N, BLOCK_N)
    bt = (pid // n_blocks).to(tl.int64)
    n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc_x = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):  # Eq. (3), both branches over one pass of the channels
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (n[:, None] < N) & (c[None, :] < C)
        w_mask = (c[:, None] < C) & (k[None, :] < K)
        wxt = tl.load(wx_ptr + k[None, :] * wx_k + c[:, None] * wx_c, mask=w_mask, other=0.0)  # (BC, BK) = W_x^T
        wat = tl.load(wa_ptr + k[None, :] * wa_k + c[:, None] * wa_c, mask=w_mask, other=0.0).to(wxt.dtype)
        # x and a are cast tile by tile to the weights' (compute) dtype: fp32 LayerNorm outputs are read as they are
        xt = tl.load(x_ptr + bt * x_bt + n[:, None] * x_n + c[None, :] * x_c, mask=mask, other=0.0)  # (BN, BC)
        at = tl.load(a_ptr + bt * a_bt + n[:, None] * a_n + c[None, :] * a_c, mask=mask, other=0.0)
        acc_x = tl.dot(xt.to(wxt.dtype), wxt, acc_x, input_precision=PRECISION)
        acc_a = tl.dot(at.to(wxt.dtype), wat, acc_a, input_precision=PRECISION)
    acc_x += tl.load(bx_ptr + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
    acc_a += tl.load(ba_ptr + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
    out_mask = (n[:, None] < N) & (k[None, :] < K)
    offs = bt * N * K + n[:, None] * K + k[None, :]  # x0, x1 contiguous (BT, N, K) fp32
    tl.store(x0_ptr + offs, acc_x, mask=out_mask)
    tl.store(x1_ptr + offs, acc_a, mask=out_mask)


@triton.jit
def _mcp_gate_fwd_kernel(
    x0_ptr, x1_ptr, s_ptr, out_ptr, max_ptr, sum_ptr, N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    s = tl.load(s_ptr).to(tl.float32)
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)  # running max of s * x0 per channel
    total = tl.zeros((BLOCK_K,), tl.float32)  # running sum of exp(s * x0 - m)
    for n0 in range(0, N, BLOCK_N):  # Eq. (4): online softmax statistics over the N positions
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n[:, None] < N) & (k[None, :] < K)
        z = s * tl.load(x0_ptr + bt * N * K + n[:, None] * K + k[None, :], mask=mask, other=0.0)
        z = tl.where(n[:, None] < N, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[None, :]), axis=0)
        m = m_new
    tl.store(max_ptr + bt * K + k, m, mask=k < K)
    tl.store(sum_ptr + bt * K + k, total, mask=k < K)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n[:, None] < N) & (k[None, :] < K)
        offs = bt * N * K + n[:, None] * K + k[None, :]
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0)
        x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0)
        out = tl.exp(s * x0 - m[None, :]) / total[None, :] * x0 + x1  # Eq. (5): A * x0, plus the landmark branch
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mcp_gate_bwd_kernel(
    dout_ptr, x0_ptr, max_ptr, sum_ptr, s_ptr, dx0_ptr, ds_ptr, N, K,
    dout_bt, dout_n, dout_k,  # dout strides, (BT, N, K)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Gradient, per frame bt and channel k, with g_n = dL/dout_n for out_n = A_n x0_n + x1_n, A = softmax_n(z),
    # z_n = s x0_n (Eq. 4-5):
    #   dL/dx1_n = g_n                                  (returned by the launcher as dout itself)
    #   dL/dz_n  = A_n (g_n x0_n - delta), delta = sum_m A_m g_m x0_m     (softmax backward of dL/dA_n = g_n x0_n)
    #   dL/dx0_n = g_n A_n + s dL/dz_n                  (x0 enters directly and through z)
    #   dL/ds    = sum_n dL/dz_n x0_n                   (this frame's part; the launcher sums frames)
    # Two passes over N: delta first, then dx0 and ds. dout strides: dout_bt, dout_n, dout_k; x0 contiguous.
    bt = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    s = tl.load(s_ptr).to(tl.float32)
    m = tl.load(max_ptr + bt * K + k, mask=k < K, other=0.0)  # the forward's softmax statistics
    total = tl.load(sum_ptr + bt * K + k, mask=k < K, other=1.0)
    delta = tl.zeros((BLOCK_K,), tl.float32)  # sum over N of A * dA, with dA = dout * x0
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n[:, None] < N) & (k[None, :] < K)
        x0 = tl.load(x0_ptr + bt * N * K + n[:, None] * K + k[None, :], mask=mask, other=0.0)
        g = tl.load(dout_ptr + bt * dout_bt + n[:, None] * dout_n + k[None, :] * dout_k, mask=mask, other=0.0)
        g = g.to(tl.float32)
        delta += tl.sum(tl.exp(s * x0 - m[None, :]) / total[None, :] * g * x0, axis=0)
    ds = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n[:, None] < N) & (k[None, :] < K)
        offs = bt * N * K + n[:, None] * K + k[None, :]
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0)
        g = tl.load(dout_ptr + bt * dout_bt + n[:, None] * dout_n + k[None, :] * dout_k, mask=mask, other=0.0)
        g = g.to(tl.float32)
        attn = tl.exp(s * x0 - m[None, :]) / total[None, :]
        dz = tl.where(mask, attn * (g * x0 - delta[None, :]), 0.0)  # gradient of the softmax logits s * x0
        tl.store(dx0_ptr + offs, g * attn + s * dz, mask=mask)
        ds += tl.sum(dz * x0, axis=0)
    tl.store(ds_ptr + bt, tl.sum(ds, axis=0))


@triton.jit
def _mcp_proj_bwd_kernel(
    dx0_ptr, dout_ptr, x_ptr, a_ptr, wx_ptr, wa_ptr, dx_ptr, da_ptr, dwx_ptr, dwa_ptr, N, C, K,
    dout_bt, dout_n, dout_k, x_bt, x_n, x_c, a_bt, a_n, a_c, wx_k, wx_c, wa_k, wa_c,  # strides of dout, x, a, w_x, w_a
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # Gradient of Eq. (3), x0 = x W_x^T + b_x and x1 = a W_a^T + b_a, with dx0 from _mcp_gate_bwd_kernel and
    # dx1 = dout:
    #   dx = dx0 W_x,  da = dout W_a                     (per token: (N, K) @ (K, C))
    #   dW_x = sum over frames and tokens of dx0^T x,  dW_a = the same of dout^T a    (this frame's part here)
    #   db_x = sum of dx0, db_a = sum of dout            (taken by torch in the launcher)
    # Strides by tensor and axis: dout (bt, n, k), x and a (bt, n, c), w_x and w_a (k, c); dx0, dx, da contiguous.
    pid = tl.program_id(0)  # bt * cdiv(C, BLOCK_C) + block of channels
    c_blocks = tl.cdiv(C, BLOCK_C)
    bt = (pid // c_blocks).to(tl.int64)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_K)
    w_mask = (k[:, None] < K) & (c[None, :] < C)
    wx = tl.load(wx_ptr + k[:, None] * wx_k + c[None, :] * wx_c, mask=w_mask, other=0.0)  # (BK, BC)
    wa = tl.load(wa_ptr + k[:, None] * wa_k + c[None, :] * wa_c, mask=w_mask, other=0.0).to(wx.dtype)
    dwx = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
    dwa = tl.zeros((BLOCK_K, BLOCK_C), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        k_mask = (n[:, None] < N) & (k[None, :] < K)
        dx0 = tl.load(dx0_ptr + bt * N * K + n[:, None] * K + k[None, :], mask=k_mask, other=0.0)  # (BN, BK)
        g = tl.load(dout_ptr + bt * dout_bt + n[:, None] * dout_n + k[None, :] * dout_k, mask=k_mask, other=0.0)
        mask = (n[:, None] < N) & (c[None, :] < C)
        xt = tl.load(x_ptr + bt * x_bt + n[:, None] * x_n + c[None, :] * x_c, mask=mask, other=0.0)  # (BN, BC)
        at = tl.load(a_ptr + bt * a_bt + n[:, None] * a_n + c[None, :] * a_c, mask=mask, other=0.0)
        dx0 = dx0.to(wx.dtype)  # the compute dtype, as in the forward
        g = g.to(wx.dtype)
        dx = tl.dot(dx0, wx, input_precision=PRECISION)  # (BN, BC)
        da = tl.dot(g, wa, input_precision=PRECISION)
        offs = bt * N * C + n[:, None] * C + c[None, :]  # dx, da contiguous (BT, N, C)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
        dwx = tl.dot(tl.trans(dx0), xt.to(wx.dtype), dwx, input_precision=PRECISION)  # (BK, BC)
        dwa = tl.dot(tl.trans(g), at.to(wx.dtype), dwa, input_precision=PRECISION)
    offs = bt * K * C + k[:, None] * C + c[None, :]  # per-frame partials (BT, K, C) fp32
    tl.store(dwx_ptr + offs, dwx, mask=w_mask)
    tl.store(dwa_ptr + offs, dwa, mask=w_mask)


# ---------------------------------------------------------------- launchers (torch.library custom ops)
def _check(x, a, w_x, w_a, s, b_x=None, b_a=None):
    """(BT, N, C, K) of valid inputs; else a ValueError naming every shape (the biases where given)."""
    ok = x.dim() == 3 and w_x.dim() == 2 and a.shape == x.shape and s.numel() == 1
    if ok:
        (BT, N, C), K = x.shape, w_x.shape[0]
        ok = w_x.shape == w_a.shape == (K, C) and all(b is None or b.shape == (K,) for b in (b_x, b_a))
    if not ok:
        biases = "" if b_x is None else f", b_x {tuple(b_x.shape)}, b_a {tuple(b_a.shape)}"
        raise ValueError(f"kernels/mcp_gate.py: expected x, a (BT, N, C), w_x, w_a (K, C), b_x, b_a (K,), one-element "
                         f"s; got x {tuple(x.shape)}, a {tuple(a.shape)}, w_x {tuple(w_x.shape)}, "
                         f"w_a {tuple(w_a.shape)}{biases}, s {tuple(s.shape)}")
    return BT, N, C, K


def _blocks(K, dtype):
    block_k = max(16, triton.next_power_of_2(K))  # tl.dot needs 16 rows at least
    return dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_K=block_k, PRECISION=dot_precision(dtype))


@torch.library.custom_op("s2d::mcp_gate_forward", mutates_args=())
def mcp_gate_forward(x: torch.Tensor, a: torch.Tensor, w_x: torch.Tensor, b_x: torch.Tensor, w_a: torch.Tensor,
                     b_a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (BT, N, K) in the weights' dtype; x0 (BT, N, K) and the softmax's max and sum (2, BT, K) in fp32."""
    BT, N, C, K = _check(x, a, w_x, w_a, s, b_x, b_a)
    x0 = torch.empty(BT, N, K, dtype=torch.float32, device=x.device)
    x1 = torch.empty_like(x0)
    proj = for_device(_mcp_proj_fwd_kernel, x, __file__)
    proj[(BT * triton.cdiv(N, BLOCK_N),)](x, a, w_x, b_x, w_a, b_a, x0, x1, N, C, K, *x.stride(), *a.stride(),
                                          *w_x.stride(), *w_a.stride(), **_blocks(K, w_x.dtype))
    out = torch.empty(BT, N, K, dtype=w_x.dtype, device=x.device)
    stats = torch.empty(2, BT, K, dtype=torch.float32, device=x.device)  # softmax max and sum per frame, channel
    gate = for_device(_mcp_gate_fwd_kernel, x, __file__)
    gate[(BT,)](x0, x1, s, out, stats[0], stats[1], N, K, BLOCK_N=BLOCK_N, BLOCK_K=triton.next_power_of_2(K))
    return out, x0, stats


@mcp_gate_forward.register_fake
def _(x, a, w_x, b_x, w_a, b_a, s):
    (BT, N, _), K = x.shape, w_x.shape[0]
    x0 = x.new_empty(BT, N, K, dtype=torch.float32)
    return x.new_empty(BT, N, K, dtype=w_x.dtype), x0, x.new_empty(2, BT, K, dtype=torch.float32)


@torch.library.custom_op("s2d::mcp_gate_backward", mutates_args=())
def mcp_gate_backward(dout: torch.Tensor, x: torch.Tensor, a: torch.Tensor, w_x: torch.Tensor, w_a: torch.Tensor,
                      s: torch.Tensor, x0: torch.Tensor, stats: torch.Tensor) -> list[torch.Tensor]:
    """-> [dx, da, dw_x, db_x, dw_a, db_a, ds]; weight, bias and s gradients in fp32, summed over frames."""
    BT, N, C, K = _check(x, a, w_x, w_a, s)
    dx0 = torch.empty_like(x0)  # (BT, N, K) fp32
    ds = torch.empty(BT, dtype=torch.float32, device=x.device)  # per-frame parts of ds
    gate = for_device(_mcp_gate_bwd_kernel, x, __file__)
    gate[(BT,)](dout, x0, stats[0], stats[1], s, dx0, ds, N, K, *dout.stride(),
                BLOCK_N=BLOCK_N, BLOCK_K=triton.next_power_of_2(K))
    dx = torch.empty(BT, N, C, dtype=x.dtype, device=x.device)
    da = torch.empty(BT, N, C, dtype=a.dtype, device=x.device)
    dwx = torch.empty(BT, K, C, dtype=torch.float32, device=x.device)  # per-frame parts of dW_x, dW_a
    dwa = torch.empty_like(dwx)
    proj = for_device(_mcp_proj_bwd_kernel, x, __file__)
    proj[(BT * triton.cdiv(C, BLOCK_C),)](dx0, dout, x, a, w_x, w_a, dx, da, dwx, dwa, N, C, K, *dout.stride(),
                                          *x.stride(), *a.stride(), *w_x.stride(), *w_a.stride(),
                                          **_blocks(K, w_x.dtype))
    return [dx, da, dwx.sum(0), dx0.sum((0, 1)), dwa.sum(0), dout.float().sum((0, 1)), ds.sum().reshape(s.shape)]


@mcp_gate_backward.register_fake
def _(dout, x, a, w_x, w_a, s, x0, stats):
    K = w_x.shape[0]
    f32 = dict(dtype=torch.float32)
    return [x.new_empty(x.shape), a.new_empty(a.shape), w_x.new_empty(w_x.shape, **f32), x.new_empty(K, **f32),
            w_a.new_empty(w_a.shape, **f32), x.new_empty(K, **f32), s.new_empty(s.shape, **f32)]


# ---------------------------------------------------------------- autograd
class MCPGateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, w_x, b_x, w_a, b_a, s):
        out, x0, stats = torch.ops.s2d.mcp_gate_forward(x, a, w_x, b_x, w_a, b_a, s)
        ctx.save_for_backward(x, a, w_x, w_a, s, x0, stats)  # x0 (BT, N, K) and stats (2, F, K) fp32: small
        ctx.dtypes = (b_x.dtype, b_a.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, a, w_x, w_a, s, x0, stats = ctx.saved_tensors
        dx, da, dw_x, db_x, dw_a, db_a, ds = torch.ops.s2d.mcp_gate_backward(dout, x, a, w_x, w_a, s, x0, stats)
        return dx, da, dw_x.to(w_x.dtype), db_x.to(ctx.dtypes[0]), dw_a.to(w_a.dtype), db_a.to(ctx.dtypes[1]), \
            ds.to(s.dtype)


# ---------------------------------------------------------------- public entry
def mcp_gate(x, a, w_x, b_x, w_a, b_a, s):
    """Fused gate, same contract as mcp_gate_ref: softmax_N(s * x0) * x0 + x1, (BT, N, K), in the weights' dtype."""
    w_x, b_x, w_a, b_a = autocast_like(w_x, b_x, w_a, b_a)  # the compute dtype; x, a are cast inside the kernel
    check_inputs(__file__, x, a, w_x, b_x, w_a, b_a, s)
    return MCPGateFunction.apply(x, a, w_x, b_x, w_a, b_a, s)
