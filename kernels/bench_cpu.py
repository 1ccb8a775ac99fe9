"""CPU figures in one table: data loading with 0, 1 and 2 worker processes, the SDL step, the landmark view's
forward, and one training step of the demo's video stage broken down by phase.

    python kernels/bench_cpu.py            # under a minute on 2 cores
Loading: ClipDataset in train mode (full augmentation) on generated 16-frame 224 px JPEG frame folders, through a
DataLoader (batches of 8 clips, the video stage's batch per process; persistent workers after an untimed warm-up
pass); per process = clips per wall-clock second, per core = clips per CPU second of the process and its workers
together (Linux: the workers' /proc times). --batch-size 1 shows the per-batch cost of a worker's transfer.
Each figure is the median of --repeats passes; times vary by 10-20 % on a shared machine.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python kernels/bench_cpu.py`

# The scripts' setting (README, Data loading speed): huge pages for CPU tensors of 2 MB and more
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import data  # noqa: E402
import landmarks  # noqa: E402
import loss  # noqa: E402
from model import build_model, set_trainable  # noqa: E402


def cpu_seconds(pids=()):
    """CPU seconds of this process and of the live processes `pids` (Linux /proc: utime + stime)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the command name
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def loader_rows(root, samples, workers, repeats, batch_size=8):
    """Steady-state loading: persistent workers, started and warmed up by one untimed pass, so that a worker's
    start (a process that imports torch) is not counted; CPU time is the main process's plus every worker's."""
    ds = data.ClipDataset(samples, root, "train", num_frames=16, image_size=224, augment=True)
    rows = []
    for w in workers:
        loader = DataLoader(ds, batch_size=batch_size, num_workers=w, shuffle=False, persistent_workers=w > 0)
        for _ in loader:  # the untimed warm-up pass
            pass
        pids = [p.pid for p in loader._iterator._workers] if w else []
        wall, core = [], []
        for repeat in range(repeats):
            ds.set_epoch(repeat + 1)
            t0, c0 = time.perf_counter(), cpu_seconds(pids)
            for _ in loader:
                pass
            wall.append(len(ds) / (time.perf_counter() - t0))
            core.append(len(ds) / (cpu_seconds(pids) - c0))
        del loader
        rows.append((f"loading, batch {batch_size}, {w} worker(s): clips/s per process / per core",
                     f"{statistics.median(wall):.1f} / {statistics.median(core):.1f}"))
    return rows


def train_step_rows(root, samples, repeats):
    """The demo video stage's step: 8 clips x 8 frames at 112 px, s2d_tiny, tiny landmark view, SDL, AdamW."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = landmarks.LandmarkFeatures(preset="mobilefacenet_tiny")
    model = build_model("s2d_tiny", 7, 8, landmark_channels=lm.feature_width)
    set_trainable(model, "video")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    anchors = loss.EmotionAnchors(7, model.cfg.width, init="random")
    ds = data.ClipDataset(samples, root, "train", num_frames=8, sampling_rate=2, image_size=112, augment=False)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=0, drop_last=True)
    phases = {k: [] for k in ("data", "landmark view", "forward", "SDL", "backward", "optimizer")}
    for step in range(repeats + 2):
        t = [time.perf_counter()]
        batch = next(iter(loader))
        t.append(time.perf_counter())
        feats = lm(batch["video"])
        t.append(time.perf_counter())
        logits, features = model(batch["video"], feats)
        t.append(time.perf_counter())
        total, _, _ = loss.sdl_loss(logits, batch["label"], anchors.soft_labels(features), 0.5)
        t.append(time.perf_counter())
        total.backward()
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if step >= 2:  # two warm-up steps
            for times, a, b in zip(phases.values(), t[:-1], t[1:], strict=True):
                times.append(1000 * (b - a))
    medians = {k: statistics.median(v) for k, v in phases.items()}
    total = sum(medians.values())
    return [(f"demo video step (8 clips x 8 frames, 112 px): {k}", f"{ms:.0f} ms ({100 * ms / total:.0f} %)")
            for k, ms in medians.items()] + [("demo video step: total", f"{total:.0f} ms")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64, help="generated clips for the loading figures")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch for the loading figures")
    parser.add_argument("--repeats", type=int, default=3, help="passes (loading) and timed steps (training step)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = data.make_demo(Path(tmp) / "big", num_clips=args.clips, size=224, mp4_every=10**6, workers=1)
        samples = [s for s in data.read_split("demo", big / "train.csv") + data.read_split("demo", big / "test.csv")
                   if not s.path.endswith(".mp4")]
        rows += loader_rows(big, samples, (0, 1, 2), args.repeats, args.batch_size)
        sdl = loss.bench()
        rows += [(f"SDL step (soft labels + loss, forward + backward), batch {b}", f"{ms:.3f} ms")
                 for b, ms in sdl.items()]
        lm = landmarks.bench()
        rows += [(f"landmark view forward, full MobileFaceNet, 16 frames: {way}", f"{ms:.1f} ms")
                 for way, ms in lm.items()]
        small = data.make_demo(Path(tmp) / "small", num_clips=28, workers=1)
        rows += train_step_rows(small, data.read_split("demo", small / "train.csv"), args.repeats + 2)
    print(f"\n| figure (1 torch thread per process, {torch.__version__}) | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
