"""T-MSA: multi-head self-attention across the T frames, independently at every patch position.

Reference only for now; the fused Triton kernel follows in this file.
"""
import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- reference (the function model.py uses)
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


def temporal_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    return temporal_attention_ref(qkv, scale)
