"""The landmark view of S2D: a frozen MobileFaceNet 68-point face landmark detector (SPEC.md section 1).

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
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import safe_load

INPUT_SIZE = 112  # the detector's input side; conv_4 then sits at stride 8: 14 x 14
NUM_POINTS = 68
RANDOM_INIT_SEED = 20240117  # fixed, so that every process builds the same untrained detector
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


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


class LandmarkFeatures(nn.Module):
    """Frozen MobileFaceNet (1,007,248 parameters) giving conv_4 features and, on request, 68 landmarks.

    The module is always in eval mode: `.train()` leaves it in eval, so BatchNorm keeps its running statistics,
    and no parameter requires grad. With `weights=None` the detector is untrained: it warns once per process,
    and its weights are drawn from a generator seeded with RANDOM_INIT_SEED (the global RNG is left untouched),
    so every process - training, evaluation - builds the very same random detector and sees the same features.
    """

    def __init__(self, weights=None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # building the layers must not consume the caller's RNG
            self._build()
        if weights is None:
            _warn_untrained()
            self._random_init(RANDOM_INIT_SEED)
        else:
            self.load_state_dict(load_landmark_state_dict(weights, self.state_dict()))
        self.requires_grad_(False)
        super().train(False)

    def _build(self):
        # Stride 2 at conv1, conv_23, conv_34, conv_45: 112 -> 56 -> 28 -> 14 -> 7.
        self.conv1 = ConvBlock(3, 64, kernel=3, stride=2)
        self.conv2_dw = ConvBlock(64, 64, kernel=3, groups=64)
        self.conv_23 = DepthWise(64, 64, groups=128, stride=2)
        self.conv_3 = Residual(64, num_block=4, groups=128)
        self.conv_34 = DepthWise(64, 128, groups=256, stride=2)
        self.conv_4 = Residual(128, num_block=6, groups=256)  # the landmark-aware feature
        self.conv_45 = DepthWise(128, 128, groups=512, stride=2)
        self.conv_5 = Residual(128, num_block=2, groups=256)
        self.conv_6_sep = ConvBlock(128, 512)
        self.output_layer = GDC(512, 2 * NUM_POINTS)

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
        """video (B, 3, T, H, W), ImageNet-normalised -> features (B, T, 128, 14, 14) [, points (B, T, 68, 2)].

        Points are (x, y) pairs in the order the head emits them (x0, y0, x1, y1, ...), in coordinates normalised
        to [0, 1] over the 112 x 112 crop, i.e. over the input frame (0 = left/top edge, 1 = right/bottom edge).
        This convention is assumed from the public detector's demo code (it maps a point back to the image as
        crop_corner + point * crop_size); it is not stored in the checkpoint, and with random weights the
        points are meaningless. Input: RGB, ImageNet mean/std, as SPEC.md says; the public demo we read (another
        backbone) used the same mean/std but OpenCV's BGR channel order, so the channel order is unconfirmed.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"LandmarkFeatures expects a video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        B, _, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, 3, H, W)  # (B, 3, T, H, W) -> (B*T, 3, H, W)
        if (H, W) != (INPUT_SIZE, INPUT_SIZE):
            frames = F.interpolate(frames, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=True)
        x = self.conv_3(self.conv_23(self.conv2_dw(self.conv1(frames))))  # (B*T, 64, 28, 28)
        x = self.conv_4(self.conv_34(x))  # (B*T, 128, 14, 14)
        feats = x.reshape(B, T, *x.shape[1:])  # (B*T, 128, 14, 14) -> (B, T, 128, 14, 14)
        if not return_points:
            return feats
        x = self.conv_6_sep(self.conv_5(self.conv_45(x)))  # (B*T, 512, 7, 7)
        points = self.output_layer(x).reshape(B, T, NUM_POINTS, 2)  # (B*T, 136) -> (B, T, 68, 2)
        return feats, points


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


def load_landmark_state_dict(path, reference):
    """Read a MobileFaceNet checkpoint ({'state_dict': sd} or a bare sd, 'module.' prefixes stripped) and check
    its names and shapes against `reference` (our own state dict), naming the file and every mismatch."""
    obj = safe_load(path)  # weights_only: a checkpoint that carries code is refused
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with key 'state_dict', got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    missing = sorted(reference.keys() - sd.keys())
    unexpected = sorted(sd.keys() - reference.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} is not the 68-point MobileFaceNet checkpoint: missing keys {missing}, unexpected keys {unexpected}"
        )
    wrong = [f"{k}: expected {tuple(v.shape)}, found {tuple(sd[k].shape)}" for k, v in reference.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from MobileFaceNet-68: " + "; ".join(wrong))
    return sd


def read_frames(path):
    """An image file or a folder of images (sorted by name) -> (1, 3, T, H, W), ImageNet-normalised."""
    import av
    import numpy as np

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    frames = []
    for file in files:
        with av.open(str(file)) as container:
            rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")  # (H, W, 3) uint8
        frames.append(torch.from_numpy(np.ascontiguousarray(rgb)))
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"{path}: frames differ in size: {sorted({tuple(f.shape) for f in frames})}")
    video = torch.stack(frames).permute(3, 0, 1, 2).float() / 255  # (T, H, W, 3) -> (3, T, H, W) in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return ((video - mean) / std).unsqueeze(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the landmark view on face crops and print what it sees.")
    parser.add_argument("--weights", help="MobileFaceNet-68 checkpoint (mobilefacenet_model_best.pth.tar); "
                                          "omitted: the untrained, seeded detector")
    parser.add_argument("--video", required=True, help="an image file or a folder of frame images (aligned faces)")
    args = parser.parse_args(argv)
    video = read_frames(args.video)
    feats, points = LandmarkFeatures(args.weights)(video, return_points=True)
    print(f"frames {tuple(video.shape)} -> features {tuple(feats.shape)}, points {tuple(points.shape)}")
    for t in range(points.shape[1]):
        p = points[0, t]  # (68, 2), normalised (x, y)
        print(f"frame {t}: |feature| mean {feats[0, t].abs().mean():.4f}; points x in [{p[:, 0].min():.3f}, "
              f"{p[:, 0].max():.3f}], y in [{p[:, 1].min():.3f}, {p[:, 1].max():.3f}]; first 3: "
              f"{[tuple(round(v, 3) for v in q) for q in p[:3].tolist()]}")


if __name__ == "__main__":
    main()
