"""S4D pieces: soft targets, mixup / cutmix and soft-target CE (loss.py); the joint image + video schedule (data.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from data import JointSchedule
from loss import MixCut, soft_target_ce, soft_targets

K = 7


def gen(seed):
    return torch.Generator().manual_seed(seed)


def box_mask(box, height, width):
    """(H, W) bool, True inside box (y0, y1, x0, x1)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    if box is not None:
        y0, y1, x0, x1 = box
        mask[y0:y1, x0:x1] = True
    return mask


# ---- soft targets and the loss

def test_soft_targets_hand_example():
    t = soft_targets(torch.tensor([2, 0]), 4, 0.1)
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4  # 0.025, 0.925
    assert t.shape == (2, 4) and t.dtype == torch.float32
    assert torch.allclose(t, torch.tensor([[off, off, on, off], [on, off, off, off]]))
    assert torch.allclose(t.sum(-1), torch.ones(2))
    assert torch.equal(soft_targets(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))


def test_soft_target_ce_matches_cross_entropy():
    logits, labels = torch.randn(5, K), torch.randint(0, K, (5,))
    assert torch.allclose(soft_target_ce(logits, soft_targets(labels, K, 0.0)), F.cross_entropy(logits, labels))
    for eps in (0.1, 0.3):
        assert torch.allclose(soft_target_ce(logits, soft_targets(labels, K, eps)),
                              F.cross_entropy(logits, labels, label_smoothing=eps))
    probs = torch.softmax(torch.randn(5, K), -1)  # any soft target: PyTorch's probability-target CE
    assert torch.allclose(soft_target_ce(logits, probs), F.cross_entropy(logits, probs))


# ---- mixup / cutmix

def test_mixup_is_lam_x_plus_flip():
    mix = MixCut(K, cutmix_alpha=0.0)  # mixup on every batch
    labels = torch.tensor([0, 1, 2, 3, 4, 6])  # no sample shares its partner's label, so lam shows in the target
    off, on = 0.1 / K, 0.9 + 0.1 / K
    for x in (torch.randn(6, 3, 5, 4), torch.randn(6, 3, 2, 5, 4)):
        for seed in range(5):
            lam, box = mix.draw(gen(seed), 5, 4)
            mixed, target = mix(x, labels, gen(seed))
            assert box is None and 0.0 <= lam <= 1.0
            lam_t = (target[torch.arange(6), labels] - off) / (on - off)  # recovered from the target
            assert torch.allclose(lam_t, torch.full((6,), lam), atol=1e-5)
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
            t = soft_targets(labels, K, 0.1)
            assert torch.allclose(target, lam * t + (1 - lam) * t.flip(0), atol=1e-6)


def test_cutmix_box_from_flip_same_on_every_frame():
    mix = MixCut(K, mixup_alpha=0.0)  # cutmix on every batch
    B, T, H, W = 4, 3, 8, 10
    x, labels = torch.randn(B, 3, T, H, W), torch.tensor([0, 1, 2, 3])
    nonempty = 0
    for seed in range(12):
        lam, box = mix.draw(gen(seed), H, W)
        mixed, target = mix(x, labels, gen(seed))
        inside = box_mask(box, H, W)
        assert torch.equal(mixed[..., inside], x.flip(0)[..., inside])
        assert torch.equal(mixed[..., ~inside], x[..., ~inside])
        changed = (mixed != x).any(dim=1)  # (B, T, H, W); x is continuous, so every boxed value changed
        assert all(torch.equal(changed[b, f], inside) for b in range(B) for f in range(T))
        assert lam == pytest.approx(1.0 - inside.float().mean().item())
        t = soft_targets(labels, K, 0.1)
        assert torch.allclose(target, lam * t + (1 - lam) * t.flip(0), atol=1e-6)
        nonempty += int(inside.any())
    assert nonempty >= 6


def test_cutmix_on_images_and_box_clipped():
    mix = MixCut(K, mixup_alpha=0.0)
    x, labels = torch.randn(2, 3, 6, 6), torch.tensor([1, 5])
    for seed in range(30):
        lam, box = mix.draw(gen(seed), 6, 6)
        y0, y1, x0, x1 = box
        assert 0 <= y0 <= y1 <= 6 and 0 <= x0 <= x1 <= 6
        mixed, _ = mix(x, labels, gen(seed))
        inside = box_mask(box, 6, 6)
        assert torch.equal(mixed[..., inside], x.flip(0)[..., inside]) and torch.equal(mixed[..., ~inside],
                                                                                       x[..., ~inside])


def test_switch_and_prob():
    both = [MixCut(K).draw(np.random.default_rng(s), 16, 16)[1] is not None for s in range(400)]
    assert 0.4 < np.mean(both) < 0.6  # switch_prob 0.5: about half the batches cutmix
    assert all(MixCut(K, cutmix_alpha=0.0).draw(gen(s), 16, 16)[1] is None for s in range(20))
    assert all(MixCut(K, mixup_alpha=0.0).draw(gen(s), 16, 16)[1] is not None for s in range(20))
    assert all(MixCut(K, prob=0.0).draw(gen(s), 16, 16) == (1.0, None) for s in range(20))


def test_alphas_zero_only_smooths():
    mix = MixCut(K, mixup_alpha=0.0, cutmix_alpha=0.0)
    x, labels = torch.randn(3, 3, 2, 4, 4), torch.tensor([0, 3, 6])
    mixed, target = mix(x, labels, gen(0))
    assert torch.equal(mixed, x) and torch.equal(target, soft_targets(labels, K, 0.1))


def test_batch_of_one_and_odd_batch():
    mix = MixCut(K, cutmix_alpha=0.0)
    x, labels = torch.randn(1, 3, 4, 4), torch.tensor([2])
    mixed, target = mix(x, labels, gen(1))
    assert torch.allclose(mixed, x, atol=1e-6) and torch.allclose(target, soft_targets(labels, K, 0.1))
    x, labels = torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2])
    mixed, target = mix(x, labels, gen(1))
    assert torch.allclose(mixed[1], x[1], atol=1e-6)  # the middle sample is its own partner


def test_same_seed_same_output():
    mix = MixCut(K)
    x, labels = torch.randn(4, 3, 2, 6, 6), torch.tensor([0, 1, 2, 3])
    for seed in range(6):
        a, b = mix(x, labels, gen(seed)), mix(x, labels, gen(seed))
        c, d = mix(x, labels, np.random.default_rng(seed)), mix(x, labels, np.random.default_rng(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])
    g = gen(0)
    outputs = [mix(x, labels, g)[1] for _ in range(3)]  # one generator advances: later batches differ
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_bad_inputs():
    mix = MixCut(K)
    with pytest.raises(ValueError, match="MixCut"):
        mix(torch.randn(2, 3, 4), torch.tensor([0, 1]), gen(0))
    with pytest.raises(ValueError, match="MixCut"):
        mix(torch.randn(2, 3, 4, 4), torch.tensor([0, 1, 2]), gen(0))
    with pytest.raises(TypeError, match="rng"):
        mix(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="mixup_alpha=-1"):
        MixCut(K, mixup_alpha=-1)


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 5), K=st.integers(2, 6), video=st.booleans(), H=st.integers(1, 7), W=st.integers(1, 7),
       mixup=st.sampled_from([0.0, 0.8]), cutmix=st.sampled_from([0.0, 1.0]), smoothing=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 10**6))
def test_targets_are_distributions_and_pixels_stay_in_range(B, K, video, H, W, mixup, cutmix, smoothing, seed):
    x = torch.rand((B, 3, 2, H, W) if video else (B, 3, H, W), generator=gen(seed))
    labels = torch.randint(0, K, (B,), generator=gen(seed + 1))
    mixed, target = MixCut(K, mixup, cutmix, smoothing=smoothing)(x, labels, gen(seed))
    assert mixed.shape == x.shape and target.shape == (B, K)
    assert (target >= 0).all() and torch.allclose(target.sum(-1), torch.ones(B), atol=1e-6)
    lo, hi = torch.minimum(x, x.flip(0)), torch.maximum(x, x.flip(0))  # every value comes from the sample or partner
    assert (mixed >= lo - 1e-6).all() and (mixed <= hi + 1e-6).all()
    assert torch.isfinite(soft_target_ce(torch.randn(B, K), target))


# ---- joint image + video schedule

def test_joint_schedule_step_counts():
    s = JointSchedule(10, 7, image_share=0.5, seed=0)
    order = s.order(0)
    assert len(s) == len(order) == 13 and order.count("video") == 10 and order.count("image") == 3
    s = JointSchedule(10, 7, image_share=1.0, seed=0)  # pre-training: every image batch
    assert len(s) == 17 and s.order(3).count("image") == 7
    assert JointSchedule(0, 4, image_share=1.0).order(0) == ["image"] * 4
    assert JointSchedule(5, 0).order(0) == ["video"] * 5


def test_joint_schedule_deterministic_and_changes_with_epoch():
    a, b = JointSchedule(10, 7, seed=3), JointSchedule(10, 7, seed=3)
    assert all(a.order(e) == b.order(e) for e in range(4))  # every rank builds the same order
    assert len({tuple(a.order(e)) for e in range(4)}) == 4
    assert a.order(0) != JointSchedule(10, 7, seed=4).order(0)


def test_joint_schedule_counts_before():
    s = JointSchedule(6, 8, image_share=0.5, seed=1)
    for epoch in range(3):
        order = s.order(epoch)
        for step in range(len(s) + 1):
            counts = s.counts_before(epoch, step)
            assert counts == {"video": order[:step].count("video"), "image": order[:step].count("image")}
        assert s.counts_before(epoch, len(s)) == {"video": 6, "image": 4}
    with pytest.raises(ValueError, match="outside"):
        s.counts_before(0, len(s) + 1)


def test_joint_schedule_empty_raises():
    with pytest.raises(ValueError, match="video_steps=0, image_steps=0"):
        JointSchedule(0, 0)
    with pytest.raises(ValueError, match="image_steps=1, image_share=0.5"):
        JointSchedule(0, 1, image_share=0.5)  # int(0.5 * 1) == 0 image steps


def test_train_views_are_augmented_views_of_one_clip(tmp_path):
    demo = data.make_demo(tmp_path / "demo", num_clips=14, workers=1)
    samples = data.read_split("demo", data.dataset_files("demo", demo).train)[:3]
    ds = data.ClipDataset(samples, demo, mode="train", num_frames=4, image_size=112, sampling_rate=2,
                          augment=data.Augment(scale=(0.2, 1.0), randaugment=False, erase_p=0.0), train_views=2)
    assert len(ds) == 6
    items = [ds[i] for i in range(6)]
    assert [it["index"] for it in items] == [0, 0, 1, 1, 2, 2] and [it["view"] for it in items] == [0, 1] * 3
    assert [it["label"] for it in items[::2]] == [s.label for s in samples]
    assert not torch.equal(items[0]["video"], items[1]["video"])  # its own crop and frames
