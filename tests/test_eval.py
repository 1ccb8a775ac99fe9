"""eval.py: metrics on hand-worked cases, the report, and evaluation on 2 gloo ranks equal to 1 process."""

import argparse
import csv
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from eval import class_names, compute_metrics, evaluate, format_report, load_model, parse_folds, summarize
from eval import main as eval_main
from eval import parse_args as eval_parse_args
import landmarks
from landmarks import LandmarkFeatures
from model import build_model, to_released


def test_metrics_hand_worked():
    m = compute_metrics([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2], 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows = true, columns = predicted
    assert m["recall"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert m["uar"] == pytest.approx(13 / 18)
    assert m["war"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx([4 / 5, 2 / 4, 2 / 3])  # 2 tp / (support + predicted)
    assert m["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert m["support"] == [3, 2, 1]


def test_metrics_absent_classes():
    # class 2 is in neither labels nor predictions; class 3 is only predicted
    m = compute_metrics([0, 0, 1, 1], [0, 3, 1, 1], 4)
    assert m["recall"] == [0.5, 1.0, None, None]
    assert m["uar"] == pytest.approx(0.75)  # mean over the classes present in the labels
    assert m["war"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx([2 / 3, 1.0, None, 0.0])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match=r"preds must lie in \[0, 3\)"):
        compute_metrics([0, 1], [0, 3], 3)


@settings(deadline=None, max_examples=30)
@given(
    st.integers(1, 6).flatmap(
        lambda c: st.tuples(
            st.just(c), st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1, max_size=40)
        )
    )
)
def test_metrics_match_counting(case):
    C, pairs = case
    labels, preds = [y for y, _ in pairs], [p for _, p in pairs]
    m = compute_metrics(labels, preds, C)
    present = sorted(set(labels))
    recall = {c: sum(y == p == c for y, p in pairs) / labels.count(c) for c in present}
    assert m["uar"] == pytest.approx(sum(recall.values()) / len(present))
    assert m["war"] == pytest.approx(sum(y == p for y, p in pairs) / len(pairs))
    assert sum(map(sum, m["confusion"])) == len(pairs)
    assert [m["confusion"][c][c] for c in range(C)] == [sum(y == p == c for y, p in pairs) for c in range(C)]


def test_format_report_shows_everything():
    m = compute_metrics([0, 0, 1, 1], [0, 2, 1, 1], 3)
    text = format_report(m, ["happy", "sad", "neutral"])
    assert "UAR 75.00" in text and "WAR 75.00" in text and "macro-F1" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:6]}
    assert rows["happy"] == ["2", "50.00", "66.67"] and rows["neutral"] == ["0", "n/a", "0.00"]
    assert text.splitlines()[-3].split() == ["happy", "1", "0", "1"]  # a confusion row


class TinyClips(torch.utils.data.Dataset):
    """In-memory eval-mode dataset with ClipDataset's item layout: views of clip i are items i*V .. i*V + V-1."""

    def __init__(self, num_clips=3, views=3, frames=2, size=112, classes=3):
        g = torch.Generator().manual_seed(7)
        self.samples = [dict(path=f"clip{i}", label=i % classes) for i in range(num_clips)]
        self.videos = torch.randn(num_clips * views, 3, frames, size, size, generator=g)
        self.views = views

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        index, view = divmod(i, self.views)
        return dict(video=self.videos[i], label=self.samples[index]["label"], index=index, view=view)


class MeanPixelModel(torch.nn.Module):
    """A stand-in with S2D's interface whose logits depend on each view's pixels only: cheap and exact."""

    def __init__(self, classes=3):
        super().__init__()
        self.cfg = SimpleNamespace(num_classes=classes)
        self.proj = torch.nn.Linear(3, classes)

    def forward(self, video, landmarks):  # video (B, 3, T, S, S)
        features = video.mean(dim=(2, 3, 4))  # (B, 3)
        return self.proj(features), features


def test_evaluate_averages_views_per_clip():
    model, ds = MeanPixelModel(), TinyClips()
    result = evaluate(model, torch.nn.Identity(), ds, batch_size=2, device="cpu")
    with torch.no_grad():
        logits, _ = model(ds.videos, None)
    expected = logits.softmax(-1).reshape(3, 3, 3).mean(1)  # (clips, views, classes) -> (clips, classes)
    got = torch.tensor([p["probs"] for p in result["predictions"]])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [p["pred"] for p in result["predictions"]] == expected.argmax(-1).tolist()
    assert [p["index"] for p in result["predictions"]] == [0, 1, 2]
    assert [p["label"] for p in result["predictions"]] == [0, 1, 2]
    assert result["war"] == sum(p["pred"] == p["label"] for p in result["predictions"]) / 3
    assert model.training  # evaluate restores the mode it found


def write_png(path, rgb):
    """(H, W, 3) uint8 -> a PNG file, encoded with PyAV."""
    ctx = av.CodecContext.create("png", "w")
    ctx.height, ctx.width = rgb.shape[:2]
    ctx.pix_fmt = "rgb24"
    packets = ctx.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")) + ctx.encode(None)
    Path(path).write_bytes(b"".join(bytes(p) for p in packets))


def make_frames_dataset(root, labels=(0, 3, 5), frames=3):
    """A FERV39K-layout test split of frame folders (the 'demo' reader): root/test.csv + root/Scene/<id>/*.png."""
    rng = np.random.default_rng(1)
    rows = ["path,id"]
    for i, label in enumerate(labels):
        folder = Path(root, "Scene", f"{i:04d}")
        folder.mkdir(parents=True)
        for t in range(frames):
            write_png(folder / f"{t + 1}.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        rows.append(f"Scene/{i:04d},{label}")
    Path(root, "test.csv").write_text("\n".join(rows) + "\n")
    return root


def eval_dataset(root):
    files = data.dataset_files("demo", root)
    samples = data.read_split("demo", files.test)
    return data.ClipDataset(
        samples,
        files.media_root,
        mode="eval",
        num_frames=2,
        image_size=112,
        temporal_views=3,
        spatial_crops=1,
        augment=False,
    )


def tiny_model():
    torch.manual_seed(3)
    return build_model("s2d_tiny", num_classes=7, num_frames=2), LandmarkFeatures()


def test_unreadable_clip_raises_with_its_path(tmp_path):
    root = make_frames_dataset(tmp_path)
    shutil.rmtree(tmp_path / "Scene" / "0001")
    with pytest.raises(data.ClipError, match="Scene/0001"):
        evaluate(MeanPixelModel(7), torch.nn.Identity(), eval_dataset(root), batch_size=2, device="cpu")


def _eval_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, lm = tiny_model()
    result = evaluate(model, lm, eval_dataset(out_dir), batch_size=2, device="cpu")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def save_checkpoint(path, model, **extra):
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg), **extra}, path)
    return str(path)


def test_load_model_ours_and_released(tmp_path):
    model, _ = tiny_model()
    ours, _ = load_model(save_checkpoint(tmp_path / "ours.pth", model), "cpu")
    args = argparse.Namespace(data_set="DFEW", batch_size=8)  # the release pickles its arguments beside the weights
    released = to_released(model.state_dict())
    dead = model.cfg.depth - 1  # the release stores one more prompt norm than it uses (README, The model)
    released |= {f"prompt_norms.{dead}.weight": torch.ones(192), f"prompt_norms.{dead}.bias": torch.zeros(192)}
    torch.save({"model": released, "args": args}, tmp_path / "released.pth")
    released, ckpt = load_model(str(tmp_path / "released.pth"), "cpu")
    assert released.cfg == model.cfg  # inferred from the weights alone
    for name, value in model.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value) and torch.equal(released.state_dict()[name], value), name
    assert class_names(ckpt, None, 7) == list(data.CLASSES["dfew"])
    assert class_names(ckpt, "ferv39k", 7) == list(data.CLASSES["ferv39k"])
    assert class_names({}, None, 3) == ["0", "1", "2"]


def test_folds_and_summary():
    assert parse_folds(
        eval_parse_args(["--checkpoint", "c{fold}", "--dataset", "dfew", "--data-root", "r", "--folds", "1-5"])
    ) == [1, 2, 3, 4, 5]
    assert parse_folds(eval_parse_args(["--checkpoint", "c", "--video", ".", "--folds", "2,4"])) == [2, 4]
    results = [compute_metrics([0, 1], [0, 1], 2), compute_metrics([0, 1], [0, 0], 2)]
    text = summarize(results, ["a", "b"])
    assert "uar        75.00 +- 35.36" in [
        line.strip() for line in text.splitlines()
    ]  # mean of 100 and 50, sample std over the 2 folds


def test_cli_report_csv_and_single_clip(tmp_path, capsys):
    root = make_frames_dataset(tmp_path / "demo")
    model, _ = tiny_model()
    ckpt = save_checkpoint(tmp_path / "ckpt.pth", model)
    views = ["--temporal-views", "3", "--spatial-crops", "1", "--device", "cpu", "--workers", "0",
             "--landmark-weights", "none"]  # these checkpoints record no detector: the untrained one, asked for
    eval_main(
        ["--checkpoint", ckpt, "--dataset", "demo", "--data-root", str(root), "--out", str(tmp_path / "p.csv")] + views
    )
    report = capsys.readouterr().out
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = data.CLASSES["demo"]
    assert [r["path"] for r in rows] == ["Scene/0000", "Scene/0001", "Scene/0002"]
    assert [int(r["label"]) for r in rows] == [0, 3, 5] and {r["fold"] for r in rows} == {"1"}
    probs = torch.tensor([[float(r[f"prob_{n}"]) for n in names] for r in rows])  # (clips, classes)
    assert [int(r["pred"]) for r in rows] == probs.argmax(-1).tolist()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    m = compute_metrics([0, 3, 5], [int(r["pred"]) for r in rows], 7)
    assert f"UAR {100 * m['uar']:.2f}  WAR {100 * m['war']:.2f}" in report and "confusion matrix" in report

    eval_main(["--checkpoint", ckpt, "--dataset", "demo", "--video", str(root / "Scene" / "0000")] + views)
    lines = capsys.readouterr().out.splitlines()
    clip = {line.split()[0]: float(line.split()[1]) for line in lines[-7:]}
    assert sorted(clip) == sorted(names)
    torch.testing.assert_close(torch.tensor([clip[n] for n in names]), probs[0], atol=2e-4, rtol=0)
    first = Path(data.list_frames(root / "Scene" / "0000")[0])  # a still for this video model: one frame, repeated
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / first.name).write_bytes(first.read_bytes())
    answers = []
    for video in (first, tmp_path / "one"):  # the image, and a folder holding only it
        eval_main(["--checkpoint", ckpt, "--dataset", "demo", "--video", str(video)] + views)
        out = capsys.readouterr().out
        assert "of 1 (the clip is shorter than a window: its last frame is repeated)" in out
        answers.append(out.splitlines()[-7:])
    assert answers[0] == answers[1]


def test_a_checkpoint_of_other_classes_stops_with_both_lists(tmp_path, capsys):
    root = make_frames_dataset(tmp_path / "demo")
    model, _ = tiny_model()
    dfew = save_checkpoint(tmp_path / "dfew.pth", model, classes=list(data.CLASSES["dfew"]))  # another order
    eleven = save_checkpoint(tmp_path / "eleven.pth", build_model("s2d_tiny", num_classes=11, num_frames=2))
    views = ["--temporal-views", "3", "--spatial-crops", "1", "--device", "cpu", "--workers", "0",
             "--landmark-weights", "none"]  # these checkpoints record no detector: the untrained one, asked for
    run = ["--dataset", "demo", "--data-root", str(root)] + views
    with pytest.raises(SystemExit, match=r"dfew.pth was trained on the classes \['happy', 'sad', 'neutral', 'angry', "
                                         r"'surprise', 'disgust', 'fear'\], but --dataset demo has 7: \['Angry', "
                                         r"'Disgust', 'Fear', 'Happy', 'Neutral', 'Sad', 'Surprise'\]"):
        eval_main(["--checkpoint", dfew] + run)
    with pytest.raises(SystemExit, match=r"eleven.pth was trained on 11 classes, but --dataset demo has 7"):
        eval_main(["--checkpoint", eleven] + run)  # no names recorded (as the released files): the count decides
    eval_main(["--checkpoint", dfew, "--allow-other-classes"] + run)  # asked for: it runs
    assert "UAR" in capsys.readouterr().out
    clip = ["--video", str(root / "Scene" / "0000")] + views  # one clip: --dataset's names would label it
    with pytest.raises(SystemExit, match=r"dfew.pth was trained on the classes \['happy', .*--dataset demo has 7"):
        eval_main(["--checkpoint", dfew, "--dataset", "demo"] + clip)
    eval_main(["--checkpoint", dfew] + clip)  # without --dataset: the checkpoint's own names
    assert "happy" in capsys.readouterr().out
    same = save_checkpoint(tmp_path / "same.pth", model, classes=list(data.CLASSES["demo"]))
    eval_main(["--checkpoint", same] + run)


@pytest.mark.parametrize("extra, why", [
    (["--out", "{tmp}/c1.pth"], "--out {tmp}/c1.pth is an input of this evaluation (the checkpoint or the split)"),
    (["--out", "{tmp}/split.csv", "--split", "{tmp}/split.csv"], "is an input of this evaluation"),
    (["--folds", "5-1"], "--folds '5-1': the range is empty"),
    (["--folds", "1-x"], "--folds '1-x': expected a range such as 1-5 or a list such as 1,3"),
])
def test_an_out_that_is_an_input_and_bad_folds_are_refused(tmp_path, capsys, extra, why):
    for name in ("c1.pth", "split.csv"):
        (tmp_path / name).write_bytes(b"keep me")
    args = ["--checkpoint", str(tmp_path / "c{fold}.pth"), "--dataset", "dfew", "--data-root", "r", "--folds", "1"]
    with pytest.raises(SystemExit) as stop:
        eval_parse_args(args + [a.format(tmp=tmp_path) for a in extra])
    assert stop.value.code == 2 and why.format(tmp=tmp_path) in capsys.readouterr().err
    assert all((tmp_path / name).read_bytes() == b"keep me" for name in ("c1.pth", "split.csv"))


def test_out_with_video_is_refused(capsys):
    with pytest.raises(SystemExit):
        eval_parse_args(["--checkpoint", "c", "--video", "v.mp4", "--out", "p.csv"])
    assert "--out writes the per-clip predictions of --dataset's test split" in capsys.readouterr().err


def test_an_unwritable_out_is_refused_before_evaluating(tmp_path, capsys):
    for out, why in ((tmp_path / "missing" / "p.csv", "does not exist"), (tmp_path, "cannot write a file there")):
        with pytest.raises(SystemExit) as stop:
            eval_parse_args(["--checkpoint", "c", "--dataset", "demo", "--data-root", "r", "--out", str(out)])
        assert stop.value.code == 2 and why in capsys.readouterr().err


def test_a_broken_checkpoint_is_one_line_naming_it(tmp_path):
    root = make_frames_dataset(tmp_path / "demo")
    (tmp_path / "half.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # the start of a zip, then nothing
    run = ["--checkpoint", str(tmp_path / "half.pth"), "--dataset", "demo", "--data-root", str(root), "--device", "cpu"]
    with pytest.raises(SystemExit, match=rf"^eval.py: {tmp_path / 'half.pth'}: not a readable PyTorch checkpoint "
                                         r"\(64 bytes; "):
        eval_main(run)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        eval_main(run + ["--debug"])  # the exception itself, with its traceback


def test_a_checkpoint_that_records_no_detector_takes_the_public_file_or_stops(tmp_path, monkeypatch, capsys):
    """A released checkpoint records no landmark file: eval.py takes weights/mobilefacenet_model_best.pth.tar, and
    without it stops (an untrained view would score the checkpoint wrongly); `none` asks for the untrained one."""
    root = make_frames_dataset(tmp_path / "demo")
    model, _ = tiny_model()
    released = save_checkpoint(tmp_path / "released.pth", model, args=argparse.Namespace(batch_size=8))
    monkeypatch.chdir(tmp_path)
    run = ["--checkpoint", released, "--dataset", "demo", "--data-root", str(root), "--temporal-views", "1",
           "--spatial-crops", "1", "--device", "cpu", "--workers", "0"]
    with pytest.raises(SystemExit, match=r"released.pth records no landmark detector, and weights/mobilefacenet_model_"
                                         r"best.pth.tar is not there: get the 68-point MobileFaceNet .* pass "
                                         r"--landmark-weights PATH \(or --landmark-weights none"):
        eval_main(run)

    def probs(out):
        with open(out, newline="") as f:
            return [[r[k] for k in r if k.startswith("prob_")] for r in csv.DictReader(f)]

    eval_main(run + ["--landmark-weights", "none", "--out", "untrained.csv"])
    (tmp_path / "weights").mkdir()
    torch.manual_seed(1)
    net = landmarks.MobileFaceNet(**landmarks.PRESETS["mobilefacenet"])  # stands in for the public file
    torch.save({"state_dict": net.state_dict()}, tmp_path / "weights/mobilefacenet_model_best.pth.tar")
    capsys.readouterr()
    eval_main(run + ["--out", "default.csv"])
    printed = capsys.readouterr().out
    assert "landmark view: weights/mobilefacenet_model_best.pth.tar (the checkpoint records none)" in printed
    eval_main(run + ["--landmark-weights", "weights/mobilefacenet_model_best.pth.tar", "--out", "named.csv"])
    assert probs("default.csv") == probs("named.csv") != probs("untrained.csv")

    ours = save_checkpoint(tmp_path / "ours.pth", model, args={"landmark_weights": None})  # train.py's, untrained view
    eval_main(["--checkpoint", ours] + run[2:] + ["--out", "ours.csv"])
    assert "landmark view: the untrained, seeded detector (recorded in the checkpoint)" in capsys.readouterr().out
    assert probs("ours.csv") == probs("untrained.csv")
