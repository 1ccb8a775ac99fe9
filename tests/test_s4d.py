"""S4D in model.py: the encoder's size and names (the release's), MoAE routing and its balance loss, the image path,
the tubelet embedding, the MAE pieces (masks, targets, loss) and both released checkpoints' loaders."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import model as M

# Measured on the authors' release in its DFEW configuration (README, S4D)
RELEASED_PARTS = {"patch embedding": 1_180_416, "blocks without MoAE": 85_045_248, "experts": 14_201_856,
                  "routers": 73_824, "fc_norm": 1_536, "head image": 5_383, "head video": 5_383}


def tiny(num_frames=4, **overrides):
    return M.build_model("s4d_tiny", num_classes=5, num_frames=num_frames, **overrides)


def test_base_size_matches_the_release_part_by_part():
    net = M.build_model("s4d_base", num_classes=7, num_frames=16)
    assert M.parameter_parts(net) == RELEASED_PARTS
    assert sum(p.numel() for p in net.parameters()) == 100_513_646 == sum(RELEASED_PARTS.values())
    assert list(net.buffers()) == []  # the sin-cos table is neither a parameter nor a buffer
    assert net.cfg.tokens == 800 and net.cfg.img_size == 160
    plain = M.build_model("s4d_base", num_classes=7, num_frames=16, moae_from=12)  # no MoAE anywhere
    assert sum(p.numel() for p in plain.parameters()) == 86_237_966


def synthetic(fixture):
    """A state dict with the fixture's names and shapes, every tensor distinct."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) if shape else torch.randn((), generator=gen)
            for k, shape in fixture["state_dict"].items()}


def test_released_finetuned_checkpoint_loads_every_tensor(fixture_json):
    fixture = fixture_json("official_s4d_finetune_dfew")
    sd = synthetic(fixture)
    net = M.build_model("s4d_base", num_classes=7, num_frames=16)
    report = M.load_checkpoint(net, {"model": sd}, verbose=False)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert len(report.loaded) == fixture["num_tensors"] == 380
    own = net.state_dict()
    assert torch.equal(own["blocks.7.moae.experts.3.fc2.weight"], sd["blocks.7.moe_layer.experts.3.fc2.weight"])
    assert torch.equal(own["blocks.11.moae.noise.bias"], sd["blocks.11.moe_layer.router.noise_linear.bias"])
    assert torch.equal(own["head.video.weight"], sd["head.video.weight"])
    # the architecture can be read back from the file alone (eval.py does)
    cfg = M.s4d_config_from_state_dict(sd)
    assert (cfg.width, cfg.depth, cfg.moae_from, cfg.experts, cfg.expert_dim, cfg.heads) == (768, 12, 6, 8, 192, 12)
    assert (cfg.num_classes, cfg.image_classes, cfg.img_size) == (7, 7, 160)


def test_released_pretrained_encoder_loads_into_both_models(fixture_json):
    fixture = fixture_json("official_s4d_pretrain")
    sd = synthetic(fixture)
    for wrap in (lambda d: {"model": d, "epoch": 99}, lambda d: {"module": d}, lambda d: d):
        mae = M.build_model("s4d_base", num_classes=7, num_frames=16, pretrain=True)
        report = M.load_checkpoint(mae, wrap(sd), verbose=False)
        assert report.missing == [] and report.unexpected == [] and len(report.loaded) == 218
        assert torch.equal(mae.mask_token, sd["mask_token"])
    net = M.build_model("s4d_base", num_classes=7, num_frames=16)
    report = M.load_checkpoint(net, {"model": sd}, verbose=False)
    assert report.unexpected == [] and report.mismatched == []
    assert set(report.ignored) == {k for k in sd if k.startswith(("encoder.norm.", "decoder.", "encoder_to_decoder",
                                                                   "mask_token"))}
    assert {k.split(".")[0] for k in report.missing} == {"blocks", "fc_norm", "head"}
    assert all(".moae." in k for k in report.missing if k.startswith("blocks."))  # experts and routers start fresh
    assert len(report.loaded) == 218 - len(report.ignored)
    assert torch.equal(net.blocks[3].attn.q_bias, sd["encoder.blocks.3.attn.q_bias"])
    assert torch.equal(net.patch_embed.proj.weight, sd["encoder.patch_embed.proj.weight"])


# ----------------------------------------------------------------------------- MoAE
def hand_moae():
    """4 experts on 2-d tokens; router logits = token @ W^T with W chosen so the logits are easy to read."""
    moae = M.MoAE(width=2, experts=4, dim=3, top_k=2, noise=False, capacity=0)
    with torch.no_grad():
        moae.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]))
        moae.router.bias.zero_()
    return moae.eval()


def test_moae_top2_selection_and_weights_by_hand():
    moae = hand_moae()
    tokens = torch.tensor([[2.0, 1.0], [-1.0, 0.0]])
    # token 0: logits (2, 1, -2, 1.5): experts 0 and 3, weights softmax(2, 1.5) = (0.6225, 0.3775)
    # token 1: logits (-1, 0, 1, -0.5): experts 2 and 1, weights softmax(1, 0) = (0.7311, 0.2689)
    _, chosen, weight = moae.route(tokens)
    assert chosen.tolist() == [[0, 3], [2, 1]]
    torch.testing.assert_close(weight, torch.tensor([[0.622459, 0.377541], [0.731059, 0.268941]]))
    out = moae(tokens[None])[0]
    expert = [e(tokens) for e in moae.experts]
    want = torch.stack([0.622459 * expert[0][0] + 0.377541 * expert[3][0],
                        0.731059 * expert[2][1] + 0.268941 * expert[1][1]])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_each_token_goes_to_exactly_two_experts():
    moae = M.MoAE(width=8, experts=8, dim=4, top_k=2, noise=False, capacity=0).eval()
    seen = []
    for e, expert in enumerate(moae.experts):
        expert.register_forward_hook(lambda m, inputs, out, e=e: seen.append((e, inputs[0])))
    tokens = torch.randn(3, 10, 8)
    moae(tokens)
    flat = tokens.reshape(30, 8)
    counts = torch.zeros(30, dtype=torch.long)
    for _, x in seen:  # which tokens each expert received
        hit = (x[:, None] == flat[None]).all(-1)  # (received, 30)
        assert (hit.sum(1) == 1).all()
        counts += hit.sum(0)
    assert counts.tolist() == [2] * 30


def test_capacity_drops_tokens_only_in_training():
    moae = M.MoAE(width=4, experts=4, dim=4, top_k=2, noise=False, capacity=1.0)  # at most int(M / 4) per expert
    with torch.no_grad():
        moae.router.weight.zero_()
        moae.router.bias.copy_(torch.tensor([3.0, 2.0, 0.0, 0.0]))  # every token picks experts 0 and 1
    tokens = torch.randn(1, 8, 4)
    trained = moae.train()(tokens)[0]
    assert (trained[2:] == 0).all() and (trained[:2] != 0).any()  # 2 tokens of capacity; the other 6 get nothing
    full = moae.eval()(tokens)[0]
    torch.testing.assert_close(full[:2], trained[:2])
    assert (full[2:] != 0).all()


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**16))
def test_eval_prediction_is_the_same_alone_or_in_any_batch(batch, seed):
    net = tiny().eval()
    gen = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch + 1, 3, 4, 112, 112, generator=gen)
    together, _ = net(clips)
    for i in range(batch + 1):
        alone, _ = net(clips[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
    again, _ = net(clips)
    assert torch.equal(again, together)  # no noise in eval


def test_balance_loss_formula_by_hand():
    # 2 tokens, 2 experts, top-1: token 0 -> expert 0 with probs (0.7311, 0.2689), token 1 -> expert 1 with
    # probs (0.5, 0.5). f = (1/2, 1/2), P = (0.6155, 0.3845): loss = 2 * (0.5 * 0.6155 + 0.5 * 0.3845) = 1
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    chosen = torch.tensor([[0], [1]])
    torch.testing.assert_close(M.balance_loss(logits, chosen), torch.tensor(1.0))
    # both tokens to expert 0: f = (1, 0): loss = 2 * 0.6155
    torch.testing.assert_close(M.balance_loss(logits, torch.tensor([[0], [0]])), torch.tensor(2 * 0.615529))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**16), st.floats(0.0, 3.0))
def test_balance_loss_is_least_for_uniform_routing(experts, seed, peak):
    """Tokens that all route alike (the collapse the loss fights): E * mean of the top-k probabilities >= k,
    with equality only for uniform probabilities."""
    k = min(2, experts)
    gen = torch.Generator().manual_seed(seed)
    logits = (peak * torch.randn(experts, generator=gen)).expand(6, -1)
    chosen = logits.topk(k, dim=-1).indices
    loss = M.balance_loss(logits, chosen)
    assert loss >= k - 1e-5
    uniform = torch.zeros(6, experts)
    torch.testing.assert_close(M.balance_loss(uniform, uniform.topk(k, dim=-1).indices), torch.tensor(float(k)))


def test_router_noise_only_in_training_and_behind_its_option():
    moae = M.MoAE(width=4, experts=4, dim=4, top_k=2, noise=True, capacity=0)
    tokens = torch.randn(16, 4)
    assert not torch.equal(moae.train().route(tokens)[0], moae.train().route(tokens)[0])
    assert torch.equal(moae.eval().route(tokens)[0], moae.router(tokens))
    quiet = M.MoAE(width=4, experts=4, dim=4, top_k=2, noise=False, capacity=0).train()
    assert torch.equal(quiet.route(tokens)[0], quiet.router(tokens))
    net = tiny(router_noise=False)
    M.set_trainable(net, "all")
    assert all(not p.requires_grad for n, p in net.named_parameters() if ".moae.noise." in n)


# ----------------------------------------------------------------------------- tokens, positions, the image path
def test_tubelet_embedding_equals_a_conv3d_and_the_token_order():
    embed = M.TubeletEmbed(width=6, patch_size=4, tubelet=2)
    x = torch.randn(2, 3, 4, 8, 8)
    ref = F.conv3d(x, embed.proj.weight, embed.proj.bias, stride=(2, 4, 4)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(x), ref)
    # token n = (t, h, w) in row-major order holds the pixels patchify gives it: a linear map of them
    pixels = M.patchify(x, 4, 2)  # (B, N, t*p*p, 3)
    weight = embed.proj.weight.permute(0, 2, 3, 4, 1).reshape(6, -1)  # (C, t*p*p*3) in patchify's order
    torch.testing.assert_close(embed(x), pixels.flatten(2) @ weight.T + embed.proj.bias, rtol=1e-5, atol=1e-5)


def test_image_enters_as_one_tubelet_at_the_first_positions():
    net = tiny(num_frames=2).eval()  # a 2-frame clip is one tubelet too
    image = torch.randn(3, 3, 112, 112)
    tokens, kind = M.tubelet_tokens(net.cfg, net.patch_embed, image)
    assert kind == "image" and tokens.shape == (3, 49, 96)
    repeated = image[:, :, None].expand(-1, -1, 2, -1, -1)
    want = net.patch_embed(repeated) + M.sinusoid_table(net.cfg.tokens, 96)[:, :49]
    torch.testing.assert_close(tokens, want)
    logits_i, feats_i = net(image)
    logits_v, feats_v = net(repeated.contiguous())
    torch.testing.assert_close(feats_i, feats_v)  # the same tokens; only the head differs
    assert torch.equal(logits_i, net.head["image"](feats_i)) and torch.equal(logits_v, net.head["video"](feats_v))
    big = tiny(num_frames=8)
    assert big.cfg.tokens == 4 * 49
    tokens, _ = M.tubelet_tokens(big.cfg, big.patch_embed, image)  # the first 49 rows of the 196-row table
    torch.testing.assert_close(tokens - big.patch_embed(repeated), M.sinusoid_table(196, 96)[:, :49].expand(3, -1, -1))


def test_sinusoid_table_values():
    table = M.sinusoid_table(5, 4)[0]
    n = torch.arange(5.0)
    torch.testing.assert_close(table[:, 0], torch.sin(n))
    torch.testing.assert_close(table[:, 1], torch.cos(n))
    torch.testing.assert_close(table[:, 2], torch.sin(n / 100))
    torch.testing.assert_close(table[:, 3], torch.cos(n / 100))


def test_wrong_input_shapes_are_named():
    net = tiny()
    for bad in (torch.randn(1, 3, 3, 112, 112), torch.randn(1, 3, 96, 96), torch.randn(3, 112, 112)):
        try:
            net(bad)
        except ValueError as e:
            assert str(tuple(bad.shape)) in str(e) and "(B, 3, 4, 112, 112)" in str(e)
        else:
            raise AssertionError(f"{tuple(bad.shape)} was accepted")


# ----------------------------------------------------------------------------- the MAE pieces
def test_mask_ratios_and_randomness():
    gen = torch.Generator().manual_seed(0)
    video = M.random_mask(4, 800, 0.95, gen)
    image = M.random_mask(4, 100, 0.9, gen)
    assert video.sum(1).tolist() == [760] * 4 and image.sum(1).tolist() == [90] * 4
    assert len({tuple(row.nonzero().flatten().tolist()) for row in video}) == 4  # a fresh random mask per sample


def test_an_image_token_covers_both_repeated_frames():
    image = torch.randn(2, 3, 32, 32)
    pixels = M.patchify(image, 16, 2)  # (2, 4, 2*16*16, 3): one tubelet, its frame twice
    assert pixels.shape == (2, 4, 512, 3)
    torch.testing.assert_close(pixels[:, :, :256], pixels[:, :, 256:])
    target = M.mae_target(image, 16, 2).reshape(2, 4, 2, 256, 3)
    torch.testing.assert_close(target[:, :, 0], target[:, :, 1])  # a hidden token hides the pixel in both frames


def test_target_is_each_token_normalised_per_channel():
    video = torch.rand(2, 3, 4, 32, 32)
    target = M.mae_target(video, 16, 2)
    assert target.shape == (2, 8, 2 * 16 * 16 * 3)
    per_channel = target.reshape(2, 8, 512, 3)
    torch.testing.assert_close(per_channel.mean(2), torch.zeros(2, 8, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(2), torch.ones(2, 8, 3), atol=1e-4, rtol=0)
    scaled = video * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1, 1) + 0.3  # the data's normalisation: no effect
    torch.testing.assert_close(M.mae_target(scaled, 16, 2), target, atol=1e-4, rtol=1e-4)


def test_mae_loss_counts_only_hidden_tokens():
    target = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    pred = target[mask].reshape(2, 2, 3)
    assert M.mae_loss(pred, target, mask) == 0
    changed = target.clone()
    changed[~mask] += 10  # the visible tokens' pixels do not count
    assert M.mae_loss(pred, changed, mask) == 0
    torch.testing.assert_close(M.mae_loss(pred + 1, target, mask), torch.tensor(1.0))


def test_pretraining_model_reconstructs_and_learns():
    mae = tiny(pretrain=True)
    ramp = torch.linspace(0, 1, 16).repeat(7)  # the same ramp inside every 16-pixel patch: a learnable target
    video = ramp.expand(2, 3, 4, 112, 112) + 0.1 * torch.randn(2, 3, 4, 112, 112)
    image = ramp.expand(3, 3, 112, 112) + 0.1 * torch.randn(3, 3, 112, 112)
    gen = torch.Generator().manual_seed(1)
    masks = M.random_mask(2, 98, 0.95, gen), M.random_mask(3, 49, 0.9, gen)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = sum(M.mae_loss(mae(x, m), M.mae_target(x, 16, 2), m) for x, m in zip((video, image), masks, strict=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert mae(video, masks[0]).shape == (2, 93, 2 * 16 * 16 * 3)  # round(0.95 * 98) = 93 hidden tokens
    assert losses[-1] < 0.5 * losses[0]


def test_layer_decay_scales():
    assert M.layer_scale("patch_embed.proj.weight", 12, 0.75) == 0.75 ** 13
    assert M.layer_scale("blocks.0.attn.qkv.weight", 12, 0.75) == 0.75 ** 12
    assert M.layer_scale("blocks.11.moae.experts.0.fc1.weight", 12, 0.75) == 0.75  # a MoAE: its block's scale
    assert M.layer_scale("blocks.11.mlp.fc1.weight", 12, 0.75) == 0.75
    assert M.layer_scale("head.video.weight", 12, 0.75) == 1.0 == M.layer_scale("fc_norm.bias", 12, 0.75)


def test_pretraining_decays_only_weight_matrices():
    """Weight decay 0.05 in pre-training: none on biases, norms and the learned mask token (README, S4D)."""
    mae = tiny(pretrain=True)
    decayed = {n for n, p in mae.named_parameters() if not M.no_weight_decay(n, p)}
    assert "mask_token" in dict(mae.named_parameters()) and "mask_token" not in decayed
    assert decayed and all(dict(mae.named_parameters())[n].ndim >= 2 for n in decayed)
