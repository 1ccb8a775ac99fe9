"""The whole model with kernels="triton" equals kernels="torch" (s2d_tiny): outputs and trainable gradients.

Without CUDA the Triton kernels run in the interpreter (tests/conftest.py switches it on); one clip of 4 frames
keeps that to a few seconds.
"""
import torch

from model import build_model, set_trainable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(model, video, landmarks, grad_logits):
    """Logits, features and the gradients of every trainable parameter, for one shared grad_output."""
    logits, features = model(video, landmarks)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(logits, list(params.values()), grad_logits)
    return logits, features, dict(zip(params, grads, strict=True))


def test_triton_kernels_match_torch_reference_in_the_model():
    fused = build_model("s2d_tiny", 7, 4, kernels="triton").to(DEVICE)
    reference = build_model("s2d_tiny", 7, 4, kernels="torch").to(DEVICE)
    reference.load_state_dict(fused.state_dict())
    for m in (fused, reference):
        set_trainable(m, "video")
    S = fused.cfg.img_size
    video, landmarks = torch.randn(1, 3, 4, S, S, device=DEVICE), torch.randn(1, 4, 128, 14, 14, device=DEVICE)
    grad_logits = torch.randn(1, 7, device=DEVICE)

    logits, features, grads = run(fused, video, landmarks, grad_logits)
    logits_ref, features_ref, grads_ref = run(reference, video, landmarks, grad_logits)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features, features_ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        scale = grads_ref[name].abs().max().clamp(min=1e-3)  # compare on the parameter's own gradient scale
        torch.testing.assert_close(g / scale, grads_ref[name] / scale, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
