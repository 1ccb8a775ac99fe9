"""Golden numbers: logits, features, the SDL loss, the trainable gradients and both kernel references, pinned on fixed
weights and inputs (tests/fixtures/pinned.pt), so a rewrite that reads better cannot change what the code computes.

Regenerate only for a deliberate change of behaviour: `python tests/test_pinned.py --write`.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss import EmotionAnchors, sdl_loss  # noqa: E402
from model import build_model, set_trainable  # noqa: E402

PINNED = Path(__file__).resolve().parent / "fixtures" / "pinned.pt"
SMALL = dict(width=48, depth=2, heads=2, adapter_dim=24, tma_heads=1)  # s2d_tiny's grid and frames, fewer weights


def compute(weights=None):
    """Everything pinned, from `weights` (a state dict) or, when None, from a freshly seeded model."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    model = build_model("s2d_tiny", num_classes=7, num_frames=4, kernels="torch", **SMALL)
    if weights is not None:
        model.load_state_dict(weights)
    with torch.no_grad():  # move every parameter off its initial value, so no term is trivially zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    set_trainable(model, "video")
    S = model.cfg.img_size
    video = torch.randn(3, 3, 4, S, S, generator=gen)
    landmarks = torch.randn(3, 4, 128, 14, 14, generator=gen)
    labels = torch.tensor([0, 3, 6])
    logits, features = model(video, landmarks)
    anchors = EmotionAnchors(7, features.shape[1], queue_size=4, k=2)
    anchors.enqueue(torch.randn(10, features.shape[1], generator=gen),
                    torch.softmax(torch.randn(10, 7, generator=gen), -1), torch.arange(10) % 7)
    total, ce, bce = sdl_loss(logits, labels, anchors.soft_labels(features), 0.5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, [p for n, p in model.named_parameters() if p.requires_grad])
    return {"logits": logits.detach(), "features": features.detach(), "loss": torch.stack([total, ce, bce]).detach(),
            **{f"grad/{n}": g for n, g in zip(names, grads, strict=True)}}


def kernel_references():
    from kernels.mcp_gate import mcp_gate_ref
    from kernels.temporal_attention import temporal_attention_ref
    gen = torch.Generator().manual_seed(99)
    x, a = torch.randn(2, 16, 12, generator=gen), torch.randn(2, 16, 12, generator=gen)
    w = [torch.randn(shape, generator=gen) for shape in ((8, 12), (8,), (8, 12), (8,))]
    qkv = torch.randn(2, 5, 3, 3, 2, 4, generator=gen)
    return {"mcp_gate_ref": mcp_gate_ref(x, a, *w, torch.tensor([3.0])),
            "temporal_attention_ref": temporal_attention_ref(qkv, 0.5)}


def test_pinned_model_loss_and_gradients_are_unchanged():
    pinned = torch.load(PINNED, weights_only=True)
    now = compute(pinned["weights"])
    assert now.keys() == pinned["outputs"].keys()
    for name, value in now.items():
        torch.testing.assert_close(value, pinned["outputs"][name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_pinned_kernel_references_are_unchanged():
    pinned = torch.load(PINNED, weights_only=True)
    for name, value in kernel_references().items():
        torch.testing.assert_close(value, pinned["kernels"][name], atol=1e-6, rtol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    torch.manual_seed(0)
    weights = build_model("s2d_tiny", num_classes=7, num_frames=4, kernels="torch", **SMALL).state_dict()
    torch.save({"weights": weights, "outputs": compute(weights), "kernels": kernel_references()}, PINNED)
    print(f"wrote {PINNED} ({PINNED.stat().st_size:,} bytes)")
