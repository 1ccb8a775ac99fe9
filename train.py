"""Train S2D: the landmark view, the image stage (SFER) and the video stage (DFER), as one plain script.

The demo, S2D in miniature on CPU (makes ./data/demo if it is missing; each finished stage is reused next time):
    python train.py                      # landmarks -> image stage -> video stage; last line: test UAR / WAR
    python train.py --retrain image      # redo the image stage and what depends on it
    python train.py --ablation           # the video stage without TMA / MCP / SDL, 3 seeds each, as a table
The demo's stages one by one (what `python train.py` runs on a 2-core machine: 2 processes of one thread each):
    python landmarks.py --train --data-root data/demo --out runs/demo-landmarks
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py --stage image --dataset demo_image \
        --landmark-weights runs/demo-landmarks/landmarks.pt --batch-size 8 --workers 0 --out runs/demo-image
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py --stage video --init runs/demo-image/best.pt \
        --landmark-weights runs/demo-landmarks/landmarks.pt --batch-size 4 --workers 0 --out runs/demo-video
Real datasets sit in data/<NAME> (README, Datasets) and the start files in weights/ (README, Files to download):
    torchrun --standalone --nproc_per_node=8 train.py --stage image --dataset affectnet7   # image stage, from MAE
    torchrun --standalone --nproc_per_node=8 train.py --dataset ferv39k                    # video stage
    torchrun --standalone --nproc_per_node=8 train.py --dataset dfew --fold 1              # folds 1-5, MAFW too
S4D, the follow-up (README, S4D): dual-modal MAE pre-training, then joint image + video fine-tuning with MoAE:
    python train.py --stage mae --dataset demo                                   # s4d_tiny on the demo, CPU
    python train.py --stage joint --dataset demo --init runs/demo-mae/last.pt
    torchrun --standalone --nproc_per_node=8 train.py --stage joint --dataset dfew --fold 1   # s4d_base, AffectNet-7
Continue a stopped run (same world size for a bit-exact continuation):
    python train.py --resume runs/demo-video

Learning rate: lr = blr * total_batch / 8, total_batch = batch-size x accum-steps x processes (the release's rule;
S4D's pre-training also counts the --views of each clip).
Outputs in --out: config.json, log.jsonl (one JSON line per epoch), last.pt (every epoch and on SIGTERM / SIGINT),
best.pt (best validation score), results.json (test metrics of last.pt and best.pt).
Exit status: 0 when done, and also when stopped by SIGTERM / SIGINT (after the current step and a checkpoint);
1 on a non-finite loss (the message names epoch and step; last.pt stays the last good checkpoint).
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# Huge pages for CPU tensors of 2 MB and more, set before torch starts: eval.py says why (it is imported after torch)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import data
import landmarks
from eval import demo_pictures, evaluate, format_report
from loss import SCHEDULES, EmotionAnchors, MixCut, lambda_at, sdl_loss, soft_target_ce
from model import (VIDEO_STAGE, build_model, layer_scale, load_checkpoint, mae_loss, mae_target, no_weight_decay,
                   random_mask, safe_load, set_trainable)

# ----------------------------------------------------------------------------- options
# Options left unset take the default of the run kind. The demo's are measured (README, "The demo"): its image
# stage trains a tiny ViT from scratch on 1,650 stills, its video stage adapts it on 8 frames a clip, 2 apart.
# S4D's two stages (joint fine-tuning, dual-modal MAE pre-training) follow its release's recipe (README, S4D).
KINDS = ("demo image", "demo video", "image", "video", "demo joint", "demo mae", "joint", "mae")
RUN_DEFAULTS = {  # one value per kind, in KINDS order
    "model": ("s2d_tiny", "s2d_tiny", "s2d_base", "s2d_base", "s4d_tiny", "s4d_tiny", "s4d_base", "s4d_base"),
    "epochs": (7, 3, 20, 100, 15, 8, 100, 100),
    # per process; the demo's stages keep these totals on several processes. S4D: videos per batch (an image
    # batch is --image-batch-size, twice this by default); its pre-training: 48 videos x 4 views, and as many
    # images (the release's 192)
    "batch_size": (16, 8, 32, 8, 8, 8, 16, 48),
    "num_frames": (1, 8, 1, 16, 4, 4, 16, 16),
    # demo: 8 frames 2 apart (S4D's: 4 frames 4 apart) span the 16-18 frame clip. S4D: 4 on DFEW and MAFW, 1 on
    # FERV39K (set below)
    "sampling_rate": (1, 2, 1, 1, 4, 4, 1, 4),
    # video: the release's 1e-5; image: our choice (lr 1.6e-4 at total batch 256, full fine-tuning without
    # layer decay; the authors publish no image-stage recipe); demo: measured (README). S4D joint: its 1e-5;
    # its MAE: lr 1.6e-3 x batch / 512 (batch = videos x views; total_batch counts views there) is blr 2.5e-5
    "blr": (3e-4, 3e-3, 5e-6, 1e-5, 3e-3, 3e-3, 1e-5, 2.5e-5),
    # S4D's MAE: 5 % of the epochs (the release's), so 5 at its 100; set below from --epochs
    "warmup_epochs": (1, 0.5, 2, 2, 0.5, 0.5, 5, 5),
    "sdl_start": (-1, 1, -1, 20, -1, -1, -1, -1),  # -1: no SDL. The release starts SDL after epoch 20
    "augment": ("flip", "none", "paper", "paper", "flip", "light", "paper", "light"),
    "landmark_preset": ("mobilefacenet_tiny", "mobilefacenet_tiny", "mobilefacenet", "mobilefacenet") + (None,) * 4,
    "workers": (1, 1, 8, 8, 1, 1, 8, 8),  # demo: one loader process overlaps decoding with the model's 2 threads
}
S4D_STAGES = ("joint", "mae")


def by_kind(name):
    """The defaults of option `name` per run kind, for its --help: 'demo image 7, demo video 3, image 20, video 100'."""
    return ", ".join(f"{kind} {value}" for kind, value in zip(KINDS, RUN_DEFAULTS[name], strict=True))


# Where a real-dataset run looks for the files it starts from, and where to get each (README, Files to download)
WEIGHTS = {"video": "weights/pretrain-AffectNet-7.pth", "image": "weights/mae_pretrain_vit_base.pth",
           "landmarks": landmarks.PUBLIC_WEIGHTS,
           "joint": "weights/vit_base_voxceleb2+affectnet_100.pt", "mae": None}  # pre-training starts from scratch
WHERE = {"video": "the authors' image-stage checkpoint, https://huggingface.co/cyinen/S2D (pretrain-AffectNet-7.pth), "
                  "or your own: train.py --stage image --dataset affectnet7",
         "image": "MAE's ImageNet-1K ViT-B/16, https://github.com/facebookresearch/mae (mae_pretrain_vit_base.pth)",
         "landmarks": landmarks.PUBLIC_SOURCE,
         "joint": "S4D's dual-modal MAE encoder, https://huggingface.co/cyinen/S4D "
                  "(vit_base_voxceleb2+affectnet_100.pt), or your own: train.py --stage mae",
         "mae": "a checkpoint to continue pre-training from"}
RUNTIME_OPTIONS = ("resume", "workers", "stop_after_steps", "debug")  # on --resume these come from the command line
FOLDED = ("dfew", "mafw")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add = parser.add_argument
add("--stage", choices=("demo", "image", "video", "joint", "mae"),
    help="demo: the three demo stages in order (landmarks.py --train, then image, then video), each reused when "
         "finished (default for --dataset demo); image: the SFER image "
         "model, full fine-tuning (from an MAE ViT-B/16 via --init); video: the DFER model (default otherwise), "
         "training only the video-stage set when --init gives the image-stage checkpoint, everything otherwise. "
         "S4D: joint: image + video fine-tuning of the whole model with MoAE (from the dual-modal MAE encoder via "
         "--init); mae: dual-modal masked-autoencoder pre-training on the --dataset clips and --image-dataset images")
add("--dataset", default="demo", choices=sorted(data.CLASSES), help="dataset to train on (default: demo)")
add("--data-root", help="dataset folder in its release layout (README, Datasets; default: data/<NAME>, e.g. "
                        "data/FERV39K; the demo's data/demo is generated when train.csv is missing)")
add("--media-root", help="folder the split files' paths are relative to (default: the release layout's, e.g. "
                         "<data-root>/2_ClipsforFaceCrop for FERV39K)")
add("--train-split", help="training split file instead of the release layout's (e.g. MAFW's set_1/train.csv)")
add("--test-split", help="test split file instead of the release layout's")
add("--one-based", action="store_true", help="DFEW's own split files, labels 1-7 (the authors' files count 0-6)")
add("--fold", type=int, default=1, help="fold of DFEW / MAFW (1-5)")
add("--model", choices=("s2d_base", "s2d_tiny", "s4d_base", "s4d_tiny"), help=f"preset (default: {by_kind('model')})")
add("--init", help="checkpoint to start from: an MAE / timm ViT-B/16 (image stage), an image-stage checkpoint, "
                   "ours or the released pretrain-AffectNet-7.pth (video stage). On a real dataset the default is "
                   f"{WEIGHTS['video']} (video stage) or {WEIGHTS['image']} (image stage); 'none' trains from "
                   "scratch, which must be asked for")
add("--allow-other-classes", action="store_true",
    help="fine-tune an --init video checkpoint trained on other classes (by default the run stops, naming both "
         "lists); an image-stage --init of other classes always starts a fresh classifier")
add("--allow-partial-init", action="store_true",
    help="start even when --init leaves some of the backbone unloaded (by default the run stops before its first "
         "step: the video stage needs every tensor it freezes, the image stage the whole ViT)")
add("--landmark-weights", help="MobileFaceNet checkpoint: mobilefacenet_model_best.pth.tar, or the landmarks.pt of "
                               f"landmarks.py --train. On a real dataset the default is {WEIGHTS['landmarks']}; "
                               "'none' (or the demo without it) uses an untrained detector, with a warning")
add("--landmark-preset", choices=sorted(landmarks.PRESETS),
    help="MobileFaceNet size without --landmark-weights (default: the tiny one for the demo, else the public "
         "checkpoint's); a weights file records its own")
add("--no-mcp", action="store_true", help="ablation: no landmark view and no MCP prompts")
add("--no-tma", action="store_true", help="ablation: the video stage without TMA (the image model on every frame, "
                                          "its per-frame features averaged over time)")
s4d = parser.add_argument_group("S4D stages (--stage joint / mae)")
s4d.add_argument("--image-dataset", choices=sorted(data.IMAGE_DATASETS),
                 help="the still images trained with the videos (default: affectnet7; the demo: demo_image)")
s4d.add_argument("--image-data-root", help="its folder (default: data/<NAME>; the demo: --data-root)")
s4d.add_argument("--image-batch-size", type=int, help="images per process and step (default: joint 2 x "
                                                     "--batch-size, mae --views x --batch-size)")
s4d.add_argument("--image-share", type=float,
                 help="an epoch takes every video batch and this share of the image batches (default: joint 0.5, "
                      "mae 1.0), in an order shuffled from seed and epoch")
s4d.add_argument("--layer-decay", type=float, help="joint: layer-wise lr decay, 1: none (default 0.75; demo 1)")
s4d.add_argument("--mixup", type=float, help="joint: mixup alpha, 0: off (default 0.8; demo 0)")
s4d.add_argument("--cutmix", type=float, help="joint: cutmix alpha, 0: off (default 1.0; demo 0)")
s4d.add_argument("--smoothing", type=float, default=0.1, help="joint: label smoothing")
s4d.add_argument("--routing", default="release", choices=("release", "plain"),
                 help="MoAE router in training: release: noisy logits and a per-expert capacity, as released; "
                      "plain: as in evaluation (evaluation is always plain)")
s4d.add_argument("--views", type=int, help="mae: augmented views of each clip, side by side in its batch (default 4, "
                                          "the release's; demo 1)")
s4d.add_argument("--image-mask", type=float, default=0.9, help="mae: share of an image's tokens hidden")
s4d.add_argument("--video-mask", type=float, default=0.95, help="mae: share of a clip's tokens hidden (random)")
add("--oversample", action="store_true", help="class-balanced sampling (trades WAR for UAR, paper Tables IX-X)")
add("--epochs", type=int, help=f"training epochs (default: {by_kind('epochs')})")
add("--batch-size", type=int, help=f"clips per process and micro-step (default: {by_kind('batch_size')})")
add("--accum-steps", type=int, default=1, help="micro-steps per optimizer step (gradient accumulation)")
add("--num-frames", type=int, help=f"frames per clip (default: {by_kind('num_frames')})")
add("--sampling-rate", type=int, help=f"frame step within a clip (default: {by_kind('sampling_rate')}; joint on "
                                      "DFEW and MAFW 4)")
add("--blr", type=float, help=f"base lr; lr = blr * total_batch / 8 (default: {by_kind('blr')})")
add("--min-lr", type=float, help="lr at the end of the cosine schedule (default 0; joint: 1e-6 x total batch / 256)")
add("--warmup-epochs", type=float, help=f"linear warm-up, in epochs (default: {by_kind('warmup_epochs')}; mae: "
                                        "5 %% of --epochs)")
add("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on biases, norms, embeddings)")
add("--augment", choices=("paper", "light", "flip", "none"),
    help="training augmentation. paper: RandAugment (m7, n4, mstd 0.5), random erasing 0.25, random resized crop and "
         "flip (README, Training); light: the crop and flip only; flip: the flip only. S4D's stages take its "
         "release's variants: joint, paper: videos crop scale 0.08-1, images a 160/192 crop and RandAugment m9 n2; "
         f"mae, light: crop scale 0.2-1 and flip (README, S4D) (default: {by_kind('augment')})")
add("--sdl-start", type=int,
    help=f"first epoch (0-based) with the SDL term, -1 for none (default: {by_kind('sdl_start')})")
add("--lambda-schedule", default="linear", choices=SCHEDULES,
    help="SDL weight: linear / cosine ramp from 0 to 1 (the paper), or release: the released epoch steps")
add("--sdl-ramp", type=float, default=0.0, help="ramp length in epochs (0: over the rest of the training)")
add("--sdl-refresh", default="step", choices=("step", "never"),
    help="step: the paper, anchors refreshed from every mini-batch; never: the release, random anchors kept fixed")
add("--val-fraction", type=float, default=0.1, help="per-class fraction of the training list held out for model "
                                                    "selection (seeded); 0: no validation, no best.pt")
add("--val-every", type=int, default=1, help="validate every N epochs and after the last one (default 1)")
add("--select", default="war", choices=("war", "uar"),
    help="validation metric that picks best.pt (on a tie, the later epoch)")
add("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
    help="autocast on CUDA (auto: bf16 on CUDA, fp16 for --stage mae as released; fp32 on CPU); fp16 uses a "
         "gradient scaler")
add("--kernels", default="auto", choices=("auto", "triton", "torch"), help="TMA / MCP kernels (auto: triton on CUDA)")
add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
add("--workers", type=int, help=f"data-loading worker processes per process (default: {by_kind('workers')}; the "
                               "demo pipeline runs its stages with 0)")
add("--debug", action="store_true", help="show the Python traceback of an error (by default: one line naming it)")
add("--seed", type=int, default=0, help="seed of model init, split, sampling order and augmentation")
add("--out", help="run folder (default: runs/<dataset>[-fold<k>]-<stage>; the demo's stages: runs/demo-<stage>)")
add("--resume", metavar="DIR", help="continue the run in DIR from its last.pt, with its saved options")
add("--stop-after-steps", type=int, help="stop as on SIGTERM after this many optimizer steps (for tests)")
add("--retrain", choices=("landmarks", "image", "video", "all"),
    help="--stage demo: train this stage again, and every stage (and ablation run) that starts from it, even if "
         "finished")
add("--ablation", action="store_true", help="--stage demo: after the demo, the ablation table (README)")
add("--ablation-seeds", type=int, default=3, help="--ablation: seeds per row (default 3)")
add("--procs", type=int, help="--stage demo: processes per image / video stage, one thread each (default: 2 when "
                              "the machine has 2 cores or more, else 1); the total batches stay 16 and 8")
add("--demo-args", default="", help="--stage demo: options added to its image and video stages, e.g. "
                                   "\"--epochs 1\" for a quick smoke run (tests use it)")


# ----------------------------------------------------------------------------- the demo: S2D in miniature
# Each stage is an ordinary run of landmarks.py or of this script, in a subprocess: the commands it prints are the
# ones a user would type. A stage whose results.json exists is reused, unless --retrain names it or a stage before,
# or a stage it starts from finished after it (redone by an earlier --retrain).
DEMO_STAGES = {"landmarks": "landmark view (MobileFaceNet on ground-truth points)",
               "image": "image stage (MCP, no TMA; still frames of the training clips)",
               "video": "video stage (frozen image model + MCP + TMA + SDL)"}
ABLATION = [  # (key, row, image stage it starts from, extra options of its video stage)
    ("a", "(a) image model on frames, averaged over time", "image-nomcp",
     ["--no-mcp", "--no-tma", "--sdl-start", "-1"]),
    ("b", "(b) + TMA", "image-nomcp", ["--no-mcp", "--sdl-start", "-1"]),
    ("c", "(c) + MCP landmark view", "image", ["--sdl-start", "-1"]),
    ("d", "(d) + SDL = S2D", "image", []),
]


DEMO_OPTIONS = {"stage", "dataset", "data_root", "out", "retrain", "ablation", "ablation_seeds", "demo_args", "procs",
                "debug"}  # what the demo pipeline itself takes


class DemoStages:
    """The demo's stages under `runs`, the ablation's included. Each method gives a stage as (folder, command,
    needs): needs are the folders of the stages it starts from (one finished after it makes it stale)."""

    def __init__(self, args, root):
        self.runs, self.root, self.extra = Path(args.out or "runs"), str(root), shlex.split(args.demo_args)
        self.weights = str(self.runs / "demo-landmarks" / "landmarks.pt")
        self.procs = args.procs or (2 if (os.cpu_count() or 1) >= 2 else 1)
        if self.procs < 1 or 8 % self.procs:
            sys.exit(f"train.py: --procs {self.procs}: the demo's total batches (16 image, 8 video) need 1, 2, 4 or "
                     "8 processes")

    def train(self, kind, *options):
        """This script with options; on several CPU processes (torchrun), one thread each, sharing the kind's
        total batch. A small model's operations keep 2 threads of one process busy only part of the time: 2
        processes with 1 thread each take an image-stage epoch in about 0.8 of the time (README, The demo)."""
        if self.procs == 1:
            return [sys.executable, __file__, *options]
        per_process = RUN_DEFAULTS["batch_size"][KINDS.index(kind)] // self.procs
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.procs}",
                __file__, "--batch-size", str(per_process), "--workers", "0", *options]

    def landmarks(self):
        out = self.runs / "demo-landmarks"
        return out, [sys.executable, landmarks.__file__, "--train", "--data-root", self.root, "--out", str(out)], []

    def image(self, name="image", mcp=True):
        out = self.runs / f"demo-{name}"
        view = ["--landmark-weights", self.weights] if mcp else ["--no-mcp"]
        return out, self.train("demo image", "--data-root", self.root, "--stage", "image", "--dataset",
                               "demo_image", *view, *self.extra, "--out", str(out)), self._view(mcp)

    def video(self, image="image", out=None, extra=()):
        out, mcp = out or self.runs / "demo-video", "--no-mcp" not in extra
        view = ["--landmark-weights", self.weights] if mcp else []
        init = self.runs / f"demo-{image}"
        return out, self.train("demo video", "--data-root", self.root, "--stage", "video", *view, *self.extra,
                               "--init", str(init / "best.pt"), *extra, "--out", str(out)), [init, *self._view(mcp)]

    def _view(self, mcp):
        """The landmark stage's folder, for a stage that uses the landmark view (MCP)."""
        return [self.runs / "demo-landmarks"] if mcp else []


def finished_after(folder, needs):
    """The stages in `needs` (folders) that finished after the one in `folder` did: it started from older files."""
    done = (folder / "results.json").stat().st_mtime_ns
    return [n for n in needs if (n / "results.json").exists() and (n / "results.json").stat().st_mtime_ns > done]


def run_stage(title, stage, redo):
    """Run one stage, (folder, command, needs) of DemoStages, unless it is finished (and not to be redone, and none
    of the stages it starts from, `needs`, finished after it: a --retrain of those, now or in an earlier call, makes
    it stale)."""
    folder, command, needs = stage
    if not redo and (folder / "results.json").exists():
        newer = finished_after(folder, needs)
        if not newer:
            took = json.loads((folder / "stage.json").read_text())["seconds"] if (folder / "stage.json").exists() else 0
            print(f"== {title}: finished in {folder} ({took:.0f} s when it ran), reused; --retrain redoes it",
                  flush=True)
            return
        print(f"== {title}: {', '.join(map(str, newer))} finished after it; redone", flush=True)
    previous = folder.with_name(folder.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if (folder / "results.json").exists():
        folder.rename(previous)  # a finished run waits aside: a new one that fails or is stopped costs nothing
    shutil.rmtree(folder, ignore_errors=True)  # a stage that did not finish starts again
    threads = {"OMP_NUM_THREADS": "1"} if "torch.distributed.run" in command else {}
    print(f"== {title}\n   {' '.join([*(f'{k}={v}' for k, v in threads.items()), *command])}", flush=True)
    t0 = time.perf_counter()
    try:
        code = subprocess.run(command, env={**os.environ, **threads}).returncode
    except KeyboardInterrupt:
        code = "Ctrl-C"
    if code != 0 or not (folder / "results.json").exists():
        back = ""
        if previous.exists():
            shutil.rmtree(folder, ignore_errors=True)
            previous.rename(folder)
            back = f" The finished run from before is back in {folder}."
        why = f"failed (exit {code})" if code != 0 else "stopped before it finished"
        sys.exit(f"train.py: {title} {why}; its messages are above.{back} `python train.py` redoes it.")
    shutil.rmtree(previous, ignore_errors=True)
    (folder / "stage.json").write_text(json.dumps(dict(seconds=time.perf_counter() - t0, command=command)))
    print(f"== {title}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def best_test(folder):
    """The test metrics of a run's best-on-validation checkpoint."""
    return json.loads((folder / "results.json").read_text())["best"]


def run_demo(args):
    root, t_start = Path(args.data_root or "data/demo"), time.perf_counter()
    stages = DemoStages(args, root)
    if not (root / "train.csv").exists():
        print(f"== the demo dataset: making it in {root}", flush=True)
        data.make_demo(root)
        print(f"== the demo dataset: done in {time.perf_counter() - t_start:.0f} s", flush=True)
    for k, (name, title) in enumerate(DEMO_STAGES.items(), 1):
        run_stage(f"stage {k}/3, {title}", getattr(stages, name)(), args.retrain in ("all", name))
    if args.ablation:
        run_ablation(args, stages)
    lm, image, video = (json.loads((getattr(stages, n)()[0] / "results.json").read_text()) for n in DEMO_STAGES)
    for path in demo_pictures(stages.video()[0], stages.weights, root):
        print(f"picture: {path}")
    print(f"\nlandmark view: held-out NME {lm['nme']:.4f} (mean point error / outer-eye-corner distance)")
    print(f"image stage: held-out frame accuracy {image['best']['war']:.4f} (epoch {image['best']['epoch']})")
    print(f"demo done in {time.perf_counter() - t_start:.0f} s (this run)")
    print(f"video stage, held-out test (best on validation, epoch {video['best']['epoch']}): "
          f"UAR {video['best']['uar']:.4f}  WAR {video['best']['war']:.4f}")
    return 0


def spread(xs):
    """'mean +- sample standard deviation' of a few numbers."""
    return f"{np.mean(xs):.3f} +- {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


def run_ablation(args, stages):
    """The video stage with components switched off, on the same data and seeds; the table as README shows it."""
    t0, folder = time.perf_counter(), stages.runs / "ablation"
    run_stage("ablation: image stage without MCP", stages.image("image-nomcp", mcp=False), args.retrain == "all")
    lines = [f"| row | test UAR (mean +- std over {args.ablation_seeds} seeds) | test WAR | WAR per seed |",
             "|---|---|---|---|"]
    for key, row, image, extra in ABLATION:
        scores = []
        for seed in range(args.ablation_seeds):
            if key == "d" and seed == args.seed:  # the demo's own video stage
                run = stages.video()[0]
            else:
                stage = stages.video(image, folder / f"{key}-seed{seed}", [*extra, "--seed", str(seed)])
                run_stage(f"ablation {row}, seed {seed}", stage, args.retrain == "all")
                run = stage[0]
            scores.append(best_test(run))
        wars = [s["war"] for s in scores]
        lines.append(f"| {row} | {spread([s['uar'] for s in scores])} | {spread(wars)} | "
                     f"{', '.join(f'{w:.3f}' for w in wars)} |")
    folder.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    print(f"\n{table}\nablation done in {time.perf_counter() - t0:.0f} s; table in {folder / 'table.md'}")


args = parser.parse_args()
for name, low in (("epochs", 1), ("batch_size", 1), ("accum_steps", 1), ("val_every", 1), ("stop_after_steps", 1),
                  ("image_batch_size", 1), ("views", 1), ("ablation_seeds", 1), ("procs", 1), ("workers", 0)):
    if getattr(args, name) is not None and getattr(args, name) < low:
        parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
if not 0 <= args.val_fraction < 1:
    parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
given = {a.dest: a.option_strings[0] for a in parser._actions  # the options typed, as typed (for --resume below)
         if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default}


def one_line_errors(kind, err, tb):
    """An error the user can cause (bad file, bad clip, bad checkpoint) ends as one line naming it; --debug, or any
    other exception, shows the traceback."""
    if issubclass(kind, (ValueError, data.ClipError, OSError)) and not args.debug:
        print(f"train.py: {err}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, err, tb)


sys.excepthook = one_line_errors
args.stage = args.stage or ("demo" if args.dataset == "demo" and not args.resume else "video")
if args.stage == "demo":
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.exit("train.py: the demo pipeline runs in one process; run its stages under torchrun one by one "
                 "(python train.py --help shows them)")
    unused = [option for dest, option in given.items() if dest not in DEMO_OPTIONS]
    if unused:  # the pipeline runs its stages with their own options: these would be dropped silently
        parser.error(f"{', '.join(unused)}: the demo pipeline does not take {'these' if len(unused) > 1 else 'this'}; "
                     "pass stage options with --demo-args (e.g. --demo-args '--epochs 1'), or run a stage yourself "
                     "(python train.py --help shows the stages' commands)")
    sys.exit(run_demo(args))
if args.no_mcp and args.landmark_weights:
    parser.error("--no-mcp switches the landmark view off; --landmark-weights would not be used")
if args.retrain or args.ablation or args.demo_args or args.procs:
    parser.error("--retrain, --ablation, --procs and --demo-args belong to the demo pipeline (--stage demo)")
if args.resume:  # the saved options win, except the runtime ones
    runtime = {k: getattr(args, k) for k in RUNTIME_OPTIONS}
    ckpt = safe_load(Path(args.resume) / "last.pt")
    # the run continues with the options it was started with: one typed with another value would be ignored
    saved = ckpt["args"]
    other = [f"{option} {getattr(args, dest)!r} (the run's: {saved.get(dest)!r})" for dest, option in given.items()
             if dest not in (*RUNTIME_OPTIONS, "out") and getattr(args, dest) != saved.get(dest)]
    if other:
        parser.error(f"--resume {args.resume} continues the run with its own options; given otherwise: "
                     f"{'; '.join(other)}. Start a new run (another --out) to change them")
    args = argparse.Namespace(**{**ckpt["args"], **runtime, "out": args.resume})
    if args.workers is None:  # not given again: as the run had it
        args.workers = ckpt["args"].get("workers") or 0
    for name, value in dict(val_every=1, sampling_rate=1, no_mcp=False, no_tma=False,
                            landmark_preset="mobilefacenet").items():  # runs saved before these options existed
        args.__dict__.setdefault(name, value)
else:
    ckpt = None
    demo = args.dataset in ("demo", "demo_image")
    kind = KINDS.index(("demo " if demo else "") + args.stage)
    if args.stage == "image" and args.num_frames is None:
        args.num_frames = 1  # the image model sees single frames, the demo's too
    if args.stage in S4D_STAGES:
        if args.landmark_weights or args.no_tma or args.oversample or args.sdl_start not in (None, -1):
            parser.error(f"--stage {args.stage} trains S4D, a plain ViT with MoAE: --landmark-weights, --no-tma, "
                         "--oversample (its images are always class-balanced) and --sdl-start do not apply")
        if args.dataset in data.IMAGE_DATASETS:
            parser.error(f"--stage {args.stage}: --dataset names the videos ({args.dataset} is an image dataset; "
                         "the images come from --image-dataset)")
        if args.accum_steps != 1:
            parser.error(f"--stage {args.stage} takes one modality per step: --accum-steps must be 1")
        args.no_mcp = True  # no landmark view
        if args.sampling_rate is None and args.stage == "joint" and args.dataset in ("dfew", "mafw"):
            args.sampling_rate = 4  # the release's: 4 on DFEW and MAFW, 1 on FERV39K
        args.image_dataset = args.image_dataset or ("demo_image" if demo else "affectnet7")
        args.image_share = args.image_share if args.image_share is not None else {"joint": 0.5, "mae": 1.0}[args.stage]
        # the release's mixing and layer decay fit a pre-trained ViT-B; the demo's tiny ViT, barely pre-trained,
        # learns in a few CPU minutes only without them (README, S4D)
        for name, recipe, tiny in (("mixup", 0.8, 0.0), ("cutmix", 1.0, 0.0), ("layer_decay", 0.75, 1.0)):
            if getattr(args, name) is None:
                setattr(args, name, tiny if demo else recipe)
        if args.views is not None and args.stage != "mae":
            parser.error("--views belongs to --stage mae")
        args.views = args.views or (1 if demo or args.stage != "mae" else 4)
    elif args.image_dataset or args.image_data_root or args.image_batch_size or args.image_share is not None:
        parser.error("--image-dataset, --image-data-root, --image-batch-size and --image-share belong to --stage "
                     "joint / mae")
    warmup_given = args.warmup_epochs is not None
    for name, by_kind in RUN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, by_kind[kind])
    if args.stage == "mae" and not demo and not warmup_given:
        args.warmup_epochs = 0.05 * args.epochs  # the release's 5 % warm-up
    if args.stage in S4D_STAGES and not args.model.startswith("s4d"):
        parser.error(f"--stage {args.stage} trains S4D: --model s4d_base or s4d_tiny, not {args.model}")
    if args.stage not in S4D_STAGES and args.model.startswith("s4d"):
        parser.error(f"--model {args.model} is S4D: train it with --stage joint or mae")
    args.data_root = args.data_root or data.DEFAULT_ROOTS[args.dataset]
    if args.stage in S4D_STAGES:
        # joint: twice the clips (the release's 32 and 16); mae: as many images as clip views (192 = 48 x 4)
        args.image_batch_size = args.image_batch_size or (args.views if args.stage == "mae" else 2) * args.batch_size
        args.image_data_root = args.image_data_root or (args.data_root if demo else
                                                        data.DEFAULT_ROOTS[args.image_dataset])
    if not demo:  # a real dataset: the files it starts from, found now
        args.init = args.init or WEIGHTS[args.stage]
        args.landmark_weights = args.landmark_weights or (None if args.no_mcp else WEIGHTS["landmarks"])
    args.init = None if args.init == "none" else args.init
    args.landmark_weights = None if args.landmark_weights == "none" else args.landmark_weights
    fold = f"-fold{args.fold}" if args.dataset in FOLDED else ""
    args.out = args.out or f"runs/{args.dataset}{fold}-{args.stage}"

# ----------------------------------------------------------------------------- processes and devices
ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
if use_cuda:
    torch.cuda.set_device(device)
if ddp:
    dist.init_process_group("nccl" if use_cuda else "gloo")
master = rank == 0
log = print if master else (lambda *a, **k: None)
auto = "fp16" if args.stage == "mae" else "bf16"  # S4D's pre-training: the release's fp16, with a gradient scaler
precision = (auto if use_cuda else "fp32") if args.precision == "auto" else args.precision
if precision != "fp32" and not use_cuda:
    parser.error(f"--precision {precision} needs CUDA; on CPU training runs in fp32")
amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
out = Path(args.out)
existing = next(p for p in (out, *out.parents) if p.exists())  # --out is made only later: check it can be, now
if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    parser.error(f"--out {out}: cannot create or write it ({existing} is "
                 f"{'not a folder' if not existing.is_dir() else 'not writable'})")
if not args.resume and any((out / name).exists() for name in ("last.pt", "best.pt", "results.json")):
    parser.error(f"{out} holds a run: continue it with --resume {out}, or choose another --out (the demo "
                 "pipeline's --retrain redoes its stages)")

# ----------------------------------------------------------------------------- data
root = Path(args.data_root)
if args.dataset == "demo" and not (root / "train.csv").exists():
    if master:
        log(f"making the demo dataset in {root}")
        t_make = time.perf_counter()
        data.make_demo(root)
        log(f"made the demo dataset in {time.perf_counter() - t_make:.0f} s")
    if ddp:
        dist.barrier()
files = data.dataset_files(args.dataset, root, fold=args.fold)
files = data.DatasetFiles(args.train_split or files.train, args.test_split or files.test,
                          args.media_root or files.media_root)
s4d_stage = args.stage in S4D_STAGES
if s4d_stage:  # S4D also trains on still images: their train split, and for the joint stage their test split
    image_root = Path(args.image_data_root)
    image_files = data.dataset_files(args.image_dataset, image_root)
if not args.resume:  # everything the run reads, checked before it reads anything: one message for all of it
    missing = [data.layout_problem(args.dataset, root, files)]
    if s4d_stage:
        needed = ("train", "test") if args.stage == "joint" else ("train",)
        missing.append(data.layout_problem(args.image_dataset, image_root, image_files, needed=needed))
    starts = [("init", args.init, WHERE[args.stage]), ("landmark-weights", args.landmark_weights, WHERE["landmarks"])]
    missing += [f"--{option} {path}: no such file" + (f"; get {where}" if path in WEIGHTS.values() else "")
                for option, path, where in starts if path and not Path(path).is_file()]
    missing = [m for m in missing if m]
    if missing:
        hint = ("\n(to train without them, ask for it: --init none, --landmark-weights none)"
                if any(m.startswith("--") for m in missing) else "")
        sys.exit("train.py: cannot start:\n" + "\n".join(missing) + hint if master else 1)
classes = data.CLASSES[args.dataset]
train_all = data.read_split(args.dataset, files.train, one_based=args.one_based)
test_samples = data.read_split(args.dataset, files.test, one_based=args.one_based)
checks = [(files.train, train_all, files.media_root), (files.test, test_samples, files.media_root)]
if s4d_stage:
    image_classes = data.CLASSES[args.image_dataset]
    image_train = data.read_split(args.image_dataset, image_files.train)
    image_test = data.read_split(args.image_dataset, image_files.test) if args.stage == "joint" else []
    checks += [(image_files.train, image_train, image_files.media_root)]
    checks += [(image_files.test, image_test, image_files.media_root)] if image_test else []
for warning in data.split_warnings([(files.train, train_all), (files.test, test_samples)]) + (
        data.split_warnings([(image_files.train, image_train), (image_files.test, image_test)]) if s4d_stage else []):
    log(f"warning: {warning}")
if args.stage == "mae":
    args.val_fraction = 0.0  # pre-training selects nothing: every clip trains
for split, samples, media_root in checks:  # found now, not after training
    problems = [p for _, p in data.header_problems(samples[rank::world], media_root)]  # each rank a share
    if ddp:
        shares = [None] * world
        dist.all_gather_object(shares, problems)
        problems = [p for share in shares for p in share]
    if problems:
        first = "; ".join(problems[:3])
        sys.exit(f"train.py: {len(problems)} of the {len(samples)} clips of {split} cannot be read: {first}. Fix the "
                 f"list or the data (python data.py check --dataset {args.dataset} --root {root} decodes every clip)"
                 if master else 1)  # every rank stops; one says why


same_clip = (lambda s: s.path.rsplit("/", 1)[0]) if args.dataset == "demo_image" else (lambda s: s.path)
train_samples, val_samples = data.split_validation(train_all, args.val_fraction, args.seed, same_clip)

# ----------------------------------------------------------------------------- model, landmark view, SDL anchors
torch.manual_seed(args.seed)  # the same initial model and anchors on every rank
image_stage = args.stage == "image"
landmark_net = None  # frozen, eval mode, no grad; none without MCP
if not args.no_mcp:
    landmark_net = landmarks.LandmarkFeatures(args.landmark_weights, args.landmark_preset).to(device)
if s4d_stage:  # S4D: its classifier (joint) or its masked autoencoder (mae); everything trains
    routing = dict(router_noise=args.routing == "release", capacity=2.0 if args.routing == "release" else 0.0)
    model = build_model(args.model, len(classes), args.num_frames, pretrain=args.stage == "mae",
                        image_classes=len(image_classes), **routing)
else:
    model = build_model(args.model, len(classes), args.num_frames, image_model=image_stage or args.no_tma,
                        kernels=args.kernels, mcp=not args.no_mcp,
                        landmark_channels=landmark_net.feature_width if landmark_net is not None else 128)
scope = "image" if image_stage else ("video" if args.init and not s4d_stage else "all")
if args.init and not args.resume:
    init = safe_load(args.init)
    init_classes = init.get("classes") if isinstance(init, dict) else None  # recorded by train.py
    if init_classes is not None and list(init_classes) != list(classes):
        video_init = any(k.startswith(("tma.", "temporal_embed", "head.video.")) for k in init.get("model", {}))
        if video_init and not args.allow_other_classes:  # a fine-tuned DFER model of other classes
            sys.exit(f"train.py: --init {args.init} was trained on the classes {list(init_classes)}, but "
                     f"--dataset {args.dataset} has {list(classes)}; --allow-other-classes fine-tunes it anyway "
                     "(its classifier starts afresh)")
        drop = "head.video." if s4d_stage else "head."  # S4D's image head keeps its own classes
        init = {**init, "model": {k: v for k, v in init["model"].items() if not k.startswith(drop)}}
        log(f"--init {args.init}: its classes {list(init_classes)} are not --dataset {args.dataset}'s "
            f"{list(classes)}, so its classifier is not loaded: the head starts afresh")
    report = load_checkpoint(model, init, verbose=False, source=args.init)
    log(report)
    del init
    # what this stage cannot start without: the video stage freezes everything but its set, so all of that must
    # come from the checkpoint; the image stage fine-tunes the ViT, which must come from it
    backbone = ("patch_embed.", "cls_token", "pos_embed", "blocks.")
    needed = [n for n, _ in model.named_parameters()
              if (not n.startswith(VIDEO_STAGE) if scope == "video" else n.startswith(backbone))]
    if s4d_stage:  # S4D fine-tuning needs the pre-trained encoder (its MoAE starts fresh); pre-training all of it
        needed = [n for n, _ in model.named_parameters() if args.stage == "mae" or
                  (n.startswith(("patch_embed.", "blocks.")) and ".moae." not in n)]
    loaded = set(report.loaded)
    absent = [n for n in needed if n not in loaded]
    if absent and not args.allow_partial_init:
        shapes = {n: (a, b) for n, a, b in report.mismatched}
        why = [f"shape mismatch {n}: checkpoint {tuple(shapes[n][0])}, model {tuple(shapes[n][1])}"
               if n in shapes else f"{n} not in the checkpoint" for n in absent[:3]]
        why = "; ".join(why)
        sys.exit(f"train.py: --init {args.init} does not fit the {args.model} {args.stage} model: {len(absent)} of "
                 f"the {len(needed)} tensors this stage {'freezes' if scope == 'video' else 'fine-tunes'} were not "
                 f"loaded ({len(report.loaded)} loaded, {len(report.mismatched)} shape mismatches, "
                 f"{len(report.unexpected)} unexpected); first: {why}. Check --init and --model; "
                 "--allow-partial-init starts anyway")
n_trainable, n_total = set_trainable(model, scope)
model.to(device)
anchors = EmotionAnchors(len(classes), model.cfg.width, init="empty" if args.sdl_refresh == "step" else "random")
anchors.to(device)
raw_model = model
if ddp:  # S2D: every trainable parameter gets a gradient, so no unused-parameter search. S4D: a step uses one
    # head, and an expert may get no token
    model = DDP(model, device_ids=[local_rank] if use_cuda else None, find_unused_parameters=s4d_stage)
torch.manual_seed(args.seed + rank)  # from here on, anything random differs per rank
random.seed(args.seed + rank)
np.random.seed(args.seed + rank)

common = dict(num_frames=args.num_frames, sampling_rate=args.sampling_rate, image_size=raw_model.cfg.img_size,
              seed=args.seed)
views = data.eval_views(args.dataset)  # 2 temporal x 2 spatial views of a video (as released), as eval.py
augment = {"paper": True, "light": data.Augment(randaugment=False, erase_p=0.0), "none": False,
           "flip": data.Augment(resized_crop=False, randaugment=False, erase_p=0.0)}[args.augment]
image_augment = augment
if s4d_stage and args.augment == "paper":  # S4D's release: its own crops and RandAugment per modality
    augment = data.Augment(scale=(0.08, 1.0))  # videos: random resized crop 0.08-1, flip, RA m7 n4, erasing 0.25
    # images: resize to 192 and a random 160 crop (a random square of (160/192)^2 of the face, resized), flip,
    # RandAugment m9 (2 ops, timm's default), erasing 0.25
    image_augment = data.Augment(scale=((160 / 192) ** 2,) * 2, ratio=(1.0, 1.0), ra_ops=2, ra_magnitude=9.0)
if args.stage == "mae" and args.augment == "light":  # S4D's pre-training: random resized crop 0.2-1 and flip
    augment = image_augment = data.Augment(scale=(0.2, 1.0), randaugment=False, erase_p=0.0)
views_per_clip = getattr(args, "views", None) or 1  # S4D's pre-training: several views of each clip per batch
train_ds = data.ClipDataset(train_samples, files.media_root, mode="train", augment=augment, train_views=views_per_clip,
                            **common)
val_ds = data.ClipDataset(val_samples, files.media_root, mode="eval", augment=False, **common, **views)
test_ds = data.ClipDataset(test_samples, files.media_root, mode="eval", augment=False, **common, **views)
if args.oversample:
    sampler = data.ClassBalancedSampler([s.label for s in train_samples], num_replicas=world, rank=rank, seed=args.seed)
else:
    sampler = DistributedSampler(train_samples, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)  # over the clips (a clip's views go into one batch together)
per_step = args.batch_size * args.accum_steps  # clips per process and optimizer step
video_steps = steps_per_epoch = len(sampler) // per_step
if steps_per_epoch == 0:
    sys.exit(f"train.py: {len(train_samples)} training clips give {len(sampler)} per process, fewer than "
             f"batch-size x accum-steps = {per_step}; lower --batch-size")
if s4d_stage:  # the images: class-balanced with replacement for fine-tuning (always), shuffled for pre-training
    image_common = dict(common, num_frames=1, sampling_rate=1)
    image_ds = data.ClipDataset(image_train, image_files.media_root, mode="train", augment=image_augment,
                                **image_common)
    image_test_ds = data.ClipDataset(image_test, image_files.media_root, mode="eval", augment=False, **image_common,
                                     **data.eval_views(args.image_dataset))
    if args.stage == "joint":
        image_sampler = data.ClassBalancedSampler([s.label for s in image_train], num_replicas=world, rank=rank,
                                                  seed=args.seed)
    else:
        image_sampler = DistributedSampler(image_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                           drop_last=True)
    schedule = data.JointSchedule(video_steps, len(image_sampler) // args.image_batch_size, args.image_share,
                                  args.seed)
    steps_per_epoch = len(schedule)
    mixers = {m: MixCut(len(names), args.mixup, args.cutmix, smoothing=args.smoothing)
              for m, names in (("video", classes), ("image", image_classes))}


def epoch_loader(epoch, skip_steps, dataset=None, order_of=None, batch_size=None, steps=None):
    """This epoch's batches after the first skip_steps optimizer steps; order and augmentation come from seed+epoch.
    The training clips by default; S4D's images with their own dataset, sampler, batch size and step count."""
    dataset, order_of = dataset or train_ds, order_of or sampler
    batch_size, steps = batch_size or args.batch_size, video_steps if steps is None else steps
    order_of.set_epoch(epoch)
    dataset.set_epoch(epoch)
    order = list(order_of)[skip_steps * batch_size * args.accum_steps: steps * batch_size * args.accum_steps]
    views = dataset.train_views  # 1, or S4D pre-training's views of each clip, side by side
    order = [k * views + v for k in order for v in range(views)]
    return data.batches(dataset, batch_size=batch_size * views, sampler=order, num_workers=args.workers,
                        pin_memory=use_cuda, generator=torch.Generator().manual_seed(args.seed + epoch))


def epoch_batches(epoch, skip_steps):
    """(modality, batch) for this epoch's steps after the first skip_steps: S2D's are all video batches; S4D's
    come from its video and image loaders in the schedule's order, each loader resuming where the epoch left it."""
    if not s4d_stage:
        yield from (("video", batch) for batch in epoch_loader(epoch, skip_steps))
        return
    order, done = schedule.order(epoch), schedule.counts_before(epoch, skip_steps)
    loaders = {"video": iter(epoch_loader(epoch, done["video"], steps=schedule.steps["video"])),
               "image": iter(epoch_loader(epoch, done["image"], image_ds, image_sampler, args.image_batch_size,
                                          schedule.steps["image"]))}
    for modality in order[skip_steps:]:
        yield modality, next(loaders[modality])


def s4d_losses(modality, batch, epoch, step_in_epoch):
    """One S4D step's loss and its parts (CE or reconstruction, balance), for a batch of one modality. Its random
    draws (mixing, masks) come from seed, epoch, step and rank, so a resumed run draws the same."""
    x = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S); images (B, 3, 1, S, S)
    if modality == "image":
        x = x[:, :, 0]  # an image batch is 4-D: the image head, one tubelet
    seed = [args.seed, epoch, step_in_epoch, rank]
    if args.stage == "mae":
        cfg = raw_model.cfg
        tokens = cfg.grid**2 * (1 if modality == "image" else cfg.num_frames // cfg.tubelet)
        ratio = args.image_mask if modality == "image" else args.video_mask
        mask = random_mask(len(x), tokens, ratio, torch.Generator().manual_seed(int(np.random.SeedSequence(seed)
                                                                                   .generate_state(1)[0]))).to(device)
        with autocast():
            pred = model(x, mask)  # (B, hidden, tubelet*p*p*3)
        loss = mae_loss(pred.float(), mae_target(x, cfg.patch_size, cfg.tubelet), mask)
        return loss, loss.detach(), torch.zeros((), device=device)
    x, target = mixers[modality](x, batch["label"].to(device, non_blocking=True), np.random.default_rng(seed))
    with autocast():
        logits, _ = model(x)
    ce = soft_target_ce(logits.float(), target)
    balance = raw_model.balance_loss.float()  # the MoAE balance loss of this forward, weighted (1e-3)
    return ce + balance, ce.detach(), balance.detach()


# ----------------------------------------------------------------------------- optimizer and schedule
total_batch = per_step * world * views_per_clip  # S4D's pre-training counts every view of a clip
lr = args.blr * total_batch / 8
if args.min_lr is None:
    args.min_lr = 1e-6 * total_batch / 256 if args.stage == "joint" else 0.0  # S4D's: 1e-6 x total batch / 256
groups = {}  # (lr scale, weight decay) -> parameters
for name, p in raw_model.named_parameters():
    if p.requires_grad:
        scale = layer_scale(name, raw_model.cfg.depth, args.layer_decay) if args.stage == "joint" else 1.0
        groups.setdefault((scale, 0.0 if no_weight_decay(name, p) else args.weight_decay), []).append(p)
optimizer = torch.optim.AdamW([{"params": ps, "weight_decay": wd, "lr": lr * scale}
                               for (scale, wd), ps in sorted(groups.items(), key=lambda g: (-g[0][0], -g[0][1]))],
                              lr=lr, betas=(0.9, 0.95 if args.stage == "mae" else 0.999), eps=1e-8, fused=use_cuda)
warmup_steps, total_steps = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch


def lr_factor(step):
    """Linear warm-up, then cosine decay to min-lr; per optimizer step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return args.min_lr / lr + (1 - args.min_lr / lr) * 0.5 * (1 + math.cos(math.pi * t))


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

log(json.dumps(vars(args), indent=2))
views_note = f" x {views_per_clip} views" if views_per_clip > 1 else ""
log(f"{world} process(es) on {device}, {precision}; effective batch = {args.batch_size} x {args.accum_steps} accum x "
    f"{world}{views_note} = {total_batch}; lr = {args.blr:g} x {total_batch} / 8 = {lr:g}; {steps_per_epoch} steps "
    "per epoch")
log(f"data: {len(train_samples)} train / {len(val_samples)} validation / {len(test_samples)} test clips, "
    f"{len(classes)} classes")
if s4d_stage:
    log(f"S4D {args.stage}: every epoch takes {schedule.steps['video']} video batches of {args.batch_size}"
        f"{f' clips x {views_per_clip} views' if views_per_clip > 1 else ''} and "
        f"{schedule.steps['image']} image batches of {args.image_batch_size} ({args.image_dataset}, "
        f"{'class-balanced' if args.stage == 'joint' else 'shuffled'}), in a seeded order; the whole model trains")
elif scope == "all":
    log("no --init: the whole model trains (there is no image-stage model to keep frozen)")
log(f"{args.model} {args.stage} model ({scope} set trains): {n_trainable:,} trainable of {n_total:,} parameters")

# ----------------------------------------------------------------------------- checkpoints and resume


def rng_state():
    state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if use_cuda else None,
            "python": random.getstate(), "numpy": [state[0], state[1].tolist(), *state[2:]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if use_cuda and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))


def save_checkpoint(names, epoch, step_in_epoch):
    """Rank 0 writes the full state to each of names, atomically; (epoch, step_in_epoch) is where to go on."""
    rngs = [None] * world
    if ddp:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs[0] = rng_state()
    if not master:
        return
    state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 scaler=scaler.state_dict(), anchors=anchors.state_dict(), epoch=epoch, step_in_epoch=step_in_epoch,
                 step=step, meter=meter, best=best, pending=pending, rng=rngs, config=dataclasses.asdict(raw_model.cfg),
                 args=vars(args), classes=list(classes), world_size=world)
    first = out / f"{names[0]}.tmp"
    try:
        torch.save(state, first)  # serialised once; further names get a copy of the file
        for name in names[1:]:
            shutil.copyfile(first, out / f"{name}.tmp")
            os.replace(out / f"{name}.tmp", out / name)
        os.replace(first, out / names[0])
    except (OSError, RuntimeError) as err:  # a full disk: torch.save raises RuntimeError, the copy OSError
        for name in names:
            (out / f"{name}.tmp").unlink(missing_ok=True)
        kept = ", ".join(str(out / n) for n in names if (out / n).exists()) or "no checkpoint"
        sys.exit(f"train.py: could not write {first.with_suffix('')} ({type(err).__name__}: "
                 f"{str(err).splitlines()[0] if str(err) else 'no message'}); the temporary file is removed and "
                 f"{kept} is as it was. Free space, then continue with: python train.py --resume {out}")


def new_meter():  # S4D also keeps its loss per modality: video_loss / video_steps, image_loss / image_steps
    return dict(loss=0.0, ce=0.0, bce=0.0, steps=0, clips=0, replaced=0, seconds=0.0, lr=0.0, video_loss=0.0,
                video_steps=0, image_loss=0.0, image_steps=0)


start_epoch, skip, step, meter, best = 0, 0, 0, new_meter(), dict(score=-1.0, epoch=-1)
pending = None  # a trained epoch's meter until its validation, log line and second save are done (see end_epoch)
if ckpt is not None:
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    anchors.load_state_dict(ckpt["anchors"])
    start_epoch, skip, step, meter, best = (ckpt[k] for k in ("epoch", "step_in_epoch", "step", "meter", "best"))
    pending = ckpt.get("pending")  # the run ended in validation: it is done first, then training goes on
    if ckpt["world_size"] != world:
        log(f"warning: the run used {ckpt['world_size']} processes, now {world}: the sampling order changes")
    set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])
    log(f"resumed {out} at epoch {start_epoch}, step {skip} of {steps_per_epoch}")
    del ckpt
frozen = {n: p.detach().clone() for n, p in raw_model.named_parameters() if not p.requires_grad}  # checked at the end
if master:
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        config = dict(args=vars(args), model=dataclasses.asdict(raw_model.cfg), classes=list(classes),
                      world_size=world, total_batch=total_batch, lr=lr, steps_per_epoch=steps_per_epoch)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    # an epoch that did not reach its checkpoint is redone, and one whose validation did not end is validated
    # again: drop their log lines
    old = (out / "log.jsonl").read_text().splitlines() if args.resume and (out / "log.jsonl").exists() else []
    keep = start_epoch - (pending is not None)
    (out / "log.jsonl").write_text("".join(f"{r}\n" for r in old if json.loads(r)["epoch"] < keep))

stop_signal = None


def request_stop(signum, _frame):
    global stop_signal
    stop_signal = signum


signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)


def sdl_weight(epoch_float):
    """lambda of Eq. (21) at a fractional epoch; 0 without SDL."""
    if args.sdl_start < 0:
        return 0.0
    return lambda_at(epoch_float, args.lambda_schedule, args.sdl_start, args.sdl_ramp, args.epochs)


def stop_requested():
    """Whether any rank got SIGTERM / SIGINT (or reached --stop-after-steps); all ranks agree."""
    flag = torch.tensor(float(stop_signal is not None or step == args.stop_after_steps), device=device)
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def finish(code, message):
    log(message, file=sys.stderr if code else sys.stdout)
    if ddp:
        global model
        model = raw_model  # free DDP's reducer, which holds the process group, while Python still runs: freed at
        gc.collect()  # interpreter exit, gloo's threads can abort the process ("terminate called ...")
        dist.barrier()  # leave together: a rank that tears gloo down while a peer still talks to it aborts
        dist.destroy_process_group()
    sys.exit(code)


def end_epoch(epoch):
    """After epoch's training (its meter in `pending`, last.pt saved): validation, the log line, best.pt, and
    last.pt again. A run that ends in here (a crash, kill -9) does it again on --resume, from that first last.pt."""
    global best, pending
    done = pending
    validate = val_samples and ((epoch + 1) % args.val_every == 0 or epoch == args.epochs - 1)
    val = evaluate(raw_model, landmark_net, val_ds, args.batch_size, device, workers=args.workers,
                   amp=precision == "bf16") if validate else None
    n = max(1, done["steps"])
    record = dict(epoch=epoch, step=step, lr=done["lr"], loss=done["loss"] / n, ce=done["ce"] / n,
                  bce=done["bce"] / n, sdl_lambda=sdl_weight(epoch + 1 - 1 / steps_per_epoch),
                  replaced=done["replaced"], clips_per_s=done["clips"] / max(done["seconds"], 1e-9),
                  seconds=done["seconds"])
    if s4d_stage:  # the loss per modality (CE, or the reconstruction error), and the MoAE balance loss
        del record["ce"], record["bce"], record["sdl_lambda"]
        record.update({f"{m}_loss": done[f"{m}_loss"] / max(1, done[f"{m}_steps"]) for m in ("video", "image")})
        if args.stage == "joint":
            record["balance"] = done["bce"] / n
    if val is not None:
        record.update(val_uar=val["uar"], val_war=val["war"])
    log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in record.items() if k != "epoch"))
    if master:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    names = ["last.pt"]
    if val is not None and val[args.select] >= best["score"]:  # a tie goes to the later, longer-trained epoch
        best = dict(score=val[args.select], epoch=epoch)
        names.append("best.pt")
    pending = None
    save_checkpoint(names, epoch + 1, 0)  # again after validation: the new best, and the RNG as validation left it
    if stop_requested():
        finish(0, f"stopped by {signal.Signals(stop_signal).name if stop_signal else '--stop-after-steps'} after "
                  f"epoch {epoch}; {out / 'last.pt'} saved; continue with: python train.py --resume {out}")


if pending is not None:  # resumed in the middle of end_epoch
    end_epoch(start_epoch - 1)

# ----------------------------------------------------------------------------- training
for epoch in range(start_epoch, args.epochs):
    model.train()
    bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}", dynamic_ncols=True,
               disable=not master or not sys.stderr.isatty())  # in a log file: only the line per epoch below
    sums = torch.zeros(4, device=device)  # this optimizer step's loss, ce, bce (means), replaced clips (a count)
    t0 = time.perf_counter()
    for micro, (modality, batch) in enumerate(epoch_batches(epoch, skip)):
        step_in_epoch, last_micro = skip + micro // args.accum_steps, (micro + 1) % args.accum_steps == 0
        if s4d_stage:  # S4D: one modality per step; ce is its CE or reconstruction loss, bce its balance loss
            loss, ce, bce = s4d_losses(modality, batch, epoch, step_in_epoch)
            scaler.scale(loss).backward()
        else:
            video = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S)
            labels = batch["label"].to(device, non_blocking=True)  # (B,)
            lam = sdl_weight(epoch + step_in_epoch / steps_per_epoch)
            with model.no_sync() if ddp and not last_micro else nullcontext():
                with autocast():
                    lm_feats = landmark_net(video) if landmark_net is not None else None  # (B, T, C, 14, 14)
                    logits, features = model(video, lm_feats)  # (B, classes), (B, C)
                soft = anchors.soft_labels(features) if lam > 0 else None  # Eq. (16)-(18), queues as they are
                loss, ce, bce = sdl_loss(logits, labels, soft, lam)
                scaler.scale(loss / args.accum_steps).backward()
            if args.sdl_refresh == "step":  # the paper: newest in, oldest out, every step; identical on all ranks
                anchors.enqueue(features.detach(), logits.detach().float().softmax(-1), labels)
        sums += torch.stack([loss.detach() / args.accum_steps, ce / args.accum_steps, bce / args.accum_steps,
                             batch["replaced"].sum().float().to(device)])
        if not last_micro:
            continue
        if ddp:  # one all-reduce: the means over ranks, the replaced count over ranks
            dist.all_reduce(sums)
            sums[:3] /= world
        if not torch.isfinite(sums).all():
            kept = (f"{out / 'last.pt'} is the last good checkpoint" if (out / "last.pt").exists() else
                    "no checkpoint was saved before it")
            finish(1, f"train.py: non-finite loss {sums[0].item()} at epoch {epoch}, step {step_in_epoch} (global "
                      f"step {step}); stopped without saving, {kept}")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_value, ce_value, bce_value, replaced = sums.tolist()
        sums.zero_()
        clips = (args.image_batch_size if modality == "image" else per_step) * world
        meter.update(loss=meter["loss"] + loss_value, ce=meter["ce"] + ce_value, bce=meter["bce"] + bce_value,
                     steps=meter["steps"] + 1, clips=meter["clips"] + clips, lr=scheduler.get_last_lr()[0],
                     replaced=meter["replaced"] + int(replaced))
        meter[f"{modality}_loss"] += ce_value
        meter[f"{modality}_steps"] += 1
        scheduler.step()
        step += 1
        elapsed = meter["seconds"] + time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{meter['lr']:.2e}",
                        clips_s=f"{meter['clips'] / elapsed:.1f}")
        bar.update()
        if stop_requested():
            meter["seconds"] = elapsed
            save_checkpoint(["last.pt"], epoch, step_in_epoch + 1)
            bar.close()
            why = signal.Signals(stop_signal).name if stop_signal else f"--stop-after-steps {args.stop_after_steps}"
            finish(0, f"stopped by {why} at epoch {epoch}, step {step_in_epoch + 1} of {steps_per_epoch}; "
                      f"{out / 'last.pt'} saved; continue with: python train.py --resume {out}")
    bar.close()
    meter["seconds"] += time.perf_counter() - t0
    pending, skip, meter = meter, 0, new_meter()
    save_checkpoint(["last.pt"], epoch + 1, 0)  # before validation: a clip that fails there costs no training
    end_epoch(epoch)


# ----------------------------------------------------------------------------- what was frozen stayed frozen
changed = [n for n, p in raw_model.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])]
if changed:
    finish(1, f"train.py: {len(changed)} frozen tensors changed during training, first {changed[:3]}")
log(f"frozen check: the {len(frozen)} frozen tensors ({sum(p.numel() for p in frozen.values()):,} parameters) are "
    "bit-identical to where training started" if frozen else "frozen check: nothing was frozen")
del frozen

# ----------------------------------------------------------------------------- test: last epoch and best on validation
if args.stage == "mae":  # pre-training has no test: its result is the reconstruction error it reached
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1]) if master else {}
    if master:
        (out / "results.json").write_text(json.dumps({"last": last}, indent=2))
    finish(0, f"done: {out}; last epoch's reconstruction loss: video {last.get('video_loss', float('nan')):.4f}, "
              f"image {last.get('image_loss', float('nan')):.4f}; fine-tune it: --stage joint --init {out}/last.pt")
results = {}
for tag in ("last", "best"):
    epoch_of = args.epochs - 1 if tag == "last" else best["epoch"]
    if tag == "best":
        if best["epoch"] < 0:
            break
        if epoch_of == args.epochs - 1:  # the model in memory already: neither reload nor test it again
            log(f"\ntest, best checkpoint (epoch {epoch_of}): the last epoch's model, as above")
            results["best"] = results["last"]
            break
        if ddp:
            dist.barrier()  # rank 0 has written best.pt
        raw_model.load_state_dict(safe_load(out / "best.pt")["model"])
    test = evaluate(raw_model, landmark_net, test_ds, args.batch_size, device, workers=args.workers,
                    amp=precision == "bf16")
    results[tag] = dict(epoch=epoch_of, **{k: test[k] for k in ("uar", "war", "recall", "macro_f1", "confusion")})
    log(f"\ntest, {tag} checkpoint (epoch {epoch_of}): UAR {test['uar']:.4f}  WAR {test['war']:.4f}")
    log(format_report(test, classes))
    if s4d_stage:  # S4D's other task: the image test list, through the image head
        images = evaluate(raw_model, None, image_test_ds, args.image_batch_size, device, workers=args.workers,
                          amp=precision == "bf16")
        results[tag]["image"] = {k: images[k] for k in ("uar", "war", "recall", "macro_f1", "confusion")}
        log(f"test images ({args.image_dataset}), {tag} checkpoint: UAR {images['uar']:.4f}  WAR {images['war']:.4f}")
if master:
    (out / "results.json").write_text(json.dumps(results, indent=2))
final = results.get("best", results["last"])
finish(0, f"done: {out}; held-out test (best on validation, epoch {final['epoch']}): "
          f"UAR {final['uar']:.4f}  WAR {final['war']:.4f}")
