"""Emotion-Anchors based Self-Distillation Loss (SDL), paper section III-D, Eq. (16)-(21).

Per class c the anchors are two FIFO queues of Q entries: pooled features (Q, D) and the softmax
probabilities the model gave those samples (Q, C). A training step uses them in this order:

    soft = anchors.soft_labels(features)            # Eq. (16)-(18), from the queues as they are
    total, ce, bce = sdl_loss(logits, labels, soft, lambda_at(...))   # Eq. (19)-(21)
    anchors.enqueue(features, logits.softmax(-1), labels)             # then refresh, no gradient

Paper: queues are refreshed from every mini-batch by ground-truth label and lambda rises from 0 to 1.
Release: queues start as uniform random values and are never refreshed (`init="random"`, and the
caller simply never calls enqueue); lambda follows epoch steps (`schedule="release"`).
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("linear", "cosine", "release")


def _gather_from_ranks(*tensors):
    """all_gather each (B_r, ...) tensor from every rank, concatenated in rank order (batch sizes may differ)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    size = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(sizes),) + t.shape[1:])  # (B_max, ...)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered.append(torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]))
    return gathered


def _unit(x):
    """Rows of x scaled to unit length along the last axis; zero rows stay zero (F.normalize's eps 1e-12)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def _unit_features_after_load(module, incompatible_keys):
    """Scale loaded queue features that are not unit length (raw ones, of an older checkpoint); rows already of
    unit length (within 1e-5) and empty slots stay bit for bit as saved, so a resumed run equals an unbroken one."""
    norms = module.features.norm(dim=-1, keepdim=True)
    raw = ((norms - 1).abs() > 1e-5) & (norms > 0)
    module.features.copy_(torch.where(raw, module.features / norms.clamp(min=1e-12), module.features))


class EmotionAnchors(nn.Module):
    """Per-class FIFO queues of features and probabilities, kept as buffers (so they are checkpointed).

    Storage: class c's queue fills from the right. Its `count[c]` valid entries sit at positions
    Q - count[c] .. Q - 1, oldest first, newest at position Q - 1; the other slots hold zeros.
    Features are stored scaled to unit length: Eq. (16) uses only their directions, and so one matrix product
    gives each sample's cosines times its own norm, which cancels (see soft_labels). Loading a state dict with raw
    features (an older checkpoint of ours) scales them on load.
    """

    def __init__(self, num_classes, dim, queue_size=16, k=2, init="empty"):
        super().__init__()
        if init not in ("empty", "random"):
            raise ValueError(f"EmotionAnchors: init must be 'empty' or 'random', got {init!r}")
        if k < 1 or queue_size < 1:
            raise ValueError(f"EmotionAnchors: need k >= 1 and queue_size >= 1, got k={k}, queue_size={queue_size}")
        self.num_classes, self.dim, self.queue_size, self.k = num_classes, dim, queue_size, k
        shape_f, shape_p = (num_classes, queue_size, dim), (num_classes, queue_size, num_classes)
        if init == "random":
            # The release: uniform [0, 1) values in every slot, all of them valid from the start
            # (its probability queue is not normalised either); the features stored at unit length.
            self.register_buffer("features", _unit(torch.rand(shape_f)))
            self.register_buffer("probs", torch.rand(shape_p))
            self.register_buffer("count", torch.full((num_classes,), queue_size, dtype=torch.long))
        else:
            self.register_buffer("features", torch.zeros(shape_f))
            self.register_buffer("probs", torch.zeros(shape_p))
            self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_load_state_dict_post_hook(_unit_features_after_load)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, dim={self.dim}, queue_size={self.queue_size}, k={self.k}"

    def valid(self):
        """(C, Q) bool: which queue slots hold an entry."""
        slots = torch.arange(self.queue_size, device=self.count.device)
        return slots[None, :] >= (self.queue_size - self.count)[:, None]

    @torch.no_grad()
    def soft_labels(self, features):
        """features (B, D) -> soft labels (B, C), or None while every queue is empty.

        Eq. (16)-(18), with three rules of ours (README, SDL): a similarity below 0 weighs 0; a sample whose picked
        similarities are all <= 0 takes the plain mean of its picks; of equally similar entries the oldest are
        picked. A class with fewer than k entries contributes those it has (none: it is left out).
        None means the soft label is undefined: sdl_loss then falls back to CE alone.
        Written for speed (it runs every step; README, SDL, has its time): few tensor operations.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"EmotionAnchors.soft_labels: features (B, D) = {tuple(features.shape)}, expected D={self.dim}"
            )
        counts = self.count.tolist()  # one read of C numbers; says whether masking is needed at all
        if sum(counts) == 0:
            return None
        B, C, Q = features.shape[0], self.num_classes, self.queue_size
        # Eq. (16): cosine similarity to every stored entry. The entries are unit length, so one matrix product gives
        # |f| cos; the factor |f| > 0 is the same for all of a sample's entries, so it changes neither Eq. (17)'s
        # ranking, nor the clamp at 0 and the fallback's test below, nor Eq. (18)'s ratio: it is never divided out.
        # (f = 0 gives all zeros: the fallback. Exact up to float overflow, far beyond any real feature.)
        anchors = self.features.reshape(C * Q, self.dim)  # (C*Q, D), unit length (or 0: an empty slot)
        sims = torch.mm(features.detach().float(), anchors.T).reshape(B, C, Q)
        valid = None if min(counts) == Q else self.valid()
        if valid is not None:
            sims.masked_fill_(~valid, float("-inf"))  # empty slots: picked only after every real entry
        # Eq. (17): the k most similar entries per class, by min(k, Q) rounds of max: each round picks the best slot
        # left and sets it to -inf. max returns the first of equal values, and a queue's oldest entries sit at the
        # lowest slots, so of equally similar entries the oldest are picked, as a stable sort would pick them.
        # For the default k = 2 this is faster than topk on rows of Q = 16 (slower from k = 4 on; README, SDL).
        # weights (B, C, Q) collects each pick's |f| cos clamped at 0 (the rule in _fallback's docstring); a pick
        # of an empty slot (a class with fewer than k entries) adds 0, so an empty class contributes nothing.
        weights = torch.zeros_like(sims)
        for _ in range(min(self.k, Q)):
            best, slot = sims.max(dim=-1, keepdim=True)  # (B, C, 1)
            weights.scatter_add_(2, slot, best.clamp_(min=0))
            sims.scatter_(2, slot, float("-inf"))
        picked = sims.isneginf() if valid is None else sims.isneginf() & valid  # (B, C, Q): the real entries picked
        _fallback(weights, picked)
        # Eq. (18): the weighted mean of the picked entries' stored probabilities, one product with (C*Q, C)
        weights = weights.reshape(B, C * Q)
        return torch.mm(weights, self.probs.reshape(C * Q, C)).div_(weights.sum(dim=1, keepdim=True))

    @torch.no_grad()
    def enqueue(self, features, probs, labels):
        """Push (B, D) features and (B, C) probabilities into their label's queue: newest in, oldest out.

        Under torch.distributed every rank's batch is gathered first (rank order), so all ranks apply the
        same update and keep identical queues. Within a class, samples enter in batch order.
        """
        B = labels.shape[0]
        if features.shape != (B, self.dim) or probs.shape != (B, self.num_classes):
            raise ValueError(
                f"EmotionAnchors.enqueue: features {tuple(features.shape)}, probs {tuple(probs.shape)}, "
                f"expected ({B}, {self.dim}) and ({B}, {self.num_classes})"
            )
        features, probs, labels = _gather_from_ranks(_unit(features.detach().float()), probs.detach().float(),
                                                     labels.long())
        Q, dev = self.queue_size, self.features.device
        features, probs, labels = features.to(dev), probs.to(dev), labels.to(dev)
        onehot = F.one_hot(labels, self.num_classes)  # (B, C)
        n_new = onehot.sum(0)  # (C,) entries arriving per class
        # How many later samples of the same class follow each sample: 0 for the newest of its class.
        later = (onehot.flip(0).cumsum(0).flip(0) - 1).gather(1, labels[:, None])[:, 0]  # (B,)
        # Shift every queue left by its number of arrivals: slot q takes the entry from slot q + n_new.
        src = torch.arange(Q, device=dev)[None, :] + n_new[:, None]  # (C, Q)
        keep = (src < Q)[:, :, None]
        src = src.clamp(max=Q - 1)
        self.features.copy_(self.features.gather(1, src[:, :, None].expand(-1, -1, self.dim)) * keep)
        self.probs.copy_(self.probs.gather(1, src[:, :, None].expand(-1, -1, self.num_classes)) * keep)
        # Arrivals fill the freed tail slots; only the newest Q per class fit.
        fits = later < Q
        slot = Q - 1 - later[fits]
        self.features[labels[fits], slot] = features[fits]
        self.probs[labels[fits], slot] = probs[fits]
        self.count.copy_((self.count + n_new).clamp(max=Q))


def _fallback(weights, picked):
    """Eq. (18)'s weights s, in place: weights (B, C, Q) hold each picked entry's similarity clamped at 0 (scaled
    by the sample's norm, which cancels in Eq. 18), picked (B, C, Q) marks the picked real entries.

    Cosine similarities can be negative, and then the paper's ratio can leave [0, 1] or divide by 0.
    Rule: weights are the similarities clamped at 0, so y~ = sum s p / sum s is a convex combination of stored
    probabilities; a sample whose picked similarities are all <= 0 (every weight 0) takes the plain mean of its
    picked real entries instead (weight 1 each). Where no picked similarity is negative and at least one is positive,
    this is the paper's formula unchanged.
    """
    none_positive = weights.sum(dim=(1, 2), keepdim=True) == 0  # (B, 1, 1)
    return weights.masked_fill_(picked & none_positive, 1.0)


def sdl_loss(logits, labels, soft, lam):
    """logits (B, C), labels (B,), soft (B, C) or None -> (total, ce, bce), all scalars.

    With soft None (no anchors yet) bce is 0 and total is CE alone.
    """
    ce = F.cross_entropy(logits.float(), labels)  # Eq. (19)
    if soft is None:
        return ce, ce.detach(), torch.zeros((), device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits.float(), soft.to(logits.device))  # Eq. (20), mean over B*C
    return torch.add(ce, bce, alpha=lam), ce.detach(), bce.detach()  # Eq. (21): ce + lam * bce


def lambda_at(epoch_float, schedule="linear", start_epoch=0, ramp_epochs=0, total_epochs=100):
    """Weight of the SDL term at a (fractional) epoch; 0 before start_epoch for every schedule.

    linear / cosine (the paper: "gradually increased from 0 to 1"): ramp from start_epoch over
        ramp_epochs (0 means: over the rest of training, up to total_epochs), then 1.
    release: the released scripts' steps for 100 epochs, read as whole epochs e = floor(epoch_float):
        e < 30 -> 0, 30 <= e < 50 -> 0.01, 50 <= e < 60 -> 0.1, 60 <= e < 80 -> 0.5, e >= 80 -> 1.0
        ("0.01 to 49" includes epoch 49). For another total the thresholds scale with total_epochs / 100.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lambda_at: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epoch_float < start_epoch:
        return 0.0
    if schedule == "release":
        e = math.floor(epoch_float)
        steps = ((80, 1.0), (60, 0.5), (50, 0.1), (30, 0.01))
        return next((lam for at, lam in steps if e * 100 >= at * total_epochs), 0.0)
    ramp = ramp_epochs if ramp_epochs > 0 else total_epochs - start_epoch
    t = min(1.0, (epoch_float - start_epoch) / ramp) if ramp > 0 else 1.0
    return t if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))


def bench(batches=(64, 512), num_classes=7, dim=768, queue_size=16, repeats=7, steps=200):
    """Median ms of one SDL step, soft labels (Eq. 16-18) and the loss (Eq. 19-21) forward and backward, on full
    queues, one thread (the caller's thread count is restored); printed, and returned as {batch: ms}.
    The steps cycle through 16 different batches: on one batch repeated, the CPU's branch predictor learns the
    data-dependent branches (torch.topk, which this step used before, then took a third of its time on new values)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen, result = torch.Generator().manual_seed(0), {}
        for B in batches:
            anchors = EmotionAnchors(num_classes, dim, queue_size, init="random")
            inputs = [(torch.randn(B, dim, generator=gen), torch.randint(0, num_classes, (B,), generator=gen),
                       torch.randn(B, num_classes, generator=gen, requires_grad=True)) for _ in range(16)]

            def step(i, anchors=anchors, inputs=inputs):
                features, labels, logits = inputs[i % len(inputs)]
                total, _, _ = sdl_loss(logits, labels, anchors.soft_labels(features), 0.5)
                total.backward()

            for i in range(20):
                step(i)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(steps):
                    step(i)
                times.append(1000 * (time.perf_counter() - t0) / steps)
            result[B] = sorted(times)[repeats // 2]
            print(f"SDL step, batch {B}, {num_classes} classes, {dim}-d features, queue {queue_size}, 1 thread: "
                  f"{result[B]:.3f} ms (median of {repeats} x {steps} steps)")
        return result
    finally:
        torch.set_num_threads(threads)  # the caller's setting back


# ---- S4D: soft-target cross-entropy with mixup / cutmix
# The joint fine-tuning recipe mixes each batch as timm's Mixup does in "batch" mode: the batch is paired with its
# flip, one lam ~ Beta(alpha, alpha) for the whole batch; when both mixup and cutmix are on, a batch uses cutmix
# with probability switch_prob, else mixup; targets are label-smoothed one-hots mixed with the same lam.


def soft_targets(labels, num_classes, smoothing=0.0):
    """labels (B,) -> (B, K) float32 one-hots with label smoothing (timm's convention, rows sum to 1):
    off-value smoothing / K, on-value 1 - smoothing + smoothing / K."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return target.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


def _numpy_rng(rng):
    """A numpy Generator as is; a torch.Generator gives one 62-bit seed for a fresh numpy Generator (numpy has the
    Beta draw that torch lacks with an explicit generator), so the torch generator's state still fixes everything."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (), generator=rng, device=rng.device)))
    raise TypeError(f"MixCut: rng must be a torch.Generator or numpy.random.Generator, got {type(rng).__name__}")


class MixCut:
    """Batch mixing of the joint fine-tuning recipe: mixup (alpha 0.8) or cutmix (alpha 1.0), switch probability
    0.5, applied to every batch (prob 1.0), label smoothing 0.1. mixup_alpha = cutmix_alpha = 0: no mixing, only
    label smoothing.

    mix(x, labels, rng) with x images (B, 3, H, W) or videos (B, 3, T, H, W), labels (B,) -> (mixed x, soft
    targets (B, K)). Sample i is mixed with sample B - 1 - i (x.flip(0)); with odd B the middle one, and with B == 1
    the only one, is mixed with itself. Cutmix uses one box for the whole batch, on every frame of a clip.
    """

    def __init__(self, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, smoothing=0.1):
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1 or not 0 <= prob <= 1:
            raise ValueError(f"MixCut: need alphas >= 0 and probabilities in [0, 1], got mixup_alpha={mixup_alpha}, "
                             f"cutmix_alpha={cutmix_alpha}, switch_prob={switch_prob}, prob={prob}")
        self.num_classes, self.smoothing = num_classes, smoothing
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob, self.prob = mixup_alpha, cutmix_alpha, switch_prob, prob

    def __repr__(self):
        return (f"MixCut(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, switch_prob={self.switch_prob}, prob={self.prob}, "
                f"smoothing={self.smoothing})")

    def draw(self, rng, height, width):
        """One batch's parameters -> (lam, box): box (y0, y1, x0, x1) for cutmix, None for mixup (or no mixing,
        lam 1.0). __call__ draws exactly this, so a generator in the same state reproduces its choice."""
        rng = _numpy_rng(rng)
        if (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0) or rng.random() >= self.prob:
            return 1.0, None
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cutmix:
            return lam, None
        # timm's rand_bbox: sides sqrt(1 - lam) of the image's (area fraction 1 - lam), centre uniform over the
        # pixels, the box clipped to the image; then lam is corrected to the fraction of the image left unboxed.
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
        x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
        return 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1)

    def apply(self, x, labels, lam, box=None):
        """Mix x (B, 3, [T,] H, W) and labels (B,) with given lam and box -> (mixed x, soft targets (B, K))."""
        if x.ndim not in (4, 5) or labels.shape != (x.shape[0],):
            raise ValueError(f"MixCut: x {tuple(x.shape)} must be (B, 3, H, W) or (B, 3, T, H, W) and labels "
                             f"{tuple(labels.shape)} must be (B,) with the same B")
        target = soft_targets(labels, self.num_classes, self.smoothing)
        if box is None and lam == 1.0:
            return x, target
        target = target * lam + target.flip(0) * (1.0 - lam)
        if box is None:
            return x * lam + x.flip(0) * (1.0 - lam), target
        y0, y1, x0, x1 = box
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]  # the last two axes: the same box on every frame
        return mixed, target

    def __call__(self, x, labels, rng):
        """x (B, 3, [T,] H, W), labels (B,), rng a torch.Generator or numpy Generator -> (mixed x, targets (B, K))."""
        return self.apply(x, labels, *self.draw(rng, x.shape[-2], x.shape[-1]))


def soft_target_ce(logits, target):
    """logits (B, K), target (B, K) rows summing to 1 -> scalar: mean over the batch of sum(-target * log_softmax)."""
    return (-target.to(logits.device) * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time one SDL step (soft labels, Eq. 16-18, and the loss, Eq. 19-21, "
                                                 "forward and backward) on full queues, 1 thread.")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 512], help="batch sizes (default 64 512)")
    parser.add_argument("--num-classes", type=int, default=7)
    parser.add_argument("--dim", type=int, default=768, help="feature dimension")
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is printed")
    parser.add_argument("--steps", type=int, default=200, help="steps per repeat")
    args = parser.parse_args(argv)
    if min(args.batches + [args.num_classes, args.dim, args.queue_size, args.repeats, args.steps]) < 1:
        parser.error("every size and count must be at least 1")
    bench(tuple(args.batches), args.num_classes, args.dim, args.queue_size, args.repeats, args.steps)


if __name__ == "__main__":
    main()
