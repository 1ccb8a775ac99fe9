"""The fused Triton kernels against their PyTorch references: values, gradients, invariants.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before triton's first import:
tests/conftest.py does so, and so does this module when run alone (see kernels/__init__.py). The interpreter is
slow, so shapes stay small. Ground truth is the reference in float64 on the same (rounded) inputs, so a tolerance
measures the kernel's own rounding.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels.mcp_gate import mcp_gate, mcp_gate_ref  # noqa: E402
from kernels.temporal_attention import temporal_attention, temporal_attention_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# dtype -> (forward tolerance, gradient tolerance), used as both atol and rtol on values scaled by max(1, |ref|max)
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="CUDA only: Triton's interpreter cannot check bf16 (it computes bf16 wrongly on CPU)"))
SETTINGS = settings(max_examples=20, deadline=None)


def assert_close(actual, expected, tol, what):
    """Compare on the scale of the expected values; the message names the tensor and the worst element."""
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual.double() / scale, expected / scale, atol=tol, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def check_against_reference(fused, reference, inputs, dtype, names, tol=None, strided_grad=False):
    """Forward and the gradients of every input, with one shared grad_output, against float64 autograd.
    strided_grad: the grad_output is a view with every axis reversed in memory, so the backward must honour its
    strides (autograd passes views as they come)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out, ref = fused(*inputs), reference(*exact)
    assert out.dtype == dtype and out.shape == ref.shape, f"output {out.dtype} {tuple(out.shape)}"
    tol_out, tol_grad = tol or TOL[dtype]
    assert_close(out, ref, tol_out, "output")
    if strided_grad:
        grad_output = torch.randn(out.shape[::-1], dtype=out.dtype, device=out.device).permute(
            *reversed(range(out.dim())))
    else:
        grad_output = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_output)
    grads_ref = torch.autograd.grad(ref, exact, grad_output.double())
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, f"grad of {name}: {tuple(g.shape)} vs {tuple(g_ref.shape)}"
        assert_close(g, g_ref, tol_grad, f"grad of {name}")


# ---------------------------------------------------------------- temporal attention
def make_qkv(B, T, N, H, D, dtype, strided=False):
    """qkv (B, T, N, 3, H, D); strided: a view with gaps, as when q, k, v come out of a wider projection."""
    if strided:
        return torch.randn(B, T, N, 4, H, D + 3, dtype=dtype, device=DEVICE)[:, :, :, 1:, :, 2:D + 2]
    return torch.randn(B, T, N, 3, H, D, dtype=dtype, device=DEVICE)


@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(1, 20), N=st.integers(1, 9), H=st.integers(1, 3),
       D=st.sampled_from([24, 24, 5, 16, 33, 100]), dtype=st.sampled_from([torch.float32, torch.float16]),
       strided=st.booleans(), strided_grad=st.booleans())
def test_temporal_attention_matches_reference(B, T, N, H, D, dtype, strided, strided_grad):
    qkv = make_qkv(B, T, N, H, D, dtype, strided)
    scale = D ** -0.5
    check_against_reference(lambda q: temporal_attention(q, scale), lambda q: temporal_attention_ref(q, scale),
                            [qkv], dtype, ["qkv"], strided_grad=strided_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_temporal_attention_s2d_shape(dtype):
    """T = 16, H = 8, D = 24 as in S2D (few positions, to keep the interpreter fast), and T = 64 at the limit."""
    for T in (16, 64):
        qkv = make_qkv(1, T, 2, 8, 24, dtype)
        check_against_reference(lambda q: temporal_attention(q, 24 ** -0.5),
                                lambda q: temporal_attention_ref(q, 24 ** -0.5), [qkv], dtype, ["qkv"])


@SETTINGS
@given(T=st.integers(1, 12), N=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_temporal_attention_permuting_positions_permutes_output(T, N, seed):
    qkv = make_qkv(2, T, N, 2, 24, torch.float32)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    out = temporal_attention(qkv, 0.2)
    torch.testing.assert_close(temporal_attention(qkv[:, :, perm], 0.2), out[:, :, perm], atol=1e-6, rtol=0)


def test_temporal_attention_reference_gradcheck():
    qkv = torch.randn(1, 3, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)  # (B, T, N, 3, H, D)
    assert torch.autograd.gradcheck(lambda q: temporal_attention_ref(q, 0.5), (qkv,))


def test_temporal_attention_rejects_long_clips():
    with pytest.raises(ValueError, match=r"T <= 64.*\(1, 65, 2, 3, 1, 8\)"):
        temporal_attention(make_qkv(1, 65, 2, 1, 8, torch.float32), 0.3)


def test_temporal_attention_compiles_without_graph_break():
    qkv = make_qkv(1, 4, 2, 2, 24, torch.float32).requires_grad_()
    compiled = torch.compile(lambda q: temporal_attention(q * 2, 0.2), fullgraph=True, backend="aot_eager")
    out = compiled(qkv)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    exact = qkv.detach().double().requires_grad_()
    ref = temporal_attention_ref(exact * 2, 0.2)
    assert_close(out, ref, 1e-5, "compiled output")
    assert_close(grad, torch.autograd.grad(ref.sum(), exact)[0], 1e-4, "compiled grad")


# ---------------------------------------------------------------- MCP gate
def make_gate_inputs(BT, side, C, dtype, s=10.0, strided=False, K=8):
    """x, a (BT, N, C) with N = side^2 tokens; w (K, C), b (K,); s (1,), as the model's parameters."""
    N = side * side
    if strided:  # token-major views of channel-major maps, as a feature map would give them
        x, a = (torch.randn(BT, C, N, dtype=dtype, device=DEVICE).transpose(1, 2) for _ in range(2))
    else:
        x, a = (torch.randn(BT, N, C, dtype=dtype, device=DEVICE) for _ in range(2))
    w_x, w_a = (torch.randn(K, C, device=DEVICE).mul(C ** -0.5).to(dtype) for _ in range(2))
    b_x, b_a = (torch.randn(K, device=DEVICE).to(dtype) for _ in range(2))
    return [x, a, w_x, b_x, w_a, b_a, torch.tensor([s], device=DEVICE)]


GATE_NAMES = ["x", "a", "w_x", "b_x", "w_a", "b_a", "s"]


@SETTINGS
@given(BT=st.integers(1, 3), side=st.integers(1, 10), C=st.integers(1, 70), s=st.floats(-3.0, 10.0),
       dtype=st.sampled_from([torch.float32, torch.float16]), strided=st.booleans(), strided_grad=st.booleans(),
       K=st.sampled_from([8, 8, 1, 3, 20]))
def test_mcp_gate_matches_reference(BT, side, C, s, dtype, strided, strided_grad, K):
    inputs = make_gate_inputs(BT, side, C, dtype, s, strided, K=K)
    check_against_reference(mcp_gate, mcp_gate_ref, inputs, dtype, GATE_NAMES, strided_grad=strided_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_mcp_gate_s2d_shape(dtype):
    """N = 196 (14 x 14, four blocks of tokens, the last one ragged) and s = 10 as initialised; C = 100 is ragged."""
    check_against_reference(mcp_gate, mcp_gate_ref, make_gate_inputs(2, 14, 100, dtype), dtype, GATE_NAMES)


def test_mcp_gate_shift_of_x0_adds_the_softmax():
    """softmax(s (x0 + c)) = softmax(s x0), so adding c to b_x adds c * A to the output, A summing to 1 over N."""
    x, a, w_x, b_x, w_a, b_a, s = make_gate_inputs(2, 9, 40, torch.float32, s=1.5)
    c = 0.75
    attn = (mcp_gate(x, a, w_x, b_x + c, w_a, b_a, s) - mcp_gate(x, a, w_x, b_x, w_a, b_a, s)) / c  # (BT, N, K)
    x0 = x @ w_x.T + b_x  # (BT, N, K)
    torch.testing.assert_close(attn, torch.softmax(s * x0, dim=1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 8, device=DEVICE), atol=1e-4, rtol=0)


def test_mcp_gate_zero_sharpness_is_uniform_average():
    """s = 0: every position gets weight 1/N, so the gate is x0 / N plus the landmark branch."""
    x, a, w_x, b_x, w_a, b_a, s = make_gate_inputs(3, 7, 50, torch.float32, s=0.0)
    expected = (x @ w_x.T + b_x) / 49 + (a @ w_a.T + b_a)  # (BT, N, K)
    torch.testing.assert_close(mcp_gate(x, a, w_x, b_x, w_a, b_a, s), expected, atol=1e-5, rtol=1e-5)


def test_mcp_gate_gradients_are_deterministic():
    """Two backward passes give bit-identical gradients (per-frame partials summed in torch, no atomics). In the
    interpreter programs run one after another, so only a compiled run (CUDA) can show a difference."""
    inputs = [t.requires_grad_() for t in make_gate_inputs(3, 9, 70, torch.float32)]
    out = mcp_gate(*inputs)
    first = torch.autograd.grad(out, inputs, torch.ones_like(out), retain_graph=True)
    second = torch.autograd.grad(out, inputs, torch.ones_like(out))
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, second, strict=True))


def test_mcp_gate_reference_gradcheck():
    inputs = [t.double().requires_grad_() for t in make_gate_inputs(2, 2, 3, torch.float32, s=2.0)]
    assert torch.autograd.gradcheck(mcp_gate_ref, inputs)


def test_mcp_gate_rejects_mismatched_weights():
    x, a, w_x, b_x, w_a, b_a, s = make_gate_inputs(1, 2, 6, torch.float32)
    with pytest.raises(ValueError, match=r"w_a \(8, 5\)"):
        mcp_gate(x, a, w_x, b_x, w_a[:, :5], b_a, s)
    for bias in (b_x[:4], torch.randn(12, device=DEVICE), b_x.reshape(2, 4)):  # read out of bounds, before
        with pytest.raises(ValueError, match=f"b_x {tuple(bias.shape)}".replace("(", r"\(").replace(")", r"\)")):
            mcp_gate(x, a, w_x, bias, w_a, b_a, s)
    with pytest.raises(ValueError, match=r"got x \(4, 6\)"):
        mcp_gate(x[0], a[0], w_x, b_x, w_a, b_a, s)
    with pytest.raises(ValueError, match="a torch.float64 input"):
        mcp_gate(x, a, w_x.double(), b_x, w_a, b_a, s)


def test_mcp_gate_compiles_without_graph_break():
    inputs = [t.requires_grad_() for t in make_gate_inputs(2, 3, 20, torch.float32, s=2.0)]
    compiled = torch.compile(lambda *t: mcp_gate(*t) * 2, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    ref = mcp_gate_ref(*exact) * 2
    assert_close(out, ref, 1e-5, "compiled output")
    for name, g, g_ref in zip(GATE_NAMES, grads, torch.autograd.grad(ref.sum(), exact), strict=True):
        assert_close(g, g_ref, 1e-4, f"compiled grad of {name}")


def test_mcp_gate_reads_fp32_activations_under_autocast():
    """Under autocast MCP gets fp32 LayerNorm outputs: computed in the autocast dtype, gradients back in fp32."""
    inputs = make_gate_inputs(2, 5, 30, torch.float32, s=3.0)
    with torch.autocast(DEVICE, dtype=torch.float16):
        check_against_reference(lambda *t: mcp_gate(*t).float(), mcp_gate_ref, inputs, torch.float32, GATE_NAMES,
                                tol=TOL[torch.float16])


def test_temporal_attention_under_autocast():
    """Under autocast the fp32 qkv is computed in the autocast dtype, and the gradient comes back in fp32."""
    qkv = make_qkv(1, 5, 2, 2, 24, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert temporal_attention(qkv, 0.2).dtype == torch.float16
        check_against_reference(lambda q: temporal_attention(q, 0.2).float(), lambda q: temporal_attention_ref(q, 0.2),
                                [qkv], torch.float32, ["qkv"], tol=TOL[torch.float16])


def test_temporal_attention_rejects_other_ranks_and_dtypes():
    with pytest.raises(ValueError, match=r"\(B, T, N, 3, H, D\).*got shape \(1, 4, 2, 3, 24\)"):
        temporal_attention(torch.randn(1, 4, 2, 3, 24, device=DEVICE), 0.3)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(ValueError, match=f"a {dtype} input of shape \\(1, 4, 2, 3, 1, 8\\)"):
            temporal_attention(make_qkv(1, 4, 2, 1, 8, torch.float32).to(dtype), 0.3)


@pytest.mark.skipif(CUDA, reason="bf16 is refused only in Triton's interpreter (CPU)")
def test_interpreted_kernels_refuse_bf16():
    with pytest.raises(ValueError, match="interpreter computes bfloat16 wrongly"):
        temporal_attention(make_qkv(1, 4, 2, 1, 8, torch.bfloat16), 0.3)
    with pytest.raises(ValueError, match="interpreter computes bfloat16 wrongly"):
        mcp_gate(*make_gate_inputs(1, 2, 6, torch.bfloat16))
    with torch.autocast("cpu"), pytest.raises(ValueError, match="interpreter computes bfloat16 wrongly"):
        mcp_gate(*make_gate_inputs(1, 2, 6, torch.float32))  # CPU autocast's default dtype is bf16


def test_temporal_attention_of_an_empty_batch_is_empty():
    qkv = make_qkv(0, 4, 2, 2, 8, torch.float32).requires_grad_()
    out = temporal_attention(qkv, 0.3)
    assert out.shape == (0, 4, 2, 16)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    assert grad.shape == qkv.shape


@pytest.mark.skipif(CUDA, reason="with CUDA, kernels/bench.py is the GPU benchmark itself (minutes): run it directly")
def test_bench_without_cuda_says_so_and_exits_cleanly():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "kernels/bench.py"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No CUDA device" in done.stdout and "no GPU figure is measured" in done.stdout


def test_custom_ops_pass_opcheck():
    """The torch.library registrations (schemas, fake tensors for torch.compile) agree with the real kernels."""
    x, a, w_x, b_x, w_a, b_a, s = make_gate_inputs(2, 3, 20, torch.float32, s=2.0, strided=True)
    torch.library.opcheck(torch.ops.s2d.mcp_gate_forward.default, (x, a, w_x, b_x, w_a, b_a, s))
    out, x0, stats = torch.ops.s2d.mcp_gate_forward(x, a, w_x, b_x, w_a, b_a, s)
    dout = torch.randn(out.shape[::-1], device=DEVICE).transpose(0, 2)  # a strided grad_output, (BT, N, K)
    torch.library.opcheck(torch.ops.s2d.mcp_gate_backward.default, (dout, x, a, w_x, w_a, s, x0, stats))
    qkv = make_qkv(1, 5, 3, 2, 24, torch.float32, strided=True)
    torch.library.opcheck(torch.ops.s2d.temporal_attention_forward.default, (qkv, 0.3))
    dout = torch.randn(1, 5, 3, 48, device=DEVICE)
    torch.library.opcheck(torch.ops.s2d.temporal_attention_backward.default, (dout, qkv, 0.3))


def test_bench_checks_each_provider_against_float64():
    """kernels/bench.py's error column: small for the kernel, large for a kernel computing something else."""
    from kernels.bench import max_error

    qkv = make_qkv(1, 6, 3, 2, 24, torch.float32)
    assert max_error(lambda q: temporal_attention(q, 0.3), lambda q: temporal_attention_ref(q, 0.3), [qkv]) < 1e-4
    assert max_error(lambda q: temporal_attention(q, 0.6), lambda q: temporal_attention_ref(q, 0.3), [qkv]) > 1e-2
    inputs = make_gate_inputs(2, 3, 20, torch.float16)
    assert max_error(mcp_gate, mcp_gate_ref, inputs) < 2e-2
