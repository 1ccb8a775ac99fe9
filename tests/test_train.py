"""train.py end to end on a tiny demo (s2d_tiny, 2 frames, a few dozen clips), each run in a subprocess: a 2-process
torchrun run against a 1-process run, and validation every n epochs. The helpers here (the tiny demo, `train`) also
serve tests/test_faults.py, where train.py meets bad input and faults."""
import json
import os
import subprocess
import sys

import pytest
import torch


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
