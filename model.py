"""S2D: a landmark-aware ViT-B/16 image model (MCP prompts) grown into a video model (TMA adapters).

Paper: Chen, Li, Shan, Wang, Hong, "From Static to Dynamic: Adapting Landmark-Aware Image Models for Facial
Expression Recognition in Videos", IEEE TAFFC (arXiv:2312.05447). Every equation of Sec. III-A to III-C is written
here in plain torch, marked `# Eq. (n)`, in the paper's order: read top to bottom.
  config and presets; the ViT pieces; S2D, the prompt chain (Eq. 1-2); MCP (Eq. 3-6); TMA (Eq. 7-15);
  which parameters train; checkpoint loading (ours, the released S2D ones, MAE / timm); then S4D, the follow-up
  (its config, tubelet ViT, MoAE, MAE pre-training and checkpoints); and last, the optional fused Triton kernels,
  which compute Eq. (3)-(5) with Eq. (6)'s sum, and Eq. (10), faster on a GPU and are imported only when selected.
Shapes: B clips, T frames (B*T frames in all), N = 196 patch tokens (a 14 x 14 grid), C channels, H heads, D head
width, K = 8 MCP channels, d the TMA bottleneck width.
"""
import argparse
import functools
import math
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, fields
from importlib import import_module

import torch
import torch.nn as nn
import torch.nn.functional as F



@dataclass
class S2DConfig:
    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 7
    num_frames: int = 16
    video: bool = True  # True: DFER model (MCP + TMA + temporal embedding); False: SFER image model (MCP only)
    mcp: bool = True  # False: no landmark view and no MCP prompts (a plain ViT, or ViT + TMA; for ablations)
    landmark_channels: int = 128  # MobileFaceNet conv_4 features, (128, 14, 14)
    prompt_dim: int = 8  # MCP's down-projection width
    adapter_dim: int = 192  # TMA bottleneck: width * 0.25
    tma_heads: int = 8  # T-MSA heads; head width D = adapter_dim // tma_heads = 24
    fovea_init: float = 10.0  # initial sharpness s of the Fovea gate
    head_dropout: float = 0.0
    # a model trained from scratch (the demo) starts from MAE's fixed 2-D sin-cos position embedding (the paper's
    # backbone is an MAE ViT-B/16, whose pos_embed is that); "normal": trunc-normal 0.02 like the other embeddings
    pos_init: str = "sincos"
    kernels: str = "auto"  # "triton" | "torch" | "auto" (triton on CUDA, torch elsewhere)

    def __post_init__(self):
        if self.img_size % self.patch_size or self.img_size // self.patch_size != 14:
            raise ValueError(f"img_size / patch_size must be 14 (landmark grid), got {self.img_size}/{self.patch_size}")
        if self.pos_init not in ("sincos", "normal"):
            raise ValueError(f"pos_init must be 'sincos' or 'normal', got {self.pos_init!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {self.kernels!r}")

    @property
    def grid(self):
        return self.img_size // self.patch_size


PRESETS = {
    # the paper's model: ViT-B/16 at 224 px
    "s2d_base": dict(img_size=224, patch_size=16, width=768, depth=12, heads=12, adapter_dim=192, tma_heads=8),
    # CPU demos and tests: 112 px with patch 8 keeps the 14 x 14 grid; T-MSA keeps head width 24
    "s2d_tiny": dict(img_size=112, patch_size=8, width=96, depth=4, heads=3, adapter_dim=24, tma_heads=1),
}


# ----------------------------------------------------------------------------- the ViT-B/16 backbone
class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # x (B*T, N+1, C)
        BT, N, C = x.shape
        q, k, v = self.qkv(x).reshape(BT, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (BT, H, N, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (BT, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(BT, N, C))


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_linears_and_norms(module):
    """Every Linear: weight truncated normal (std 0.02), bias 0; every LayerNorm: 1 / 0 (S2D's and S4D's ViTs)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def sincos_pos_embed(width, grid):
    """(1, grid*grid + 1, width): a zero row for CLS, then per patch (row r, column c) sin and cos of c and of r at
    width/4 frequencies 1 / 10000^(k / (width/4)), as MAE's ViT."""
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (C/4,)
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    angles = [pos.reshape(-1, 1) * freqs for pos in (c, r)]  # (N, C/4) each
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (N, C)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()[None]


# ----------------------------------------------------------------------------- S2D
class S2D(nn.Module):
    def __init__(self, cfg: S2DConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.width, cfg.depth
        self.patch_embed = nn.Conv2d(3, C, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, C))
        if cfg.mcp:
            self.landmark_embed = nn.Conv2d(cfg.landmark_channels, C, 1)
            self.mcp = nn.ModuleList(MCP(C, cfg.prompt_dim, cfg.fovea_init, cfg.kernels) for _ in range(L))
        if cfg.mcp or cfg.video:  # the inputs of MCP_i and TMA_i
            # norm_0 .. norm_{L-2}; the released model's norm_{L-1} is never used and is left out here
            self.prompt_norms = nn.ModuleList(nn.LayerNorm(C, eps=1e-6) for _ in range(L - 1))
        if cfg.video:
            self.temporal_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, 1, C))
            self.tma = nn.ModuleList(TMA(C, cfg.adapter_dim, cfg.tma_heads, cfg.kernels) for _ in range(L))
        self.tma_enabled = cfg.video  # tests switch the TMAs off to compare with the image model
        self.blocks = nn.ModuleList(Block(C, cfg.heads, cfg.mlp_ratio) for _ in range(L))
        self.norm = nn.LayerNorm(C, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(C, cfg.num_classes)
        self._init_weights()

    def _init_weights(self):
        """The released model's initialisation (README, The model); TMAs grown on an image model start so too."""
        init_linears_and_norms(self)
        for mcp in self.mcp if self.cfg.mcp else ():  # the release's MCP 1x1 convolutions: xavier-uniform
            for lin in (mcp.down_x, mcp.down_a, mcp.up):
                nn.init.xavier_uniform_(lin.weight)
        for p in (self.cls_token, self.pos_embed) + ((self.temporal_embed,) if self.cfg.video else ()):
            nn.init.trunc_normal_(p, std=0.02)
        if self.cfg.pos_init == "sincos":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(self.cfg.width, self.cfg.grid))

    def _check_inputs(self, video, landmarks):
        cfg, S, G = self.cfg, self.cfg.img_size, self.cfg.grid
        T = video.shape[2] if video.dim() == 5 else None
        want_T = cfg.num_frames if cfg.video else T  # the image model takes any number of independent frames
        if T is None or video.shape[1] != 3 or tuple(video.shape[3:]) != (S, S) or T != want_T:
            raise ValueError(f"video: expected shape (B, 3, {want_T or 'T'}, {S}, {S}), got {tuple(video.shape)}")
        want = (video.shape[0], T, cfg.landmark_channels, G, G)
        if not cfg.mcp:
            if landmarks is not None:
                raise ValueError("landmarks: this model has no MCP (mcp=False); pass landmarks=None")
        elif landmarks is None or tuple(landmarks.shape) != want:
            found = None if landmarks is None else tuple(landmarks.shape)
            raise ValueError(f"landmarks: expected shape {want} (B, T, C, grid, grid), got {found}")

    def _prompt_layer(self, i, patches, x_in, a_in, T):
        """Layer i's MCP_i and TMA_i, and their residual injection into the patch tokens."""
        P = self.mcp[i](x_in, a_in) if self.cfg.mcp else 0  # guiding prompt P_i, (B*T, N, C)
        M = self.tma[i](x_in, T) if self.tma_enabled else 0  # temporal tokens M_i, (B*T, N, C)
        return patches + P + M, P  # Eq. (1): patch tokens + P_i + M_i before block i (i counts blocks from 0)

    def forward(self, video, landmarks):
        """video (B, 3, T, H, W), landmarks (B, T, 128, 14, 14) or None without MCP -> logits (B, classes),
        features (B, C)."""
        self._check_inputs(video, landmarks)
        B, _, T, S, _ = video.shape
        frames = video.transpose(1, 2).reshape(B * T, 3, S, S)  # (B*T, 3, S, S)
        X = self.patch_embed(frames).flatten(2).transpose(1, 2)  # image tokens (B*T, N, C)
        prompts = self.cfg.mcp or self.tma_enabled  # without either, the backbone is a plain ViT
        if prompts:
            norm0 = self.prompt_norms[0]
            Lt = P = None  # landmark tokens and the prompt chain exist only with MCP
            if self.cfg.mcp:
                lm = landmarks.reshape(B * T, *landmarks.shape[2:]).to(X.dtype)  # (B*T, 128, 14, 14)
                Lt = norm0(self.landmark_embed(lm).flatten(2).transpose(1, 2))  # landmark tokens (B*T, N, C)
            X, P = self._prompt_layer(0, X, norm0(X), Lt, T)  # layer 0, before CLS and pos
        x = torch.cat([self.cls_token.expand(B * T, -1, -1), X], dim=1) + self.pos_embed  # (B*T, N+1, C)
        if self.cfg.video:
            x = (x.reshape(B, T, *x.shape[1:]) + self.temporal_embed).reshape(B * T, *x.shape[1:])
        for i, block in enumerate(self.blocks):
            if i > 0 and prompts:  # x-branch through norm_{i-1}; the landmark stream: the previous prompt, norm_0
                patches, x_in = x[:, 1:], self.prompt_norms[i - 1](x[:, 1:])
                a_in = norm0(P) if self.cfg.mcp else None
                patches, P = self._prompt_layer(i, patches, x_in, a_in, T)
                x = torch.cat([x[:, :1], patches], dim=1)  # the CLS token is untouched
            x = block(x)  # Eq. (2): X_i = Layer_i(X'_i)

        cls = self.norm(x)[:, 0].reshape(B, T, -1)  # (B, T, C)
        features = cls.mean(dim=1)  # average over the frames, (B, C)
        return self.head(self.head_drop(features)), features


# ----------------------------------------------------------------------------- MCP: Multi-View Complementary Prompter
class MCP(nn.Module):
    """Guiding prompt P_i from the expression tokens x_in and the landmark tokens a_in (both (B*T, N, C)).

    On the 14 x 14 grid of one frame the paper's 1x1 convolutions act on each position alone, so on the N tokens
    they are per-token linear layers: Conv1x1(x) here is Linear(x) on (B*T, N, C).
    """

    def __init__(self, width, prompt_dim, fovea_init, kernels="torch"):
        super().__init__()
        self.down_x = nn.Linear(width, prompt_dim)  # C -> K = 8, the expression branch
        self.down_a = nn.Linear(width, prompt_dim)  # C -> K, the landmark branch
        self.up = nn.Linear(prompt_dim, width)  # K -> C
        self.sharpness = nn.Parameter(torch.full((1,), fovea_init))  # s of the Fovea gate
        self.kernels = kernels  # "torch" | "triton" | "auto": see fused_mcp_gate at the end of this file

    def forward(self, x_in, a_in):
        """x_in, a_in (B*T, N, C), the N = 14 x 14 tokens of each frame -> P (B*T, N, C), Eq. (3)-(6): both
        branches down to K channels; the Fovea gate softmax(s x0) * x0, the softmax over the N positions of a frame,
        for each frame and channel; plus x1, then up to C. The first two lines pick the fused kernel on CUDA."""
        if use_triton(self.kernels, x_in):
            return self.up(fused_mcp_gate(self, x_in, a_in))  # Eq. (3)-(5) and x0' + x1 in one kernel, then Eq. (6)
        x0 = self.down_x(x_in)  # Eq. (3): x0 = Conv1x1(x_in), (B*T, N, K)
        x1 = self.down_a(a_in)  # Eq. (3): x1 = Conv1x1(a_in), (B*T, N, K)
        A = torch.softmax(self.sharpness * x0, dim=1)  # Eq. (4): softmax over the N positions, per frame and channel
        x0_gated = A * x0  # Eq. (5): the Fovea gate x0' = A * x0
        return self.up(x0_gated + x1)  # Eq. (6): P = Conv1x1(x0' + x1)


# ----------------------------------------------------------------------------- TMA: Temporal-Modeling Adapter
class TMA(nn.Module):
    """T-Adapter (down, T-MSA across frames, up) -> LayerNorm -> vanilla adapter. No residuals inside."""

    def __init__(self, width, dim, heads, kernels="torch"):
        super().__init__()
        self.heads = heads
        self.t_down = nn.Linear(width, dim)
        self.t_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.t_proj = nn.Linear(dim, dim)
        self.t_up = nn.Linear(dim, width)
        self.norm = nn.LayerNorm(width, eps=1e-5)  # eps 1e-5 as in the released model
        self.down = nn.Linear(width, dim)
        self.up = nn.Linear(dim, width)
        self.kernels = kernels  # "torch" | "triton" | "auto": see fused_temporal_attention at the end of this file

    def forward(self, x_in, T):
        """x_in (B*T, N, C), the frames of each clip consecutive (frame t of clip b at row b*T + t) -> M_i (B*T, N, C),
        Eq. (7)-(15): down to d with GELU, T-MSA (t_msa), up to C, LayerNorm, then the vanilla adapter (down, GELU,
        up). No residual connections inside: the prompt chain adds M_i (Eq. 1-2)."""
        h = F.gelu(self.t_down(x_in))  # Eq. (7): downsample to d = C * 0.25, GELU
        h = self.t_msa(h, T)  # Eq. (8): T-MSA, Eq. (9)-(11) in t_msa below
        h = self.t_up(h)  # Eq. (12): upsample back to C
        h = self.norm(h)  # Eq. (13): LayerNorm
        h = F.gelu(self.down(h))  # Eq. (14): vanilla adapter, down + GELU
        return self.up(h)  # Eq. (15): vanilla adapter, up -> M_i

    def t_msa(self, h, T):
        """h (B*T, N, d), frames of a clip consecutive -> (B*T, N, d), Eq. (9)-(11): multi-head attention across
        the T frames of one clip at each of the N positions (never across clips or positions): H heads of width
        D = d / H, scores scaled by D^-1/2, softmax over the T frames, the heads concatenated and projected.
        The branch on use_triton picks the fused kernel on CUDA."""
        BT, N, d = h.shape
        H, D = self.heads, d // self.heads
        qkv = self.t_qkv(h).reshape(BT // T, T, N, 3, H, D)  # Eq. (9): Q, K, V for every frame, (B, T, N, 3, H, D)
        if use_triton(self.kernels, h):
            heads = fused_temporal_attention(qkv, D**-0.5)  # Eq. (10) in one Triton kernel, (B, T, N, H*D)
        else:
            q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)  # each (B, N, H, T, D): frames are the sequence
            A = torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, dim=-1)  # Eq. (10): (B, N, H, T, T) over frames
            heads = (A @ v).permute(0, 3, 1, 2, 4)  # head_j = A_j V_j, back to (B, T, N, H, D)
        return self.t_proj(heads.reshape(BT, N, d))  # Eq. (11): Concat(head_1..head_H) W^O


def build_model(name, num_classes, num_frames, image_model=False, **overrides):
    """An S2D preset (the image model with image_model=True), or an S4D one (S4D's classifier: video head of
    num_classes, image head of 7; S4DPretrain, its masked autoencoder, with pretrain=True)."""
    if name in S4D_PRESETS:
        pretrain = overrides.pop("pretrain", False)
        cfg = S4DConfig(**{**S4D_PRESETS[name], "num_classes": num_classes, "num_frames": num_frames, **overrides})
        return S4DPretrain(cfg) if pretrain else S4D(cfg)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {sorted(PRESETS) + sorted(S4D_PRESETS)}")
    frames = 1 if image_model else num_frames
    cfg = S2DConfig(**{**PRESETS[name], "num_classes": num_classes, "num_frames": frames, "video": not image_model,
                       **overrides})
    return S2D(cfg)


# ----------------------------------------------------------------------------- what trains
VIDEO_STAGE = ("landmark_embed.", "mcp.", "tma.", "prompt_norms.", "temporal_embed", "norm.", "head.")


def set_trainable(model: S2D, stage: str):
    """'video': VIDEO_STAGE trains (paper Sec. IV-C's MCPs, TMAs and classifier, and, as in the release, the landmark
    embedding, the prompt norms, the temporal embedding and the final norm); the ViT is frozen.
    'image' / 'all': everything trains (the landmark detector is a separate frozen module, LandmarkFeatures)."""
    if stage not in ("video", "image", "all"):
        raise ValueError(f"stage must be 'video', 'image' or 'all', got {stage!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(stage != "video" or name.startswith(VIDEO_STAGE))
        if isinstance(model, (S4D, S4DPretrain)):  # S4D trains everything, but an unused noise linear
            p.requires_grad_(model.cfg.router_noise or ".moae.noise." not in name)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def no_weight_decay(name, param):
    return param.ndim <= 1 or any(k in name for k in ("cls_token", "pos_embed", "temporal_embed", "mask_token"))


# ----------------------------------------------------------------------------- checkpoints
def safe_load(path):
    """torch.load with weights_only=True; the one non-tensor type allowed is argparse.Namespace (the released
    fine-tuned checkpoints pickle their training arguments). Never falls back to full unpickling."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line), None)  # a class or function it would import
        why = code or next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
        why = why.split(". ")[0]
        if code is None:  # not a pickle of allowed things at all: garbage, text, another format
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({os.path.getsize(path)} bytes; {why})") \
                from None
        raise ValueError(f"{path}: refused: the checkpoint holds Python objects beyond tensors, containers and "
                         f"argparse.Namespace, and may carry code. It is not loaded. ({why})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint file") from None
    except (EOFError, KeyError, RuntimeError, OSError) as e:  # empty, not a torch file, truncated or unreadable
        size = os.path.getsize(path) if os.path.isfile(path) else None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({size if size is not None else '?'} bytes; "
                         f"{type(e).__name__}: {first[:160]}). Is the file complete, and a checkpoint?") from None


# ours <-> released S2D names; (ours, released, is_1x1_conv). Per-layer entries use {i}.
_RELEASED_NAMES = [
    ("patch_embed", "patch_embed.proj", False),
    ("landmark_embed", "patch_embed_prompt.proj", False),
    ("temporal_embed", "temporal_embedding", False),
    ("norm", "ln_post", False),
    ("head", "head.fc_cls", False),
    ("mcp.{i}.down_x", "prompt_blocks.{i}.conv0_0", True),
    ("mcp.{i}.down_a", "prompt_blocks.{i}.conv0_1", True),
    ("mcp.{i}.up", "prompt_blocks.{i}.conv1x1", True),
    ("mcp.{i}.sharpness", "prompt_blocks.{i}.fovea.smooth", False),
    ("tma.{i}.t_down", "prompt_blocks.{i}.TMA.T_Adapter.D_fc1", False),
    ("tma.{i}.t_qkv", "prompt_blocks.{i}.TMA.T_Adapter.attn.qkv", False),
    ("tma.{i}.t_proj", "prompt_blocks.{i}.TMA.T_Adapter.attn.proj", False),
    ("tma.{i}.t_up", "prompt_blocks.{i}.TMA.T_Adapter.D_fc2", False),
    ("tma.{i}.norm", "prompt_blocks.{i}.TMA.norm", False),
    ("tma.{i}.down", "prompt_blocks.{i}.TMA.S_Adapter.D_fc1", False),
    ("tma.{i}.up", "prompt_blocks.{i}.TMA.S_Adapter.D_fc2", False),
]


def _rename(key, src_col, dst_col):
    """Rename one key by the table; returns (new_key, is_1x1_conv) or (key, False) when no entry matches."""
    for row in _RELEASED_NAMES:
        src = re.escape(row[src_col]).replace(r"\{i\}", r"(\d+)")
        m = re.fullmatch(src + r"(\.weight|\.bias|)", key)
        if m:
            layer, suffix = (m.group(1), m.group(2)) if "{i}" in row[src_col] else (None, m.group(1))
            return row[dst_col].replace("{i}", layer or "") + suffix, row[2] and suffix == ".weight"
    return key, False


def to_released(state_dict):
    """Our names and shapes -> the released S2D checkpoint's (1x1 convs are 4-D there)."""
    out = {}
    for k, v in state_dict.items():
        name, conv = _rename(k, 0, 1)
        out[name] = v[:, :, None, None] if conv else v
        if name == "temporal_embedding":
            out[name] = v.reshape(1, v.shape[1], v.shape[-1])  # ours (1, T, 1, C), released (1, T, C)
    dead = len(_block_ids(state_dict)) - 1  # the release's never-used last prompt norm, as an untouched LayerNorm
    if "prompt_norms.0.weight" in state_dict:
        out[f"prompt_norms.{dead}.weight"] = torch.ones_like(state_dict["prompt_norms.0.weight"])
        out[f"prompt_norms.{dead}.bias"] = torch.zeros_like(state_dict["prompt_norms.0.bias"])
    return out


def _block_ids(state_dict):
    return {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}


def from_released(state_dict):
    """The released S2D names -> ours. Image-stage checkpoints call the final LayerNorm norm.*, video ones ln_post.*."""
    out = {}
    for k, v in state_dict.items():
        name, conv = _rename(k, 1, 0)
        out[name] = v.flatten(1) if conv else v
        if name == "temporal_embed":
            out[name] = v.reshape(1, v.shape[1], 1, v.shape[-1])
    return out


def _unwrap(obj, source):
    if isinstance(obj, dict):
        for key in ("model", "module", "model_state_dict", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{source}: no state dict found (looked for keys 'model', 'module', 'model_state_dict', "
                     f"'state_dict' or a flat name -> tensor dict); found {found}")


def _naming(sd):
    if any(k.startswith(("prompt_blocks.", "patch_embed_prompt.", "ln_post.")) for k in sd):
        return "released S2D"
    if any(k.startswith(("mcp.", "landmark_embed.")) for k in sd):
        return "s2d (this project)"
    if any(k.startswith("blocks.") for k in sd):
        return "MAE / timm ViT"
    return "unknown"


def to_ours(sd):
    """Any supported naming -> ours, plus the keys deliberately ignored (with the reason)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    naming, ignored = _naming(sd), {}
    if naming == "released S2D":
        dead = len(_block_ids(sd)) - 1  # norm_{depth-1} is never used by the released forward
        for k in [k for k in sd if k.startswith((f"prompt_norms.{dead}.", "landmark."))]:
            ignored[k] = "the release's never-used last prompt norm, or its landmark detector"
            del sd[k]
        sd = from_released(sd)
    elif naming == "MAE / timm ViT":  # timm / MAE differ from ours in the patch embedding and final-norm names
        rename = [(r"^patch_embed\.proj\.", "patch_embed."), (r"^fc_norm\.", "norm.")]
        sd = {re.sub(rename[1][0], rename[1][1], re.sub(*rename[0], k)): v for k, v in sd.items()}
        for k in [k for k in sd if k.startswith(("head.", "decoder", "mask_token"))]:
            ignored[k] = "the pre-training classifier or MAE decoder"
            del sd[k]
    return sd, naming, ignored


def _resize_pos_embed(pos, n_tokens):
    """(1, 1 + g*g, C) -> (1, n_tokens, C), bicubic on the grid; the CLS slot is kept."""
    g_old, g_new = math.isqrt(pos.shape[1] - 1), math.isqrt(n_tokens - 1)
    grid = pos[:, 1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = F.interpolate(grid.float(), size=(g_new, g_new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(pos.dtype)], dim=1)


@dataclass
class LoadReport:
    source: str
    naming: str
    loaded: list
    missing: list
    unexpected: list
    mismatched: list  # (name, checkpoint shape, model shape): skipped
    ignored: dict

    def __str__(self):
        def group(names):  # "tma.0.t_down.weight", "tma.1..." -> "tma.*.t_down.weight (x2)"
            counts = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
            return ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in sorted(counts.items())) or "none"
        lines = [f"load_checkpoint: {self.source} [{self.naming} naming]: loaded {len(self.loaded)} tensors",
                 f"  missing (kept at initialisation): {group(self.missing)}",
                 f"  unexpected (not loaded): {group(self.unexpected)}",
                 f"  ignored on purpose: {group(self.ignored)}"]
        lines += [f"  shape mismatch, skipped: {n}: checkpoint {tuple(a)}, model {tuple(b)}"
                  for n, a, b in self.mismatched]
        return "\n".join(lines)


def load_checkpoint(model, path_or_state_dict, verbose=True, source=None) -> LoadReport:
    """Load ours, the released S2D (image or video stage) or an MAE / timm ViT-B/16 checkpoint into an S2D model,
    or ours or the released S4D ones (pre-trained MAE, fine-tuned) into an S4D one; `source` names an already
    loaded checkpoint in the report."""
    source = source or ("<state dict>" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict))
    obj = path_or_state_dict if isinstance(path_or_state_dict, dict) else safe_load(path_or_state_dict)
    if isinstance(model, (S4D, S4DPretrain)):
        sd, naming, ignored = s4d_to_ours(_unwrap(obj, source), pretrain=isinstance(model, S4DPretrain))
    else:
        sd, naming, ignored = to_ours(_unwrap(obj, source))
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = _resize_pos_embed(sd["pos_embed"], own["pos_embed"].shape[1])
    mismatched = [(k, v.shape, own[k].shape) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    loadable = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    report = LoadReport(source, naming, sorted(loadable), sorted(set(own) - set(sd)),
                        sorted(set(sd) - set(own)), mismatched, ignored)
    if verbose:
        print(report)
    return report


def config_from_state_dict(sd) -> S2DConfig:
    """Infer the architecture from a state dict in any supported naming (used by eval.py for released files)."""
    sd, _, _ = to_ours(_unwrap(sd, "<state dict>"))
    if "patch_embed.weight" not in sd:
        landmark = any(k.startswith(("conv1.conv.", "conv_4.", "output_layer.")) for k in sd)
        what = ("a MobileFaceNet landmark checkpoint (it belongs to --landmark-weights)" if landmark else
                f"its tensors are named {', '.join(sorted(sd)[:3]) or 'nothing'}, ...")
        raise ValueError(f"not an S2D or ViT checkpoint: {what}")
    C, _, p, _ = sd["patch_embed.weight"].shape
    depth = len(_block_ids(sd))
    cfg = dict(width=C, patch_size=p, depth=depth, img_size=p * math.isqrt(sd["pos_embed"].shape[1] - 1),
               heads=max(1, C // 64), video="temporal_embed" in sd or any(k.startswith("tma.") for k in sd))
    cfg["num_frames"] = sd["temporal_embed"].shape[1] if "temporal_embed" in sd else 1
    cfg["mcp"] = "landmark_embed.weight" in sd
    if cfg["mcp"]:
        cfg["landmark_channels"] = sd["landmark_embed.weight"].shape[1]
    if "head.weight" in sd:
        cfg["num_classes"] = sd["head.weight"].shape[0]
    if "tma.0.t_down.weight" in sd:
        cfg["adapter_dim"] = sd["tma.0.t_down.weight"].shape[0]
        cfg["tma_heads"] = max(1, cfg["adapter_dim"] // 24)
    for preset in PRESETS.values():  # a known preset fills in what the state dict cannot say (heads)
        if preset["width"] == C and preset["depth"] == depth:
            cfg = {**preset, **{k: v for k, v in cfg.items() if k not in ("heads", "tma_heads")}}
    names = {f.name for f in fields(S2DConfig)}
    return S2DConfig(**{k: v for k, v in cfg.items() if k in names})


# ============================================================================= S4D, the follow-up
# Chen, Li, Zhang, Hu, Shan, Wang, Hong, "Static for Dynamic: Towards a Deeper Understanding of Dynamic Facial
# Expressions Using Static Expression Data" (README, S4D). A plain VideoMAE-style ViT-B: no MCP, no landmark view,
# no TMA. Tokens are tubelets (2 frames x 16 x 16 pixels); an image is one tubelet (its frame twice). A Mixture of
# Adapter Experts (MoAE) beside the FFN of the last six blocks lets images and videos route their tokens apart.
# Shapes: B clips or images, T frames, N tokens (T/2 x g x g; 800 for 16 frames at 160 px, 100 for an image),
# C channels, M = B*N tokens of a batch, E experts, k = 2 experts per token.
@dataclass
class S4DConfig:
    img_size: int = 160
    patch_size: int = 16
    tubelet: int = 2  # frames per token
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_frames: int = 16
    num_classes: int = 7  # the video head: the DFER dataset's classes
    image_classes: int = 7  # the image head: AffectNet-7
    moae_from: int = 6  # blocks moae_from .. depth-1 carry a MoAE; depth: none (the pre-training encoder)
    experts: int = 8
    expert_dim: int = 192  # each expert: C -> 192 -> C
    top_k: int = 2
    # the release's router in training: noisy logits and a per-expert capacity of int(M * capacity / E) tokens.
    # Never in eval(): there a token's experts depend on that token alone (README, S4D)
    router_noise: bool = True
    capacity: float = 2.0  # 0: no capacity limit in training either
    balance_weight: float = 1e-3  # the MoAE balance loss, summed over the MoAE blocks
    head_dropout: float = 0.0
    decoder_width: int = 384  # the MAE decoder of pre-training: 4 blocks of width 384, 6 heads
    decoder_depth: int = 4
    decoder_heads: int = 6

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet:
            raise ValueError(f"num_frames {self.num_frames} is not a multiple of the tubelet {self.tubelet}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k {self.top_k} must be between 1 and experts {self.experts}")

    @property
    def grid(self):
        return self.img_size // self.patch_size

    @property
    def tokens(self):  # tokens of a clip of num_frames frames
        return self.num_frames // self.tubelet * self.grid**2


S4D_PRESETS = {
    "s4d_base": dict(img_size=160, patch_size=16, width=768, depth=12, heads=12, moae_from=6, expert_dim=192),
    # CPU demos and tests: the demo's 112 px faces in 7 x 7 patches, MoAE in the last 2 of 4 blocks
    "s4d_tiny": dict(img_size=112, patch_size=16, width=96, depth=4, heads=3, moae_from=2, expert_dim=24,
                     decoder_width=48, decoder_depth=2, decoder_heads=2),
}


@functools.lru_cache(maxsize=8)
def sinusoid_table(positions, width):
    """(1, positions, width), fixed: position n, channel j -> sin (j even) or cos (j odd) of n / 10000^(2(j//2)/C),
    over the flattened (t, h, w) token index, as VideoMAE. Not a parameter and not a buffer: computed once."""
    n = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(width, dtype=torch.float64)[None]
    angle = n / 10000 ** (2 * (j // 2) / width)  # (positions, width)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()[None]


class TubeletEmbed(nn.Module):
    """(B, 3, T, S, S) -> (B, N, C): a Conv3d with kernel = stride = (tubelet, p, p); tokens in (t, h, w) order."""

    def __init__(self, width, patch_size, tubelet):
        super().__init__()
        self.proj = nn.Conv3d(3, width, (tubelet, patch_size, patch_size), stride=(tubelet, patch_size, patch_size))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class QVBiasAttention(nn.Module):
    """Multi-head self-attention whose qkv projection has learned q and v biases and no k bias (VideoMAE)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # (3C,): no k bias
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class MoAE(nn.Module):
    """Mixture of Adapter Experts: per token, a router picks the top-k of E bottleneck experts (C -> d -> C, GELU)
    and mixes their outputs with a softmax over the k kept logits. forward(h (B, N, C)) -> (B, N, C); the balance
    loss of the last call is left in self.balance (a scalar that carries gradient)."""

    def __init__(self, width, experts, dim, top_k, noise=True, capacity=2.0):
        super().__init__()
        self.top_k, self.noise_on, self.capacity = top_k, noise, capacity
        self.router = nn.Linear(width, experts)  # routing logits
        self.noise = nn.Linear(width, experts)  # the release's learned noise scale (training only)
        self.experts = nn.ModuleList(MLP(width, dim) for _ in range(experts))
        self.balance = None

    def route(self, tokens):
        """tokens (M, C) -> logits (M, E), chosen experts (M, k), their weights (M, k)."""
        logits = self.router(tokens)  # (M, E)
        if self.training and self.noise_on:  # noisy top-k gating: logits + N(0, 1) * softplus(W_noise h)
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(tokens))
        top, chosen = logits.topk(self.top_k, dim=-1)  # (M, k): the k largest logits
        return logits, chosen, torch.softmax(top, dim=-1)  # softmax over the k kept (as if the others were -inf)

    def forward(self, h):
        B, N, C = h.shape
        tokens = h.reshape(B * N, C)  # (M, C)
        logits, chosen, weight = self.route(tokens)
        out = torch.zeros_like(tokens)
        limit = int(B * N * self.capacity / len(self.experts)) if self.training and self.capacity > 0 else None
        for e, expert in enumerate(self.experts):  # dispatch: gather each expert's tokens, run it, scatter back
            token, slot = torch.nonzero(chosen == e, as_tuple=True)  # in token order
            if limit is not None:
                token, slot = token[:limit], slot[:limit]  # the release: tokens past capacity get nothing from e
            if len(token):
                out.index_add_(0, token, weight[token, slot, None] * expert(tokens[token]))
        self.balance = balance_loss(logits, chosen)
        return out.reshape(B, N, C)


def balance_loss(logits, chosen):
    """Switch-Transformer balance loss with router probabilities: E * sum_e f_e P_e, where f_e is the fraction of
    the M tokens routed to expert e (each token goes to k experts, so sum_e f_e = k) and P_e the mean router
    probability of e. k for perfectly uniform routing, and never less when every token routes alike.
    (The release multiplies f_e by the mean raw logit instead of the probability.)"""
    E = logits.shape[-1]
    routed = F.one_hot(chosen, E).sum(1).to(logits.dtype)  # (M, E), 1 where a token went to e
    return E * (routed.mean(0) * torch.softmax(logits, dim=-1).mean(0)).sum()


class S4DBlock(nn.Module):
    """Pre-norm block; with a MoAE beside the FFN, on the same LayerNorm output: x + FFN(h) + MoAE(h)."""

    def __init__(self, width, heads, mlp_ratio, moae=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = QVBiasAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.moae = moae

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.mlp(h) + (self.moae(h) if self.moae is not None else 0)


class S4D(nn.Module):
    """forward(x, landmarks=None) -> logits, features. x (B, 3, T, S, S) is a video batch (video head);
    x (B, 3, S, S) an image batch (image head), which enters as one tubelet: its frame repeated tubelet times, at
    the first tubelet's positions. After a forward, self.balance_loss is the MoAE balance loss, weighted."""

    def __init__(self, cfg: S4DConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.width

        def moae():
            return MoAE(C, cfg.experts, cfg.expert_dim, cfg.top_k, cfg.router_noise, cfg.capacity)
        self.patch_embed = TubeletEmbed(C, cfg.patch_size, cfg.tubelet)
        self.blocks = nn.ModuleList(S4DBlock(C, cfg.heads, cfg.mlp_ratio, moae() if i >= cfg.moae_from else None)
                                    for i in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(C, eps=1e-6)  # after mean pooling; there is no CLS token
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.ModuleDict({"image": nn.Linear(C, cfg.image_classes), "video": nn.Linear(C, cfg.num_classes)})
        self.balance_loss = None
        init_vit(self)

    def forward(self, x, landmarks=None):
        if landmarks is not None:
            raise ValueError("S4D has no landmark view; pass landmarks=None")
        x, kind = tubelet_tokens(self.cfg, self.patch_embed, x)
        for block in self.blocks:
            x = block(x)
        balances = [b.moae.balance for b in self.blocks if b.moae is not None]
        self.balance_loss = self.cfg.balance_weight * sum(balances) if balances else x.new_zeros(())
        features = self.fc_norm(x.mean(dim=1))  # mean over all tokens, (B, C)
        return self.head[kind](self.head_drop(features)), features


def tubelet_tokens(cfg, patch_embed, x):
    """Tokens with positions: video (B, 3, T, S, S) or image (B, 3, S, S) -> (B, N, C), and 'video' | 'image'."""
    S, given = cfg.img_size, tuple(x.shape)
    kind = {4: "image", 5: "video"}.get(x.dim())
    if kind == "image":
        x = x[:, :, None].expand(-1, -1, cfg.tubelet, -1, -1)  # (B, 3, tubelet, S, S)
    want = (3, cfg.tubelet if kind == "image" else cfg.num_frames, S, S)
    if kind is None or tuple(x.shape[1:]) != want:
        raise ValueError(f"S4D input: expected a video (B, 3, {cfg.num_frames}, {S}, {S}) or an image batch "
                         f"(B, 3, {S}, {S}), got {given}")
    tokens = patch_embed(x)  # (B, N, C); an image: N = g*g, the first tubelet's rows of the table
    return tokens + sinusoid_table(cfg.tokens, cfg.width)[:, :tokens.shape[1]].to(tokens), kind


def init_vit(model):
    """Linears and LayerNorms as S2D's (the experts start so too), and the tubelet projection as a linear layer:
    xavier-uniform on its flattened kernel, as MAE initialises its patch projection (our choice; a checkpoint
    replaces it)."""
    for m in model.modules():  # the tubelet projection comes first in both S4D models, so it is initialised first
        if isinstance(m, nn.Conv3d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
    init_linears_and_norms(model)


def parameter_parts(model):
    """Parameter counts per part of an S4D model: patch embedding, blocks (without MoAE), experts, routers,
    fc_norm, heads (each)."""
    parts = Counter()
    for name, p in model.named_parameters():
        if ".moae.experts." in name:
            part = "experts"
        elif ".moae." in name:
            part = "routers"
        elif name.startswith("head."):
            part = "head " + name.split(".")[1]
        else:
            part = name.split(".")[0].replace("patch_embed", "patch embedding").replace("blocks", "blocks without MoAE")
        parts[part] += p.numel()
    return dict(parts)


def layer_scale(name, depth, decay):
    """Layer-wise lr decay: the patch embedding is layer 0, block i layer i + 1 (its MoAE too), the rest (fc_norm,
    heads) layer depth + 1; the scale is decay ** (depth + 1 - layer)."""
    if name.startswith("patch_embed."):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


# ----------------------------------------------------------------------------- S4D's dual-modal MAE pre-training
class MAEEncoder(nn.Module):
    """The pre-training encoder: tubelet embedding, plain blocks (no MoAE), a final LayerNorm."""

    def __init__(self, cfg: S4DConfig):
        super().__init__()
        self.patch_embed = TubeletEmbed(cfg.width, cfg.patch_size, cfg.tubelet)
        self.blocks = nn.ModuleList(S4DBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)


class MAEDecoder(nn.Module):
    def __init__(self, width, depth, heads, out):
        super().__init__()
        self.blocks = nn.ModuleList(S4DBlock(width, heads, 4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out)  # to the pixels of one tubelet patch, tubelet * p * p * 3


class S4DPretrain(nn.Module):
    """Dual-modal masked autoencoder: forward(x, mask) -> the predicted pixels of the masked tokens
    (B, masked, tubelet*p*p*3). x is a video (B, 3, T, S, S) or an image batch (B, 3, S, S); mask (B, N) bool, True
    where a token is hidden, the same count in every row. The encoder sees the visible tokens only; the decoder
    sees them and a shared mask token, each at its own position (sin-cos tables of both widths)."""

    def __init__(self, cfg: S4DConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = MAEEncoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.width, cfg.decoder_width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        patch = cfg.tubelet * cfg.patch_size**2 * 3
        self.decoder = MAEDecoder(cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, patch)
        init_vit(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x, mask):
        tokens, _ = tubelet_tokens(self.cfg, self.encoder.patch_embed, x)  # (B, N, C) with positions
        B, N, C = tokens.shape
        if mask.shape != (B, N) or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected a bool tensor of shape {(B, N)}, got {mask.dtype} {tuple(mask.shape)}")
        hidden = int(mask[0].sum())
        if not (mask.sum(1) == hidden).all():
            raise ValueError("mask: every row must hide the same number of tokens")
        z = tokens[~mask].reshape(B, N - hidden, C)  # the visible tokens, in order
        for block in self.encoder.blocks:
            z = block(z)
        z = self.encoder_to_decoder(self.encoder.norm(z))  # (B, visible, Cd)
        Cd = z.shape[-1]
        pos = sinusoid_table(self.cfg.tokens, Cd)[:, :N].to(z).expand(B, -1, -1)  # (B, N, Cd)
        full = torch.cat([z + pos[~mask].reshape(B, -1, Cd),  # the visible tokens first, then the hidden ones
                          self.mask_token.expand(B, hidden, -1) + pos[mask].reshape(B, hidden, Cd)], dim=1)
        for block in self.decoder.blocks:  # no positional bias inside: the order of the tokens does not matter
            full = block(full)
        return self.decoder.head(self.decoder.norm(full[:, -hidden:]))  # (B, hidden, tubelet*p*p*3)


def random_mask(batch, tokens, ratio, generator=None):
    """(batch, tokens) bool, True = hidden: round(ratio * tokens) tokens per row, chosen uniformly at random
    (random masking, not tube masking; an image's one tubelet covers both of its repeated frames)."""
    hidden = round(ratio * tokens)
    rank = torch.rand(batch, tokens, generator=generator).argsort(dim=1)  # a random order of the tokens per row
    return rank < hidden


def patchify(x, patch_size, tubelet):
    """Video (B, 3, T, S, S) or image (B, 3, S, S, repeated to tubelet frames) -> (B, N, tubelet*p*p, 3): each
    token's pixels, tokens in (t, h, w) order and pixels in (t, y, x) order within a token."""
    if x.dim() == 4:
        x = x[:, :, None].expand(-1, -1, tubelet, -1, -1)
    B, _, T, S, _ = x.shape
    g, p = S // patch_size, patch_size
    x = x.reshape(B, 3, T // tubelet, tubelet, g, p, g, p)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, T // tubelet * g * g, tubelet * p * p, 3)


def mae_target(x, patch_size, tubelet):
    """The reconstruction target (B, N, tubelet*p*p*3): each token's pixels normalised by the mean and standard
    deviation of that token, per colour channel (so the data's own per-channel normalisation does not matter)."""
    pixels = patchify(x.float(), patch_size, tubelet)  # (B, N, P, 3)
    mean, std = pixels.mean(dim=2, keepdim=True), pixels.std(dim=2, keepdim=True)
    return ((pixels - mean) / (std + 1e-6)).flatten(2)


def mae_loss(pred, target, mask):
    """Mean squared error over the hidden tokens only: pred (B, hidden, P), target (B, N, P), mask (B, N)."""
    B = pred.shape[0]
    return F.mse_loss(pred, target[mask].reshape(B, -1, target.shape[-1]))


# ----------------------------------------------------------------------------- S4D checkpoints
_S4D_RELEASED = [(".moe_layer.router.topkroute_linear.", ".moae.router."),
                 (".moe_layer.router.noise_linear.", ".moae.noise."), (".moe_layer.experts.", ".moae.experts.")]


def s4d_to_ours(sd, pretrain):
    """The release's S4D names (fine-tuned, or the pre-trained MAE) or ours -> ours, for an S4D model
    (pretrain False) or an S4DPretrain one; plus the keys ignored on purpose, with the reason."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    for old, new in _S4D_RELEASED:
        sd = {k.replace(old, new): v for k, v in sd.items()}
    released = any(k.startswith("encoder.blocks.") for k in sd)
    ignored = {}
    if not pretrain and released:  # an MAE checkpoint into the classifier: the encoder only
        why = {"encoder.norm.": "the pre-training encoder's final norm (mean pooling uses a fresh fc_norm)",
               "decoder.": "the MAE decoder", "encoder_to_decoder.": "the MAE decoder", "mask_token": "the MAE decoder"}
        for k in list(sd):
            reason = next((r for prefix, r in why.items() if k.startswith(prefix)), None)
            if reason:
                ignored[k] = reason
                del sd[k]
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    naming = "S4D pre-training (MAE)" if released else "S4D"
    return sd, naming, ignored


def s4d_kind(checkpoint):
    """'classifier' or 'pretrain' for an S4D checkpoint (ours or the release's), None for anything else."""
    try:
        keys = [k.removeprefix("module.") for k in _unwrap(checkpoint, "<checkpoint>")]
    except ValueError:
        return None
    if any(k.startswith("encoder.blocks.") for k in keys):
        return "pretrain"
    return "classifier" if any(k.endswith(".attn.q_bias") for k in keys) else None


def s4d_config_from_state_dict(sd, recorded=None) -> S4DConfig:
    """The S4D architecture of a checkpoint or state dict (ours or the release's); `recorded` (a config train.py
    saved) fills in what the tensors cannot say (input size, frames), else the preset of the same width and depth
    does."""
    sd, _, _ = s4d_to_ours(_unwrap(sd, "<state dict>"), pretrain=False)
    C, _, t, p, _ = sd["patch_embed.proj.weight"].shape
    depth = len(_block_ids(sd))
    moae = sorted({int(k.split(".")[1]) for k in sd if ".moae." in k})
    cfg = dict(width=C, tubelet=t, patch_size=p, depth=depth, moae_from=moae[0] if moae else depth)
    if moae:
        cfg["experts"] = len({k.split(".")[4] for k in sd if f"blocks.{moae[0]}.moae.experts." in k})
        cfg["expert_dim"] = sd[f"blocks.{moae[0]}.moae.experts.0.fc1.weight"].shape[0]
    for head, field in (("video", "num_classes"), ("image", "image_classes")):
        if f"head.{head}.weight" in sd:
            cfg[field] = sd[f"head.{head}.weight"].shape[0]
    preset = next((p for p in S4D_PRESETS.values() if p["width"] == C and p["depth"] == depth), {})
    names = {f.name for f in fields(S4DConfig)}
    base = {k: v for k, v in {**preset, **(recorded or {})}.items() if k in names}
    return S4DConfig(**{**base, **cfg, "heads": base.get("heads", max(1, C // 64))})


# ----------------------------------------------------------------------------- the optional speed path: fused kernels
def use_triton(kernels, x):
    """The fused Triton kernels run when asked for ("triton"), or by default ("auto") on CUDA tensors."""
    return kernels == "triton" or (kernels == "auto" and x.is_cuda)


def _import_kernel(module, name):
    try:
        return getattr(import_module(f"kernels.{module}"), name)
    except ImportError as e:
        raise RuntimeError(f"kernels='triton' needs the triton package ({e}); install it, or build the model with "
                           "kernels='torch' (the plain-torch equations above)") from None


def fused_mcp_gate(mcp, x_in, a_in):
    """MCP's Eq. (3)-(5) and Eq. (6)'s x0' + x1 as one Triton kernel (kernels/mcp_gate.py), (B*T, N, K); triton is
    imported only here."""
    mcp_gate = _import_kernel("mcp_gate", "mcp_gate")
    return mcp_gate(x_in, a_in, mcp.down_x.weight, mcp.down_x.bias, mcp.down_a.weight, mcp.down_a.bias,
                    mcp.sharpness)


def fused_temporal_attention(qkv, scale):
    """T-MSA's Eq. (10) as one Triton kernel (kernels/temporal_attention.py): qkv (B, T, N, 3, H, D) ->
    (B, T, N, H*D); triton is imported only here."""
    temporal_attention = _import_kernel("temporal_attention", "temporal_attention")
    return temporal_attention(qkv, scale)


if __name__ == "__main__":
    import statistics
    import time

    ap = argparse.ArgumentParser(description="Run an S2D video model (video-stage trainable set) on one random clip; "
                                             "an S4D preset: its parameters per part, and a clip and an image batch.")
    ap.add_argument("--model", default="s2d_tiny", choices=sorted(PRESETS) + sorted(S4D_PRESETS), help="preset")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip")
    ap.add_argument("--repeat", type=int, default=1, help="timed forward+backward runs; the median is printed")
    args = ap.parse_args()
    if args.model in S4D_PRESETS:
        net = build_model(args.model, num_classes=7, num_frames=args.frames).eval()
        parts = parameter_parts(net)
        print(f"{args.model}: {sum(parts.values()):,} parameters, all trainable; "
              f"{len(list(net.buffers()))} registered buffers")
        for part, count in parts.items():
            print(f"  {part:20s} {count:>12,}")
        S = net.cfg.img_size
        with torch.no_grad():
            for x in (torch.randn(1, 3, args.frames, S, S), torch.randn(2, 3, S, S)):
                start = time.perf_counter()
                logits, feats = net(x)
                kind = "clip" if x.dim() == 5 else "image batch"
                print(f"{kind} {tuple(x.shape)} -> {'video' if x.dim() == 5 else 'image'} head logits "
                      f"{tuple(logits.shape)}, features {tuple(feats.shape)}; {time.perf_counter() - start:.2f} s")
        raise SystemExit(0)
    net = build_model(args.model, num_classes=7, num_frames=args.frames)
    trainable, total = set_trainable(net, "video")
    S = net.cfg.img_size
    video, lms = torch.randn(1, 3, args.frames, S, S), torch.randn(1, args.frames, 128, 14, 14)
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        logits, feats = net(video, lms)
        logits.sum().backward()
        seconds.append(time.perf_counter() - start)
    print(f"{args.model}: {trainable:,} of {total:,} parameters train; logits {tuple(logits.shape)}, "
          f"features {tuple(feats.shape)}")
    print(f"forward+backward of one {args.frames}-frame clip on {torch.get_num_threads()} CPU threads: "
          f"median {statistics.median(seconds):.3f} s over {args.repeat} runs (min {min(seconds):.3f}, "
          f"max {max(seconds):.3f})")
