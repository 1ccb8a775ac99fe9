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
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import safe_load

INPUT_SIZE = 112  # the detector's input side; conv_4 then sits at stride 8: 14 x 14
NUM_POINTS = 68
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
    frames run in channels-last memory order, which is about twice as fast on CPU for the depthwise layers.
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
        """Fold every ConvBlock's frozen BatchNorm into its convolution (README, The landmark view: 1.26x on a
        16-frame clip), and put the weights in channels-last order."""
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
        x = self.features(frames.contiguous(memory_format=torch.channels_last))  # (B*T, C, 14, 14)
        feats = x.contiguous().reshape(B, T, *x.shape[1:])  # (B*T, C, 14, 14) -> (B, T, C, 14, 14)
        if not return_points:
            return feats
        return feats, self.points(x).reshape(B, T, NUM_POINTS, 2)


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


def check_landmark_state_dict(path, sd, reference):
    """Check a checkpoint's names and shapes against `reference` (our own state dict), naming the file and every
    mismatch; returns sd."""
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
    """An image file or a folder of frames (natural order, data.py's reader) -> (1, 3, T, H, W), ImageNet-normalised."""
    path = Path(path)
    frames = data.load_clip(data.Sample(path.name, 0), path.parent)  # uint8 (T, H, W, 3)
    return data.to_tensor(frames).unsqueeze(0)


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
    convolutions in channels-last (what LandmarkFeatures runs). Prints the table and the largest difference."""
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
    video = torch.randn(1, 3, frames, INPUT_SIZE, INPUT_SIZE, generator=gen)
    x = video.transpose(1, 2).reshape(frames, 3, INPUT_SIZE, INPUT_SIZE)
    last = x.contiguous(memory_format=torch.channels_last)
    ways = {"BatchNorm layers, contiguous": lambda: plain.features(x),
            "BatchNorm layers, channels-last": lambda: plain.to(memory_format=torch.channels_last).features(last),
            "BatchNorm folded, channels-last (LandmarkFeatures)": lambda: folded(video)}
    times, outs = {}, {}
    with torch.no_grad():
        for name, run in ways.items():
            outs[name] = run().reshape(frames, -1)  # the warm-up call
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - t0)
            times[name] = 1000 * sorted(seconds)[repeats // 2]
    base = times["BatchNorm layers, channels-last"]
    print(f"landmark view forward, {preset}, one clip of {frames} frames at {INPUT_SIZE} px, {threads} thread(s), "
          f"median of {repeats}:")
    for name, ms in times.items():
        print(f"  {name:<52} {ms:8.2f} ms  {base / ms:5.2f}x")
    ref = outs["BatchNorm layers, contiguous"]
    print(f"  largest difference from BatchNorm layers: {max((o - ref).abs().max().item() for o in outs.values()):.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the landmark view on face crops and print what it sees, or "
                                                 "train one on the demo's ground-truth points (--train).")
    parser.add_argument("--weights", help="MobileFaceNet-68 checkpoint (mobilefacenet_model_best.pth.tar); "
                                          "omitted: the untrained, seeded detector")
    parser.add_argument("--video", help="an image file or a folder of frame images (aligned faces)")
    parser.add_argument("--train", action="store_true", help="train on the demo dataset's ground-truth points")
    parser.add_argument("--data-root", default="data/demo", help="--train: the demo dataset (data.py make-demo)")
    parser.add_argument("--out", default="runs/demo-landmarks", help="--train: writes landmarks.pt, results.json")
    parser.add_argument("--preset", default="mobilefacenet_tiny", choices=sorted(PRESETS), help="--train: size")
    parser.add_argument("--epochs", type=int, default=1, help="--train: passes over the training frames")
    parser.add_argument("--seed", type=int, default=0, help="--train: seed of initialisation and order")
    parser.add_argument("--bench", action="store_true", help="time the frozen forward (BatchNorm folded or not) of "
                                                              "the full preset on a 16-frame clip, 1 thread")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    args = parser.parse_args(argv)
    if args.bench:
        return bench()
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
