"""SDL (loss.py): soft labels against a per-sample loop, FIFO queues, DDP-identical queues, loss, lambda."""

import json
from collections import deque
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import loss
from loss import EmotionAnchors, lambda_at, sdl_loss


def naive_soft_label(f, queues, k):
    """One sample f (D,), queues: per class a list of (feature, probs), oldest first -> (C,) or None."""
    picks = []
    for entries in queues:
        sims = [(F.cosine_similarity(f, e_f, dim=0, eps=1e-12).item(), e_p) for e_f, e_p in entries]
        sims.sort(key=lambda sp: -sp[0])
        picks += sims[:k]
    if not picks:
        return None
    weights = [max(s, 0.0) for s, _ in picks]
    if sum(weights) == 0:  # every picked similarity <= 0
        weights = [1.0] * len(picks)
    return sum(w * p for w, (_, p) in zip(weights, picks, strict=True)) / sum(weights)


def fill(anchors, batches, num_classes, dim):
    """Enqueue random batches with the given labels; return the reference deques."""
    ref = [deque(maxlen=anchors.queue_size) for _ in range(num_classes)]
    for labels in batches:
        labels = torch.tensor(labels, dtype=torch.long)
        feats = torch.randn(len(labels), dim)
        probs = torch.softmax(torch.randn(len(labels), num_classes), -1)
        anchors.enqueue(feats, probs, labels)
        for f, p, y in zip(feats, probs, labels.tolist(), strict=True):
            ref[y].append((f, p))
    return ref


@settings(deadline=None, max_examples=40)
@given(
    num_classes=st.integers(1, 6),
    queue_size=st.integers(1, 5),
    k=st.integers(1, 4),
    batch=st.integers(1, 7),
    data=st.data(),
)
def test_sdl_soft_labels_match_naive_loop(num_classes, queue_size, k, batch, data):
    dim = 5
    # Labels drawn from a subset of the classes, so some queues stay empty and some are partly filled.
    used = data.draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=num_classes, unique=True))
    batches = data.draw(st.lists(st.lists(st.sampled_from(used), min_size=0, max_size=6), min_size=1, max_size=4))
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    anchors = EmotionAnchors(num_classes, dim, queue_size=queue_size, k=k)
    ref = fill(anchors, batches, num_classes, dim)
    feats = torch.randn(batch, dim)
    soft = anchors.soft_labels(feats)
    expected = [naive_soft_label(f, [list(q) for q in ref], k) for f in feats]
    if expected[0] is None:
        assert soft is None
        return
    assert soft.shape == (batch, num_classes)
    torch.testing.assert_close(soft, torch.stack(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft.sum(-1), torch.ones(batch), rtol=1e-5, atol=1e-5)  # convex mix of softmaxes


def test_sdl_soft_label_is_paper_formula_when_similarities_positive():
    anchors = EmotionAnchors(2, 2, queue_size=3, k=2)
    feats = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.2]])
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    anchors.enqueue(feats, probs, torch.tensor([0, 0, 1, 1]))
    soft = anchors.soft_labels(torch.tensor([[1.0, 0.0]]))
    s = torch.tensor([1.0, 2**-0.5, 0.0, 1 / (1.04**0.5)])  # cosine to each stored feature, all kept (k = 2)
    torch.testing.assert_close(soft[0], (s[:, None] * probs).sum(0) / s.sum())


def test_sdl_empty_queues_give_none_and_ce_only():
    anchors = EmotionAnchors(3, 4)
    assert anchors.soft_labels(torch.randn(2, 4)) is None
    logits, labels = torch.randn(2, 3, requires_grad=True), torch.tensor([0, 2])
    total, ce, bce = sdl_loss(logits, labels, None, lam=1.0)
    torch.testing.assert_close(total, F.cross_entropy(logits, labels))
    assert bce.item() == 0.0 and ce.item() == total.item()


def test_fifo_order_and_state_dict():
    # Each sample carries its id in its probability row (stored as given) and a feature (id, 1) (stored at unit
    # length), so both queues can be read back in order.
    anchors = EmotionAnchors(3, 2, queue_size=3, k=2)
    ids = iter(range(1, 100))
    ref = [deque(maxlen=3) for _ in range(3)]
    for labels in ([0, 1, 0], [0], [], [0, 0, 0, 0, 2], [1, 0]):
        batch = torch.tensor([float(next(ids)) for _ in labels])  # (B,)
        feats = torch.stack([batch, torch.ones_like(batch)], dim=1)  # (B, 2)
        probs = torch.stack([batch, torch.zeros_like(batch), torch.zeros_like(batch)], dim=1)  # (B, 3)
        anchors.enqueue(feats, probs, torch.tensor(labels, dtype=torch.long))
        for i, y in zip(batch.tolist(), labels, strict=True):
            ref[y].append(i)
        for c in range(3):
            n = int(anchors.count[c])
            assert anchors.probs[c, 3 - n :, 0].tolist() == list(ref[c])  # oldest first, newest last
            expected = F.normalize(torch.tensor([[i, 1.0] for i in ref[c]]).reshape(-1, 2), dim=-1)
            torch.testing.assert_close(anchors.features[c, 3 - n :], expected)
            assert anchors.features[c, : 3 - n].abs().sum() == 0 and anchors.probs[c, : 3 - n].abs().sum() == 0
    assert [list(q) for q in ref] == [[7.0, 8.0, 11.0], [2.0, 10.0], [9.0]]
    state = anchors.state_dict()
    assert set(state) == {"features", "probs", "count"}
    clone = EmotionAnchors(3, 2, queue_size=3, k=2)
    clone.load_state_dict(state)
    x = torch.randn(2, 2)
    torch.testing.assert_close(clone.soft_labels(x), anchors.soft_labels(x))


def test_raw_features_in_a_state_dict_are_scaled_on_load():
    """A state dict whose queue features are not unit length (written before they were stored so) gives the
    same soft labels as the queue built by enqueue."""
    anchors = EmotionAnchors(2, 4, queue_size=2, k=1)
    gen = torch.Generator().manual_seed(0)
    feats, probs = 3 * torch.randn(4, 4, generator=gen), torch.softmax(torch.randn(4, 2, generator=gen), -1)
    anchors.enqueue(feats, probs, torch.tensor([0, 1, 0, 1]))
    state = dict(anchors.state_dict())
    state["features"] = state["features"] * torch.tensor([2.0, 5.0])[:, None, None]  # raw lengths
    clone = EmotionAnchors(2, 4, queue_size=2, k=1)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.features.norm(dim=-1), torch.ones(2, 2))
    x = torch.randn(3, 4)
    torch.testing.assert_close(clone.soft_labels(x), anchors.soft_labels(x))
    # a state dict of unit-length features (as saved by this version) loads bit for bit: resuming changes nothing
    # (scaling them again would change some bits, as it would here)
    assert not torch.equal(loss._unit(anchors.features), anchors.features)
    again = EmotionAnchors(2, 4, queue_size=2, k=1)
    again.load_state_dict(anchors.state_dict())
    assert torch.equal(again.features, anchors.features)


def test_full_queues_fall_back_to_plain_mean_of_the_picks():
    """Every queue full (no empty slot to mask): a sample with all picked similarities <= 0 takes the plain mean
    of its k picks per class, a sample with positive ones the paper's weighted mean."""
    anchors = EmotionAnchors(2, 2, queue_size=2, k=1)
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    anchors.enqueue(feats, probs, torch.tensor([0, 0, 1, 1]))
    assert anchors.valid().all()
    soft = anchors.soft_labels(torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))
    # sample 0: every similarity < 0; the top-1 per class is the entry least opposed: (1, 0.1) and (0.1, 1)
    torch.testing.assert_close(soft[0], (probs[1] + probs[3]) / 2)
    # sample 1: top-1 per class (1, 0) with cosine 1 and (0.1, 1) with cosine 0.1 / |(0.1, 1)|
    s = torch.tensor([1.0, 0.1 / 1.01**0.5])
    torch.testing.assert_close(soft[1], (s[0] * probs[0] + s[1] * probs[3]) / s.sum())


def test_random_init_is_full_and_valid():
    anchors = EmotionAnchors(4, 8, queue_size=16, k=2, init="random")
    assert anchors.valid().all() and (anchors.features >= 0).all() and (anchors.features < 1).all()
    assert anchors.soft_labels(torch.randn(3, 8)).shape == (3, 4)


def test_sdl_loss_matches_formula_and_has_gradient():
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2])
    soft = torch.softmax(torch.randn(4, 5), -1)
    total, ce, bce = sdl_loss(logits, labels, soft, lam=0.3)
    ref_bce = -(soft * F.logsigmoid(logits) + (1 - soft) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(bce, ref_bce.detach())
    torch.testing.assert_close(total, F.cross_entropy(logits, labels) + 0.3 * ref_bce)
    total.backward()
    assert logits.grad.abs().sum() > 0


def test_lambda_release_steps():
    at = [
        (0, 0.0),
        (29.99, 0.0),
        (30, 0.01),
        (49.9, 0.01),
        (50, 0.1),
        (59.5, 0.1),
        (60, 0.5),
        (79.9, 0.5),
        (80, 1.0),
        (99.5, 1.0),
    ]
    for epoch, lam in at:
        assert lambda_at(epoch, "release", start_epoch=20, total_epochs=100) == lam, epoch
    assert lambda_at(15, "release", total_epochs=50) == 0.01  # thresholds scale with the run length
    assert lambda_at(14.9, "release", total_epochs=50) == 0.0
    assert lambda_at(90, "release", start_epoch=95, total_epochs=100) == 0.0


def test_lambda_ramps():
    assert lambda_at(4.9, "linear", start_epoch=5, ramp_epochs=10) == 0.0
    assert lambda_at(5, "linear", start_epoch=5, ramp_epochs=10) == 0.0
    assert lambda_at(7.5, "linear", start_epoch=5, ramp_epochs=10) == pytest.approx(0.25)
    assert lambda_at(15, "linear", start_epoch=5, ramp_epochs=10) == 1.0
    assert lambda_at(40, "linear", start_epoch=5, ramp_epochs=10) == 1.0
    assert lambda_at(50, "linear", start_epoch=0, ramp_epochs=0, total_epochs=100) == pytest.approx(0.5)
    assert lambda_at(10, "cosine", start_epoch=5, ramp_epochs=10) == pytest.approx(0.5)
    assert lambda_at(6, "cosine", start_epoch=5, ramp_epochs=10) < lambda_at(6, "linear", start_epoch=5, ramp_epochs=10)
    with pytest.raises(ValueError, match="schedule"):
        lambda_at(1, "step")



def _local_batches(rank):
    torch.manual_seed(100 + rank)  # every rank sees different samples, and a different number of them
    sizes = [2 + rank + step % 2 for step in range(4)]
    return [(torch.randn(n, 3), torch.softmax(torch.randn(n, 4), -1), torch.randint(0, 4, (n,))) for n in sizes]


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    anchors = EmotionAnchors(4, 3, queue_size=5, k=2)
    for batch in _local_batches(rank):
        anchors.enqueue(*batch)
    state = {name: value.tolist() for name, value in anchors.state_dict().items()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(state))
    dist.destroy_process_group()


def test_queues_identical_on_two_gloo_ranks(tmp_path, spawn_ranks):
    spawn_ranks(_ddp_worker, str(tmp_path), timeout=120)
    states = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = EmotionAnchors(4, 3, queue_size=5, k=2)
    for b0, b1 in zip(_local_batches(0), _local_batches(1), strict=True):  # the same steps, gathered in rank order
        single.enqueue(*(torch.cat([x0, x1]) for x0, x1 in zip(b0, b1, strict=True)))
    for name, value in single.state_dict().items():
        assert states[0][name] == states[1][name] == value.tolist(), name
    assert int(single.count.sum()) > 0


def test_loss_command_line_times_the_asked_batches_and_refuses_zero(capsys):
    threads = torch.get_num_threads()
    loss.main(["--batches", "3", "5", "--steps", "2", "--repeats", "1", "--dim", "16"])
    assert torch.get_num_threads() == threads  # bench() runs on one thread, then gives back the caller's count
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["SDL step", "SDL step"]
    assert "batch 3, 7 classes, 16-d features" in lines[0] and "batch 5," in lines[1]
    with pytest.raises(SystemExit):
        loss.main(["--steps", "0"])
    assert "at least 1" in capsys.readouterr().err
