"""The release layouts as downloaded: DFEW, FERV39K and MAFW built in a temporary folder from tiny generated frames,
with split files in the authors' formats, at the default places (data/<NAME>, weights/), no symlinks.

One training step through `train.py --dataset <name>` (only the model made small) and one evaluation through
`eval.py`, run in that folder; a missing layout or weight file stops before anything runs, naming each path.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import landmarks
from model import build_model
from test_data import write_image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SMALL = ["--model", "s2d_tiny", "--num-frames", "2", "--batch-size", "2", "--epochs", "1", "--val-fraction", "0",
         "--workers", "0", "--augment", "none", "--stop-after-steps", "1"]
EVAL = ["--temporal-views", "1", "--spatial-crops", "1", "--workers", "0", "--batch-size", "2"]


def frames(folder, kind, seed, n=3, size=32):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(1, n + 1):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if kind == "png":
            write_image(folder / f"{k:05d}.png", image, "png")
        else:
            write_image(folder / f"{k:05d}.jpg", image)


def make_dfew(root):  # EmoLabel_DataSplit/{train,test}(single-labeled)/{train,test}_set_1.csv, Clip/clip_224x224_16f
    for split, start in (("train", 1), ("test", 101)):
        rows = [f"{start + c:05d},{c}" for c in range(7)]
        path = root / f"EmoLabel_DataSplit/{split}(single-labeled)/{split}_set_1.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("video_name,label\n" + "\n".join(rows) + "\n")
        for c in range(7):
            frames(root / "Clip/clip_224x224_16f" / f"{start + c:05d}", "jpg", start + c)


def make_ferv39k(root):  # Annotation/{train,test}.csv (path,id), 2_ClipsforFaceCrop/<scene>/<class>/<id>/
    names = data.CLASSES["ferv39k"]
    (root / "Annotation").mkdir(parents=True)
    for split, start in (("train", 1), ("test", 501)):
        rows = [(f"Crime/{name}/{start + c:04d}", c) for c, name in enumerate(names)]
        (root / f"Annotation/{split}.csv").write_text("path,id\n" + "".join(f"{p},{c}\n" for p, c in rows))
        for p, c in rows:
            frames(root / "2_ClipsforFaceCrop" / p, "jpg", start + c)


def make_mafw(root):  # anno/single/no_caption/set_1/{train,test}.txt, data/frames/frames_crop_align_224/<name>/*.png
    names = data.CLASSES["mafw"]
    for split, start in (("train", 1), ("test", 3001)):
        path = root / f"anno/single/no_caption/set_1/{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{start + c:05d}.mp4 {name}\n" for c, name in enumerate(names)))
        for c in range(len(names)):
            frames(root / "data/frames/frames_crop_align_224" / f"{start + c:05d}", "png", start + c)


LAYOUTS = {"dfew": ("data/DFEW", make_dfew), "ferv39k": ("data/FERV39K", make_ferv39k),
           "mafw": ("data/MAFW", make_mafw)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder as a user has it: data/<NAME> for the three datasets and weights/ with the two start files."""
    work = tmp_path_factory.mktemp("work")
    for folder, make in LAYOUTS.values():
        make(work / folder)
    (work / "weights").mkdir()
    preset = landmarks.PRESETS["mobilefacenet_tiny"]
    torch.manual_seed(0)
    net = landmarks.MobileFaceNet(**preset)
    torch.save({"state_dict": net.state_dict(), "config": preset}, work / "weights/mobilefacenet_model_best.pth.tar")
    image = build_model("s2d_tiny", 7, 1, image_model=True, landmark_channels=preset["feature_width"])
    torch.save({"model": image.state_dict()}, work / "weights/pretrain-AffectNet-7.pth")
    return work


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_release_layout_trains_and_evaluates_with_default_paths(workdir, dataset):
    trained = run("train.py", "--dataset", dataset, *SMALL, cwd=workdir)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "stopped by --stop-after-steps 1" in trained.stdout
    assert "load_checkpoint: weights/pretrain-AffectNet-7.pth" in trained.stdout  # the default --init, found
    run_dir = workdir / "runs" / f"{dataset}{'-fold1' if dataset in ('dfew', 'mafw') else ''}-video"
    evaluated = run("eval.py", "--checkpoint", str(run_dir / "last.pt"), "--dataset", dataset, *EVAL, cwd=workdir)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    clips = len(data.CLASSES[dataset])
    assert f"({clips} clips)" in evaluated.stdout and "WAR" in evaluated.stdout


def test_media_root_and_split_options_point_elsewhere(workdir, tmp_path):
    media = tmp_path / "crops"
    shutil.copytree(workdir / "data/FERV39K/2_ClipsforFaceCrop", media)
    split = tmp_path / "my_test.csv"
    split.write_text("path,id\n" + (workdir / "data/FERV39K/Annotation/test.csv").read_text().split("\n", 1)[1])
    bare = tmp_path / "FERV39K"  # the split files only, the media elsewhere
    shutil.copytree(workdir / "data/FERV39K/Annotation", bare / "Annotation")
    common = ["--dataset", "ferv39k", "--data-root", str(bare), "--media-root", str(media)]
    out = tmp_path / "run"
    trained = run("train.py", *common, "--test-split", str(split), "--out", str(out), *SMALL, cwd=workdir)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    evaluated = run("eval.py", "--checkpoint", str(out / "last.pt"), *common, "--split", str(split), *EVAL,
                    cwd=workdir)
    assert evaluated.returncode == 0 and "(7 clips)" in evaluated.stdout, evaluated.stderr[-2000:]


def test_missing_files_are_listed_before_anything_runs(tmp_path):
    proc = run("train.py", "--dataset", "ferv39k", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr
    for path in ("data/FERV39K/Annotation/train.csv", "data/FERV39K/Annotation/test.csv",
                 "data/FERV39K/2_ClipsforFaceCrop", "weights/pretrain-AffectNet-7.pth",
                 "weights/mobilefacenet_model_best.pth.tar"):
        assert path in message, (path, message)
    assert "https://huggingface.co/cyinen/S2D" in message and "--init none" in message
    assert not (tmp_path / "runs").exists()


def test_data_check_names_the_expected_layout(workdir, tmp_path):
    assert data.main(["check", "--dataset", "dfew", "--root", str(workdir / "data/DFEW")]) == 0
    wrong = tmp_path / "DFEW"
    shutil.copytree(workdir / "data/DFEW/EmoLabel_DataSplit", wrong / "EmoLabel_DataSplit")
    shutil.copytree(workdir / "data/DFEW/Clip/clip_224x224_16f", wrong / "clips")  # not where the release has it
    with pytest.raises(data.LayoutError) as err:
        data.main(["check", "--dataset", "dfew", "--root", str(wrong)])
    out = str(err.value)
    assert f"media folder: {wrong / 'Clip/clip_224x224_16f'}" in out and "holds: EmoLabel_DataSplit/, clips/" in out


def test_a_landmark_file_given_as_checkpoint_is_named(workdir):
    proc = run("eval.py", "--checkpoint", "weights/mobilefacenet_model_best.pth.tar", "--dataset", "dfew", *EVAL,
               cwd=workdir)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("eval.py: weights/mobilefacenet_model_best.pth.tar: not an S2D or "
                                                   "ViT checkpoint: a MobileFaceNet landmark checkpoint (it belongs "
                                                   "to --landmark-weights)")


def test_pretraining_on_a_release_layout_takes_the_release_rules(workdir, tmp_path):
    """S4D's MAE pre-training on real data: as many images as clip views per step (the release's 192 = 48 x 4),
    the lr rule counts the views, and the warm-up is 5 % of the epochs."""
    stills = data.make_demo(tmp_path / "demo", num_clips=14, workers=1)  # its stills stand in for AffectNet
    trained = run("train.py", "--stage", "mae", "--dataset", "dfew", "--model", "s4d_tiny", "--num-frames", "2",
                  "--batch-size", "2", "--views", "3", "--epochs", "3", "--workers", "0", "--stop-after-steps", "1",
                  "--image-dataset", "demo_image", "--image-data-root", str(stills), "--out", str(tmp_path / "mae"),
                  cwd=workdir)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    config = json.loads((tmp_path / "mae" / "config.json").read_text())
    assert config["args"]["image_batch_size"] == 6 and config["total_batch"] == 6  # 2 clips x 3 views, 1 process
    assert config["lr"] == pytest.approx(2.5e-5 * 6 / 8) and config["args"]["warmup_epochs"] == pytest.approx(0.15)
    assert "effective batch = 2 x 1 accum x 1 x 3 views = 6" in trained.stdout
