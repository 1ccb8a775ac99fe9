"""Data for S2D: readers for the six datasets' official split files, PyAV decoding, the paper's clip sampling
(paper Sec. IV-C), clip-consistent augmentation, class-balanced oversampling and a generated demo dataset.

    python data.py make-demo --out data/demo                        # procedural face videos, FERV39K layout
    python data.py check --dataset dfew --root data/DFEW --fold 1   # decodes every clip, lists the bad ones
    python data.py bench                                            # clips/s at 16 frames x 224 px, train aug
"""
import argparse
import csv
import logging
import itertools
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # `python data.py bench` measures what train.py runs with (see train.py)
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

log = logging.getLogger("data")

# ---- label spaces, in each dataset's label order (README, Datasets)
CLASSES = {
    "dfew": ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
    "ferv39k": ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"),
    "mafw": ("anger", "anxiety", "contempt", "disappointment", "disgust", "fear", "happiness", "helplessness",
             "neutral", "sadness", "surprise"),
    "rafdb": ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"),
    "affectnet7": ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger"),
    "affectnet8": ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"),
    "ferplus": ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"),
}
CLASSES["demo"] = CLASSES["demo_image"] = CLASSES["ferv39k"]  # demo_image: the demo's expressive frames as stills
IMAGE_DATASETS = {"rafdb", "affectnet7", "affectnet8", "ferplus", "demo_image"}
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".3gp", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
              ".wmv", ".flv", ".ogv")
STRICT = {"err_detect": "explode"}  # FFmpeg decoders stop at the first error instead of concealing it
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- split files -> samples
@dataclass(frozen=True)
class Sample:
    path: str  # frame folder, video or image, relative to the media root or absolute
    label: int  # index into CLASSES[dataset]
    pixels: bytes | None = field(default=None, repr=False)  # FERPlus: 48 x 48 grey pixels, no file behind it


class SplitError(ValueError):
    """A split or annotation file that does not follow its official format; the message names file and line."""


def _text(path):
    """A split file's text: UTF-8, a leading byte-order mark dropped (spreadsheet programs write one)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SplitError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); save it as UTF-8") from None


def _rows(path, header):
    """Yield (line number, row dict) of a CSV file whose header must be exactly `header`. Read as a stream (AffectNet's
    lists are large); text that is not UTF-8 is located by _text, then."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            found = [h.strip() for h in next(reader, [])]
            if found != list(header):
                raise SplitError(f"{path}:1: expected header {','.join(header)!r}, found {','.join(found)!r}")
            for row in reader:
                if len(row) != len(header):
                    raise SplitError(f"{path}:{reader.line_num}: expected {len(header)} columns, found {len(row)}")
                yield reader.line_num, dict(zip(header, (v.strip() for v in row), strict=True))
        except UnicodeDecodeError:
            _text(path)  # raises the SplitError naming the line
            raise


def _words(path):
    """Yield (line number, [name, value]) of a whitespace-separated two-column list without header."""
    for n, line in enumerate(_text(path).splitlines(), 1):
        if line.strip():
            if len(line.split()) != 2:
                raise SplitError(f"{path}:{n}: expected '<file> <label>', found {line!r}")
            yield n, line.split()


def _index(value, num_classes, path, line, base=0, hint=""):
    """A label written as an integer counted from `base`, checked against the class count."""
    if not re.fullmatch(r"-?[0-9]+", value):  # ASCII digits only: int() would take '²' for isdigit() and fail
        raise SplitError(f"{path}:{line}: label {value!r} is not an integer")
    if not base <= int(value) < num_classes + base:
        raise SplitError(f"{path}:{line}: label {value} outside {base}..{num_classes - 1 + base}{hint}")
    return int(value) - base


def _read_dfew(path, one_based=False, **_):
    # The authors' split files count 0-6; the dataset's own files count 1-7 (one_based=True).
    hint = "" if one_based else " (DFEW's own files count 1-7: use one_based=True)"
    return [Sample(_name(r["video_name"], path, n, r"[0-9]+", "a clip number").zfill(5),
                   _index(r["label"], 7, path, n, int(one_based), hint))
            for n, r in _rows(path, ("video_name", "label"))]


def _name(value, path, line, pattern=r".+", what="a path"):
    """A sample's name as written, checked: never empty (it would name the media folder itself)."""
    if not re.fullmatch(pattern, value):
        raise SplitError(f"{path}:{line}: expected {what}, found {value!r}")
    return value


def _read_ferv39k(path, **_):
    return [Sample(_name(r["path"], path, n), _index(r["id"], 7, path, n)) for n, r in _rows(path, ("path", "id"))]


def _read_mafw(path, **_):
    if Path(path).suffix == ".csv":
        return [Sample(_name(r["video_name"], path, n), _index(r["labels"], 11, path, n))
                for n, r in _rows(path, ("video_name", "labels"))]
    samples = []
    for n, (name, label) in _words(path):
        if label not in CLASSES["mafw"]:
            raise SplitError(f"{path}:{n}: unknown class {label!r}, expected one of {', '.join(CLASSES['mafw'])}")
        samples.append(Sample(name, CLASSES["mafw"].index(label)))
    return samples


def _read_rafdb(path, split=None, **_):
    # list_patition_label.txt holds both splits; rows 'train_00001.jpg 5' point at Image/aligned/*_aligned.jpg.
    if split not in ("train", "test"):
        raise SplitError(f"{path}: RAF-DB needs split='train' or 'test' (or a '#train' / '#test' suffix)")
    rows = list(_words(path))
    for n, (name, _) in rows:
        if not name.startswith(("train_", "test_")):
            raise SplitError(f"{path}:{n}: expected a 'train_' or 'test_' image name, found {name!r}")
    return [Sample(f"{Path(name).stem}_aligned.jpg", _index(label, 7, path, n, base=1))
            for n, (name, label) in rows if name.startswith(split + "_")]


def _read_affectnet(path, num_classes, **_):
    header = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal")
    samples, excluded = [], 0
    for n, r in _rows(path, header):
        expression = _index(r["expression"], 11, path, n)  # 8-10: none, uncertain, non-face
        if expression < num_classes:
            samples.append(Sample(r["subDirectory_filePath"], expression))
        excluded += expression >= num_classes
    log.info("%s: %d images kept, %d excluded (expression %d-10)", path, len(samples), excluded, num_classes)
    return samples


def _read_ferplus(path, split=None, **_):
    # path is fer2013new.csv (votes); the pixels come from fer2013.csv in the same folder, row for row.
    usage = {"train": "Training", "valid": "PublicTest", "test": "PrivateTest"}.get(split)
    if usage is None:
        raise SplitError(f"{path}: FERPlus needs split='train', 'valid' or 'test' (or a '#train' suffix)")
    pixels_path = Path(path).with_name("fer2013.csv")
    votes = list(_rows(path, ("Usage", "Image name") + CLASSES["ferplus"] + ("unknown", "NF")))
    pixels = list(_rows(pixels_path, ("emotion", "pixels", "Usage")))
    if len(votes) != len(pixels):
        raise SplitError(f"{path}: {len(votes)} rows, but {pixels_path} has {len(pixels)}")
    samples, excluded = [], 0
    for (n, v), (m, p) in zip(votes, pixels, strict=True):
        if v["Usage"] != p["Usage"]:
            raise SplitError(f"{path}:{n}: Usage {v['Usage']} differs from {pixels_path}:{m} ({p['Usage']})")
        if v["Usage"] != usage:
            continue
        values = p["pixels"].split()
        bad = [v for v in values if not re.fullmatch(r"[0-9]{1,3}", v) or int(v) > 255]
        if len(values) != 48 * 48 or bad:
            raise SplitError(f"{pixels_path}:{m}: expected 2304 pixel values 0-255, found {len(values)} values"
                             + (f", {len(bad)} of them not in 0-255 (first {bad[0]!r})" if bad else ""))
        grey = np.array(values, np.uint8)
        label = _ferplus_majority([_index(v[c], 10**6, path, n) for c in CLASSES["ferplus"] + ("unknown", "NF")])
        if label is None or not v["Image name"]:
            excluded += 1
            continue
        samples.append(Sample(v["Image name"], label, grey.tobytes()))
    log.info("%s#%s: %d images kept, %d excluded (no majority, unknown or not a face)", path, split,
             len(samples), excluded)
    return samples


def _ferplus_majority(votes):
    """Majority vote as in the FERPlus reference script: drop single votes, keep a class with over half the
    rest, and exclude the image when that class is 'unknown' or 'NF' or no class has a majority."""
    votes = np.where(np.array(votes) > 1, votes, 0)
    top = int(votes.argmax())
    return top if votes[top] > 0.5 * votes.sum() and top < 8 else None


READERS = {"dfew": _read_dfew, "ferv39k": _read_ferv39k, "demo": _read_ferv39k, "demo_image": _read_ferv39k,
           "mafw": _read_mafw,
           "rafdb": _read_rafdb, "ferplus": _read_ferplus, "affectnet7": lambda path, **_: _read_affectnet(path, 7),
           "affectnet8": lambda path, **_: _read_affectnet(path, 8)}


def read_split(dataset, path, split=None, **options):
    """Samples of one official split file, labels in CLASSES[dataset] order. A file holding several splits
    (RAF-DB, FERPlus) takes split='train' | 'test' ('valid' for FERPlus) or the same as a '#train' suffix on path.
    Options: one_based=True for DFEW's own 1-7 label files."""
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}, expected one of {', '.join(READERS)}")
    path, _, suffix = str(path).partition("#")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{dataset} split file {path} does not exist")
    samples = READERS[dataset](path, split=split or suffix or None, **options)
    if not samples:
        raise SplitError(f"{path}: no samples for split {split or suffix or '(all)'}")
    return samples


@dataclass(frozen=True)
class DatasetFiles:
    train: str  # split files, as read_split takes them
    test: str
    media_root: str  # the folder that Sample.path is relative to


# Where train.py and eval.py look for each dataset without --data-root: data/<NAME>, as the authors' scripts do
DEFAULT_ROOTS = {"dfew": "data/DFEW", "ferv39k": "data/FERV39K", "mafw": "data/MAFW", "rafdb": "data/RAF-DB",
                 "affectnet7": "data/AffectNet", "affectnet8": "data/AffectNet", "ferplus": "data/FERPlus",
                 "demo": "data/demo", "demo_image": "data/demo"}


class LayoutError(ValueError):
    """A dataset root that is not in its release layout; the message lists what is missing and what is there."""


def dataset_files(dataset, root, fold=1):
    """Where the release layout under `root` keeps the split files and the media (README, section Datasets): the
    folders the authors' split files and scripts use (DFEW's 16-frame face crops, FERV39K's face crops, MAFW's
    aligned PNG crops, whose folders drop the split's .mp4 suffix)."""
    if not 1 <= fold <= 5:
        raise ValueError(f"fold {fold} outside 1..5")
    split = {"dfew": ("EmoLabel_DataSplit/{0}(single-labeled)/{0}_set_%d.csv" % fold, "Clip/clip_224x224_16f"),
             "ferv39k": ("Annotation/{0}.csv", "2_ClipsforFaceCrop"), "demo": ("{0}.csv", "."),
             "demo_image": ("stills_{0}.csv", "."),
             "mafw": ("anno/single/no_caption/set_%d/{0}.txt" % fold, "data/frames/frames_crop_align_224"),
             "rafdb": ("EmoLabel/list_patition_label.txt#{0}", "Image/aligned"),
             "affectnet7": ("Manually_Annotated_file_lists/{1}.csv", "Manually_Annotated_Images"),
             "ferplus": ("fer2013new.csv#{0}", ".")}
    split["affectnet8"] = split["affectnet7"]
    if dataset not in split:
        raise ValueError(f"unknown dataset {dataset!r}, expected one of {', '.join(split)}")
    pattern, media = split[dataset]
    train, test = (str(Path(root, pattern.format(*names))) for names in (("train", "training"), ("test", "validation")))
    return DatasetFiles(train, test, str(Path(root, media)))


def layout_problem(dataset, root, files, needed=("train", "test")):
    """None when the split files in `needed` and the media folder of `files` exist, else one message naming each
    missing path exactly and what `root` holds instead."""
    wanted = [(f"{name} split", getattr(files, name).partition("#")[0]) for name in needed]
    missing = [(what, path) for what, path in wanted + [("media folder", files.media_root)] if not Path(path).exists()]
    if not missing:
        return None
    root = Path(root)
    if root.is_dir():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        found = f"{root} holds: {', '.join(entries[:12]) + (', ...' if len(entries) > 12 else '') or 'nothing'}"
    else:
        found = f"{root} does not exist"
    lines = [f"{root} is not the {dataset} release layout (README, Datasets); missing:"]
    lines += [f"  {what}: {path}" for what, path in missing] + [f"  ({found})"]
    return "\n".join(lines)


# ---- decoding with PyAV
class ClipError(RuntimeError):
    """A clip that is missing, empty or undecodable; the message starts with its path."""


def _natural_key(name):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frames(folder):
    """JPEG / PNG files of a frame folder in natural order (frame2 before frame10)."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)), key=_natural_key)
    return [os.path.join(folder, n) for n in names]


def decode_image(path, rgb=None):
    """One JPEG or PNG file as uint8 (H, W, 3); grey images are expanded to 3 channels. `rgb`: a VideoReformatter
    to reuse for the colour conversion across the frames of a clip."""
    data = Path(path).read_bytes()
    codec = "png" if data.startswith(b"\x89PNG") else "mjpeg"
    if codec == "mjpeg" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise ClipError(f"{path}: truncated or not a JPEG/PNG file (no end-of-image marker)")
    decoder = av.CodecContext.create(codec, "r")
    decoder.options = STRICT  # corrupt data is an error, not a picture of garbage
    try:
        frames = decoder.decode(av.Packet(data))
    except av.FFmpegError as err:
        raise ClipError(f"{path}: corrupt image data ({type(err).__name__}: {err})") from None
    if not frames:
        raise ClipError(f"{path}: no image could be decoded")
    return (rgb or VideoReformatter()).reformat(frames[0], format="rgb24", threads=1).to_ndarray()


def _upright(frame, rgb, path):
    """A decoded video frame as uint8 (H, W, 3), turned as a player shows it: phones store portrait video as
    landscape frames with a rotation in the file's display matrix (PyAV's frame.rotation, degrees counterclockwise)."""
    array = rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
    turns = frame.rotation / 90
    if turns != round(turns):
        raise ClipError(f"{path}: a display rotation of {frame.rotation} degrees; only multiples of 90 are supported")
    return np.ascontiguousarray(np.rot90(array, int(round(turns)) % 4))  # torch.from_numpy needs positive strides


def _video_stream(container, path):
    """The first video stream of an opened file, set to decode with FFmpeg's threads and to stop at corrupt data."""
    if not container.streams.video:
        raise ClipError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.options = STRICT
    return stream


def _read_video(path, pick):
    """Frames pick(num_frames) of a video as uint8 (T, H, W, 3), decoded with FFmpeg's threads. At a constant frame
    rate with a frame count in the header: seek to the key frame before the first wanted frame and decode up to the
    last one; otherwise, or when the timestamps do not match the count, count the packets and decode from the start
    up to the last wanted frame."""
    with av.open(str(path)) as container:
        stream, rgb = _video_stream(container, path), VideoReformatter()
        if stream.frames and stream.average_rate and stream.average_rate == stream.base_rate:  # constant rate
            wanted = _pick(stream.frames, pick, path)
            start, step = stream.start_time or 0, 1 / (stream.average_rate * stream.time_base)  # pts per frame
            if min(wanted) > 0:
                container.seek(start + int(min(wanted) * step), stream=stream, backward=True)
            got, k = {}, None
            for frame in container.decode(stream):
                if k is not None and round((frame.pts - start) / step) != k + 1:
                    break  # not one frame period apart: the frame numbers cannot be trusted
                k = round((frame.pts - start) / step)
                if k in wanted:
                    got[k] = _upright(frame, rgb, path)
                if k >= max(wanted):
                    break
            if got.keys() >= set(wanted):
                return np.stack([got[k] for k in wanted])
            container.seek(0)
        wanted = _pick(sum(packet.size > 0 for packet in container.demux(stream)), pick, path)  # count packets
        container.seek(0)
        got = {}
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                got[k] = _upright(frame, rgb, path)
            if k >= max(wanted):
                break
    if not got.keys() >= set(wanted):
        raise ClipError(f"{path}: frames {sorted(set(wanted) - got.keys())} could not be decoded")
    return np.stack([got[k] for k in wanted])


def _pick(length, pick, path):
    if length == 0:
        raise ClipError(f"{path}: no frames")
    return [int(k) for k in pick(length)]


def resolve(media_root, path):
    """The file or folder of a sample; 'x.mp4' may also be a frame folder 'x', and 'x' a video 'x.mp4'."""
    full = Path(media_root, path)
    candidates = [full] + ([full.with_suffix("")] if full.suffix.lower() in VIDEO_EXTS else
                           [full.with_name(full.name + ext) for ext in VIDEO_EXTS if not full.suffix])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ClipError(f"{full}: no such frame folder, video or image")


def load_clip(sample, media_root, pick=lambda n: range(n)):
    """Frames pick(length) of a sample as uint8 (T, H, W, 3); a still image gives T = 1."""
    if sample.pixels is not None:  # FERPlus: 48 x 48 grey
        return np.repeat(np.frombuffer(sample.pixels, np.uint8).reshape(1, 48, 48, 1), 3, axis=3)
    path = resolve(media_root, sample.path)
    try:
        if path.is_dir():
            files, rgb = list_frames(path), VideoReformatter()
            frames = [decode_image(files[k], rgb) for k in _pick(len(files), pick, f"{path} (frame folder)")]
            if len({f.shape for f in frames}) > 1:
                raise ClipError(f"{path}: frames differ in size: {sorted({f.shape for f in frames})}")
            return np.stack(frames)
        if path.suffix.lower() in VIDEO_EXTS:
            return _read_video(path, pick)
        try:
            return decode_image(path)[None]
        except ClipError as err:
            if path.suffix.lower() in IMAGE_EXTS:
                raise
            raise ClipError(f"{err}; read as an image (JPEG or PNG only), because {path.suffix or 'no extension'} "
                            f"is not one of the video extensions {' '.join(VIDEO_EXTS)}") from None
    except (av.FFmpegError, OSError, IndexError) as err:
        raise ClipError(f"{path}: {type(err).__name__}: {err}") from err


def iter_frames(path):
    """Every frame of a video file, frame folder or image, one at a time as uint8 (H, W, 3), upright: for a video
    too long to hold in memory (eval.py --video --detector reads it this way, twice, three times with --annotate)."""
    path = Path(path)
    try:
        if path.is_dir():
            rgb, first = VideoReformatter(), None
            for file in list_frames(path):
                frame = decode_image(file, rgb)
                first = frame.shape if first is None else first
                if frame.shape != first:
                    raise ClipError(f"{path}: frames differ in size: {file} is {frame.shape}, the first {first}")
                yield frame
        elif path.suffix.lower() in VIDEO_EXTS:
            with av.open(str(path)) as container:
                stream, rgb = _video_stream(container, path), VideoReformatter()
                for frame in container.decode(stream):
                    yield _upright(frame, rgb, path)
        else:
            yield load_clip(Sample(str(path), 0), "")[0]
    except (av.FFmpegError, OSError) as err:
        raise ClipError(f"{path}: {type(err).__name__}: {err}") from err


def split_validation(samples, fraction, seed, group=lambda s: s.path):
    """Seeded per-class hold-out: class c gives round(fraction * n_c) of its groups of samples to validation (a
    group: samples that must not be split, e.g. the stills of one demo clip)."""
    gen = torch.Generator().manual_seed(seed)
    held = set()
    for c in sorted({s.label for s in samples}):
        groups = sorted({group(s) for s in samples if s.label == c})
        order = torch.randperm(len(groups), generator=gen).tolist()
        held.update(groups[j] for j in order[: round(fraction * len(groups))])
    return [s for s in samples if group(s) not in held], [s for s in samples if group(s) in held]


def split_warnings(named_splits):
    """[(split file, samples)] -> lines of warning, [] when all is well: a sample listed twice in one split (it then
    counts twice; with two labels, the file contradicts itself) and a sample in two splits (a test clip that also
    trains is not held out). Warnings, not errors: the official files are used as they are."""
    found, where = [], {}
    for split, samples in named_splits:
        labels = {}
        for s in samples:
            labels.setdefault(s.path, []).append(s.label)
        repeats = {p: ls for p, ls in labels.items() if len(ls) > 1}
        if repeats:
            conflicting = [p for p, ls in repeats.items() if len(set(ls)) > 1]
            first = conflicting[0] if conflicting else next(iter(repeats))
            found.append(f"{split}: {len(repeats)} sample(s) listed more than once, so they count more than once "
                         f"(e.g. {first!r}, labels {repeats[first]})"
                         + (f"; {len(conflicting)} of them with different labels" if conflicting else ""))
        for other, paths in where.items():
            shared = [p for p in labels if p in paths]
            if shared:
                found.append(f"{len(shared)} sample(s) of {split} are also in {other} (e.g. {shared[0]!r}): "
                             "they are not held out")
        where[split] = labels.keys()
    return found


def header_problem(sample, media_root):
    """What is wrong with a sample at a glance, or None: its file or frame folder exists, a folder holds frame
    images, a video file opens with a video stream (its header only, nothing decoded), an image is not empty.
    `data.py check` decodes every frame; this is the cheap check a run makes before it trains."""
    if sample.pixels is not None:
        return None
    try:
        path = resolve(media_root, sample.path)
        if path.is_dir():
            return None if list_frames(path) else f"{path}: a frame folder without {'/'.join(IMAGE_EXTS)} images"
        if path.suffix.lower() in VIDEO_EXTS:
            with av.open(str(path)) as container:
                return None if container.streams.video else f"{path}: no video stream"
        return None if path.stat().st_size > 0 else f"{path}: an empty file"
    except ClipError as err:
        return str(err)
    except (av.FFmpegError, OSError) as err:
        return f"{Path(media_root, sample.path)}: {type(err).__name__}: {err}"


def header_problems(samples, media_root, workers=8):
    """[(sample, problem)] for the samples header_problem finds fault with, in split order."""
    with ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda s: header_problem(s, media_root), samples))
    return [(s, p) for s, p in zip(samples, found, strict=True) if p]


# ---- sampling (paper Sec. IV-C: 16 frames per clip, 224 x 224)
def train_indices(length, num_frames, rate, rng):
    """T frames `rate` apart at a random offset; a clip shorter than the span repeats its last frame."""
    span = (num_frames - 1) * rate + 1
    offset = int(rng.integers(0, max(length - span, 0) + 1))
    return np.minimum(offset + np.arange(num_frames) * rate, length - 1)


def eval_indices(length, num_frames, rate, views):
    """`views` windows of T frames, evenly spaced from the first to the last possible offset (centred if 1)."""
    room = max(length - (num_frames - 1) * rate - 1, 0)
    offsets = [room // 2] if views == 1 else [round(v * room / (views - 1)) for v in range(views)]
    return [np.minimum(o + np.arange(num_frames) * rate, length - 1) for o in offsets]


def crop_offset(extent, side, crop, crops):
    """Start of spatial crop `crop` of `crops` (evenly spaced, centred if 1) along an axis of `extent` px."""
    return (extent - side) // 2 if crops == 1 else round(crop * (extent - side) / (crops - 1))


# ---- augmentation in torch: one draw per clip, applied to every frame alike
@dataclass
class Augment:
    resized_crop: bool = True  # random resized crop, else short-side resize and centre crop
    scale: tuple = (0.5, 1.0)  # area fraction of the crop (our choice: an aligned face keeps most of itself)
    ratio: tuple = (3 / 4, 4 / 3)  # aspect ratio of the crop
    flip: bool = True  # horizontal flip, p = 0.5
    randaugment: bool = True  # RandAugment (subset below), timm style: each op with p = 0.5
    ra_ops: int = 4  # n
    ra_magnitude: float = 7.0  # m, 0..10
    ra_std: float = 0.5  # per-op noise on m
    erase_p: float = 0.25  # random erasing with per-pixel normal noise


def _gray(x):  # (T, 3, H, W) -> (T, 1, H, W)
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x, other, factor):  # factor 1 keeps x, 0 gives other; other + (x - other) * factor, clamped to [0, 1]
    return torch.lerp(other, x, factor).clamp_(0, 1)


def _smooth(x):  # PIL's sharpness filter [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as two box sums, borders replicated
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = p[..., :-2] + p[..., 1:-1] + p[..., 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :] + 4 * x) / 13


def _autocontrast(x):  # stretch each frame's channels to [0, 1]
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)  # (T, 3, 1, 1) each
    return (x - low).div_((high - low).clamp_(min=1e-3))


def _gray_mean(x):  # (T, 3, H, W) -> (T, 1, 1, 1): the mean of _gray(x) per frame, from the channel means
    means = x.mean(dim=(2, 3))  # (T, 3)
    return (0.299 * means[:, 0] + 0.587 * means[:, 1] + 0.114 * means[:, 2]).view(-1, 1, 1, 1)


_COLOUR_OPS = {  # v in [-1, 1]: magnitude / 10 with a random sign; each maps [0, 1] into [0, 1]
    "brightness": lambda x, v: (x * (1 + 0.9 * v)).clamp_(0, 1),  # blended with black
    "contrast": lambda x, v: _blend(x, _gray_mean(x).expand_as(x), 1 + 0.9 * v),
    "color": lambda x, v: _blend(x, _gray(x), 1 + 0.9 * v),
    "sharpness": lambda x, v: _blend(x, _smooth(x), 1 + 0.9 * v),
    "posterize": lambda x, v: (x * 255).div_(2 ** int(4 * abs(v))).floor_().mul_(2 ** int(4 * abs(v))).div_(255),
    "solarize": lambda x, v: torch.where(x >= 1 - abs(v), 1 - x, x),
    "autocontrast": lambda x, v: _autocontrast(x),
}
_AFFINE_OPS = {  # 2 x 3 matrices on normalised coordinates
    "rotate": lambda v: [[math.cos(v * math.pi / 6), -math.sin(v * math.pi / 6), 0],
                         [math.sin(v * math.pi / 6), math.cos(v * math.pi / 6), 0]],
    "shear_x": lambda v: [[1, 0.3 * v, 0], [0, 1, 0]],
    "shear_y": lambda v: [[1, 0, 0], [0.3 * v, 1, 0]],
    "translate_x": lambda v: [[1, 0, 0.9 * v], [0, 1, 0]],
    "translate_y": lambda v: [[1, 0, 0], [0, 1, 0.9 * v]],
}
RA_OPS = sorted(_COLOUR_OPS) + sorted(_AFFINE_OPS)


def randaugment(x, aug, rng):
    """RandAugment on (T, 3, H, W) in [0, 1] with one set of ops and magnitudes for all T frames."""
    for name in rng.choice(RA_OPS, aug.ra_ops):
        m = np.clip(rng.normal(aug.ra_magnitude, aug.ra_std), 0, 10)
        v = m / 10 * rng.choice([-1, 1])
        if rng.random() >= 0.5:
            continue
        if name in _COLOUR_OPS:
            x = _COLOUR_OPS[name](x, v)
        else:  # filled with the ImageNet mean colour where the frame moved out
            mean = torch.tensor(MEAN).view(1, 3, 1, 1)
            theta = torch.tensor([_AFFINE_OPS[name](v)], dtype=x.dtype)
            grid = F.affine_grid(theta, [1, *x.shape[1:]], align_corners=False)  # (1, H, W, 2), one for all frames
            x = F.grid_sample(x - mean, grid.expand(len(x), -1, -1, -1), align_corners=False).add_(mean)
    return x


def _crop_box(h, w, aug, rng):
    """(top, left, height, width) of the clip's random resized crop, or the centred square."""
    for _ in range(10 if aug is not None and aug.resized_crop else 0):
        area = h * w * rng.uniform(*aug.scale)
        ratio = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
        ch, cw = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _resize(frames, box, size):
    """Crop uint8 (T, H, W, 3) to box and resize to uint8 (T, 3, size, size), in channels-last memory.

    Resized in uint8, as PIL and torchvision resize images (each value rounded to the nearest level): about 7x
    faster than in float on CPU, and the float conversion then runs at the output size."""
    top, left, ch, cw = box
    x = torch.from_numpy(frames[:, top:top + ch, left:left + cw]).permute(0, 3, 1, 2)
    if (ch, cw) == (size, size):
        return x
    shrink = ch > size or cw > size  # antialiasing only matters when shrinking
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _unit_float(x):  # uint8 (T, 3, H, W) -> float in [0, 1], contiguous (T, 3, H, W)
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def normalise(x):  # (T, 3, S, S) in [0, 1] -> (3, T, S, S) ImageNet-normalised, contiguous
    out = torch.empty((x.shape[1], x.shape[0], *x.shape[2:]), dtype=x.dtype)  # written in its final layout
    torch.sub(x.permute(1, 0, 2, 3), torch.tensor(MEAN).view(3, 1, 1, 1), out=out)
    return out.div_(torch.tensor(STD).view(3, 1, 1, 1))


def to_tensor(frames):
    """uint8 (T, H, W, 3) frames at their own size -> (3, T, H, W), ImageNet-normalised."""
    return normalise(_unit_float(torch.from_numpy(frames).permute(0, 3, 1, 2)))


def train_view(frames, size, aug, rng):
    """Training clip (3, T, size, size) from uint8 (T, H, W, 3): one augmentation draw for all frames."""
    x = _resize(frames, _crop_box(*frames.shape[1:3], aug, rng), size)
    if aug is not None and aug.flip and rng.random() < 0.5:
        x = x.flip(3)  # still in uint8: a quarter of the bytes
    x = _unit_float(x)
    if aug is not None and aug.randaugment:
        x = randaugment(x, aug, rng)
    x = normalise(x)
    if aug is not None and rng.random() < aug.erase_p:
        x = random_erase(x, rng)
    return x


def random_erase(x, rng):
    """Random erasing (area 2-33 %, log aspect 0.3-3.3) of the same box in every frame, per-pixel normal noise;
    x (3, T, H, W) is written in place."""
    _, _, h, w = x.shape
    for _ in range(10):
        area, ratio = h * w * rng.uniform(0.02, 1 / 3), math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        eh, ew = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if eh < h and ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            noise = torch.randn(3, 1, eh, ew, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
            x[:, :, top:top + eh, left:left + ew] = noise  # in place: x is this clip's own tensor
            return x
    return x


def eval_view(frames, size, crop, crops):
    """Evaluation clip (3, T, size, size): short side resized to size, spatial crop `crop` of `crops`."""
    _, h, w, _ = frames.shape
    side = min(h, w)
    box = (crop_offset(h, side, crop, crops), crop_offset(w, side, crop, crops), side, side)
    return normalise(_unit_float(_resize(frames, box, size)))


def eval_views(dataset):
    """Evaluation views per clip: 2 temporal windows x 2 spatial crops (as released), 1 x 1 for still images.
    The demo's frames are square at the model's input size, so its 2 spatial crops would coincide: 1 crop."""
    if dataset in IMAGE_DATASETS:
        return dict(temporal_views=1, spatial_crops=1)
    return dict(temporal_views=2, spatial_crops=1 if dataset == "demo" else 2)


# ---- dataset and sampler
class ClipDataset(torch.utils.data.Dataset):
    """Model-ready clips. mode='train': one augmented clip per sample, a clip that fails to decode is logged and
    replaced by the next readable one (item['replaced']); mode='eval': temporal_views x spatial_crops views per
    sample, never substituted (ClipError names the path). Still images give T = 1 and one temporal view.
    train_views > 1 (S4D's pre-training): items k * train_views .. + train_views - 1 are augmented views of clip k,
    each with its own frames, crop and augmentation."""

    def __init__(self, samples, media_root, mode="train", num_frames=16, image_size=224, sampling_rate=1,
                 temporal_views=2, spatial_crops=2, augment=True, seed=0, train_views=1):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode {mode!r}, expected 'train' or 'eval'")
        self.samples, self.media_root, self.mode = list(samples), media_root, mode
        still = all(s.pixels is not None or s.path.lower().endswith(IMAGE_EXTS) for s in self.samples)
        self.num_frames, self.temporal_views = (1, 1) if still else (num_frames, temporal_views)
        self.image_size, self.sampling_rate, self.spatial_crops = image_size, sampling_rate, spatial_crops
        self.augment = Augment() if augment is True else (augment or None)
        self.seed, self.epoch, self._last, self.train_views = seed, 0, (None, None), train_views

    def __len__(self):
        views = self.temporal_views * self.spatial_crops if self.mode == "eval" else self.train_views
        return len(self.samples) * views

    def set_epoch(self, epoch):
        self.epoch = epoch

    def view_of(self, i):
        """(clip index, temporal view, spatial crop) of eval item i."""
        clip, view = divmod(i, self.temporal_views * self.spatial_crops)
        return (clip, *divmod(view, self.spatial_crops))

    def __getitem__(self, i):
        if self.mode == "eval":
            clip, window, crop = self.view_of(i)
            if self._last[0] != (clip, window):  # the crops of one window decode once
                pick = lambda n: eval_indices(n, self.num_frames, self.sampling_rate, self.temporal_views)[window]  # noqa: E731
                self._last = ((clip, window), load_clip(self.samples[clip], self.media_root, pick))
            video = eval_view(self._last[1], self.image_size, crop, self.spatial_crops)
            return dict(video=video, label=self.samples[clip].label, index=clip,
                        view=i % (self.temporal_views * self.spatial_crops), replaced=False)
        rng = np.random.default_rng([self.seed, self.epoch, i])  # each view of a clip draws its own
        first = i // self.train_views
        for k in range(min(len(self.samples), 16)):
            clip = (first + k) % len(self.samples)
            try:
                pick = lambda n: train_indices(n, self.num_frames, self.sampling_rate, rng)  # noqa: E731
                frames = load_clip(self.samples[clip], self.media_root, pick)
            except ClipError as err:
                log.warning("training clip %d failed, trying the next one: %s", clip, err)
                continue
            return dict(video=train_view(frames, self.image_size, self.augment, rng), label=self.samples[clip].label,
                        index=clip, view=i % self.train_views, replaced=k > 0)
        raise ClipError(f"{self.samples[first].path}: it and the next {k} clips all failed to decode")


class ClassBalancedSampler(torch.utils.data.Sampler):
    """Oversampling: clips drawn with replacement, with probability inversely proportional to their class's
    frequency. Each epoch is one draw of num_samples (default: the dataset size, rounded up to a multiple of the
    replicas) from seed and epoch; rank r takes draws r, r + R, r + 2R, ..., so the ranks' shares are disjoint."""

    def __init__(self, labels, num_replicas=1, rank=0, seed=0, num_samples=None):
        labels = torch.as_tensor(labels)
        self.weights = 1.0 / torch.bincount(labels)[labels].double()
        self.total = math.ceil((num_samples or len(labels)) / num_replicas) * num_replicas
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draws = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self):
        return self.total // self.num_replicas


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_stop_signals(_worker_id):
    """Every loader's worker_init_fn: Ctrl-C and SIGTERM are for the main process (train.py finishes its step, saves
    and exits). A shell's Ctrl-C, and scancel's or systemd's SIGTERM, reach every process of the group, and a worker
    they killed would crash the run. The worker started with both blocked (batches). Ctrl-C is ignored from now on (one
    that came meanwhile is discarded, as POSIX discards a pending signal set to be ignored); SIGTERM stays blocked
    and a thread takes each one: the parent's ends the worker (torch and multiprocessing stop a worker that way, and a
    worker that ignored it would hang its parent's exit), anyone else's is dropped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _end_on_sigterm_from(parent):
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)  # as torch's own handler ends a worker on its parent's SIGTERM


def batches(dataset, **options):
    """iter(DataLoader(dataset, **options)) whose worker processes leave Ctrl-C and SIGTERM to this process from their
    first instruction on. Unprotected, a worker is open to them until its worker_init_fn runs (torch installs a
    handler in between that dies by the signal), so the workers start with both blocked, inherited from this
    process, which blocks them only while it starts the workers: a signal that reaches it meanwhile is handled just
    after. Where Python has no signal.sigwaitinfo (macOS, Windows) the workers are unprotected."""
    if not hasattr(signal, "sigwaitinfo"):
        return iter(torch.utils.data.DataLoader(dataset, **options))
    loader = torch.utils.data.DataLoader(dataset, worker_init_fn=_ignore_stop_signals, **options)
    if loader.num_workers == 0:
        return iter(loader)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)  # forks the workers
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class JointSchedule:
    """S4D's joint image + video fine-tuning (and its dual-modal pre-training): the order in which one epoch draws
    batches from the video and the image loader. An epoch has video_steps + int(image_share * image_steps) steps
    (image_share 0.5 for fine-tuning, 1.0 for pre-training), every video batch once and that many image batches,
    shuffled from seed and epoch: every rank computes the same order, so all take the same modality at each step."""

    MODALITIES = ("video", "image")

    def __init__(self, video_steps, image_steps, image_share=0.5, seed=0):
        if video_steps < 0 or image_steps < 0 or not 0 <= image_share <= 1:
            raise ValueError(f"JointSchedule: need step counts >= 0 and image_share in [0, 1], got video_steps="
                             f"{video_steps}, image_steps={image_steps}, image_share={image_share}")
        self.steps = dict(video=int(video_steps), image=int(image_share * image_steps))
        if len(self) == 0:
            raise ValueError(f"JointSchedule: an epoch would have no steps (video_steps={video_steps}, "
                             f"image_steps={image_steps}, image_share={image_share})")
        self.image_share, self.seed = image_share, seed

    def order(self, epoch):
        """The epoch's modalities, a list of len(self) names "video" / "image"."""
        names = ["video"] * self.steps["video"] + ["image"] * self.steps["image"]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # ClassBalancedSampler's seeding
        return [names[k] for k in torch.randperm(len(names), generator=generator).tolist()]

    def counts_before(self, epoch, step):
        """{"video": n, "image": m}: batches of each modality before `step` (0 .. len) of the epoch; resuming there,
        each loader skips that many batches."""
        if not 0 <= step <= len(self):
            raise ValueError(f"JointSchedule.counts_before: step {step} outside 0 .. {len(self)}")
        before = self.order(epoch)[:step]
        return {name: before.count(name) for name in self.MODALITIES}

    def __len__(self):
        return self.steps["video"] + self.steps["image"]


# ---- demo dataset: procedural faces drawn from 68 landmarks (iBUG layout), numpy only
# Expression parameters at the apex, as offsets from neutral: brow raise, brow inner end down, brow squeeze,
# upper lid open, lower lid open, mouth width, smile (corners up), mouth open, upper lip raise, lips thin, nose up.
# Bold on purpose, like posed expressions: a tiny ViT trained from scratch for a few CPU minutes has to tell them apart.
_APEX = np.array([
    [-1.3, 2.2, 1.6, -0.85, -0.5, -0.4, 0.0, 0.0, 0.0, 1.3, 0.0],  # Angry: brows down in a V, narrow eyes, thin lips
    [-1.0, 0.5, 1.0, -0.7, -0.95, -0.15, -1.1, 0.2, 2.2, 0.0, 2.2],  # Disgust: upper lip and nose up, corners down
    [1.6, -1.6, 1.1, 1.75, 0.65, 0.55, -0.65, 0.3, 0.0, 0.0, 0.0],  # Fear: brows up and together, wide eyes, stretched
    [0.15, 0.0, 0.0, -0.3, -1.0, 0.55, 2.2, 0.22, 0.0, 0.0, 0.0],  # Happy: wide open smile, raised cheeks
    [0.0] * 11,  # Neutral
    [0.15, -2.2, 0.65, -0.4, 0.0, -0.08, -2.4, 0.0, 0.0, 0.0, 0.0],  # Sad: inner brows up, corners down
    [2.2, 0.0, 0.0, 1.6, 0.6, -0.3, 0.0, 0.75, 0.0, 0.0, 0.0],  # Surprise: brows high, eyes wide, mouth a tall O
])
_EYE = np.array([[-1, 0], [-0.4, -1], [0.4, -1], [1, 0], [0.4, 1], [-0.4, 1]], float)  # corners and lids


def _identity(rng):
    """Face shape, feature sizes and colours of one person."""
    skin = np.array([240, 205, 180]) + rng.uniform() * np.array([-140, -140, -135]) + rng.uniform(-12, 12, 3)
    hair = np.array([[25, 20, 18], [70, 45, 25], [150, 110, 60], [200, 170, 110], [130, 130, 130]])[rng.integers(5)]
    iris = np.array([[70, 45, 25], [50, 95, 140], [70, 110, 60], [35, 30, 30]])[rng.integers(4)]
    u = lambda a, b: rng.uniform(a, b)  # noqa: E731
    return dict(w=u(0.85, 1.05), h=u(0.95, 1.12), jaw=u(0.7, 1.3), forehead=u(0.9, 1.05), hair_h=u(0.6, 1.0),
                eye_x=u(0.38, 0.46), eye=u(1.0, 1.3), brow_y=u(-0.56, -0.48), brow_t=u(0.08, 0.12),
                mouth_w=u(0.32, 0.4), mouth_y=u(0.5, 0.6), lip=u(0.04, 0.07), nose=u(0.9, 1.1),
                skin=skin, hair=hair * u(0.8, 1.2), iris=iris, lips=skin * [0.85, 0.55, 0.55] + [25, 0, 0])


def _landmarks(e, idt):
    """68 points (x right, y down, face half-width about 1) for expression parameters e and identity idt."""
    b_raise, b_inner, squeeze, lid_up, lid_low, width, smile, gap, lip_up, thin, nose_up = e
    p = np.zeros((68, 2))
    a = np.linspace(0, np.pi, 17)
    p[0:17] = _xy(-np.sign(np.cos(a)) * np.abs(np.cos(a)) ** idt["jaw"] * idt["w"],
                    -0.1 + idt["h"] * np.sin(a) + 0.6 * gap * np.sin(a) ** 8)  # jaw, the chin drops with the mouth
    u = np.linspace(0, 1, 5)  # along a brow, outer end to inner end
    bx = -(0.8 - 0.62 * u) * idt["w"] + 0.07 * squeeze * u
    by = idt["brow_y"] - 0.08 * np.sin(np.pi * u) * (1 + 0.5 * b_raise) - 0.15 * b_raise + 0.16 * b_inner * u ** 1.5
    p[17:22], p[22:27] = _xy(bx, by), _xy(-bx[::-1], by[::-1])
    p[27:31] = _xy(np.zeros(4), np.linspace(-0.3, 0.15 * idt["nose"], 4))
    p[31:36] = _xy(np.linspace(-0.17, 0.17, 5) * (1 + 0.15 * nose_up),
                     0.15 * idt["nose"] + np.array([0.06, 0.09, 0.1, 0.09, 0.06]) - 0.05 * nose_up)
    lids = np.where(_EYE[:, 1] < 0, 1 + lid_up, 0.8 * (1 + lid_low))  # upper and lower lids open separately
    for first, side in ((36, -1), (42, 1)):
        p[first:first + 6] = _EYE * [0.19, 0.085] * idt["eye"] * _xy(np.ones(6), lids) + [side * idt["eye_x"], -0.25]
    mw = idt["mouth_w"] * (1 + width)
    mid = lambda x: idt["mouth_y"] - 0.14 * smile * x ** 2  # noqa: E731  mouth line, corners up with a smile
    prof = lambda x: np.sqrt(np.clip(1 - x ** 2, 0, 1))  # noqa: E731  lip height profile, 0 at the corners
    xo, xi = np.array([-1, -0.66, -0.33, 0, 0.33, 0.66, 1]), np.array([-0.88, -0.4, 0, 0.4, 0.88])
    lip_u, lip_l = idt["lip"] * (1 - 0.6 * thin), 1.3 * idt["lip"] * (1 - 0.6 * thin)
    up_o = mid(xo) - (gap / 2 + 0.05 * lip_up) * prof(xo) - lip_u * prof(xo) ** 0.5
    low_o = mid(xo) + gap / 2 * prof(xo) + lip_l * prof(xo) ** 0.5
    up_i, low_i = mid(xi) - (gap / 2 + 0.05 * lip_up) * prof(xi), mid(xi) + gap / 2 * prof(xi)
    p[48:55], p[55:60] = _xy(xo * mw, up_o), _xy(xo[5:0:-1] * mw, low_o[5:0:-1])
    p[60:65], p[65:68] = _xy(xi * mw, up_i), _xy(xi[3:0:-1] * mw, low_i[3:0:-1])
    return p


def _xy(x, y):  # (n,), (n,) -> (n, 2)
    return np.stack(np.broadcast_arrays(x, y), axis=1)


_CLIP_TO = {"iris": "eye", "pupil": "eye", "teeth": "mouth"}  # drawn only inside


def _ellipse(cx, cy, rx, ry, n=24):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return _xy(cx + rx * np.cos(a), cy + ry * np.sin(a))


def _ribbon(points, width):
    """A thick polyline as a polygon, tapering towards both ends."""
    d = np.concatenate([points[1:2] - points[:1], points[2:] - points[:-2], points[-1:] - points[-2:-1]])
    normal = _xy(-d[:, 1], d[:, 0]) / np.linalg.norm(d, axis=1, keepdims=True).clip(1e-9)
    half = width / 2 * (0.5 + 0.5 * np.sin(np.linspace(0.15, 0.85, len(points)) * np.pi))[:, None]
    return np.r_[points + normal * half, (points - normal * half)[::-1]]


def _shapes(p, idt):
    """(polygons in face units, colour, name) back to front; 'iris'/'pupil' are clipped to the eyes,
    'teeth' to the open mouth."""
    skin, w, eyes = idt["skin"], idt["w"], (p[36:42], p[42:48])
    arc = np.linspace(0, np.pi, 13)[1:-1]
    face = np.r_[p[0:17], _xy(w * np.cos(arc), -0.1 - idt["forehead"] * np.sin(arc))]
    neck = np.array([[-0.42 * w, 0.4], [0.42 * w, 0.4], [0.5 * w, 2.5], [-0.5 * w, 2.5]])
    r = 0.07 * idt["eye"]
    teeth = np.r_[p[60:65], p[64:59:-1] + [0, 0.3 * np.ptp(p[60:68, 1])]]
    return [([neck], skin * 0.85, "neck"), ([_ellipse(0, -0.35, 1.1 * w, idt["hair_h"] + 0.2)], idt["hair"], "hair"),
            ([face], skin, "face"), (eyes, np.array([245.0, 245, 240]), "eye"),
            ([_ellipse(*e.mean(0), r, r) for e in eyes], idt["iris"], "iris"),
            ([_ellipse(*e.mean(0), 0.45 * r, 0.45 * r) for e in eyes], np.zeros(3) + 15, "pupil"),
            ([_ribbon(e[:4], 0.025) for e in eyes], idt["hair"] * 0.5, "lids"),
            ([_ribbon(p[17:22], idt["brow_t"]), _ribbon(p[22:27], idt["brow_t"])], idt["hair"] * 0.5, "brows"),
            ([_ribbon(p[27:31], 0.035)], skin * 0.8, "nose"), ([_ribbon(p[31:36], 0.045)], skin * 0.55, "nostrils"),
            ([p[48:60]], idt["lips"], "lips"), ([p[60:68]], np.array([60.0, 20, 25]), "mouth"),
            ([teeth], np.array([235.0, 230, 220]), "teeth"), ([_ribbon(p[60:65], 0.02)], idt["lips"] * 0.5, "lipline")]


def _coverage(polys, size, sub=3):
    """Anti-aliased coverage of closed polygons (even-odd rule), exact along each of `sub` sub-rows per pixel
    row: (row slice, column slice, coverage) of their bounding box in a size x size frame."""
    a, b = np.concatenate(polys), np.concatenate([np.roll(q, -1, axis=0) for q in polys])  # edges a -> b
    (x0, y0), (x1, y1) = a.min(0).tolist(), a.max(0).tolist()
    x0, y0, x1, y1 = max(int(x0), 0), max(int(y0), 0), min(max(int(x1) + 2, 0), size), min(max(int(y1) + 2, 0), size)
    ys = y0 + (np.arange((y1 - y0) * sub) + 0.5) / sub  # (R,) sub-row centres
    (xa, ya), (xb, yb) = a.T, b.T
    crosses = (ya <= ys[:, None]) != (yb <= ys[:, None])  # (R, E)
    t = (ys[:, None] - ya) / np.where(yb == ya, 1, yb - ya)
    xs = np.sort(np.where(crosses, xa + t * (xb - xa), np.inf), axis=1)  # (R, E) crossings left to right
    k = int(crosses.sum(1).max(initial=0)) // 2 * 2
    left, right = xs[:, 0:k:2, None], xs[:, 1:k:2, None]  # (R, P, 1) spans inside the polygon
    valid = np.isfinite(right)
    cols = np.arange(x0, x1)
    span = np.minimum(cols + 1, np.where(valid, right, 0)) - np.maximum(cols, np.where(valid, left, 0))
    span = np.minimum(np.maximum(span, 0), 1)
    cov = span.sum(1).reshape(y1 - y0, sub, x1 - x0).sum(1, dtype=np.float32) / sub  # (R, P, C) -> (rows, C)
    return slice(y0, y1), slice(x0, x1), cov


def _project(q, pose):
    """Face units -> pixels: yaw with a rough depth (nose out front), then roll, scale and shift."""
    z = 0.5 * np.sqrt(np.clip(1 - (q[:, 0] / 1.1) ** 2 - (q[:, 1] / 1.8) ** 2, 0, 1))
    z = z + 0.3 * np.exp(-(q[:, 0] ** 2 / 0.02 + (q[:, 1] - 0.05) ** 2 / 0.06))
    x = q[:, 0] * math.cos(pose[3]) + z * math.sin(pose[3])
    c, s = math.cos(pose[2]), math.sin(pose[2])
    return _xy(c * x - s * q[:, 1], s * x + c * q[:, 1]) * pose[4] + pose[:2]


def _render(p, idt, pose, background, size):
    """One frame: the face of landmarks p over the background, before lighting and noise."""
    img, masks = background.copy(), {}
    shapes = _shapes(p, idt)
    flat = [poly for polys, _, _ in shapes for poly in polys]
    flat = np.split(_project(np.concatenate(flat), pose), np.cumsum([len(poly) for poly in flat])[:-1])
    for (polys, colour, name) in shapes:
        polys, flat = flat[:len(polys)], flat[len(polys):]
        ys, xs, cov = _coverage(polys, size)
        if name in ("eye", "mouth"):
            masks[name] = np.zeros((size, size), np.float32)
            masks[name][ys, xs] = cov
        if name in _CLIP_TO:
            cov = cov * masks[_CLIP_TO[name]][ys, xs]
        region = img[ys, xs]
        region += cov[..., None] * (colour.astype(np.float32) - region)
    return img


def _intensity(n, rng):
    """Expression intensity of n frames and the apex frames: neutral, a smoothstep onset over 2-4 frames, the apex
    (0.85-1.1) held for 3-6 frames, a smoothstep offset over 2-4 frames, neutral again. The event starts at a random
    frame (it always fits in the clip), so a frame at a fixed position, the middle one say, can miss it."""
    onset, hold, offset = (int(v) for v in rng.integers([2, 3, 2], [5, 7, 5]))
    start = int(rng.integers(0, n - (onset + hold + offset) + 1))
    k = np.arange(n) - start  # frames since the event began
    rise = np.clip((k + 1) / (onset + 1), 0, 1)  # reaches 1 at the first apex frame k = onset
    fall = np.clip((onset + hold + offset - k) / (offset + 1), 0, 1)  # leaves 1 after the last apex frame
    t = np.minimum(rise, fall)
    return rng.uniform(0.85, 1.1) * t * t * (3 - 2 * t), np.arange(start + onset, start + onset + hold)


def demo_clip(label, rng, size=112):
    """One clip of class `label`: frames uint8 (T, size, size, 3), landmarks float32 (T, 68, 2) in pixels and the
    expression intensity of every frame (T,). 16-18 frames, neutral before and after an expression event (see
    _intensity)."""
    idt, n = _identity(rng), int(rng.integers(16, 19))
    intensity, _ = _intensity(n, rng)
    # roughly aligned faces, as a face detector's crops are: small shifts, roll, yaw and scale
    pose = np.array([size * rng.uniform(0.48, 0.52), size * rng.uniform(0.465, 0.495), rng.uniform(-0.06, 0.06),
                     rng.uniform(-0.1, 0.1), size * rng.uniform(0.42, 0.45)])  # centre x, y, roll, yaw, px per unit
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    light, bg_dir = rng.uniform(-0.08, 0.08, 2), rng.uniform(-15, 15, 2)
    light = (1 + xx * light[0] + yy * light[1]).astype(np.float32)[..., None]  # (S, S, 1) lighting gradient
    background = np.clip(rng.uniform(60, 200, 3) + (xx * bg_dir[0] + yy * bg_dir[1])[..., None], 0, 255)
    background = background.astype(np.float32)
    frames, points, jitter = [], [], np.zeros(5)
    for k in range(n):
        jitter = 0.8 * jitter + rng.normal(0, [0.004 * size, 0.004 * size, 0.01, 0.01, 0.004 * pose[4]])
        p = _landmarks(_APEX[label] * intensity[k], idt)
        img = _render(p, idt, pose + jitter, background, size)
        img *= light * rng.uniform(0.97, 1.03)
        img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1, 3)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        points.append(_project(p, pose + jitter))
    return np.stack(frames), np.stack(points).astype(np.float32), intensity


def write_frames(folder, frames, names=None):
    """JPEG files 1.jpg, 2.jpg, ... (unpadded, so readers must sort naturally), or names[k].jpg. frames: uint8
    (T, H, W, 3), or any iterable of (H, W, 3) frames of one size."""
    folder.mkdir(parents=True)
    codec = None
    for k, frame in enumerate(frames, 1):
        if codec is None:  # every JPEG frame is coded on its own
            codec = av.CodecContext.create("mjpeg", "w")
            codec.width, codec.height, codec.pix_fmt, codec.time_base = frame.shape[1], frame.shape[0], "yuvj420p", 1
            codec.options = {"qmin": "1", "qmax": "3"}
        packets = codec.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuvj420p", threads=1))
        (folder / f"{names[k - 1] if names else k}.jpg").write_bytes(b"".join(bytes(p) for p in packets))


def frame_rate(path, default=25):
    """A video's average frame rate (frames per second, a Fraction: write_video takes it as it is), else `default`
    (a frame folder, an image, no rate known)."""
    if Path(path).is_dir() or Path(path).suffix.lower() not in VIDEO_EXTS:
        return default
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate if container.streams.video else None
    return rate or default


def write_video(path, frames, fps=25):
    """H.264 mp4, near-lossless, a key frame every 8 frames so that readers seek. frames: uint8 (T, H, W, 3), or
    any iterable of (H, W, 3) frames of one size."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"write_video {path}: no frames")
    frames = itertools.chain([first], frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        # The same seed must give the same bytes. Things that varied from run to run: x264's B-frame look-ahead, the
        # encoder's own RGB -> YUV conversion (now and then), and now and then a few frames of a clip: x264's
        # macroblock tree (mbtree) reads uninitialised stack memory (valgrind shows it inside x264_encoder_encode;
        # with mbtree=0 it reports nothing in x264). So: x264 on one thread, without B-frames or the macroblock
        # tree, and every frame converted to YUV 4:2:0 on its own, on one thread, before it reaches the encoder.
        options = {"crf": "12", "preset": "veryfast", "g": "8", "threads": "1", "x264-params": "bframes=0:mbtree=0"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", threads=1)
            container.mux(stream.encode(yuv))
        container.mux(stream.encode(None))


def _demo_item(job):
    """Render and write one demo clip; returns its split row and, for a frame folder, its still-image rows."""
    out, seed, label, k, rel, size = job
    frames, points, intensity = demo_clip(label, np.random.default_rng([seed, label, k]), size)
    (write_video if rel.endswith(".mp4") else write_frames)(out / rel, frames)
    landmarks = out / "landmarks" / Path(rel).relative_to("clips").with_suffix(".npy")
    landmarks.parent.mkdir(parents=True, exist_ok=True)
    np.save(landmarks, points)
    shown = np.flatnonzero(intensity >= 0.5 * intensity.max())[::2]  # every other frame at half the peak or more
    folder = rel
    if rel.endswith(".mp4"):  # the stills of a video clip are written as images of their own, under stills/
        folder = str(Path("stills", *Path(rel).with_suffix("").parts[1:]))
        write_frames(out / folder, frames[shown], names=[f + 1 for f in shown])
    return f"{rel},{label}", [f"{folder}/{f + 1}.jpg,{label}" for f in shown]


def demo_points(root, sample):
    """Ground-truth landmarks (T, 68, 2), in pixels, of a demo clip: landmarks/<Class>/<nnnn>.npy under root."""
    return np.load(Path(root, "landmarks", Path(sample.path).relative_to("clips").with_suffix(".npy")))


def make_demo(out_dir="data/demo", num_clips=None, seed=0, size=112, mp4_every=4, workers=None):
    """Write the demo dataset in the FERV39K layout: train.csv / test.csv ('path,id'), frame folders
    clips/<Class>/<nnnn>/<k>.jpg, every mp4_every-th clip as clips/<Class>/<nnnn>.mp4 instead, and the ground-truth
    landmarks (T, 68, 2) in pixels as landmarks/<Class>/<nnnn>.npy. num_clips (default 490) is split evenly over
    the 7 classes, a fifth of each class held out for test. stills_train.csv / stills_test.csv list every other
    frame showing at least half its clip's peak expression, of every clip, as still images (the image stage's data,
    a miniature AffectNet): files of the frame folders, and for an mp4 clip the rendered frames as JPEG files
    stills/<Class>/<nnnn>/<k>.jpg. Written into a temporary folder that is renamed at the end, so a crash
    leaves no complete-looking dataset."""
    out, per_class = Path(out_dir), max(2, (num_clips or 490) // 7)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    mp4 = [k % mp4_every == 1 % mp4_every for k in range(per_class)]  # clips 1, 1 + mp4_every, ...; 1: all
    jobs = [(tmp, seed, label, k, f"clips/{name}/{k:04d}" + (".mp4" if mp4[k] else ""), size)
            for label, name in enumerate(CLASSES["demo"]) for k in range(per_class)]
    try:
        pool = ThreadPoolExecutor(1) if workers == 1 else ProcessPoolExecutor(workers or min(os.cpu_count() or 1, 8))
        with pool:
            items = list(pool.map(_demo_item, jobs))
        test = {i for i, job in enumerate(jobs) if job[3] >= per_class - max(1, per_class // 5)}
        for split, keep in (("test", lambda i: i in test), ("train", lambda i: i not in test)):
            rows = [row for i, (row, _) in enumerate(items) if keep(i)]
            stills = [row for i, (_, rows) in enumerate(items) if keep(i) for row in rows]
            (tmp / f"{split}.csv").write_text("path,id\n" + "".join(r + "\n" for r in rows))
            (tmp / f"stills_{split}.csv").write_text("path,id\n" + "".join(r + "\n" for r in stills))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "train.csv").exists():  # else another process finished the same dataset first
            raise
    return out


# ---- command line: make-demo, check, bench
def check(args):
    """Open every clip of the split files; print counts per class and every bad item; exit status 1 if any."""
    files = dataset_files(args.dataset, args.root, args.fold)
    if args.media_root:
        files = DatasetFiles(files.train, files.test, args.media_root)
    problem = None if args.split else layout_problem(args.dataset, args.root, files)
    if problem is None and args.split:
        missing = [path for path in args.split if not Path(path.partition("#")[0]).is_file()]
        problem = "; ".join(f"split file {path} does not exist" for path in missing) or None
        if problem is None and not Path(files.media_root).is_dir():
            problem = f"the media folder {files.media_root} does not exist"
    if problem:
        raise LayoutError(problem)
    media_root = files.media_root
    bad, named = 0, []
    for split in args.split or [files.train, files.test]:
        samples = read_split(args.dataset, split, one_based=args.one_based)
        named.append((split, samples))
        counts = np.bincount([s.label for s in samples], minlength=len(CLASSES[args.dataset]))
        names = CLASSES[args.dataset]
        print(f"{split}: {len(samples)} samples; " + ", ".join(f"{c} {n}" for c, n in zip(names, counts, strict=True)))
        with ThreadPoolExecutor(args.workers) as pool:
            for sample, error in zip(samples, pool.map(lambda s: _problem(s, media_root), samples), strict=True):
                if error:
                    bad += 1
                    print(f"BAD {sample.path} (label {sample.label}): {error}")
    for warning in split_warnings(named):
        print(f"warning: {warning}")
    print(f"{bad} bad item(s)" if bad else "all items readable")
    return 1 if bad else 0


def _problem(sample, media_root):
    try:
        load_clip(sample, media_root)
    except ClipError as err:
        return str(err)
    return None


def bench(args):
    """Clips/s of ClipDataset in train mode (full augmentation) on generated clips, in this one process with one
    torch thread: per process (wall clock) and per core (CPU seconds of all its threads), median and range."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo(Path(tmp) / "bench", num_clips=args.clips, seed=0, size=args.size, mp4_every=2, workers=1)
        samples = read_split("demo", root / "train.csv") + read_split("demo", root / "test.csv")
        for kind in ("frame folders", "mp4"):
            subset = [s for s in samples if s.path.endswith(".mp4") == (kind == "mp4")]
            ds = ClipDataset(subset, root, "train", num_frames=args.frames, image_size=args.size, augment=True)
            wall, cpu = [], []
            for repeat in range(args.repeats):
                ds.set_epoch(repeat)
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(len(ds)):
                    ds[i]
                wall.append(len(ds) / (time.perf_counter() - t0))
                cpu.append(len(ds) / (time.process_time() - c0))
            print(f"{kind:>13}: {len(ds)} clips x {args.repeats} repeats, {args.frames} frames x {args.size} px: "
                  f"{np.median(wall):.1f} clips/s per process ({min(wall):.1f}-{max(wall):.1f}), "
                  f"{np.median(cpu):.1f} clips/s per core ({min(cpu):.1f}-{max(cpu):.1f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    demo = sub.add_parser("make-demo", parents=[common], help="write the procedural demo dataset")
    demo.add_argument("--out", default="data/demo", help="output folder, must not exist or be empty")
    demo.add_argument("--clips", type=int, default=490, help="number of clips over the 7 classes (a fifth test)")
    demo.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset")
    demo.add_argument("--size", type=int, default=112, help="frame size in pixels")
    demo.add_argument("--workers", type=int, default=None, help="processes (default: all cores, at most 8)")
    chk = sub.add_parser("check", parents=[common], help="read split files and decode every clip")
    chk.add_argument("--dataset", required=True, choices=sorted(CLASSES), help="which reader and label order")
    chk.add_argument("--root", required=True, help="dataset root in its official layout (README)")
    chk.add_argument("--split", action="append", help="split file (repeatable); default: train and test of --fold")
    chk.add_argument("--fold", type=int, default=1, help="DFEW / MAFW fold, 1-5")
    chk.add_argument("--media-root", help="folder the split's paths are relative to, if not the official one")
    chk.add_argument("--one-based", action="store_true", help="DFEW's own split files with labels 1-7")
    chk.add_argument("--workers", type=int, default=4, help="decoding threads")
    ben = sub.add_parser("bench", parents=[common], help="decode + augmentation throughput, frame folders vs mp4")
    ben.add_argument("--clips", type=int, default=28, help="generated clips (half frame folders, half mp4)")
    ben.add_argument("--frames", type=int, default=16, help="frames per clip")
    ben.add_argument("--size", type=int, default=224, help="frame size of the generated clips and of the crops")
    ben.add_argument("--repeats", type=int, default=5, help="passes over the clips; median and range reported")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "make-demo":
        t0 = time.perf_counter()
        out = make_demo(args.out, args.clips, args.seed, args.size, workers=args.workers)
        n = {split: len(read_split("demo", out / f"{split}.csv")) for split in ("train", "test")}
        print(f"wrote {out}: {n['train']} train + {n['test']} test clips in {time.perf_counter() - t0:.1f} s")
        return 0
    return check(args) if args.command == "check" else bench(args) or 0


def exit_on_user_error(script, main):
    """Run main(); an error a user can cause (a bad file, clip, split line or checkpoint: ValueError, ClipError,
    OSError) ends as one line `script: message` and exit code 1; with --debug on the command line, the traceback."""
    try:
        return main()
    except (ValueError, ClipError, OSError) as err:
        if "--debug" in sys.argv[1:]:
            raise
        print(f"{script}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(exit_on_user_error("data.py", main))
