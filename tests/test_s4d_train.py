"""S4D's stages in train.py on a tiny demo (s4d_tiny, 4 frames, 35 clips and their stills), each run in a subprocess:
dual-modal MAE pre-training, joint fine-tuning from it, a bit-exact resume, and eval.py on both heads."""
import json
import subprocess
import sys

import pytest
import torch

from test_train import ENV, ROOT, TRAIN, assert_same_tensors

pytestmark = pytest.mark.slow
# 28 training clips in batches of 4: 7 video steps (5 after the validation split of 0.15: 7 clips); 116 stills:
# fine-tuning takes 7 of 14 batches of 8 (twice the clips), pre-training all 29 batches of 4 (clips x 1 view)
TINY = ["--dataset", "demo", "--num-frames", "4", "--sampling-rate", "4", "--batch-size", "4", "--epochs", "1",
        "--workers", "0", "--val-fraction", "0.15", "--blr", "1e-3", "--warmup-epochs", "0.5"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import data

    return str(data.make_demo(tmp_path_factory.mktemp("demo") / "demo", num_clips=35, workers=1))


def run(demo, out, *extra, script=TRAIN, check=True):
    own = ["--out", str(out), *TINY] if script == TRAIN else []
    cmd = [sys.executable, script, "--data-root", demo, *own, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def log_of(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae") / "mae"
    proc = run(demo, out, "--stage", "mae", "--epochs", "2")
    return out, proc


def test_mae_stage_trains_on_both_modalities(pretrained):
    out, proc = pretrained
    log = log_of(out)
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        assert r["video_loss"] > 0 and r["image_loss"] > 0  # both modalities took steps
    assert log[1]["loss"] < log[0]["loss"]  # the reconstruction error falls
    assert "7 video batches of 4 and 29 image batches of 4" in proc.stdout  # no validation split: every clip
    assert "2 views" not in proc.stdout  # the demo's default: one view per clip
    results = json.loads((out / "results.json").read_text())
    assert results["last"]["epoch"] == 1 and not (out / "best.pt").exists()
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert "mask_token" in state and any(k.startswith("decoder.") for k in state)


def test_joint_stage_from_the_mae_checkpoint(demo, pretrained, tmp_path):
    recipe = ["--layer-decay", "0.75", "--mixup", "0.8", "--cutmix", "1.0"]  # the release's (the demo's are off)
    proc = run(demo, tmp_path / "joint", "--stage", "joint", "--init", str(pretrained[0] / "last.pt"), *recipe)
    assert "[S4D pre-training (MAE) naming]" in proc.stdout and "unexpected (not loaded): none" in proc.stdout
    assert "5 video batches of 4 and 7 image batches of 8 (demo_image, class-balanced)" in proc.stdout
    log = log_of(tmp_path / "joint")
    assert log[0]["step"] == 12 and log[0]["balance"] > 0 and "val_war" in log[0]
    results = json.loads((tmp_path / "joint" / "results.json").read_text())
    assert 0 <= results["best"]["war"] <= 1 and len(results["best"]["confusion"]) == 7
    assert 0 <= results["best"]["image"]["war"] <= 1  # the image test list through the image head
    ckpt = torch.load(tmp_path / "joint" / "best.pt", weights_only=True)
    # layer decay 0.75 over 4 blocks: six lr scales from 0.75^5 (patch embedding) to 1 (fc_norm and heads)
    scales = sorted({round(g["initial_lr"] / ckpt["optimizer"]["param_groups"][0]["initial_lr"], 6)
                     for g in ckpt["optimizer"]["param_groups"]})
    assert scales == [round(0.75**k, 6) for k in range(5, -1, -1)]
    # eval.py reads the S4D checkpoint: the clips through the video head, the stills through the image head
    video = run(demo, None, "--checkpoint", str(tmp_path / "joint" / "best.pt"), "--dataset", "demo",
                script=f"{ROOT}/eval.py")
    assert f"WAR {100 * results['best']['war']:.2f}" in video.stdout
    images = run(demo, None, "--checkpoint", str(tmp_path / "joint" / "best.pt"), "--dataset", "demo_image",
                 script=f"{ROOT}/eval.py")
    assert f"WAR {100 * results['best']['image']['war']:.2f}" in images.stdout
    mae = run(demo, None, "--checkpoint", str(pretrained[0] / "last.pt"), "--dataset", "demo",
              script=f"{ROOT}/eval.py", check=False)
    assert mae.returncode != 0 and "has no classifier; fine-tune it first" in mae.stderr


def test_joint_stage_resumes_bit_exactly(demo, pretrained, tmp_path):
    init = ["--stage", "joint", "--init", str(pretrained[0] / "last.pt"), "--val-fraction", "0"]
    run(demo, tmp_path / "whole", *init)
    stopped = run(demo, tmp_path / "parts", *init, "--stop-after-steps", "5")
    assert "stopped by --stop-after-steps 5" in stopped.stdout
    subprocess.run([sys.executable, TRAIN, "--resume", str(tmp_path / "parts")], check=True, capture_output=True,
                   env=ENV, cwd=ROOT, timeout=600)
    whole, parts = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("whole", "parts"))
    assert_same_tensors(whole["model"], parts["model"], "model after resume")
    assert log_of(tmp_path / "whole")[-1]["loss"] == log_of(tmp_path / "parts")[-1]["loss"]


def test_s4d_stage_options_are_checked(demo, tmp_path):
    wrong = run(demo, tmp_path / "x", "--stage", "joint", "--model", "s2d_tiny", check=False)
    assert wrong.returncode != 0 and "--model s4d_base or s4d_tiny" in wrong.stderr
    wrong = run(demo, tmp_path / "y", "--stage", "mae", "--landmark-weights", "x.pt", check=False)
    assert wrong.returncode != 0 and "do not apply" in wrong.stderr
    wrong = run(demo, tmp_path / "z", "--stage", "video", "--model", "s4d_tiny", check=False)
    assert wrong.returncode != 0 and "--stage joint or mae" in wrong.stderr


def test_both_stages_run_under_torchrun_on_two_processes(demo, pretrained, tmp_path):
    """Each step takes one modality and one head, and an expert may get no token: DDP must not wait for them."""
    for stage, extra in (("mae", []), ("joint", ["--init", str(pretrained[0] / "last.pt")])):
        out = tmp_path / stage
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
               "--data-root", demo, "--out", str(out), *TINY, "--batch-size", "2", "--image-batch-size", "4",
               "--stage", stage, "--device", "cpu", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "effective batch = 2 x 1 accum x 2 = 4" in proc.stdout
        results = json.loads((out / "results.json").read_text())
        assert results["last"]["epoch"] == 0
        if stage == "joint":
            assert 0 <= results["best"]["war"] <= 1 and 0 <= results["best"]["image"]["war"] <= 1
        log = log_of(out)
        assert log[-1]["video_loss"] > 0 and log[-1]["image_loss"] > 0


def test_mae_views_go_side_by_side(demo, tmp_path):
    proc = run(demo, tmp_path / "views", "--stage", "mae", "--views", "2", "--stop-after-steps", "3")
    assert "7 video batches of 4 clips x 2 views and 14 image batches of 8" in proc.stdout
    wrong = run(demo, tmp_path / "no", "--stage", "joint", "--views", "2", check=False)
    assert wrong.returncode != 0 and "--views belongs to --stage mae" in wrong.stderr
