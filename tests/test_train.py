"""train.py end to end on a tiny demo (s2d_tiny, 2 frames, a few dozen clips), each run in a subprocess:
bit-exact resume, SIGTERM, a non-finite loss, and a 2-process torchrun run against a 1-process run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from model import safe_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# 35 clips: 28 train (7 of them held out for validation) and 7 test; 2 frames, batch 2 -> 10 steps per epoch
TINY = ["--stage", "video", "--num-frames", "2", "--sampling-rate", "1", "--batch-size", "2", "--val-fraction", "0.25",
        "--blr", "2e-4", "--warmup-epochs", "0.5",
        "--sdl-start", "1", "--sdl-ramp", "0.5", "--augment", "paper", "--val-every", "1"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import data

    return str(data.make_demo(tmp_path_factory.mktemp("demo") / "demo", num_clips=35, workers=1))


def train(demo, out, *extra, check=True):
    cmd = [sys.executable, TRAIN, "--data-root", demo, "--out", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_resume_is_bit_exact(demo, tmp_path):
    train(demo, tmp_path / "whole", "--epochs", "2")
    stopped = train(demo, tmp_path / "parts", "--epochs", "2", "--stop-after-steps", "13")
    assert "stopped by --stop-after-steps 13 at epoch 1, step 3 of 10" in stopped.stdout
    ckpt = safe_load(tmp_path / "parts" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 3, 13)
    train(demo, tmp_path / "parts", "--resume", str(tmp_path / "parts"))
    whole, parts = (safe_load(tmp_path / run / "last.pt") for run in ("whole", "parts"))
    assert_same_tensors(whole["model"], parts["model"], "model")
    assert_same_tensors(whole["anchors"], parts["anchors"], "SDL anchors")
    for a, b in zip(whole["optimizer"]["state"].values(), parts["optimizer"]["state"].values(), strict=True):
        assert_same_tensors(a, b, "AdamW state")
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("whole", "parts")]
    assert [r["epoch"] for r in logs[1]] == [0, 1]
    assert [r["val_war"] for r in logs[0]] == [r["val_war"] for r in logs[1]]
    assert logs[0][1]["sdl_lambda"] > 0 and logs[0][1]["bce"] > 0, "SDL was active in epoch 1"
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("whole", "parts")]
    assert results[0] == results[1]


def test_sigterm_saves_a_loadable_checkpoint(demo, tmp_path):
    err, out = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    cmd = [sys.executable, TRAIN, "--data-root", demo, "--out", str(tmp_path / "run"), *TINY, "--epochs", "50"]
    with open(err, "w") as stderr, open(out, "w") as stdout_file:
        proc = subprocess.Popen(cmd, stdout=stdout_file, stderr=stderr, text=True, env=ENV, cwd=ROOT)
        deadline = time.monotonic() + 300
        while "epoch 0:" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the line of epoch 0 is printed when its checkpoint is due: training is under way
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    stdout = out.read_text()
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert "stopped by SIGTERM" in stdout
    ckpt = safe_load(tmp_path / "run" / "last.pt")
    assert ckpt["step"] >= 1 and ckpt["epoch"] < 50
    from model import S2D, S2DConfig

    S2D(S2DConfig(**ckpt["config"])).load_state_dict(ckpt["model"])
    assert set(ckpt) >= {"optimizer", "scheduler", "scaler", "anchors", "rng", "args", "classes", "step_in_epoch"}
    assert not list((tmp_path / "run").glob("*.tmp")), "a temporary file was left behind"


NAN_AT_CALL_12 = """
import runpy, sys
sys.path.insert(0, {root!r})
import loss
calls, sdl_loss = [0], loss.sdl_loss
def poisoned(logits, labels, soft, lam):
    calls[0] += 1
    total, ce, bce = sdl_loss(logits, labels, soft, lam)
    return (total * float("nan") if calls[0] == 12 else total), ce, bce
loss.sdl_loss = poisoned
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo, tmp_path):
    script = tmp_path / "poisoned_train.py"
    script.write_text(NAN_AT_CALL_12.format(root=ROOT, train=TRAIN))
    cmd = [sys.executable, str(script), "--data-root", demo, "--out", str(tmp_path / "run"), *TINY, "--epochs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss nan at epoch 1, step 1 (global step 11)" in proc.stderr
    ckpt = safe_load(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 0, 10), "the epoch-0 checkpoint is kept"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "run" / "results.json").exists()


def test_torchrun_two_processes_match_one_process(demo, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
           "--data-root", demo, "--out", str(tmp_path / "ddp"), *TINY, "--epochs", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("effective batch = 2 x 1 accum x 2 = 4") == 1, "rank 0 alone prints"
    train(demo, tmp_path / "single", "--epochs", "1", "--batch-size", "4")  # the same 4 clips per step, 1 process
    ddp, single = ([json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
                   for run in ("ddp", "single"))
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [5]
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-3)
    assert ddp[0]["lr"] == single[0]["lr"]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert (config["world_size"], config["total_batch"]) == (2, 4)
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["last"]["confusion"]


def test_val_every_validates_every_nth_epoch_and_the_last(demo, tmp_path):
    train(demo, tmp_path / "run", "--epochs", "3", "--val-every", "2")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_war" in r] == [1, 2]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["best"]["epoch"] in (1, 2)
    if results["best"]["epoch"] == 2:  # the best is the last model: its test pass is not run twice
        assert results["best"] == results["last"]


def test_an_init_that_does_not_fit_stops_before_the_first_step(demo, tmp_path):
    from model import build_model

    image = build_model("s2d_tiny", 7, 1, image_model=True).state_dict()
    torch.save({"model": image}, tmp_path / "image.pt")  # fits: the frozen set loads in full
    torch.save({"model": {k: v for k, v in image.items() if not k.startswith("blocks.3.")}}, tmp_path / "cut.pt")
    wide = build_model("s2d_tiny", 7, 1, image_model=True, width=48, heads=2, adapter_dim=12).state_dict()
    torch.save({"model": wide}, tmp_path / "wide.pt")  # another width: every frozen tensor mismatches
    torch.save({"state_dict": {"conv1.conv.weight": torch.zeros(16, 3, 3, 3)}}, tmp_path / "landmarks.pt")
    for name, absent, what in (("cut", 12, "first: blocks.3.norm1.weight not in the checkpoint"),
                               ("wide", 52, "first: shape mismatch cls_token: checkpoint (1, 1, 48), model (1, 1, 96)"),
                               ("landmarks", 52, "first: cls_token not in the checkpoint")):
        proc = train(demo, tmp_path / name, "--epochs", "1", "--init", str(tmp_path / f"{name}.pt"), check=False)
        assert proc.returncode == 1, proc.stderr[-2000:]
        message = proc.stderr.strip().splitlines()[-1]
        assert message.startswith(f"train.py: --init {tmp_path / f'{name}.pt'} does not fit the s2d_tiny video model:")
        assert f"{absent} of the 52 tensors this stage freezes were not loaded" in message and what in message
        assert "Traceback" not in proc.stderr and not (tmp_path / name / "last.pt").exists()
    allowed = train(demo, tmp_path / "allowed", "--epochs", "1", "--init", str(tmp_path / "cut.pt"),
                    "--allow-partial-init", "--stop-after-steps", "1")
    assert "stopped by --stop-after-steps 1" in allowed.stdout
    fits = train(demo, tmp_path / "fits", "--epochs", "1", "--init", str(tmp_path / "image.pt"),
                 "--stop-after-steps", "1")
    assert "does not fit" not in fits.stderr and (tmp_path / "fits" / "last.pt").exists()


def _copy_demo(demo, to):
    import shutil

    shutil.copytree(demo, to)
    return to


def test_a_missing_or_empty_clip_is_found_before_training(demo, tmp_path):
    import shutil

    import data

    broken = _copy_demo(demo, tmp_path / "demo")
    test = data.read_split("demo", broken / "test.csv")
    gone, empty = [s.path for s in test if not s.path.endswith(".mp4")][:2]
    shutil.rmtree(broken / gone)
    for frame in (broken / empty).iterdir():
        frame.unlink()
    proc = train(str(broken), tmp_path / "run", "--epochs", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"train.py: 2 of the {len(test)} clips of {broken / 'test.csv'} cannot be read:")
    assert f"{broken / gone}: no such frame folder, video or image" in message
    assert f"{broken / empty}: a frame folder without .jpg/.jpeg/.png images" in message
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_last_pt_is_saved_before_validation(demo, tmp_path):
    import data

    broken = _copy_demo(demo, tmp_path / "demo")
    train_all = data.read_split("demo", broken / "train.csv")
    _, val = data.split_validation(train_all, 0.25, 0)  # the run's validation split (TINY: --val-fraction 0.25)
    clip = next(s for s in val if not s.path.endswith(".mp4"))
    for frame in (broken / clip.path).iterdir():  # readable headers, undecodable frames
        frame.write_bytes(b"\xff\xd8" + b"\x00" * 64 + b"\xff\xd9")
    proc = train(str(broken), tmp_path / "run", "--epochs", "2", check=False)
    assert proc.returncode != 0 and clip.path in proc.stderr  # validation names the clip it could not decode
    ckpt = safe_load(tmp_path / "run" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 0, 10)  # epoch 0's training is kept


NAN_AT_CALL_2 = NAN_AT_CALL_12.replace("calls[0] == 12", "calls[0] == 2")
FULL_DISK_AT_SAVE_2 = """
import runpy, sys
sys.path.insert(0, {root!r})
import torch
saves, save = [0], torch.save
def full(obj, f, *a, **k):
    saves[0] += 1
    if saves[0] == 2:  # epoch 0's second save, after validation
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
    return save(obj, f, *a, **k)
torch.save = full
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def _run_script(text, demo, out, *extra):
    script = out.parent / f"{out.name}.py"
    script.write_text(text.format(root=ROOT, train=TRAIN))
    cmd = [sys.executable, str(script), "--data-root", demo, "--out", str(out), *TINY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)


def test_a_non_finite_loss_before_any_checkpoint_claims_none(demo, tmp_path):
    proc = _run_script(NAN_AT_CALL_2, demo, tmp_path / "run", "--epochs", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("stopped without saving, no checkpoint was saved before it")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_failed_save_removes_its_temporary_file_and_keeps_the_last_checkpoint(demo, tmp_path):
    out = tmp_path / "run"
    proc = _run_script(FULL_DISK_AT_SAVE_2, demo, out, "--epochs", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"train.py: could not write {out / 'last.pt'} (RuntimeError: [enforce fail")
    assert f"the temporary file is removed and {out / 'last.pt'} is as it was" in message
    assert f"continue with: python train.py --resume {out}" in message
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []
    ckpt = safe_load(out / "last.pt")  # the save before validation, intact
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 0, 10)


def test_a_broken_checkpoint_file_is_one_line_naming_it(demo, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for name, what in (("empty.pt", "0 bytes; EOFError"), ("notes.pt", "16 bytes; "), ("missing.pt", "no such")):
        proc = train(demo, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / name), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"train.py: {tmp_path / name}: ") and what in line
    debug = train(demo, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / "empty.pt"), "--debug", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug shows where it came from
