"""S2D: a landmark-aware ViT-B/16 image model (MCP prompts) grown into a video model (TMA adapters).

Paper: Chen, Li, Shan, Wang, Hong, "From Static to Dynamic: Adapting Landmark-Aware Image Models for Facial
Expression Recognition in Videos", IEEE TAFFC (arXiv:2312.05447). Every equation of Sec. III-A to III-C is written
here in plain torch, marked `# Eq. (n)`, in the paper's order: read top to bottom.
  config and presets; the ViT pieces; S2D, the prompt chain (Eq. 1-2); MCP (Eq. 3-6); TMA (Eq. 7-15);
  which parameters train; checkpoint loading (ours, the released S2D ones, MAE / timm); and last, the optional
  fused Triton kernels, which compute Eq. (3)-(5) and (10) faster on a GPU and are imported only when selected.
Shapes: B clips, T frames (B*T frames in all), N = 196 patch tokens (a 14 x 14 grid), C channels, H heads, D head
width, K = 8 MCP channels, d the TMA bottleneck width.
"""
import argparse
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
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
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
        return patches + P + M, P  # Eq. (1): X'_i = X_{i-1} + P_{i-1} + M_{i-1}

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

    def forward(self, x_in, a_in):  # (B*T, N, C), (B*T, N, C) -> P (B*T, N, C)
        if use_triton(self.kernels, x_in):
            return self.up(fused_mcp_gate(self, x_in, a_in))  # Eq. (3)-(5) in one Triton kernel, then Eq. (6)
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

    def t_msa(self, h, T):  # h (B*T, N, d) -> (B*T, N, d): attention across the T frames at every position
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

    def forward(self, x_in, T):  # x_in (B*T, N, C) -> M (B*T, N, C)
        h = F.gelu(self.t_down(x_in))  # Eq. (7): downsample to d = C * 0.25, GELU
        h = self.t_msa(h, T)  # Eq. (8): T-MSA
        h = self.t_up(h)  # Eq. (12): upsample back to C
        h = self.norm(h)  # Eq. (13): LayerNorm
        h = F.gelu(self.down(h))  # Eq. (14): vanilla adapter, down + GELU
        return self.up(h)  # Eq. (15): vanilla adapter, up -> M_i


def build_model(name, num_classes, num_frames, image_model=False, **overrides) -> S2D:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {sorted(PRESETS)}")
    frames = 1 if image_model else num_frames
    cfg = S2DConfig(**{**PRESETS[name], "num_classes": num_classes, "num_frames": frames, "video": not image_model,
                       **overrides})
    return S2D(cfg)


# ----------------------------------------------------------------------------- what trains
VIDEO_STAGE = ("landmark_embed.", "mcp.", "tma.", "prompt_norms.", "temporal_embed", "norm.", "head.")


def set_trainable(model: S2D, stage: str):
    """'video': the adapted set (paper Sec. IV-C: MCPs, TMAs, norms, classifier) trains, the ViT is frozen.
    'image' / 'all': everything trains (the landmark detector is a separate frozen module, LandmarkFeatures)."""
    if stage not in ("video", "image", "all"):
        raise ValueError(f"stage must be 'video', 'image' or 'all', got {stage!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(stage != "video" or name.startswith(VIDEO_STAGE))
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def no_weight_decay(name, param):
    return param.ndim <= 1 or any(k in name for k in ("cls_token", "pos_embed", "temporal_embed"))


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
        for key in ("model", "model_state_dict", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{source}: no state dict found (looked for keys 'model', 'model_state_dict', 'state_dict' "
                     f"or a flat name -> tensor dict); found {found}")


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


def load_checkpoint(model: S2D, path_or_state_dict, verbose=True, source=None) -> LoadReport:
    """Load ours, the released S2D (image or video stage) or an MAE / timm ViT-B/16 checkpoint into `model`;
    `source` names an already loaded checkpoint in the report."""
    source = source or ("<state dict>" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict))
    obj = path_or_state_dict if isinstance(path_or_state_dict, dict) else safe_load(path_or_state_dict)
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
    """MCP's Eq. (3)-(5) as one Triton kernel (kernels/mcp_gate.py), (B*T, N, K); triton is imported only here."""
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

    ap = argparse.ArgumentParser(description="Run an S2D video model (video-stage trainable set) on one random clip.")
    ap.add_argument("--model", default="s2d_tiny", choices=sorted(PRESETS), help="preset")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip")
    ap.add_argument("--repeat", type=int, default=1, help="timed forward+backward runs; the median is printed")
    args = ap.parse_args()
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
