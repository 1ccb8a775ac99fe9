"""eval.py: metrics on hand-worked cases, the report, and evaluation on 2 gloo ranks equal to 1 process."""

import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from eval import compute_metrics, evaluate, format_report
from landmarks import LandmarkFeatures
from model import build_model


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


def tiny_model():
    torch.manual_seed(3)
    return build_model("s2d_tiny", num_classes=3, num_frames=2), LandmarkFeatures()


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, lm = tiny_model()
    result = evaluate(model, lm, TinyClips(), batch_size=2, device="cpu")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_evaluate_two_gloo_ranks_equals_one(tmp_path):
    # 3 clips x 3 views = 9 views: rank 0 takes 5, rank 1 takes 4, and each clip's views are split between ranks
    ctx = mp.start_processes(
        _eval_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-rank gloo evaluation did not finish in 150 s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, lm = tiny_model()
    single = evaluate(model, lm, TinyClips(), batch_size=3, device="cpu")
    assert ranks[0] == ranks[1]  # identical on every rank
    for key in ("uar", "war", "recall", "f1", "macro_f1", "confusion", "support"):
        assert ranks[0][key] == single[key], key  # digit for digit
    assert [p["index"] for p in ranks[0]["predictions"]] == [0, 1, 2]  # each clip exactly once
    got = torch.tensor([p["probs"] for p in ranks[0]["predictions"]])
    torch.testing.assert_close(got, torch.tensor([p["probs"] for p in single["predictions"]]), rtol=1e-5, atol=1e-6)
