"""The fault battery: every bad input and fault a user can cause fails clearly, early, and costs no finished work.

Each case is built in a temporary folder from the demo generator (tiny sizes) and checks the exact outcome: the exit
code, the one-line message naming the file, line or shape, and what is kept. train.py runs in a subprocess.
    kill -9 / SIGTERM / a stop mid-epoch, then --resume: bit-exact     test_kill_9_*, test_sigterm_*, test_resume_*
    a non-finite loss; a failed save (disk full)                       test_non_finite_*, test_a_failed_save_*
    --init that does not fit; broken, foreign or code-carrying files   test_an_init_*, test_a_broken_*, test_code_*
    missing, empty, corrupt clips; one-frame clips; grey and RGBA      test_a_missing_*, test_corrupt_*, test_grey_*
    a bad clip in validation; empty split, bad split line, bad --out  test_last_pt_*, test_an_empty_*, test_a_bad_*
    every script's errors in one line; distributed evaluation, odd   test_each_script_*, test_evaluate_two_gloo_*
Beside these, tests/test_data.py checks every split-file error (file and line), tests/test_eval.py eval.py's class
check, unwritable --out and broken checkpoints, tests/test_model.py and tests/test_landmarks.py the code-carrying
checkpoints at every loader, and tests/test_layouts.py a missing dataset layout or start file.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from eval import evaluate
from model import safe_load
from test_data import write_image
from test_eval import _eval_worker, eval_dataset, make_frames_dataset, tiny_model
from test_train import ENV, ROOT, TINY, TRAIN, assert_same_tensors, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):  # 35 clips, as tests/test_train.py's: 28 train (7 for validation), 7 test
    return str(data.make_demo(tmp_path_factory.mktemp("demo") / "demo", num_clips=35, workers=1))


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


def _copy_demo(demo, to):
    shutil.copytree(demo, to)
    return to


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


@pytest.mark.parametrize("to", ["the process", "its process group"])
def test_sigterm_saves_a_loadable_checkpoint(demo, tmp_path, to):
    """SIGTERM to train.py, or to its whole process group with a loading worker (as scancel and systemd send it:
    the worker ignores it, so it does not die and crash the run)."""
    err, out = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    cmd = [sys.executable, TRAIN, "--data-root", demo, "--out", str(tmp_path / "run"), *TINY, "--epochs", "50"]
    group = to == "its process group"
    with open(err, "w") as stderr, open(out, "w") as stdout_file:
        proc = subprocess.Popen(cmd + (["--workers", "1"] if group else []), stdout=stdout_file, stderr=stderr,
                                text=True, env=ENV, cwd=ROOT, start_new_session=group)
        deadline = time.monotonic() + 300
        while "epoch 0:" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the line of epoch 0 is printed when its checkpoint is due: training is under way
        if group:  # once a loading worker (a child process) runs
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            while not children.read_text().split() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
        else:
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


def test_a_missing_or_empty_clip_is_found_before_training(demo, tmp_path):
    broken = _copy_demo(demo, tmp_path / "demo")
    test = data.read_split("demo", broken / "test.csv")
    gone, empty = [s.path for s in test if not s.path.endswith(".mp4")][:2]
    shutil.rmtree(broken / gone)
    for frame in (broken / empty).iterdir():
        frame.unlink()
    rows = (broken / "train.csv").read_text().splitlines()  # and a train row twice, a test row in train as well
    shared = next(s for s in test if s.path not in (gone, empty))
    (broken / "train.csv").write_text("\n".join(rows + [rows[1], f"{shared.path},{shared.label}"]) + "\n")
    proc = train(str(broken), tmp_path / "run", "--epochs", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"warning: {broken / 'train.csv'}: 1 sample(s) listed more than once, so they count more than once "
            f"(e.g. {rows[1].split(',')[0]!r}") in proc.stdout
    assert f"warning: 1 sample(s) of {broken / 'test.csv'} are also in {broken / 'train.csv'}" in proc.stdout
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"train.py: 2 of the {len(test)} clips of {broken / 'test.csv'} cannot be read:")
    assert f"{broken / gone}: no such frame folder, video or image" in message
    assert f"{broken / empty}: a frame folder without .jpg/.jpeg/.png images" in message
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_last_pt_is_saved_before_validation(demo, tmp_path):
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
    shutil.rmtree(broken / clip.path)
    shutil.copytree(Path(demo) / clip.path, broken / clip.path)  # the clip repaired: resume validates epoch 0 first
    train(str(broken), tmp_path / "run", "--resume", str(tmp_path / "run"))
    train(demo, tmp_path / "whole", "--epochs", "2")
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("run", "whole")]
    assert [r["epoch"] for r in logs[0]] == [0, 1]
    assert [r["val_war"] for r in logs[0]] == [r["val_war"] for r in logs[1]]
    run, whole = (safe_load(tmp_path / name / "last.pt") for name in ("run", "whole"))
    assert_same_tensors(run["model"], whole["model"], "model")
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("run", "whole")]
    assert results[0] == results[1]


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
    for name, what in (("empty.pt", "0 bytes; EOFError"), ("notes.pt", "16 bytes; ")):
        proc = train(demo, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / name), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"train.py: {tmp_path / name}: ") and what in line
    missing = train(demo, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / "missing.pt"), check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr  # found before the data is read
    assert f"train.py: cannot start:\n--init {tmp_path / 'missing.pt'}: no such file" in missing.stderr
    debug = train(demo, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / "empty.pt"), "--debug", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug shows where it came from


# ----------------------------------------------------------------------------- kill -9, at a step and inside a save
KILLED_AT = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
import torch
{patch}
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""
AT_STEP_13 = """
steps, step = [0], torch.optim.AdamW.step
def killed(self, *a, **k):
    steps[0] += 1
    if steps[0] == 13:  # mid-epoch 1, after epoch 0's checkpoints
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *a, **k)
torch.optim.AdamW.step = killed
"""
INSIDE_SAVE_3 = """
saves, save = [0], torch.save
def killed(obj, f, *a, **k):
    saves[0] += 1
    if saves[0] == 3:  # epoch 1's first save: half a file written, then the process dies
        open(f, "wb").write(b"PK half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *a, **k)
torch.save = killed
"""


@pytest.fixture(scope="module")
def whole_run(demo, tmp_path_factory):
    """An uninterrupted 2-epoch run, to compare interrupted and resumed runs with."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(demo, out, "--epochs", "2")
    return out


def assert_same_run(whole, parts):
    a, b = (safe_load(run / "last.pt") for run in (whole, parts))
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["anchors"], b["anchors"], "SDL anchors")
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert_same_tensors(x, y, "AdamW state")
    results = [json.loads((run / "results.json").read_text()) for run in (whole, parts)]
    assert results[0] == results[1]


@pytest.mark.parametrize("where,patch", [("at step 13", AT_STEP_13), ("inside a save", INSIDE_SAVE_3)])
def test_kill_9_then_resume_equals_the_uninterrupted_run(demo, whole_run, tmp_path, where, patch):
    out = tmp_path / "run"
    killed = _run_script(KILLED_AT.replace("{patch}", patch), demo, out, "--epochs", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = safe_load(out / "last.pt")  # the last complete save: epoch 0's, after its validation
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]) == (1, 0, 10)
    resumed = train(demo, out, "--resume", str(out))
    assert "resumed" in resumed.stdout and "epoch 1" in resumed.stdout
    assert_same_run(whole_run, out)
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"


# ----------------------------------------------------------------------------- split files
def test_an_empty_split_is_one_line_naming_the_file(demo, tmp_path):
    for name in ("test.csv", "train.csv"):
        broken = _copy_demo(demo, tmp_path / name / "demo")
        (broken / name).write_text("path,id\n")
        proc = train(str(broken), tmp_path / name / "run", "--epochs", "1", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"train.py: {broken / name}: no samples for split (all)"
        assert not (tmp_path / name / "run").exists()


def test_a_bad_split_line_is_one_line_naming_file_and_line(demo, tmp_path):
    broken = _copy_demo(demo, tmp_path / "demo")
    lines = (broken / "train.csv").read_text().splitlines()
    (broken / "train.csv").write_text("\n".join(lines[:3] + ["clips/Happy/0001,9"] + lines[3:]) + "\n")
    proc = train(str(broken), tmp_path / "run", "--epochs", "1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message == f"train.py: {broken / 'train.csv'}:4: label 9 outside 0..6", message
    assert not (tmp_path / "run").exists()


def test_an_unwritable_out_is_refused_before_any_work(demo, tmp_path):
    (tmp_path / "a_file").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(tmp_path / "a_file" / "run", "a_file is not a folder")]
    if os.geteuid() != 0:  # root may write into any folder, so a read-only folder stops only other users
        cases.append((locked / "run", "locked is not writable"))
    try:
        for out, why in cases:
            start = time.monotonic()
            proc = train(demo, out, "--epochs", "1", check=False)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr
            assert f"--out {out}: cannot create or write it" in proc.stderr and why in proc.stderr, proc.stderr
            assert "data:" not in proc.stdout, "it stopped before reading the data"
            assert time.monotonic() - start < 120
    finally:
        locked.chmod(0o700)


def test_a_finished_run_is_never_overwritten_and_resume_refuses_other_options(demo, tmp_path):
    out = tmp_path / "run"
    train(demo, out, "--epochs", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = train(demo, out, "--epochs", "1", check=False)  # the demo's dataset too: no exemption
    assert again.returncode == 2 and f"{out} holds a run: continue it with --resume {out}" in again.stderr
    other = train(demo, out, "--resume", str(out), "--epochs", "3", check=False)
    assert other.returncode == 2 and "given otherwise: --epochs 3 (the run's: 1)" in other.stderr, other.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("option, value, message", [
    ("--val-every", "0", "--val-every must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--accum-steps", "0", "--accum-steps must be at least 1, got 0"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--val-fraction", "-0.3", "--val-fraction must be in [0, 1), got -0.3"),
])
def test_numbers_out_of_range_are_refused_at_once(tmp_path, option, value, message):
    proc = subprocess.run([sys.executable, TRAIN, "--dataset", "demo", "--stage", "video", "--out",
                           str(tmp_path / "run"), option, value], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "run").exists(), proc.stderr


# ----------------------------------------------------------------------------- frames as users have them
def test_grey_rgba_and_one_frame_clips_read_right_and_train(demo, tmp_path):
    root = _copy_demo(demo, tmp_path / "demo")
    folders = [s.path for s in data.read_split("demo", root / "train.csv") if not s.path.endswith(".mp4")]
    grey_clip, rgba_clip, one_frame = folders[:3]
    originals = {}
    for clip, kind in ((grey_clip, "grey"), (rgba_clip, "rgba")):
        for jpg in map(Path, data.list_frames(root / clip)):
            rgb = data.decode_image(jpg)  # (H, W, 3)
            image = rgb.mean(-1).round().astype(np.uint8) if kind == "grey" else np.dstack(
                [rgb, np.full(rgb.shape[:2], 77, np.uint8)])  # a constant, non-opaque alpha
            originals[(clip, jpg.stem)] = image
            write_image(jpg.with_suffix(".png"), image, "png")
            jpg.unlink()
    frames = data.list_frames(root / one_frame)
    for extra in frames[1:]:
        os.unlink(extra)
    grey = data.load_clip(data.Sample(grey_clip, 0), root)  # (T, H, W, 3)
    assert grey.shape[-1] == 3 and (grey[0] == originals[(grey_clip, "1")][:, :, None]).all(), "3 equal channels"
    rgba = data.load_clip(data.Sample(rgba_clip, 0), root)
    assert rgba.shape[-1] == 3 and (rgba[0] == originals[(rgba_clip, "1")][:, :, :3]).all(), "alpha is dropped"
    single = data.ClipDataset([data.Sample(one_frame, 0)], root, "train", num_frames=4, image_size=112)[0]["video"]
    assert single.shape == (3, 4, 112, 112) and all(torch.equal(single[:, 0], single[:, t]) for t in range(4))
    run = train(str(root), tmp_path / "run", "--epochs", "1")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["replaced"] == 0, "every clip was read, none replaced"
    assert "WAR" in run.stdout


# ----------------------------------------------------------------------------- checkpoints that carry code
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/nonexistent"


def test_code_carrying_checkpoint_is_refused_and_never_run(demo, tmp_path):
    global MARKER
    MARKER = str(tmp_path / "the_payload_ran")
    torch.save({"model": {"x": torch.zeros(1)}, "note": Payload()}, tmp_path / "evil.pt")
    for option in ("--init", "--landmark-weights"):
        proc = train(demo, tmp_path / "run", "--epochs", "1", option, str(tmp_path / "evil.pt"), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"train.py: {tmp_path / 'evil.pt'}: refused: the checkpoint holds Python objects"), line
        assert not os.path.exists(MARKER), "the pickle's code ran"


# ----------------------------------------------------------------------------- every script: one line, --debug
@pytest.mark.parametrize("script,args,names", [
    ("data.py", ["check", "--dataset", "dfew", "--root", "{tmp}/nowhere"], "{tmp}/nowhere"),
    ("landmarks.py", ["--video", "{tmp}/no_such_frames"], "{tmp}/no_such_frames"),
    ("landmarks.py", ["--weights", "{tmp}/empty.pt", "--video", "{tmp}/face.png"], "{tmp}/empty.pt"),
    ("eval.py", ["--checkpoint", "{tmp}/empty.pt", "--video", "{tmp}/face.png"], "{tmp}/empty.pt"),
])
def test_each_script_ends_a_user_error_in_one_line(tmp_path, script, args, names):
    (tmp_path / "empty.pt").write_bytes(b"")
    write_image(tmp_path / "face.png", np.full((112, 112, 3), 128, np.uint8), "png")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr[proc.stderr.index(f"{script}: "):]  # the message, after any warnings
    assert names.format(tmp=tmp_path) in message and message.count(f"{script}: ") == 1, proc.stderr
    debug = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--debug"], capture_output=True,
                           text=True, env=ENV, cwd=ROOT, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ----------------------------------------------------------------------------- corrupt data; distributed evaluation
def _corrupt_middle(path, n=200):
    """n bytes of 0xFF in the middle of the file. JPEG and H.264 carry no checksum: random bytes there were caught
    in 33 of 51 demo frames (README), a run of 0xFF is invalid entropy-coded data every time."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + n] = b"\xff" * n
    path.write_bytes(bytes(raw))


def test_corrupt_frames_and_videos_are_errors_not_garbage(demo, tmp_path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    train, test = data.read_split("demo", root / "train.csv"), data.read_split("demo", root / "test.csv")
    folder = next(s for s in train if not s.path.endswith(".mp4"))  # a frame folder
    video = next(s for s in test + train if s.path.endswith(".mp4"))  # and an mp4
    frame = data.list_frames(root / folder.path)[2]
    _corrupt_middle(Path(frame))  # its end-of-image marker is intact
    assert Path(frame).read_bytes().endswith(b"\xff\xd9")
    with pytest.raises(data.ClipError, match=f"{frame}: corrupt image data"):
        data.load_clip(folder, root)
    _corrupt_middle(data.resolve(root, video.path), n=2000)
    with pytest.raises(data.ClipError, match=str(data.resolve(root, video.path))):
        data.load_clip(video, root)
    assert data.main(["check", "--dataset", "demo", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"BAD {folder.path} (label {folder.label}): {frame}: corrupt image data" in out
    assert f"BAD {video.path}" in out and "2 bad item(s)" in out


def test_evaluate_two_gloo_ranks_equals_one(tmp_path, spawn_ranks):
    make_frames_dataset(tmp_path)
    # 3 clips x 3 views = 9 views: rank 0 takes 5, rank 1 takes 4, and each clip's views are split between ranks
    spawn_ranks(_eval_worker, str(tmp_path), timeout=150)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, lm = tiny_model()
    single = evaluate(model, lm, eval_dataset(tmp_path), batch_size=3, device="cpu")
    assert ranks[0] == ranks[1]  # identical on every rank
    for key in ("uar", "war", "recall", "f1", "macro_f1", "confusion", "support"):
        assert ranks[0][key] == single[key], key  # digit for digit
    assert [p["index"] for p in ranks[0]["predictions"]] == [0, 1, 2]  # each clip exactly once
    got = torch.tensor([p["probs"] for p in ranks[0]["predictions"]])
    torch.testing.assert_close(got, torch.tensor([p["probs"] for p in single["predictions"]]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- an --init of other classes
def test_an_init_of_other_classes_stops_or_starts_a_fresh_classifier(demo, tmp_path):
    from model import build_model

    other = ["calm", "joy", "grief", "shock", "dread", "scorn", "rage"]
    video = build_model("s2d_tiny", 7, 2, landmark_channels=32).state_dict()
    torch.save({"model": video, "classes": other}, tmp_path / "video.pt")
    proc = train(demo, tmp_path / "run", "--epochs", "1", "--init", str(tmp_path / "video.pt"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"train.py: --init {tmp_path / 'video.pt'} was trained on the classes {other}, but "
                           "--dataset demo has [") and "--allow-other-classes" in line
    allowed = train(demo, tmp_path / "allowed", "--epochs", "1", "--init", str(tmp_path / "video.pt"),
                    "--allow-other-classes", "--stop-after-steps", "1")
    assert "so its classifier is not loaded: the head starts afresh" in allowed.stdout
    image = build_model("s2d_tiny", 7, 1, image_model=True, landmark_channels=32).state_dict()
    torch.save({"model": image, "classes": other}, tmp_path / "image.pt")  # an image stage of other classes
    fresh = train(demo, tmp_path / "fresh", "--epochs", "1", "--init", str(tmp_path / "image.pt"),
                  "--stop-after-steps", "1")
    assert "the head starts afresh" in fresh.stdout and "head.weight" in fresh.stdout  # reported as missing
