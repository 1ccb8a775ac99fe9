"""The landmark view of S2D: a frozen MobileFaceNet 68-point face landmark detector (paper Sec. III-B2).

Every frame of a clip is resized to 112 x 112 and run through MobileFaceNet up to stage conv_4; that stage's
output, 128 channels on a 14 x 14 grid, is the *landmark-aware feature* that S2D fuses with the ViT tokens.
The layer names follow the public checkpoint `mobilefacenet_model_best.pth.tar` (68 points, 136 outputs), so
its 'state_dict' loads with strict=True:

    lm = LandmarkFeatures(weights="mobilefacenet_model_best.pth.tar")
    feats = lm(video)                              # (B, 3, T, H, W) -> (B, T, 128, 14, 14)
    feats, points = lm(video, return_points=True)  # points (B, T, 68, 2)

Check a checkpoint on a few face crops (an image file or a folder of frames, decoded with PyAV):

    python landmarks.py --weights mobilefacenet_model_best.pth.tar --video path/to/frames
"""
import argparse
import copy
import itertools
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import safe_load

INPUT_SIZE = 112  # the detector's input side; conv_4 then sits at stride 8: 14 x 14
NUM_POINTS = 68
CHUNK_BYTES = 6_500_000  # LandmarkFeatures.chunk_frames: the widest activation of one CPU pass
RANDOM_INIT_SEED = 20240117  # fixed, so that every process builds the same untrained detector
_warned_untrained = False  # the untrained-detector warning is given once per process


class ConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU; without the PReLU it is the 'linear block' of MobileFaceNet."""

    def __init__(self, c_in, c_out, kernel=1, stride=1, groups=1, padding=None, act=True):
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.prelu = nn.PReLU(c_out) if act else None

    def forward(self, x):
        if hasattr(self, "fused_weight"):  # frozen: BatchNorm folded into the convolution (LandmarkFeatures)
            c = self.conv
            x = F.conv2d(x, self.fused_weight, self.fused_bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)

    @torch.no_grad()
    def fold(self):
        """Fold the BatchNorm's running statistics into the convolution: in eval mode BN(conv(x)) is
        (W x - mean) * g / sqrt(var + eps) + b, i.e. a convolution with weight W * k and bias b - mean * k,
        k = g / sqrt(var + eps) per output channel. Kept as non-persistent buffers: the state dict is unchanged."""
        bn = self.bn
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        self.register_buffer("fused_weight", self.conv.weight * k.reshape(-1, 1, 1, 1), persistent=False)
        self.register_buffer("fused_bias", bn.bias - bn.running_mean * k, persistent=False)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `groups` channels, 3x3 depthwise, 1x1 linear projection (+ skip)."""

    def __init__(self, c_in, c_out, groups, stride=1, residual=False):
        super().__init__()
        self.conv = ConvBlock(c_in, groups)
        self.conv_dw = ConvBlock(groups, groups, kernel=3, stride=stride, groups=groups)
        self.project = ConvBlock(groups, c_out, act=False)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Module):
    """A stage of `num_block` residual DepthWise blocks at constant width `c`."""

    def __init__(self, c, num_block, groups):
        super().__init__()
        self.model = nn.Sequential(*[DepthWise(c, c, groups, residual=True) for _ in range(num_block)])

    def forward(self, x):
        return self.model(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 depthwise conv over the whole 7 x 7 map, linear 512 -> 136, BatchNorm1d."""

    def __init__(self, channels=512, outputs=2 * NUM_POINTS):
        super().__init__()
        self.conv_6_dw = ConvBlock(channels, channels, kernel=7, groups=channels, padding=0, act=False)
        self.linear = nn.Linear(channels, outputs, bias=False)
        self.bn = nn.BatchNorm1d(outputs)

    def forward(self, x):
        x = self.conv_6_dw(x).flatten(1)  # (N, 512, 1, 1) -> (N, 512)
        return self.bn(self.linear(x))


# The public detector: where train.py and eval.py look for it when no file is named, and where it comes from.
PUBLIC_WEIGHTS = "weights/mobilefacenet_model_best.pth.tar"
PUBLIC_SOURCE = ("the 68-point MobileFaceNet in the authors' repository, https://github.com/MSA-LMC/S2D "
                 "(landmark/mobilefacenet_model_best.pth.tar)")

PRESETS = {
    # the public checkpoint mobilefacenet_model_best.pth.tar: 1,007,248 parameters, conv_4 = 128 x 14 x 14
    "mobilefacenet": dict(width=64, feature_width=128, head_width=512, blocks=(4, 6, 2)),
    # the demo's landmark view, trained by `landmarks.py --train`: the same layers, narrower and shallower
    "mobilefacenet_tiny": dict(width=16, feature_width=32, head_width=128, blocks=(1, 2, 1)),
}


class MobileFaceNet(nn.Module):
    """The 68-point landmark regressor. Stride 2 at conv1, conv_23, conv_34, conv_45: 112 -> 56 -> 28 -> 14 -> 7.
    Widths and block counts come from PRESETS; the layer names are those of the public checkpoint."""

    def __init__(self, width=64, feature_width=128, head_width=512, blocks=(4, 6, 2)):
        super().__init__()
        c, f = width, feature_width
        self.conv1 = ConvBlock(3, c, kernel=3, stride=2)
        self.conv2_dw = ConvBlock(c, c, kernel=3, groups=c)
        self.conv_23 = DepthWise(c, c, groups=2 * c, stride=2)
        self.conv_3 = Residual(c, num_block=blocks[0], groups=2 * c)
        self.conv_34 = DepthWise(c, f, groups=2 * f, stride=2)
        self.conv_4 = Residual(f, num_block=blocks[1], groups=2 * f)  # the landmark-aware feature
        self.conv_45 = DepthWise(f, f, groups=4 * f, stride=2)
        self.conv_5 = Residual(f, num_block=blocks[2], groups=2 * f)
        self.conv_6_sep = ConvBlock(f, head_width)
        self.output_layer = GDC(head_width, 2 * NUM_POINTS)
        self.feature_width = f

    def features(self, frames):  # (N, 3, 112, 112) -> conv_4 output (N, C, 14, 14)
        x = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(frames))))  # (N, width, 28, 28)
        return self.conv_4(self.conv_34(x))

    def points(self, feats):  # conv_4 output (N, C, 14, 14) -> (N, 68, 2), (x, y) in [0, 1] of the frame
        x = self.conv_6_sep(self.conv_5(self.conv_45(feats)))  # (N, head_width, 7, 7)
        return self.output_layer(x).reshape(-1, NUM_POINTS, 2)  # (N, 136) -> (N, 68, 2)

    def forward(self, frames):
        feats = self.features(frames)
        return feats, self.points(feats)


class LandmarkFeatures(MobileFaceNet):
    """Frozen MobileFaceNet giving conv_4 features and, on request, 68 landmarks, for every frame of a clip.

    The module is always in eval mode: `.train()` leaves it in eval, so BatchNorm keeps its running statistics,
    and no parameter requires grad. `weights`: the public checkpoint (the full preset) or one written by
    `landmarks.py --train` (which records its preset). With `weights=None` the detector of `preset` is
    untrained: it warns once per process, and its weights are drawn from a generator seeded with RANDOM_INIT_SEED
    (the global RNG is left untouched), so every process builds the very same random detector.
    Every BatchNorm is folded into the convolution before it (the state dict keeps the checkpoint's tensors), and
    frames run in channels-last memory order (README, The landmark view, has the measured gains).
    """

    def __init__(self, weights=None, preset="mobilefacenet"):
        sd, config = read_landmark_checkpoint(weights) if weights is not None else (None, PRESETS[preset])
        with torch.random.fork_rng(devices=[]):  # building the layers must not consume the caller's RNG
            super().__init__(**config)
        if sd is None:
            _warn_untrained()
            self._random_init(RANDOM_INIT_SEED)
        else:
            self.load_state_dict(check_landmark_state_dict(weights, sd, self.state_dict()))
        self.requires_grad_(False)
        self.fold_batchnorm()
        super().train(False)

    def fold_batchnorm(self):
        """Fold every ConvBlock's frozen BatchNorm into its convolution (README, The landmark view: with
        channels-last and chunks, 1.74x on a 16-frame clip), and put the weights in channels-last order."""
        for module in self.modules():
            if isinstance(module, ConvBlock):
                module.fold()
        self.to(memory_format=torch.channels_last)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, then the BatchNorms are folded again from the new weights."""
        report = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if any(isinstance(m, ConvBlock) and hasattr(m, "fused_weight") for m in self.modules()):
            self.fold_batchnorm()
        return report

    @torch.no_grad()
    def _random_init(self, seed):
        """He-normal convs and linear layer from a private generator; BatchNorm and PReLU keep their defaults."""
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear", generator=gen)

    def train(self, mode=True):
        """Stay in eval mode whatever is asked: the detector is frozen, BatchNorm uses its running statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, video, return_points=False):
        """video (B, 3, T, H, W), ImageNet-normalised -> features (B, T, C, 14, 14) [, points (B, T, 68, 2)].

        Points are (x, y) pairs in the order the head emits them (x0, y0, x1, y1, ...), in coordinates normalised
        to [0, 1] over the 112 x 112 crop, i.e. over the input frame (0 = left/top edge, 1 = right/bottom edge).
        For the public checkpoint this convention is assumed from the public detector's demo code (it maps a point
        back to the image as crop_corner + point * crop_size); it is not stored in the checkpoint. The detectors
        that `landmarks.py --train` trains use it by construction. With random weights the points are
        meaningless. Input: RGB, ImageNet mean/std; for the public checkpoint the channel order is unconfirmed (the
        public demo we read, of another backbone, used OpenCV's BGR).
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"LandmarkFeatures expects a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, 3, H, W)  # (B, 3, T, H, W) -> (B*T, 3, H, W)
        if (H, W) != (INPUT_SIZE, INPUT_SIZE):
            frames = F.interpolate(frames, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=True)
        frames = frames.contiguous(memory_format=torch.channels_last)
        n = self.chunk_frames() if frames.device.type == "cpu" else len(frames)
        chunks = [self.features(frames[i:i + n]) for i in range(0, len(frames), n)]  # each (n, C, 14, 14)
        feats = torch.cat([c.contiguous() for c in chunks]).reshape(B, T, *chunks[0].shape[1:])  # (B, T, C, 14, 14)
        if not return_points:
            return feats
        return feats, torch.cat([self.points(c) for c in chunks]).reshape(B, T, NUM_POINTS, 2)

    def chunk_frames(self):
        """Frames per pass on CPU, so that the network's widest activation (conv_23's expansion at 56 x 56, float32)
        stays near 6.5 MB a pass: 4 frames of the full preset, 16 of the tiny one. One pass over 16 or 64 frames
        allocates activations of about 25 MB, which glibc's malloc serves from fresh memory maps, page-faulting on
        every call; buffers of a few MB are reused from its heap instead. Measured in one process on a 2-core Intel
        Xeon (README, The landmark view): 1.2x on 16 frames of the full preset, 1.6x on 64 of the tiny one; with
        malloc kept from mapping memory, chunks are 6-12 % slower and 6-19 % faster, respectively, so the page
        faults are the gain. Every frame is computed alone either way: results change only by float rounding."""
        per_frame = self.conv_23.conv.conv.out_channels * (INPUT_SIZE // 2) ** 2 * 4  # bytes
        return max(1, CHUNK_BYTES // per_frame)


def _warn_untrained():
    global _warned_untrained
    if _warned_untrained:
        return
    _warned_untrained = True
    warnings.warn(
        "LandmarkFeatures(weights=None): the landmark view is UNTRAINED (random MobileFaceNet weights, seed "
        f"{RANDOM_INIT_SEED}); S2D results will not match the paper. Pass the 68-point checkpoint "
        "mobilefacenet_model_best.pth.tar as weights.",
        UserWarning,
        stacklevel=3,
    )


def read_landmark_checkpoint(path):
    """A MobileFaceNet checkpoint -> (state dict, preset config). Accepts {'state_dict': sd} (the public file, and
    ours, which adds 'config') or a bare sd; 'module.' prefixes are stripped. Without 'config': the full preset."""
    obj = safe_load(path)  # weights_only: a checkpoint that carries code is refused
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with key 'state_dict', got {type(sd).__name__}")
    config = obj.get("config", PRESETS["mobilefacenet"]) if "state_dict" in obj else PRESETS["mobilefacenet"]
    if set(config) != set(PRESETS["mobilefacenet"]):
        raise ValueError(f"{path}: 'config' must have the keys {sorted(PRESETS['mobilefacenet'])}, found {config}")
    return {k.removeprefix("module."): v for k, v in sd.items()}, dict(config)


def check_landmark_state_dict(path, sd, reference, what="MobileFaceNet-68"):
    """Check a checkpoint's names and shapes against `reference` (our own state dict), naming the file and every
    mismatch; returns sd."""
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict of {what}, found {type(sd).__name__}")
    missing = sorted(reference.keys() - sd.keys())
    unexpected = sorted(sd.keys() - reference.keys())

    def some(keys):  # a few names, not thousands of characters
        return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else "none"

    if missing or unexpected:
        raise ValueError(f"{path} is not the {what} checkpoint: missing keys {some(missing)}, unexpected keys "
                         f"{some(unexpected)}")
    odd = sorted(k for k in reference if not isinstance(sd[k], torch.Tensor))
    if odd:
        raise ValueError(f"{path}: expected tensors, found other values for {some(odd)}")
    wrong = [f"{k}: expected {tuple(v.shape)}, found {tuple(sd[k].shape)}" for k, v in reference.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from {what}: " + "; ".join(wrong))
    return sd


def read_frames(path):
    """An image file or a folder of frames (natural order, data.py's reader) -> (1, 3, T, H, W), ImageNet-normalised."""
    path = Path(path)
    frames = data.load_clip(data.Sample(path.name, 0), path.parent)  # uint8 (T, H, W, 3)
    return data.to_tensor(frames).unsqueeze(0)


# ----------------------------------------------------------------------------- MTCNN face detection, for your own video
# Zhang, Zhang, Li, Qiao, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks" (2016):
# P-Net proposes faces on an image pyramid, R-Net and O-Net refine them; O-Net also gives five landmarks (eyes, nose,
# mouth corners). The layer names and shapes are those of the public weights in the facenet-pytorch 2.6.0 wheel
# (facenet_pytorch/data/pnet.pt, rnet.pt, onet.pt; README, A video of your own), loaded with weights_only=True.
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


class PNet(nn.Module):
    """12 x 12 windows, fully convolutional: (N, 3, H, W) -> face probability (N, h, w), box offsets (N, 4, h, w)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """24 x 24 crops -> face probability (N,), box offsets (N, 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))  # (N, 64, 3, 3)
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))  # the weights read (W, H, C) order
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """48 x 48 crops -> face probability (N,), box offsets (N, 4), five points (N, 10): x0..x4, y0..y4 in the box."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))  # (N, 128, 3, 3)
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def nms(boxes, scores, threshold, mode="union"):
    """Greedy non-maximum suppression: indices of the kept boxes (x1, y1, x2, y2), best first. An overlap is
    intersection / union, or intersection / the smaller area with mode 'min'."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # (n, n)
    base = torch.minimum(area[:, None], area[None]) if mode == "min" else area[:, None] + area[None] - inter
    overlap = inter / base.clamp(min=1e-12)
    keep, suppressed = [], torch.zeros(len(boxes), dtype=torch.bool)
    for i in range(len(boxes)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i] > threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def pyramid_scales(height, width, min_face=20, factor=0.709):
    """The image scales at which P-Net's 12-pixel window sees faces from min_face pixels up to the whole image."""
    scale, side, scales = 12 / min_face, min(height, width) * 12 / min_face, []
    while side >= 12:
        scales.append(scale)
        scale, side = scale * factor, side * factor
    return scales


def square(boxes):
    """Boxes (x1, y1, x2, y2) grown to squares of their longer side, about the same centre."""
    centre, side = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
    return torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], dim=1)


def refine(boxes, offsets):
    """Box regression: each corner moves by its offset times the box's width / height."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (w, h, w, h)
    return boxes + offsets * size


def crops(image, boxes, size):
    """(1, 3, H, W) image -> (K, 3, size, size): each box, clipped to the image, resized (area averaging)."""
    H, W = image.shape[2:]
    out = []
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(max(x2, x1 + 1), W), min(max(y2, y1 + 1), H)
        out.append(F.interpolate(image[:, :, y1:y2, x1:x2], size=(size, size), mode="area"))
    return torch.cat(out) if out else image.new_zeros(0, 3, size, size)


class MTCNN(nn.Module):
    """Face boxes, scores and five landmarks in an RGB uint8 image (H, W, 3). `weights`: the folder holding
    pnet.pt, rnet.pt and onet.pt (README, A video of your own); without it the nets are untrained."""

    def __init__(self, weights=None, min_face=20, factor=0.709, thresholds=(0.6, 0.7, 0.7)):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.min_face, self.factor, self.thresholds = min_face, factor, thresholds
        if weights is not None:
            for net, name in zip((self.pnet, self.rnet, self.onet), MTCNN_FILES, strict=True):
                path = Path(weights) / name
                sd = safe_load(path)
                check_landmark_state_dict(path, sd, net.state_dict(), what=f"MTCNN {name[:4].upper()}")
                net.load_state_dict(sd)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, image):
        """uint8 (H, W, 3) -> boxes (K, 4) as (x1, y1, x2, y2) pixels, scores (K,), points (K, 5, 2) as (x, y)."""
        x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() - 127.5) / 128  # (1, 3, H, W) in [-1, 1]
        H, W = x.shape[2:]
        found = []
        for scale in pyramid_scales(H, W, self.min_face, self.factor):  # stage 1: P-Net on the pyramid
            small = F.interpolate(x, size=(math.ceil(H * scale), math.ceil(W * scale)), mode="area")
            prob, offsets = self.pnet(small)  # (1, h, w), (1, 4, h, w)
            ys, xs = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            cells = torch.stack([xs, ys], dim=1).float() * 2  # P-Net's stride is 2 pixels of the scaled image
            boxes = torch.cat([cells, cells + 12], dim=1) / scale  # its 12 x 12 window, in the full image
            scores, offsets = prob[0, ys, xs], offsets[0][:, ys, xs].T
            keep = nms(boxes, scores, 0.5)
            found.append((boxes[keep], scores[keep], offsets[keep]))
        none = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))
        if not found or sum(len(b) for b, _, _ in found) == 0:
            return none
        boxes, scores, offsets = (torch.cat(parts) for parts in zip(*found, strict=True))
        keep = nms(boxes, scores, 0.7)
        boxes = square(refine(boxes[keep], offsets[keep]))
        for net, size, threshold in ((self.rnet, 24, self.thresholds[1]), (self.onet, 48, self.thresholds[2])):
            out = net(crops(x, boxes, size))  # stages 2 and 3: R-Net, then O-Net, on the boxes so far
            keep = out[0] >= threshold
            if not keep.any():
                return none
            boxes, scores, offsets = boxes[keep], out[0][keep], out[1][keep]
            if net is self.onet:
                size_wh = boxes[:, 2:] - boxes[:, :2]  # (K, 2)
                pts = out[2][keep].reshape(-1, 2, 5).transpose(1, 2)  # (K, 5, 2): (x, y) as fractions of the box
                points = boxes[:, None, :2] + pts * size_wh[:, None]
                boxes = refine(boxes, offsets)
                keep = nms(boxes, scores, 0.7, mode="min")
                return boxes[keep], scores[keep], points[keep]
            keep = nms(boxes, scores, 0.7)
            boxes = square(refine(boxes[keep], offsets[keep]))
        return none


def face_track(detections, frames, window=5):
    """One face through a clip: per frame the box that overlaps the track most (starting from the first frame's
    best-scoring face), held over frames without a detection, then smoothed by a centred moving average of its
    centre, size and eye points over `window` frames. detections: per frame (boxes, scores, points).
    -> boxes (T, 4), points (T, 5, 2), and the frame numbers where no face was found."""
    T = len(detections)
    missed = [t for t, (boxes, _, _) in enumerate(detections) if len(boxes) == 0]
    if len(missed) == T:
        raise ValueError(f"{frames}: no face found in any of its {T} frames")
    track, track_pts, current = [], [], None
    first = next(t for t in range(T) if t not in missed)
    for t in range(T):
        boxes, scores, points = detections[t]
        if len(boxes):
            if current is None:
                pick = int(scores.argmax())
            else:
                lt = torch.maximum(boxes[:, :2], current[0][:2])
                rb = torch.minimum(boxes[:, 2:], current[0][2:])
                pick = int((rb - lt).clamp(min=0).prod(-1).argmax())  # the largest overlap with the track
            current = (boxes[pick], points[pick])
        elif current is None:  # frames before the first detection take the first face
            boxes, _, points = detections[first]
            current = (boxes[0], points[0])
        track.append(current[0])
        track_pts.append(current[1])
    track, track_pts = torch.stack(track), torch.stack(track_pts)  # (T, 4), (T, 5, 2)
    kernel = torch.ones(1, 1, window) / window
    def smooth(v):  # (T, k) -> (T, k), edges replicated
        padded = F.pad(v.T[:, None], (window // 2, window // 2), mode="replicate")
        return F.conv1d(padded, kernel)[:, 0].T
    return smooth(track), smooth(track_pts.flatten(1)).reshape(T, 5, 2), missed


def align_faces(video, boxes, points, size, enlarge=1.0):
    """Crop and align one face per frame, the way MAFW's face crops were made (paper Sec. IV-C: detect, then crop
    and align): rotate about the box centre so that the eyes are level, cut the box made square (its longer side
    times `enlarge`), resize to size x size. video uint8 (T, H, W, 3) -> uint8 (T, size, size, 3)."""
    T, H, W, _ = video.shape
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    eyes = points[:, 1] - points[:, 0]  # right eye minus left eye, (T, 2)
    angle = torch.atan2(eyes[:, 1], eyes[:, 0])  # the eye line's tilt
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values * enlarge / 2  # (T,)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output (u, v) in [-1, 1] -> input pixel centre + half * R(angle) (u, v), then to grid_sample's [-1, 1]
    theta = torch.zeros(T, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = half * cos * 2 / W, -half * sin * 2 / W
    theta[:, 1, 0], theta[:, 1, 1] = half * sin * 2 / H, half * cos * 2 / H
    theta[:, 0, 2], theta[:, 1, 2] = centre[:, 0] * 2 / W - 1, centre[:, 1] * 2 / H - 1
    grid = F.affine_grid(theta, (T, 3, size, size), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def detect_faces(frames, detector, detect_side=640):
    """MTCNN on each of an iterable of uint8 (H, W, 3) frames, on a copy at most detect_side pixels on its longer
    side -> per frame (boxes, scores, points) in the frame's pixels: face_track's input."""
    detections = []
    for frame in frames:
        shrink = min(1.0, detect_side / max(frame.shape[:2]))
        small = frame if shrink == 1 else F.interpolate(
            torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float(), scale_factor=shrink,
            mode="area")[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
        boxes, scores, points = detector(small)
        detections.append((boxes / shrink, scores, points / shrink))
    return detections


def align_in_chunks(frames, boxes, points, size, chunk=16):
    """align_faces over an iterable of frames, `chunk` frames at a time (it works in float, four times the bytes of
    uint8): yields the aligned uint8 (size, size, 3) crops in order."""
    buffer, start = [], 0
    for frame in itertools.chain(frames, [None]):
        if frame is not None:
            buffer.append(frame)
            if start + len(buffer) > len(boxes):
                raise ValueError(f"align_in_chunks: more frames than the {len(boxes)} boxes of the face track")
        elif start + len(buffer) != len(boxes):
            raise ValueError(f"align_in_chunks: {start + len(buffer)} frames for the {len(boxes)} boxes of the track")
        if buffer and (len(buffer) == chunk or frame is None):
            yield from align_faces(np.stack(buffer), boxes[start:start + len(buffer)],
                                   points[start:start + len(buffer)], size)
            start, buffer = start + len(buffer), []


# ----------------------------------------------------------------------------- training on ground-truth points
def nme(pred, target):
    """Normalised mean error of (N, 68, 2) points: the mean point-to-point distance divided by the inter-ocular
    distance (between the outer eye corners, points 36 and 45 of the iBUG 68-point layout), averaged over frames."""
    inter_ocular = (target[:, 45] - target[:, 36]).norm(dim=-1)  # (N,)
    return ((pred - target).norm(dim=-1).mean(-1) / inter_ocular).mean().item()


def frames_and_points(clips):
    """[(uint8 frames (T, H, W, 3), points (T, 68, 2) in pixels)] -> frames (N, 3, 112, 112) uint8 and points
    (N, 68, 2) normalised to [0, 1] of the frame, over all frames of all clips."""
    frames, points = [], []
    for video, pts in clips:
        if len(video) != len(pts):
            raise ValueError(f"a clip has {len(video)} frames but {len(pts)} sets of points")
        x = torch.from_numpy(video).permute(0, 3, 1, 2)  # (T, 3, H, W)
        size = torch.tensor([x.shape[3], x.shape[2]], dtype=torch.float32)  # (W, H)
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x.float(), (INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        frames.append(x)
        points.append(torch.as_tensor(pts, dtype=torch.float32) / size)
    return torch.cat(frames), torch.cat(points)


def _to_input(frames):  # uint8 (N, 3, 112, 112) -> ImageNet-normalised float, channels last
    x = data.normalise(frames.float() / 255).transpose(0, 1)  # normalise works on (T, 3, S, S) -> (3, T, S, S)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_points(net, frames, batch_size=256):
    """uint8 frames (N, 3, 112, 112) -> points (N, 68, 2) from a MobileFaceNet in eval mode."""
    net.eval()
    return torch.cat([net(_to_input(frames[i:i + batch_size]))[1] for i in range(0, len(frames), batch_size)])


def train_landmarks(train, test, preset="mobilefacenet_tiny", epochs=6, batch_size=32, lr=3e-3, seed=0, log=print):
    """Train a MobileFaceNet of `preset` to regress 68 points, L1 loss on [0, 1] coordinates, AdamW with a warm-up over
    a tenth of the steps and a cosine decay. train, test: (frames, points) from frames_and_points. The last layer
    (BatchNorm1d) starts at the training set's mean face, so the first steps refine a face instead of finding one.
    Returns the checkpoint (the public file's format plus 'config') and the per-epoch log; NME as in `nme`."""
    torch.manual_seed(seed)
    net = MobileFaceNet(**PRESETS[preset]).to(memory_format=torch.channels_last)
    (frames, points), gen = train, torch.Generator().manual_seed(seed)
    with torch.no_grad():  # BatchNorm1d(136) output = the mean face, spread like the faces
        net.output_layer.bn.bias.copy_(points.flatten(1).mean(0))
        net.output_layer.bn.weight.copy_(points.flatten(1).std(0))
    steps = epochs * (len(frames) // batch_size)
    if steps < 2:
        raise ValueError(f"train_landmarks: {len(frames)} training frames give {steps} steps of batch {batch_size}; "
                         "give more frames or a smaller batch")
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    decay = max(1, steps - warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over a tenth of the steps, then cosine to 0
        optimizer, lambda k: min((k + 1) / warmup, 0.5 * (1 + math.cos(math.pi * (k - warmup) / decay))))
    history = []
    for epoch in range(epochs):
        net.train()
        order, total = torch.randperm(len(frames), generator=gen), 0.0
        for i in range(len(frames) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.l1_loss(net(_to_input(frames[idx]))[1], points[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        history.append(dict(epoch=epoch, loss=total / max(1, len(frames) // batch_size),
                            test_nme=nme(predict_points(net, test[0]), test[1])))
        log(f"landmarks epoch {epoch}: L1 loss {history[-1]['loss']:.4f}, held-out NME {history[-1]['test_nme']:.4f}")
    checkpoint = dict(state_dict=net.state_dict(), config=PRESETS[preset], preset=preset, nme=history[-1]["test_nme"])
    return checkpoint, history


def train_demo_landmarks(root, out, preset="mobilefacenet_tiny", epochs=1, batch_size=32, lr=4e-3, seed=0, every=2):
    """Stage 1 of the demo: train on every `every`-th frame of the demo's training clips (neighbouring frames are
    nearly alike), report the NME on all its test clips' frames; writes out/landmarks.pt (LandmarkFeatures loads it)
    and out/results.json."""
    root, out = Path(root), Path(out)
    t0 = time.perf_counter()
    split = {name: data.read_split("demo", root / f"{name}.csv") for name in ("train", "test")}
    sets = {name: frames_and_points([(data.load_clip(s, root), data.demo_points(root, s)) for s in samples])
            for name, samples in split.items()}
    print(f"landmarks: {len(sets['train'][0]) // every} training frames, {len(sets['test'][0])} held-out frames "
          f"(decoded in {time.perf_counter() - t0:.1f} s); {preset}", flush=True)
    train = (sets["train"][0][::every], sets["train"][1][::every])
    checkpoint, history = train_landmarks(train, sets["test"], preset, epochs, batch_size, lr, seed)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out / "landmarks.pt")
    (out / "results.json").write_text(json.dumps(dict(nme=checkpoint["nme"], history=history, preset=preset)))
    print(f"landmarks: held-out NME {checkpoint['nme']:.4f} (inter-ocular: outer eye corners); {out / 'landmarks.pt'}")


def bench(preset="mobilefacenet", frames=16, repeats=7, threads=1):
    """Median ms of the frozen landmark view's forward on one clip of `frames` frames at 112 px (the features, as
    S2D uses them): BatchNorm as layers in contiguous memory, the same in channels-last, and folded into the
    convolutions in channels-last (what LandmarkFeatures runs). Prints the table and the largest difference;
    returns {way: ms}."""
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained detector's warning: speed does not depend on the weights
        folded = LandmarkFeatures(preset=preset)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics away from 0 / 1, as a trained network has them
        for m in folded.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    folded.fold_batchnorm()
    plain = MobileFaceNet(**PRESETS[preset]).eval().requires_grad_(False)
    plain.load_state_dict(folded.state_dict())
    plain_last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    video = torch.randn(1, 3, frames, INPUT_SIZE, INPUT_SIZE, generator=gen)
    x = video.transpose(1, 2).reshape(frames, 3, INPUT_SIZE, INPUT_SIZE)
    last = x.contiguous(memory_format=torch.channels_last)
    ways = {"BatchNorm layers, contiguous": lambda: plain.features(x),
            "BatchNorm layers, channels-last": lambda: plain_last.features(last),
            "BatchNorm folded, channels-last, in chunks (LandmarkFeatures)": lambda: folded(video)}
    outs, seconds = {}, {name: [] for name in ways}
    with torch.no_grad():
        for name, run in ways.items():
            outs[name] = run().reshape(frames, -1)  # the warm-up call
        for _ in range(repeats):  # the ways take turns, so a slower spell of a shared machine hits them alike
            for name, run in ways.items():
                t0 = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - t0)
    times = {name: 1000 * sorted(s)[repeats // 2] for name, s in seconds.items()}
    base = times["BatchNorm layers, contiguous"]  # the forward as it was before folding and chunking
    print(f"landmark view forward, {preset}, one clip of {frames} frames at {INPUT_SIZE} px, {threads} thread(s), "
          f"median of {repeats}:")
    for name, ms in times.items():
        print(f"  {name:<62} {ms:8.2f} ms  {base / ms:5.2f}x")
    ref = outs["BatchNorm layers, contiguous"]
    print(f"  largest difference from BatchNorm layers: {max((o - ref).abs().max().item() for o in outs.values()):.2e}")
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the landmark view on face crops and print what it sees, or "
                                                 "train one on the demo's ground-truth points (--train).")
    parser.add_argument("--weights", help="MobileFaceNet-68 checkpoint (mobilefacenet_model_best.pth.tar); "
                                          "omitted: the untrained, seeded detector")
    parser.add_argument("--video", help="a video file, an image file or a folder of frame images (aligned faces): "
                                        "every frame is read")
    parser.add_argument("--train", action="store_true", help="train on the demo dataset's ground-truth points")
    parser.add_argument("--data-root", default="data/demo", help="--train: the demo dataset (data.py make-demo)")
    parser.add_argument("--out", default="runs/demo-landmarks", help="--train: writes landmarks.pt, results.json")
    parser.add_argument("--preset", default="mobilefacenet_tiny", choices=sorted(PRESETS), help="--train: size")
    parser.add_argument("--epochs", type=int, default=1, help="--train: passes over the training frames")
    parser.add_argument("--seed", type=int, default=0, help="--train: seed of initialisation and order")
    parser.add_argument("--bench", action="store_true", help="time the frozen forward (BatchNorm folded or not, "
                                                              "chunked or not) on one clip, 1 thread")
    parser.add_argument("--bench-preset", default="mobilefacenet", choices=sorted(PRESETS), help="--bench: size")
    parser.add_argument("--bench-frames", type=int, default=16, help="--bench: frames of the clip")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    args = parser.parse_args(argv)
    if args.bench:
        bench(args.bench_preset, args.bench_frames)
        return 0
    if args.train:
        return train_demo_landmarks(args.data_root, args.out, args.preset, args.epochs, seed=args.seed)
    if not args.video:
        parser.error("give --video (frames to look at) or --train")
    video = read_frames(args.video)
    feats, points = LandmarkFeatures(args.weights)(video, return_points=True)
    print(f"frames {tuple(video.shape)} -> features {tuple(feats.shape)}, points {tuple(points.shape)}")
    for t in range(points.shape[1]):
        p = points[0, t]  # (68, 2), normalised (x, y)
        print(f"frame {t}: |feature| mean {feats[0, t].abs().mean():.4f}; points x in [{p[:, 0].min():.3f}, "
              f"{p[:, 0].max():.3f}], y in [{p[:, 1].min():.3f}, {p[:, 1].max():.3f}]; first 3: "
              f"{[tuple(round(v, 3) for v in q) for q in p[:3].tolist()]}")


if __name__ == "__main__":
    sys.exit(data.exit_on_user_error("landmarks.py", main))
