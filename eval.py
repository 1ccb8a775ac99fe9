"""Evaluate S2D as the papers report it: softmax averaged over each clip's views, then UAR, WAR, macro-F1.

    python eval.py --checkpoint runs/demo/best.pth --dataset demo --data-root data/demo
    python eval.py --checkpoint "runs/dfew_fold{fold}/best.pth" --dataset dfew --data-root /data/DFEW --folds 1-5
    torchrun --nproc_per_node=8 eval.py --checkpoint CKPT --dataset ferv39k --data-root /data/FERV39K
    python eval.py --checkpoint CKPT --video path/to/clip.mp4_or_frame_folder

Checkpoints: ours (train.py, with the model config inside) or the released S2D ones (config inferred from
the weights). Under torchrun each rank evaluates every world_size-th view (no padding, so no duplicates),
the per-view probabilities are gathered, and every rank computes the same metrics as a single process.
"""

import argparse
import csv
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import av

# Transparent huge pages for PyTorch's CPU tensors of 2 MB and more, as PyTorch's CPU performance tuning guide
# suggests (read once, when torch starts): a new clip or batch then costs a few page faults instead of thousands.
# README, Data loading speed, has the gain; THP_MEM_ALLOC_ENABLE=0 turns it off. Results do not change.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import landmarks
from data import CLASSES, ClipDataset, Sample, dataset_files, read_split
from model import (S2D, S4D, S2DConfig, config_from_state_dict, load_checkpoint, s4d_config_from_state_dict, s4d_kind,
                   safe_load)


# ----------------------------------------------------------------------------- metrics
def compute_metrics(labels, preds, num_classes):
    """Clip labels and predictions (N,) -> dict(uar, war, recall, f1, support, macro_f1, confusion).

    confusion[i][j] counts clips of true class i predicted as j. A class absent from `labels` has recall
    None and is left out of UAR (the mean recall over the classes present). Macro-F1 averages the F1 of the
    classes present in labels or predictions (a class only ever predicted has F1 = 0; one in neither, None).
    """
    labels, preds = torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(preds, dtype=torch.long)
    if labels.numel() == 0 or labels.shape != preds.shape:
        raise ValueError(
            f"compute_metrics: need equal, non-empty label and prediction vectors, got "
            f"{tuple(labels.shape)} and {tuple(preds.shape)}"
        )
    for name, v in (("labels", labels), ("preds", preds)):
        if v.min() < 0 or v.max() >= num_classes:
            raise ValueError(f"compute_metrics: {name} must lie in [0, {num_classes}), found [{v.min()}, {v.max()}]")
    confusion = torch.bincount(labels * num_classes + preds, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)  # (true, predicted)
    tp, support, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    recall = [tp[c].item() / support[c].item() if support[c] > 0 else None for c in range(num_classes)]
    f1 = [
        2 * tp[c].item() / (support[c] + predicted[c]).item() if support[c] + predicted[c] > 0 else None
        for c in range(num_classes)
    ]
    present = [r for r in recall if r is not None]
    return dict(
        uar=sum(present) / len(present),
        war=tp.sum().item() / labels.numel(),
        recall=recall,
        macro_f1=statistics.fmean(x for x in f1 if x is not None),
        f1=f1,
        support=support.tolist(),
        confusion=confusion.tolist(),
    )


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_report(metrics, class_names):
    """Metrics from compute_metrics -> a text table: the summary line, per-class rows, the confusion matrix."""
    w = max(8, *(len(n) for n in class_names))
    lines = [
        f"UAR {_pct(metrics['uar'])}  WAR {_pct(metrics['war'])}  macro-F1 {_pct(metrics['macro_f1'])}  "
        f"({sum(metrics['support'])} clips)",
        "",
        f"{'class':<{w}} {'clips':>6} {'recall':>7} {'F1':>7}",
    ]
    for name, n, r, f in zip(class_names, metrics["support"], metrics["recall"], metrics["f1"], strict=True):
        lines.append(f"{name:<{w}} {n:>6} {_pct(r):>7} {_pct(f):>7}")
    cw = max(min(8, max(len(n) for n in class_names)), *(len(str(v)) for row in metrics["confusion"] for v in row))
    short = [n[:cw] for n in class_names]
    lines += [
        "",
        "confusion matrix (rows = true class, columns = predicted)",
        " " * w + "".join(f" {n:>{cw}}" for n in short),
    ]
    for name, row in zip(class_names, metrics["confusion"], strict=True):
        lines.append(f"{name:<{w}}" + "".join(f" {v:>{cw}}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation
def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _view_probs(model, landmark_net, dataset, indices, batch_size, device, workers, amp):
    """Softmax of every view in `indices` -> rows (clip index, view, label, probs list)."""
    loader = data.batches(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                          pin_memory=device.type == "cuda")  # its workers leave Ctrl-C and SIGTERM to this process
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    rows = []
    s4d = isinstance(model, S4D)
    for batch in loader:
        video = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S)
        if s4d and dataset.num_frames == 1:
            video = video[:, :, 0]  # S4D: still images are a 4-D batch, which its image head classifies
        with autocast:
            logits, _ = model(video, landmark_net(video) if landmark_net is not None else None)
        probs = logits.float().softmax(-1).cpu()  # (B, classes)
        rows += zip(
            batch["index"].tolist(), batch["view"].tolist(), batch["label"].tolist(), probs.tolist(), strict=True
        )
    return rows


def _per_clip(rows, num_clips):
    """All views' rows -> one prediction per clip (probabilities averaged over its views, in view order)."""
    by_clip = {}
    for index, _view, label, probs in sorted(rows):  # sorted by clip, then view: a fixed summation order
        by_clip.setdefault(index, []).append((label, probs))
    counts = {len(v) for v in by_clip.values()}
    if sorted(by_clip) != list(range(num_clips)) or len(counts) != 1:
        raise RuntimeError(
            f"evaluate: expected every one of {num_clips} clips with the same number of views, got "
            f"{len(by_clip)} clips with view counts {sorted(counts)}"
        )
    predictions = []
    for index, clip in by_clip.items():
        mean = torch.tensor([p for _, p in clip]).mean(0)  # (views, classes) -> (classes,)
        predictions.append(dict(index=index, label=clip[0][0], pred=int(mean.argmax()), probs=mean.tolist()))
    return predictions


def evaluate(model, landmark_net, dataset, batch_size, device, workers=0, amp=False):
    """Evaluate `dataset` (ClipDataset, mode="eval") -> dict(uar, war, recall, f1, support, macro_f1, confusion,
    predictions); identical on every rank under torch.distributed, each clip counted exactly once."""
    device = torch.device(device)
    net = model.module if isinstance(model, DistributedDataParallel) else model  # no DDP syncs in eval
    was_training = net.training
    net.eval()
    rank, world = _world()
    try:
        rows = _view_probs(
            net, landmark_net, dataset, list(range(rank, len(dataset), world)), batch_size, device, workers, amp
        )  # rank r takes views r, r + world, ...: no padding, no duplicates
    finally:
        net.train(was_training)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    predictions = _per_clip(rows, len(dataset.samples))
    image_head = isinstance(net, S4D) and dataset.num_frames == 1
    num_classes = net.cfg.image_classes if image_head else net.cfg.num_classes
    metrics = compute_metrics([p["label"] for p in predictions], [p["pred"] for p in predictions], num_classes)
    return dict(metrics, predictions=predictions)


# ----------------------------------------------------------------------------- pictures (PNG through PyAV)
def write_png(path, rgb):
    """uint8 (H, W, 3) -> a PNG file, encoded with PyAV's PNG encoder."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    Path(path).write_bytes(b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None)))
    return Path(path)


_GLYPHS = {  # a 3 x 5 pixel font: digits, capital letters and the space
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "H": "101101111101101", "I": "111010010010111",
    "N": "101111111111101", "S": "111100111001111", "U": "101101101101111", " ": "000000000000000",
    "B": "110101110101110", "C": "111100100100111", "G": "111100101101111", "J": "001001001101111",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "O": "111101101101111",
    "P": "111101111100100", "Q": "111101101111001", "R": "110101110101101", "T": "111010010010010",
    "V": "101101101101010", "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010",
    "Z": "111001010100111",
}


def draw_text(img, text, top, left, scale=2, colour=(0, 0, 0)):
    """Write `text` (the characters of _GLYPHS) into img in place, each glyph 3 x 5 pixels times scale."""
    for k, ch in enumerate(text.upper()):
        glyph = np.array([int(b) for b in _GLYPHS[ch]], bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
        y, x = top, left + k * 4 * scale
        region = img[y:y + 5 * scale, x:x + 3 * scale]  # cut off at the image's edge
        region[glyph[:region.shape[0], :region.shape[1]]] = colour


def confusion_picture(confusion, names, cell=36):
    """The confusion matrix as a grid: rows true class, columns predicted, darker = more clips, counts written."""
    counts = np.array(confusion)
    n, margin = len(counts), 40
    img = np.full((margin + n * cell, margin + n * cell, 3), 255, np.uint8)
    shade = counts / max(1, counts.sum(1, keepdims=True).max())  # a cell's share of its row
    for i in range(n):
        draw_text(img, names[i][:2], margin + i * cell + cell // 2 - 5, 6)  # row labels, then column labels
        draw_text(img, names[i][:2], 14, margin + i * cell + cell // 2 - 7)
        for j in range(n):
            y, x = margin + i * cell, margin + j * cell
            tint = 255 * (1 - 0.85 * shade[i, j] * np.array([1, 0.6, 0.2]))  # white to dark blue
            img[y + 1:y + cell, x + 1:x + cell] = tint.astype(np.uint8)
            text = str(counts[i, j])
            draw_text(img, text, y + cell // 2 - 5, x + cell // 2 - 4 * len(text) + 1,
                      colour=(255, 255, 255) if shade[i, j] > 0.5 else (0, 0, 0))
    return img


def _dots(img, points, colour, scale):
    for x, y in (points * scale).round().astype(int):
        img[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = colour


def landmark_picture(frames, truth, predicted, scale=3):
    """Faces uint8 (K, S, S, 3) side by side, scale x larger, ground-truth points green and predicted red
    (both (K, 68, 2) in pixels)."""
    tiles = []
    for frame, t, p in zip(frames, truth, predicted, strict=True):
        tile = frame.repeat(scale, 0).repeat(scale, 1).copy()
        _dots(tile, t, (0, 200, 0), scale)
        _dots(tile, p, (230, 0, 0), scale)
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


def gate_picture(frames, gates, scale=3):
    """Faces (K, S, S, 3) over a row of their MCP gate maps (K, 14, 14): red where the gate puts its weight."""
    tiles = []
    for frame, gate in zip(frames, gates, strict=True):
        g = (gate - gate.min()) / max(float(gate.max() - gate.min()), 1e-12)  # (14, 14) in [0, 1]
        g = np.kron(g, np.ones((frame.shape[0] // g.shape[0], frame.shape[1] // g.shape[1])))[..., None]
        face = frame.astype(np.float32)
        heat = (1 - 0.6 * g) * face + 0.6 * g * np.array([255.0, 0, 0])
        tiles.append(np.concatenate([face, heat]).astype(np.uint8).repeat(scale, 0).repeat(scale, 1))
    return np.concatenate(tiles, axis=1)


@torch.no_grad()
def mcp_gates(model, video, lm_feats, layer=0):
    """Eq. (4)'s Fovea gate A = softmax over the N positions of (s * x0) at MCP_layer, averaged over its 8 channels:
    (T, 14, 14) for a clip video (1, 3, T, S, S). Read from the inputs MCP_layer receives in a forward pass."""
    seen = {}
    hook = model.mcp[layer].register_forward_hook(lambda m, inputs, out: seen.update(x_in=inputs[0]))
    try:
        model(video, lm_feats)
    finally:
        hook.remove()
    mcp = model.mcp[layer]
    A = torch.softmax(mcp.sharpness * mcp.down_x(seen["x_in"]), dim=1)  # (B*T, N, 8), Eq. (3)-(4)
    G = model.cfg.grid
    return A.mean(-1).reshape(-1, G, G).numpy()


def demo_pictures(video_run, landmark_weights, root):
    """The demo's three pictures in video_run: landmarks.png, gate.png, confusion.png; returns their paths."""
    video_run, root = Path(video_run), Path(root)
    model, _ = load_model(video_run / "best.pt", "cpu", show=lambda *_: None)
    lm = landmarks.LandmarkFeatures(landmark_weights)
    sample = next(s for s in read_split("demo", root / "test.csv") if s.label == CLASSES["demo"].index("Happy"))
    frames = data.load_clip(sample, root)  # (T, S, S, 3) uint8
    truth = data.demo_points(root, sample)  # (T, 68, 2) pixels
    n = model.cfg.num_frames if model.cfg.video else 6  # the frames the model takes, first to last of the clip
    pick = np.linspace(0, len(frames) - 1, n).round().astype(int)
    video = data.to_tensor(frames[pick])[None]  # (1, 3, n, S, S)
    feats, points = lm(video, return_points=True)
    predicted = points[0].numpy() * np.array([frames.shape[2], frames.shape[1]])  # [0, 1] -> pixels
    gates = mcp_gates(model, video, feats)
    results = json.loads((video_run / "results.json").read_text())["best"]
    return [write_png(video_run / "landmarks.png", landmark_picture(frames[pick], truth[pick], predicted)),
            write_png(video_run / "gate.png", gate_picture(frames[pick], gates)),
            write_png(video_run / "confusion.png", confusion_picture(results["confusion"], CLASSES["demo"]))]


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate an S2D or S4D checkpoint: UAR, WAR, per-class recall, macro-F1 and "
        "the confusion matrix, or the class probabilities of one clip."
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="our checkpoint (train.py) or a released S2D one; with --folds, a pattern with {fold}",
    )
    p.add_argument("--dataset", choices=sorted(CLASSES), help="dataset whose test split is evaluated")
    p.add_argument("--data-root", help="dataset folder in its release layout (README, Datasets; default: "
                   "data/<NAME>, e.g. data/DFEW)")
    p.add_argument("--media-root", help="folder the split file's paths are relative to (default: the layout's)")
    p.add_argument("--split", help="test split file instead of the release layout's (e.g. MAFW's set_1/test.csv)")
    p.add_argument("--one-based", action="store_true", help="DFEW's own split files, labels 1-7")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=int, default=1, help="the fold to evaluate (DFEW, MAFW: 1-5; default 1)")
    folds.add_argument("--folds", help="several folds, e.g. 1-5 or 1,3: per-fold reports, then mean and std")
    p.add_argument("--video", help="a video file or a folder of frames: print this one clip's class probabilities")
    p.add_argument("--detector", help="--video: the folder with MTCNN's pnet.pt, rnet.pt, onet.pt (README, A video "
                   "of your own): find, track, align and crop the face first; for a video that is not a face crop")
    p.add_argument("--annotate", help="--video with --detector: write the frames with the face box, its points and "
                   "the predicted label to this mp4")
    p.add_argument("--landmark-weights", help="MobileFaceNet-68 checkpoint, or none for the untrained, seeded "
                   "detector; omitted: the one the checkpoint was trained with (train.py records it), else "
                   f"{landmarks.PUBLIC_WEIGHTS} for a checkpoint that records none (a released one)")
    p.add_argument("--batch-size", type=int, default=8, help="views per forward pass, per process (default 8)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes per rank (default 2)")
    p.add_argument("--temporal-views", type=int, help="temporal windows per clip (default 2; images 1)")
    p.add_argument("--spatial-crops", type=int, help="spatial crops per window (default 2; images and the demo 1)")
    p.add_argument("--out", help="write per-clip predictions to this CSV (fold, index, path, label, pred, "
                                 "prob per class)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (by default: one line)")
    p.add_argument("--allow-other-classes", action="store_true",
                   help="evaluate even when the checkpoint's classes are not --dataset's (by default it stops)")
    args = p.parse_args(argv)
    if not args.video and not args.dataset:
        p.error("give --dataset (its test split, under --data-root), or --video (one clip)")
    if args.dataset and not args.data_root:
        args.data_root = data.DEFAULT_ROOTS[args.dataset]
    if (args.detector or args.annotate) and not args.video:
        p.error("--detector and --annotate belong to --video (one clip of your own)")
    if args.annotate and not args.detector:
        p.error("--annotate draws the detected face: give --detector too")
    if args.out and args.video:
        p.error("--out writes the per-clip predictions of --dataset's test split; --video prints its one clip's")
    if args.video:
        try:  # x.mp4 may be a frame folder x, and x a video x.mp4 (data.resolve)
            data.resolve("", os.path.abspath(args.video))
        except data.ClipError as err:
            p.error(f"--video: {err}")
    if args.annotate:  # found before the work, not after it
        folder = os.path.dirname(os.path.abspath(args.annotate))
        if not args.annotate.lower().endswith(".mp4"):
            p.error(f"--annotate {args.annotate}: the annotated frames are written as an H.264 .mp4; name it so")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--annotate {args.annotate}: cannot write a file in {folder}")
        if os.path.exists(args.annotate) and os.path.samefile(args.annotate,
                                                              data.resolve("", os.path.abspath(args.video))):
            p.error(f"--annotate {args.annotate} is the --video itself: choose another file")
    try:
        parse_folds(args)
    except ValueError as err:
        p.error(str(err))
    if args.out:  # found before the evaluation, not after it
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            p.error(f"--out {args.out}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or os.path.isdir(args.out):
            p.error(f"--out {args.out}: cannot write a file there")
        checkpoints = ([args.checkpoint.format(fold=f) for f in parse_folds(args)] if "{fold}" in args.checkpoint
                       else [args.checkpoint])
        inputs = [*checkpoints, (args.split or "").partition("#")[0]]
        if os.path.exists(args.out) and any(os.path.exists(f) and os.path.samefile(args.out, f) for f in inputs):
            p.error(f"--out {args.out} is an input of this evaluation (the checkpoint or the split): choose another")
    return args


def check_classes(path, ckpt, dataset, num_classes, allow=False):
    """Stop unless the checkpoint's classes are `dataset`'s, in the same order: the recorded names (train.py
    saves them), else at least their number (the released files record none)."""
    want = list(CLASSES[dataset])
    have = ckpt.get("classes") if isinstance(ckpt, dict) else None
    if allow or (have == want if have else num_classes == len(want)):
        return
    got = f"the classes {have}" if have else f"{num_classes} classes"
    raise SystemExit(f"eval.py: {path} was trained on {got}, but --dataset {dataset} has {len(want)}: {want}. "
                     "Its predictions would be read as the wrong classes; pass the checkpoint of this dataset, or "
                     "--allow-other-classes to evaluate anyway")


def image_head(model, dataset):
    """Whether the model answers `dataset` with S4D's image head (its own classes) rather than its video head."""
    return isinstance(model, S4D) and dataset in data.IMAGE_DATASETS


def checked_classes(args, path, model, ckpt):
    """The number of classes the model predicts for --dataset, after check_classes (S4D on an image dataset: its
    image head's)."""
    num_classes, ckpt_classes = model.cfg.num_classes, ckpt
    if image_head(model, args.dataset):  # S4D's image head, its classes
        num_classes, image_dataset = model.cfg.image_classes, recorded(ckpt, "image_dataset")
        ckpt_classes = {"classes": list(CLASSES[image_dataset])} if image_dataset in CLASSES else {}
    check_classes(path, ckpt_classes, args.dataset, num_classes, args.allow_other_classes)
    return num_classes


def parse_folds(args):
    """--folds '1-5' or '1,3' (else --fold) -> the fold numbers; ValueError naming --folds when it is neither."""
    if not args.folds:
        return [args.fold]
    parts = args.folds.split("-") if "-" in args.folds else args.folds.split(",")
    if not all(x.strip().isdigit() for x in parts) or ("-" in args.folds and len(parts) != 2):
        raise ValueError(f"--folds {args.folds!r}: expected a range such as 1-5 or a list such as 1,3")
    if "-" in args.folds:
        first, last = (int(x) for x in parts)
        if last < first:
            raise ValueError(f"--folds {args.folds!r}: the range is empty (its last fold comes before its first)")
        return list(range(first, last + 1))
    return [int(x) for x in parts]


def setup(device_arg):
    """torchrun's environment -> (rank, device); a process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if world > 1:
        local = int(os.environ["LOCAL_RANK"])
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), device
    return 0, torch.device(device_arg or ("cuda" if cuda else "cpu"))


def load_model(path, device, show=print):
    """Our checkpoint (config inside) or a released one (config inferred) -> (model in eval mode, checkpoint)."""
    ckpt = safe_load(path)
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    kind = s4d_kind(ckpt)
    if kind == "pretrain":
        raise ValueError(f"{path}: an S4D pre-training (MAE) checkpoint has no classifier; fine-tune it first: "
                         f"train.py --stage joint --init {path}")
    if kind == "classifier":  # S4D: its recorded config, else the architecture its tensors show
        try:
            cfg = s4d_config_from_state_dict(ckpt, config if isinstance(config, dict) else None)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
        model = S4D(cfg)
    if kind is None:
        if not (isinstance(config, dict) and set(config) <= {f.name for f in dataclasses.fields(S2DConfig)}):
            config = None  # not one of ours (a landmark file records its own config): judged by its tensors
        try:
            cfg = S2DConfig(**config) if config else config_from_state_dict(ckpt)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path}: {err}") from None
        model = S2D(cfg)
    report = load_checkpoint(model, ckpt, verbose=False, source=str(path))
    if report.missing or report.mismatched:
        raise ValueError(f"{path}: does not fit the model it describes ({cfg}):\n{report}")
    show(report)
    return model.to(device).eval(), ckpt


def training_args(ckpt):
    """The options the checkpoint's training run saved, as a dict (train.py's dict, the release's Namespace), or {}."""
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}


def class_names(ckpt, dataset, num_classes, own=True):
    """The names the checkpoint records (train.py saves them: what the model predicts, also under
    --allow-other-classes; own=False for S4D's image head, whose classes are not those), else --dataset's, else the
    recorded dataset's (ours or the release's args), else indices."""
    recorded = []
    if isinstance(ckpt, dict):
        names = ckpt.get("classes") if own else None
        if names and len(names) == num_classes:
            return [str(c) for c in names]
        args = training_args(ckpt)
        recorded = [ckpt.get("dataset"), args.get("dataset"), args.get("data_set")]
    for name in (dataset, *recorded):
        key = str(name).lower() if name else None
        if key in CLASSES and len(CLASSES[key]) == num_classes:
            return list(CLASSES[key])
    return [str(c) for c in range(num_classes)]


def recorded(ckpt, name, default=None):
    """An option the checkpoint's training run recorded (train.py saves its arguments), else default."""
    args = training_args(ckpt)
    return args.get(name) if args.get(name) is not None else default


def landmark_view(args, ckpt, model, device, show=print):
    """The landmark net for `model` (none without MCP), in this order:
    --landmark-weights PATH (`none`: the untrained, seeded detector, asked for);
    the file train.py recorded in the checkpoint (a recorded None: that run's untrained, seeded detector);
    a checkpoint that records none (a released one, or one not written by train.py) that takes the public
    detector's 128-channel view: landmarks.PUBLIC_WEIGHTS, and if that file is absent, a stop that says what to
    pass, never a silent untrained view. A narrower view (the demo's tiny detector) is the untrained, seeded one."""
    if not getattr(model.cfg, "mcp", False):  # S4D has no landmark view
        return None
    train_args = training_args(ckpt)
    if args.landmark_weights:
        weights = None if args.landmark_weights == "none" else args.landmark_weights
    elif "landmark_weights" in train_args:  # written by train.py
        weights = train_args["landmark_weights"]
        show(f"landmark view: {weights or 'the untrained, seeded detector'} (recorded in the checkpoint)")
    elif model.cfg.landmark_channels == landmarks.PRESETS["mobilefacenet"]["feature_width"]:
        weights = landmarks.PUBLIC_WEIGHTS
        if not Path(weights).is_file():
            raise SystemExit(f"eval.py: {args.checkpoint} records no landmark detector, and {weights} is not there: "
                             f"get {landmarks.PUBLIC_SOURCE} and pass --landmark-weights PATH "
                             "(or --landmark-weights none for the untrained, seeded detector)")
        show(f"landmark view: {weights} (the checkpoint records none)")
    else:
        weights = None
    widths = {p["feature_width"]: name for name, p in landmarks.PRESETS.items()}  # without a file: the model's width
    preset = recorded(ckpt, "landmark_preset", widths.get(model.cfg.landmark_channels, "mobilefacenet"))
    net = landmarks.LandmarkFeatures(weights, preset).to(device)
    if net.feature_width != model.cfg.landmark_channels:
        raise SystemExit(f"eval.py: the landmark net {weights} gives {net.feature_width} channels, the model expects "
                         f"{model.cfg.landmark_channels}; pass the --landmark-weights it was trained with")
    return net


def views_dataset(args, ckpt, model, samples, media_root, views):
    """The eval views of `samples` for `model` (views: data.eval_views, unless --temporal-views / --spatial-crops
    say otherwise), frames sampled at the rate the model was trained with."""
    t, s = args.temporal_views or views["temporal_views"], args.spatial_crops or views["spatial_crops"]
    return ClipDataset(samples, media_root, mode="eval", num_frames=recorded(ckpt, "num_frames", model.cfg.num_frames),
                       sampling_rate=recorded(ckpt, "sampling_rate", 1), image_size=model.cfg.img_size,
                       temporal_views=t, spatial_crops=s, augment=False)


def eval_fold(args, fold, device, show):
    path = args.checkpoint.format(fold=fold) if "{fold}" in args.checkpoint else args.checkpoint
    files = dataset_files(args.dataset, args.data_root, fold=fold)
    files = data.DatasetFiles(files.train, args.split or files.test, args.media_root or files.media_root)
    problem = data.layout_problem(args.dataset, args.data_root, files, needed=("test",))
    if problem:
        raise data.LayoutError(problem)
    model, ckpt = load_model(path, device, show)
    num_classes = checked_classes(args, path, model, ckpt)
    landmark_net = landmark_view(args, ckpt, model, device, show)
    samples = read_split(args.dataset, files.test, one_based=args.one_based)
    ds = views_dataset(args, ckpt, model, samples, files.media_root, data.eval_views(args.dataset))
    show(f"fold {fold}: {path} on {files.test}: {len(samples)} clips x {len(ds) // len(samples)} views")
    result = evaluate(model, landmark_net, ds, args.batch_size, device, args.workers, args.amp)
    names = class_names(ckpt, args.dataset, num_classes, own=not image_head(model, args.dataset))
    show(format_report(result, names) + "\n")
    return result, samples, names


def summarize(results, names):
    """Mean and sample standard deviation (n - 1) over folds, in percent."""
    lines = [f"mean over {len(results)} folds (std over folds, n - 1):"]
    for key in ("uar", "war", "macro_f1"):
        xs = [100 * r[key] for r in results]
        lines.append(f"  {key:<9} {statistics.fmean(xs):6.2f} +- {statistics.stdev(xs):5.2f}")
    for c, name in enumerate(names):
        xs = [100 * r["recall"][c] for r in results if r["recall"][c] is not None]
        if xs:
            lines.append(f"  recall {name:<12} {statistics.fmean(xs):6.2f}")
    return "\n".join(lines)


def write_csv(path, per_fold):
    """The per-clip predictions, written to a temporary file first: an earlier file is replaced only when the new
    one is whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        names = next(iter(per_fold.values()))[2]
        out.writerow(["fold", "index", "path", "label", "pred"] + [f"prob_{n}" for n in names])
        for fold, (result, samples, _) in per_fold.items():
            for p in result["predictions"]:
                out.writerow(
                    [fold, p["index"], samples[p["index"]].path, p["label"], p["pred"]]
                    + [f"{x:.6f}" for x in p["probs"]]
                )
    os.replace(tmp, path)


def looks_uncropped(frame, model_side):
    """A frame far from a square face crop: much wider than tall (or the reverse), or far larger than the input."""
    h, w = frame.shape[:2]
    return max(h, w) > 1.25 * min(h, w) or min(h, w) > 4 * model_side


def _box(img, box, colour, width=2):
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    H, W = img.shape[:2]
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, W - 1), min(y2, H - 1)
    for edge in (img[y1:y1 + width, x1:x2], img[y2 - width + 1:y2 + 1, x1:x2], img[y1:y2, x1:x1 + width],
                 img[y1:y2, x2 - width + 1:x2 + 1]):
        edge[...] = colour


def annotate(path, video, boxes, points, label, fps=25):
    """Write the frames (uint8 (T, H, W, 3), or an iterable of frames) with the tracked face box (green), its five
    points (red) and the label as an H.264 mp4, one frame at a time."""
    def drawn():
        for frame, box, pts in zip(video, boxes.tolist(), points.numpy(), strict=True):
            frame = frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2].copy()  # H.264 wants even sides
            scale = max(2, frame.shape[0] // 180)
            _box(frame, box, (0, 220, 0))
            _dots(frame, pts, (230, 30, 30), 1)
            draw_text(frame, label, max(0, int(box[1]) - 7 * scale), max(0, int(box[0])), scale, (255, 255, 255))
            yield frame

    data.write_video(Path(path), drawn(), fps)


def frames_used(length, ds):
    """Which frames of a `length`-frame clip the views of ClipDataset ds read, in words."""
    windows = data.eval_indices(length, ds.num_frames, ds.sampling_rate, ds.temporal_views)
    spans = ", ".join(f"{w[0]}-{w[-1]}" if w[-1] > w[0] else f"{w[0]}" for w in windows)
    crops = f" x {ds.spatial_crops} crops" if ds.spatial_crops > 1 else ""
    text = f"{len(windows)} window{'s' * (len(windows) > 1)} of {ds.num_frames} frame{'s' * (ds.num_frames > 1)}" \
           f"{crops}: frames {spans} of {length}"
    if ds.sampling_rate > 1:
        text += f", one in {ds.sampling_rate}"
    short = (ds.num_frames - 1) * ds.sampling_rate + 1 > length
    return text + (" (the clip is shorter than a window: its last frame is repeated)" if short else "")


def predict_video(args, device):
    """One clip: the eval views of data.py, softmax averaged, printed per class (most likely first). With
    --detector, the face is found in every frame first (MTCNN), tracked, aligned and cropped."""
    model, ckpt = load_model(args.checkpoint, device)
    if args.dataset:  # its class names label the prediction: they must be the checkpoint's
        checked_classes(args, args.checkpoint, model, ckpt)
    landmark_net = landmark_view(args, ckpt, model, device)
    names = class_names(ckpt, args.dataset, model.cfg.num_classes)
    image = model.cfg.num_frames == 1 and not recorded(ckpt, "no_tma")  # an image-stage model: one view
    views = dict(temporal_views=1, spatial_crops=1) if image else data.eval_views(args.dataset or "any video")
    clip = source = str(data.resolve("", os.path.abspath(args.video)))  # x may be x.mp4 (checked in parse_args)
    detector = None
    if args.detector:  # its weights are read before the video is decoded
        try:
            detector = landmarks.MTCNN(args.detector)
        except (OSError, ValueError) as err:
            raise ValueError(f"--detector {args.detector}: {err} (README, A video of your own, fetches the weights "
                             "in two commands)") from None
    lengths = []  # the video's frame count, as load_clip finds it (last: it may count again); none for an image
    with tempfile.TemporaryDirectory() as tmp:
        if args.detector:  # the video is read frame by frame, once to detect, once to align (and once to annotate)
            detections = landmarks.detect_faces(data.iter_frames(source), detector)
            if not detections:
                raise data.ClipError(f"{source}: no frames")
            lengths.append(len(detections))
            boxes, points, missed = landmarks.face_track(detections, args.video)
            print(f"{args.video}: a face in {len(detections) - len(missed)} of {len(detections)} frames"
                  + (f" (none in frames {', '.join(map(str, missed[:10]))}{', ...' if len(missed) > 10 else ''}:"
                     " the track holds its last box there)" if missed else ""))
            if 2 * len(missed) > len(detections):
                print(f"warning: {args.video}: a face in fewer than half of the frames; the track holds a box over "
                      "the others, so the answer below may mean little", file=sys.stderr)
            clip = str(Path(tmp) / "faces")
            data.write_frames(Path(clip), landmarks.align_in_chunks(data.iter_frames(source), boxes, points, 224))
        else:
            if not image and Path(clip).suffix.lower() in data.IMAGE_EXTS:  # a still for a video model: a clip of
                still = Path(tmp) / "still"  # one frame, repeated as any short clip is (not read as a still)
                still.mkdir()
                shutil.copy(clip, still / Path(clip).name)
                clip = str(still)
            first = data.load_clip(Sample(path=clip, label=0), "",
                                   pick=lambda n: lengths.append(n) or range(min(n, 1)))[0]
            if looks_uncropped(first, model.cfg.img_size):
                print(f"warning: {args.video}: frames of {first.shape[1]} x {first.shape[0]} look like an uncropped "
                      "scene, but the model expects face crops; give --detector (README, A video of your own), or "
                      "the answer below may mean nothing", file=sys.stderr)
            elif min(first.shape[:2]) * 2 < model.cfg.img_size:
                print(f"warning: {args.video}: frames of {first.shape[1]} x {first.shape[0]} are enlarged "
                      f"{model.cfg.img_size / min(first.shape[:2]):.1f}x to the model's {model.cfg.img_size} pixels: "
                      "little detail is left for it", file=sys.stderr)
        ds = views_dataset(args, ckpt, model, [Sample(path=clip, label=0)], "", views)
        probs = evaluate(model, landmark_net, ds, args.batch_size, device)["predictions"][0]["probs"]
    print(f"{args.video}: {len(ds)} views averaged, {frames_used(lengths[-1] if lengths else 1, ds)}")
    for p, name in sorted(zip(probs, names, strict=True), reverse=True):
        print(f"  {name:<16} {p:.4f}")
    if args.annotate:
        best = int(np.argmax(probs))
        text = names[best].upper() if all(c in _GLYPHS for c in names[best].upper()) else f"CLASS {best}"
        annotate(args.annotate, data.iter_frames(source), boxes, points, f"{text} {round(100 * probs[best])}",
                 data.frame_rate(source))
        print(f"annotated frames: {args.annotate}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, data.ClipError, OSError) as err:  # a bad file, clip or checkpoint: one line naming it
        if args.debug:
            raise
        raise SystemExit(f"eval.py: {err}") from None


def run(args):
    if args.video:  # one clip, one process
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        predict_video(args, device)
    else:
        rank, device = setup(args.device)
        show = print if rank == 0 else (lambda *a: None)
        folds = parse_folds(args)
        if len(folds) > 1 and "{fold}" not in args.checkpoint:
            raise SystemExit(
                "eval.py: --folds needs a --checkpoint pattern with {fold}: one checkpoint evaluated "
                "on every fold's test split would be tested on clips it was trained on"
            )
        per_fold = {fold: eval_fold(args, fold, device, show) for fold in folds}
        if len(folds) > 1:
            show(summarize([r for r, _, _ in per_fold.values()], next(iter(per_fold.values()))[2]))
        if args.out and rank == 0:
            write_csv(args.out, per_fold)
            show(f"per-clip predictions: {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
