"""The demo pipeline (`python train.py`) at tiny sizes: the three stages wire together, finished stages are reused,
a missing or --retrain'ed one is redone with what depends on it, the frozen set stays bit-identical, and the ablation
rows build the model variants they name. No speed and no accuracy is asserted: README's figures come from the
documented commands."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
from model import build_model, load_checkpoint, no_weight_decay, safe_load, set_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# the image and video stages at a few steps each: 28 train clips (7 held out), batch 4, 4 frames
QUICK = "--epochs 1 --batch-size 4 --num-frames 4 --val-fraction 0.25 --blr 1e-3"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return data.make_demo(tmp_path_factory.mktemp("demo") / "demo", num_clips=35, workers=1)


def pipeline(demo, runs, *extra):
    cmd = [sys.executable, TRAIN, "--data-root", str(demo), "--out", str(runs), "--demo-args", QUICK, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def ran(stdout):
    """Which stages ran (not reused) in a pipeline run, from its '== stage k/3, <name> ...: done' lines."""
    return [name for name in ("landmark view", "image stage", "video stage")
            if any(line.startswith("== stage") and name in line and line.endswith("s") and ": done in" in line
                   for line in stdout.splitlines())]


@pytest.fixture(scope="module")
def first_run(demo, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return runs, pipeline(demo, runs, "--procs", "2")  # what `python train.py` does on a 2-core machine


def test_stages_wire_together(first_run):
    runs, stdout = first_run
    assert ran(stdout) == ["landmark view", "image stage", "video stage"]
    weights = runs / "demo-landmarks" / "landmarks.pt"
    lm = safe_load(weights)
    assert lm["preset"] == "mobilefacenet_tiny" and lm["nme"] == json.loads(
        (runs / "demo-landmarks" / "results.json").read_text())["nme"]
    image = json.loads((runs / "demo-image" / "config.json").read_text())
    assert image["args"]["landmark_weights"] == str(weights) and image["args"]["stage"] == "image"
    assert image["model"]["mcp"] and not image["model"]["video"]
    assert image["world_size"] == 2 and image["total_batch"] == 8 and image["args"]["workers"] == 0
    launch = "OMP_NUM_THREADS=1 " + sys.executable + " -m torch.distributed.run --standalone --nproc_per_node=2 "
    commands = [line.strip() for line in stdout.splitlines() if line.strip().startswith(launch)]
    # per process: half the demo's total batches (image 16, video 8); QUICK then sets 4 for the test's speed
    assert [c.split(TRAIN, 1)[1].split()[:4] for c in commands] == [["--batch-size", "8", "--workers", "0"],
                                                                   ["--batch-size", "4", "--workers", "0"]]
    assert image["model"]["landmark_channels"] == lm["config"]["feature_width"] == 32
    video = json.loads((runs / "demo-video" / "config.json").read_text())
    assert video["world_size"] == 2
    assert video["args"]["init"] == str(runs / "demo-image" / "best.pt") and video["model"]["video"]
    assert video["args"]["landmark_weights"] == str(weights)
    assert "frozen check: the" in stdout and "bit-identical" in stdout
    assert "UNTRAINED" not in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("video stage, held-out test") and "UAR" in last and "WAR" in last
    for name in ("landmarks.png", "gate.png", "confusion.png"):
        assert (runs / "demo-video" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_second_run_reuses_every_finished_stage(demo, first_run):
    runs, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.pt")}
    stdout = pipeline(demo, runs)
    assert ran(stdout) == [] and stdout.count("reused") == 3
    assert before == {p: p.stat().st_mtime_ns for p in runs.rglob("*.pt")}


def test_a_missing_stage_is_redone_and_retrain_redoes_what_follows(demo, first_run):
    runs, _ = first_run
    (runs / "demo-video" / "results.json").unlink()  # as if the video stage had been stopped half way
    assert ran(pipeline(demo, runs)) == ["video stage"]
    assert ran(pipeline(demo, runs, "--retrain", "image")) == ["image stage", "video stage"]


def test_procs_that_cannot_share_the_batch_are_refused(demo, tmp_path):
    cmd = [sys.executable, TRAIN, "--data-root", str(demo), "--out", str(tmp_path), "--procs", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 1
    assert "--procs 3: the demo's total batches (16 image, 8 video) need 1, 2, 4 or 8" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_video_stage_keeps_the_frozen_set_bit_identical(tmp_path):
    image = build_model("s2d_tiny", 7, 1, image_model=True, landmark_channels=32)
    torch.save({"model": image.state_dict()}, tmp_path / "image.pt")
    video = build_model("s2d_tiny", 7, 4, landmark_channels=32)
    load_checkpoint(video, tmp_path / "image.pt", verbose=False)
    set_trainable(video, "video")
    before = {n: p.detach().clone() for n, p in video.named_parameters()}
    params = [p for p in video.parameters() if p.requires_grad]
    groups = [[p for n, p in video.named_parameters() if p.requires_grad and no_weight_decay(n, p) == decay]
              for decay in (0, 1)]
    optimizer = torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.05}, {"params": groups[1]}], lr=1e-2)
    logits, _ = video(torch.randn(2, 3, 4, 112, 112), torch.randn(2, 4, 32, 14, 14))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    optimizer.step()
    frozen = {n for n, p in video.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.")) for n in frozen)
    assert all(torch.equal(before[n], p) for n, p in video.named_parameters() if n in frozen)
    assert sum(not torch.equal(before[n], p) for n, p in video.named_parameters() if p.requires_grad) == len(params)


@pytest.mark.parametrize("flags, video, mcp, trains", [
    (["--no-mcp", "--no-tma"], False, False, {"norm", "head"}),  # (a) the image model on frames, averaged over time
    (["--no-mcp"], True, False, {"norm", "head", "tma", "prompt_norms", "temporal_embed"}),  # (b) + TMA
    ([], True, True, {"norm", "head", "tma", "prompt_norms", "temporal_embed", "mcp", "landmark_embed"}),  # (c), (d)
])
def test_ablation_rows_build_their_model_variants(demo, tmp_path, flags, video, mcp, trains):
    init = build_model("s2d_tiny", 7, 1, image_model=True, mcp=mcp, landmark_channels=32)
    torch.save({"model": init.state_dict()}, tmp_path / "image.pt")
    cmd = [sys.executable, TRAIN, "--stage", "video", "--data-root", str(demo), "--out", str(tmp_path / "run"),
           "--init", str(tmp_path / "image.pt"), "--num-frames", "4", "--batch-size", "2", "--epochs", "1",
           "--stop-after-steps", "1", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"]["video"], config["model"]["mcp"]) == (video, mcp)
    ckpt = safe_load(tmp_path / "run" / "last.pt")
    model = build_model("s2d_tiny", 7, 4, image_model=not video, mcp=mcp, landmark_channels=32)
    model.load_state_dict(ckpt["model"])
    n, total = set_trainable(model, "video")
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == trains
    assert len(ckpt["optimizer"]["state"]) == sum(p.requires_grad for p in model.parameters())  # AdamW stepped each
    assert f"{n:,} trainable of {total:,}" in proc.stdout


def test_ablation_runs_are_redone_after_the_stage_they_start_from(demo, first_run):
    runs, _ = first_run
    pipeline(demo, runs, "--ablation", "--ablation-seeds", "1")  # image-nomcp, (a), (b), (c); (d) is the demo's
    stdout = pipeline(demo, runs, "--retrain", "image")  # the ablation is not asked for: its runs stay as they are
    assert ran(stdout) == ["image stage", "video stage"]
    stdout = pipeline(demo, runs, "--ablation", "--ablation-seeds", "1")
    lines = stdout.splitlines()
    # (c) started from the old image stage: redone; (a), (b) and their no-MCP image stage did not: reused
    assert any(line.startswith("== ablation (c)") and "finished after it; redone" in line for line in lines)
    assert sum(line.startswith("== ablation") and "reused" in line for line in lines) == 3, stdout
    assert ran(stdout) == []


def test_a_failed_retrain_keeps_the_finished_stage(demo, first_run):
    runs, _ = first_run
    before = {p.name: p.read_bytes() for p in (runs / "demo-video").iterdir()}
    cmd = [sys.executable, TRAIN, "--data-root", str(demo), "--out", str(runs), "--retrain", "video",
           "--demo-args", QUICK + " --epochs 0"]  # the stage's own command refuses --epochs 0
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 1 and "--epochs must be at least 1" in proc.stderr
    assert f"failed (exit 1); its messages are above. The finished run from before is back in " \
           f"{runs / 'demo-video'}." in proc.stderr, proc.stderr  # exit 1: torchrun's, for its process's 2
    assert {p.name: p.read_bytes() for p in (runs / "demo-video").iterdir()} == before
    assert not (runs / "demo-video.previous").exists()


def test_the_pipeline_refuses_options_it_would_drop(tmp_path):
    """`python train.py --epochs 1` ran the demo with its own epochs: a stage option must go through --demo-args."""
    cmd = [sys.executable, TRAIN, "--out", str(tmp_path / "runs"), "--epochs", "1", "--model", "s2d_base"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("train.py: error: --") and "--epochs" in error and "--model" in error
    assert "the demo pipeline does not take these; pass stage options with --demo-args" in error
