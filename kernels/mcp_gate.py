"""MCP's spatial gating: both 1x1 down-projections, the Fovea gate and the landmark-branch add.

Reference only for now; the fused Triton kernel follows in this file.
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- reference (the function model.py uses)
def mcp_gate_ref(x, a, w_x, b_x, w_a, b_a, s):
    """x, a (F, N, C) token-major; w_x, w_a (K, C); b_x, b_a (K,); s scalar -> (F, N, K), K = 8.

    Eq. (3): x0 = Conv1x1(x), x1 = Conv1x1(a) on the feature map (F, C, h, w)
    Eq. (4): A = softmax over the N = h*w positions of s * x0, per frame and channel
    Eq. (5): x0' = A * x0;  then x0' + x1 (the sum inside Eq. (6))
    Like the release, this works on feature maps: tokens -> (F, C, h, w) -> 1x1 conv -> tokens.
    Memory traffic: reads x and a (2 F N C), writes and re-reads the permuted copies (4 F N C).
    """
    Fr, N, C = x.shape
    h = w = int(round(N ** 0.5))
    if h * w != N:
        raise ValueError(f"mcp_gate_ref: N={N} tokens is not a square grid")
    fmap_x = x.transpose(1, 2).reshape(Fr, C, h, w)  # (F, C, h, w)
    fmap_a = a.transpose(1, 2).reshape(Fr, C, h, w)
    x0 = F.conv2d(fmap_x, w_x[:, :, None, None], b_x).flatten(2)  # Eq. (3)  (F, K, N)
    x1 = F.conv2d(fmap_a, w_a[:, :, None, None], b_a).flatten(2)  # Eq. (3)  (F, K, N)
    attn = torch.softmax(s.reshape(()) * x0, dim=-1)  # Eq. (4)  softmax over N
    gated = attn * x0  # Eq. (5)
    return (gated + x1).transpose(1, 2)  # (F, N, K)


def mcp_gate(x, a, w_x, b_x, w_a, b_a, s):
    return mcp_gate_ref(x, a, w_x, b_x, w_a, b_a, s)
