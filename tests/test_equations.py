"""The paper's equations worked by hand: graders for MCP (Eq. 3-6), TMA (Eq. 7-15) and SDL (Eq. 16-21).

Each component has one tiny case whose numbers are derived in the comments (pen and paper, a table of the normal
CDF for GELU), and a property test against an independent formulation (the Triton kernels' reference functions,
which are written differently: MCP on feature maps with conv2d, T-MSA with scaled_dot_product_attention).
A teacher runs one component's grader alone with `python -m pytest tests/test_equations.py -k mcp` (or `-k tma`,
`-k sdl`); README's "Exercises" says what a student deletes for each.
"""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loss import EmotionAnchors, sdl_loss
from model import MCP, TMA

LN2, LN3 = math.log(2), math.log(3)


def set_linear(linear, weight, bias=None):
    weight = torch.tensor(weight, dtype=torch.float32)
    assert weight.shape == linear.weight.shape, f"weight {tuple(weight.shape)} for {linear}"
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(torch.tensor(bias if bias is not None else [0.0] * len(weight)))


# ----------------------------------------------------------------------------- MCP, Eq. (3)-(6)
def test_mcp_worked_by_hand():
    # One frame, N = 4 tokens (a 2 x 2 grid), C = 2 channels, K = 1 prompt channel, sharpness s = 2.
    mcp = MCP(width=2, prompt_dim=1, fovea_init=2.0)
    set_linear(mcp.down_x, [[1.0, 0.0]], [0.0])  # x0 = channel 0 of x_in
    set_linear(mcp.down_a, [[0.0, 1.0]], [0.5])  # x1 = channel 1 of a_in + 0.5
    set_linear(mcp.up, [[1.0], [-2.0]], [0.0, 1.0])  # P = (g, -2 g + 1)
    x_in = torch.tensor([[[LN2, 5.0], [LN2 / 2, 5.0], [0.0, 5.0], [0.0, 5.0]]])  # (1, 4, 2); channel 1 is unused
    a_in = torch.tensor([[[9.0, 1.0], [9.0, 2.0], [9.0, 3.0], [9.0, 4.0]]])  # channel 0 is unused
    # Eq. (3): x0 = (ln 2, ln 2 / 2, 0, 0), x1 = (1.5, 2.5, 3.5, 4.5)
    # Eq. (4): s x0 = (ln 4, ln 2, 0, 0); exp -> (4, 2, 1, 1), sum 8; A = (1/2, 1/4, 1/8, 1/8)
    # Eq. (5): x0' = A x0 = (ln 2 / 2, ln 2 / 8, 0, 0) = (0.346574, 0.086643, 0, 0)
    # Eq. (6): g = x0' + x1 = (1.846574, 2.586643, 3.5, 4.5); P = (g, -2 g + 1)
    g = [1.846574, 2.586643, 3.5, 4.5]
    expected = torch.tensor([[[v, -2 * v + 1] for v in g]])  # (1, 4, 2)
    torch.testing.assert_close(mcp(x_in, a_in), expected, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(frames=st.integers(1, 3), side=st.integers(1, 5), width=st.integers(1, 12), k=st.integers(1, 4),
       s=st.floats(-3.0, 10.0), seed=st.integers(0, 2**16))
def test_mcp_matches_the_kernels_reference(frames, side, width, k, s, seed):
    from kernels.mcp_gate import mcp_gate_ref  # Eq. (3)-(5) on (BT, C, h, w) feature maps with 1x1 conv2d

    torch.manual_seed(seed)
    mcp = MCP(width, k, fovea_init=s).double()
    x_in, a_in = (torch.randn(frames, side * side, width, dtype=torch.float64) for _ in range(2))
    gate = mcp_gate_ref(x_in, a_in, mcp.down_x.weight, mcp.down_x.bias, mcp.down_a.weight, mcp.down_a.bias,
                        mcp.sharpness)
    torch.testing.assert_close(mcp(x_in, a_in), mcp.up(gate))


# ----------------------------------------------------------------------------- TMA, Eq. (7)-(15)
def tma_for_hand_cases():
    """C = 2 channels, d = 2, 2 heads of width D = 1 (so the attention scale D^-1/2 is 1)."""
    return TMA(width=2, dim=2, heads=2)


def test_tma_t_msa_worked_by_hand():
    # Eq. (9)-(11) alone: one clip, T = 2 frames, N = 1 position, h(t0) = (1, 0), h(t1) = (0, 1).
    tma = tma_for_hand_cases()
    # qkv rows (q_h0, q_h1, k_h0, k_h1, v_h0, v_h1): Q = ln 3 * h, K = h, V = (10 h_0, 20 h_1)
    set_linear(tma.t_qkv, [[LN3, 0], [0, LN3], [1, 0], [0, 1], [10, 0], [0, 20]])
    set_linear(tma.t_proj, [[1, 0], [0, 1]], [0, 0])  # W^O = identity
    h = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (B*T, N, d) = (2, 1, 2)
    # head 0 (channel 0): q = (ln 3, 0), k = (1, 0), v = (10, 0) over (t0, t1)
    #   t0: logits q k = (ln 3, 0) -> softmax (3/4, 1/4) -> 3/4 * 10 = 7.5;  t1: logits (0, 0) -> 5
    # head 1 (channel 1): q = (0, ln 3), k = (0, 1), v = (0, 20)
    #   t0: logits (0, 0) -> 10;  t1: logits (0, ln 3) -> (1/4, 3/4) -> 15
    # Eq. (11): Concat(head_0, head_1) W^O = t0 (7.5, 10), t1 (5, 15)
    expected = torch.tensor([[[7.5, 10.0]], [[5.0, 15.0]]])
    torch.testing.assert_close(tma.t_msa(h, T=2), expected, atol=1e-5, rtol=0)


def test_tma_worked_by_hand():
    # Eq. (7)-(15): one clip, T = 2 frames, N = 1 position, x_in(t0) = (10, 0), x_in(t1) = (0, 10).
    tma = tma_for_hand_cases()
    eye = [[1.0, 0.0], [0.0, 1.0]]
    set_linear(tma.t_down, eye, [0, 0])
    set_linear(tma.t_qkv, [[LN3 / 10, 0], [0, LN3 / 10], [0.1, 0], [0, 0.1], [1, 0], [0, 1]])
    set_linear(tma.t_proj, eye, [0, 0])
    set_linear(tma.t_up, eye, [0, 0])
    set_linear(tma.down, [[10.0, -10.0], [0.0, 0.0]], [0, 0])
    set_linear(tma.up, [[1.0, 0.0], [0.5, 0.0]], [0.0, 1.0])
    x_in = torch.tensor([[[10.0, 0.0]], [[0.0, 10.0]]])  # (B*T, N, C) = (2, 1, 2)
    # Eq. (7):  h = GELU(x_in): GELU(10) = 10 Phi(10) = 10 (to 1e-22), GELU(0) = 0, so h = x_in
    # Eq. (9):  Q = ln 3 h / 10 = ln 3 * (t0: (1, 0), t1: (0, 1)), K = h / 10, V = h
    # Eq. (10): head 0: t0 logits (ln 3, 0) -> (3/4, 1/4) -> 7.5; t1 (0, 0) -> 5.
    #           head 1: t0 (0, 0) -> 5; t1 (0, ln 3) -> 7.5
    # Eq. (11), (12): W^O and the up-projection are identities: t0 (7.5, 5), t1 (5, 7.5)
    # Eq. (13): LayerNorm over the 2 channels: mean 6.25, deviations +-1.25, variance 1.5625, so
    #           +-1.25 / sqrt(1.5625 + 1e-5) = +-0.9999968: t0 (1, -1), t1 (-1, 1) times 0.9999968
    # Eq. (14): down, rows (10, -10) and (0, 0): t0 (20 * 0.9999968, 0) = (19.999936, 0), t1 (-19.999936, 0);
    #           GELU: t0 (19.999936, 0), t1 (0, 0) (GELU(-20) = -20 Phi(-20), about 1e-88)
    # Eq. (15): up, rows (1, 0) and (0.5, 0), bias (0, 1): M(t0) = (19.999936, 10.999968), M(t1) = (0, 1)
    expected = torch.tensor([[[19.999936, 10.999968]], [[0.0, 1.0]]])
    torch.testing.assert_close(tma(x_in, T=2), expected, atol=1e-4, rtol=0)


@settings(max_examples=25, deadline=None)
@given(clips=st.integers(1, 2), T=st.integers(1, 5), N=st.integers(1, 4), heads=st.integers(1, 3),
       head_width=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_tma_t_msa_matches_the_kernels_reference(clips, T, N, heads, head_width, seed):
    from kernels.temporal_attention import temporal_attention_ref  # Eq. (10) with scaled_dot_product_attention

    torch.manual_seed(seed)
    d = heads * head_width
    tma = TMA(width=4, dim=d, heads=heads).double()
    h = torch.randn(clips * T, N, d, dtype=torch.float64)
    qkv = tma.t_qkv(h).reshape(clips, T, N, 3, heads, head_width)
    expected = tma.t_proj(temporal_attention_ref(qkv, head_width**-0.5).reshape(clips * T, N, d))
    torch.testing.assert_close(tma.t_msa(h, T), expected)


def test_tma_frames_of_different_clips_do_not_mix():
    # T-MSA attends over the frames of one clip: changing clip 1 must leave clip 0's output as it was
    tma = TMA(width=8, dim=4, heads=2)
    x = torch.randn(2 * 3, 5, 8)  # 2 clips of 3 frames
    y = x.clone()
    y[3:] += 1.0
    torch.testing.assert_close(tma(x, T=3)[:3], tma(y, T=3)[:3])
    assert not torch.allclose(tma(x, T=3)[3:], tma(y, T=3)[3:])


# ----------------------------------------------------------------------------- SDL, Eq. (16)-(21)
def test_sdl_worked_by_hand():
    # 2 classes, queues of 2 entries, k = 1 neighbour per class.
    anchors = EmotionAnchors(num_classes=2, dim=2, queue_size=2, k=1)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])
    anchors.enqueue(feats, probs, torch.tensor([0, 0, 1, 1]))
    f = torch.tensor([[2.0, 0.0]])
    # Eq. (16): cosine of f = (2, 0) with class 0's (1, 0), (0, 1): 1, 0; with class 1's (1, 1), (-1, 0): 1/sqrt 2, -1
    # Eq. (17): the top k = 1 per class: class 0: s = 1 (p = (0.8, 0.2)); class 1: s = 1/sqrt 2 (p = (0.3, 0.7))
    # Eq. (18): y~ = (1 (0.8, 0.2) + 0.707107 (0.3, 0.7)) / 1.707107 = (0.592893, 0.407107)
    soft = anchors.soft_labels(f)
    torch.testing.assert_close(soft, torch.tensor([[0.592893, 0.407107]]), atol=1e-6, rtol=0)
    logits, label = torch.tensor([[1.0, -1.0]], requires_grad=True), torch.tensor([0])
    total, ce, bce = sdl_loss(logits, label, soft, lam=0.5)
    # Eq. (19): CE = -log softmax(1, -1)_0 = log(1 + e^-2) = 0.126928
    # Eq. (20): log sigmoid(1) = -0.313262, log sigmoid(-1) = -1.313262; per element
    #           -(y log sigmoid(z) + (1 - y) log sigmoid(-z)):
    #           z = 1,  y = 0.592893: 0.592893 * 0.313262 + 0.407107 * 1.313262 = 0.720368
    #           z = -1, y = 0.407107: 0.407107 * 1.313262 + 0.592893 * 0.313262 = 0.720368; mean 0.720368
    # Eq. (21): total = CE + lambda BCE = 0.126928 + 0.5 * 0.720368 = 0.487112
    torch.testing.assert_close(torch.stack([total, ce, bce]), torch.tensor([0.487112, 0.126928, 0.720368]),
                               atol=2e-6, rtol=0)
    total.backward()
    # dL/dz = softmax(z) - onehot(y) + lambda (sigmoid(z) - y~) / 2 (the BCE mean is over the 2 elements):
    # softmax(1, -1) = (0.880797, 0.119203), sigmoid = (0.731059, 0.268941)
    # z_0: 0.880797 - 1 + 0.25 (0.731059 - 0.592893) = -0.084661; z_1: 0.119203 + 0.25 (0.268941 - 0.407107) = 0.084661
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.084661, 0.084661]]), atol=2e-6, rtol=0)


def test_sdl_negative_similarities_weigh_nothing_and_all_negative_take_the_plain_mean():
    # The rules README, SDL, adds to Eq. (18), whose ratio a negative cosine can push out of [0, 1] or to 0 / 0.
    anchors = EmotionAnchors(num_classes=2, dim=2, queue_size=1, k=1)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    anchors.enqueue(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), probs, torch.tensor([0, 1]))
    # f = (1, 0): cosines 1 (class 0) and -1/sqrt 2 (class 1). The ratio as written would give
    # ((0.9, 0.1) - 0.707107 (0.2, 0.8)) / (1 - 0.707107) = (2.590, -1.590); clamped at 0 the weights are 1 and 0:
    soft = anchors.soft_labels(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(soft, torch.tensor([[0.9, 0.1]]), atol=1e-6, rtol=0)
    # f = (0, -1): cosines 0 and -1/sqrt 2, every weight 0: the plain mean of the picks, (0.55, 0.45)
    soft = anchors.soft_labels(torch.tensor([[0.0, -1.0]]))
    torch.testing.assert_close(soft, torch.tensor([[0.55, 0.45]]), atol=1e-6, rtol=0)


def test_sdl_equal_similarities_pick_the_oldest_entries():
    # Eq. (17) with ties: of entries equally similar, the k picked are the oldest (as a stable sort by similarity
    # would pick them), so the soft label does not depend on how a top-k routine breaks ties.
    anchors = EmotionAnchors(2, 2, queue_size=4, k=2)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    anchors.enqueue(torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]]), probs, torch.tensor([0, 0, 0, 1]))
    # f = (2, 0): cosine 1 to all three of class 0 (the oldest two are picked), 0 to class 1's one (weight 0):
    # y~ = ((0.9, 0.1) + (0.8, 0.2)) / 2 = (0.85, 0.15)
    soft = anchors.soft_labels(torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(soft, torch.tensor([[0.85, 0.15]]), atol=1e-6, rtol=0)


def test_sdl_soft_label_is_a_convex_mix_of_the_stored_probabilities():
    anchors = EmotionAnchors(num_classes=3, dim=4, queue_size=4, k=2)
    anchors.enqueue(torch.randn(12, 4), torch.softmax(torch.randn(12, 3), -1), torch.arange(12) % 3)
    soft = anchors.soft_labels(torch.randn(5, 4))
    assert (soft >= 0).all()
    torch.testing.assert_close(soft.sum(-1), torch.ones(5))
