"""The landmark view: MobileFaceNet layout against the released checkpoint's names, loading, shapes, freezing."""
import warnings

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import landmarks
from landmarks import LandmarkFeatures

FIXTURE = "official_mobilefacenet_136"


@pytest.fixture(scope="module")
def lm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LandmarkFeatures()


def fake_checkpoint_sd(shapes):
    """Random tensors with the released names and shapes (positive BN variances, integer batch counters)."""
    sd = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(1000)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape) + 0.5
        else:
            sd[name] = torch.randn(shape) * 0.1
    return sd


def test_parameter_count_matches_release(lm, fixture_json):
    # The fixture's total counts learnable parameters (BatchNorm running statistics excluded).
    assert sum(p.numel() for p in lm.parameters()) == fixture_json(FIXTURE)["total_params"] == 1_007_248


def test_state_dict_names_and_shapes_match_release(lm, fixture_json):
    ours = {k: list(v.shape) for k, v in lm.state_dict().items()}
    theirs = fixture_json(FIXTURE)["state_dict"]
    assert list(ours) == list(theirs)
    assert ours == theirs


def test_loads_released_format_strictly(tmp_path, fixture_json):
    sd = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])
    path = tmp_path / "mobilefacenet_model_best.pth.tar"
    torch.save({"state_dict": sd, "epoch": 10}, path)
    loaded = LandmarkFeatures(weights=path).state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_loads_bare_and_data_parallel_state_dicts(tmp_path, fixture_json):
    sd = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])
    torch.save(sd, tmp_path / "bare.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "dp.pth")
    video = torch.randn(1, 3, 2, 112, 112)
    bare = LandmarkFeatures(weights=tmp_path / "bare.pth")(video)
    torch.testing.assert_close(LandmarkFeatures(weights=tmp_path / "dp.pth")(video), bare, rtol=0, atol=0)


def test_missing_or_renamed_key_is_named(tmp_path, fixture_json):
    sd = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])
    key = "conv_4.model.3.conv_dw.prelu.weight"
    missing = {k: v for k, v in sd.items() if k != key}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys 1 \(conv_4\.model\.3\.conv_dw\.prelu\.weight\)"):
        LandmarkFeatures(weights=tmp_path / "missing.pth")
    renamed = dict(missing, **{"conv_4.model.3.conv_dw.act.weight": sd[key]})
    torch.save({"state_dict": renamed}, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"unexpected keys 1 \(conv_4\.model\.3\.conv_dw\.act\.weight\)"):
        LandmarkFeatures(weights=tmp_path / "renamed.pth")


def test_a_file_of_other_layers_or_values_is_named_briefly(tmp_path, fixture_json):
    sd = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])
    torch.save({"state_dict": {f"blocks.{i}.weight": torch.zeros(1) for i in range(500)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as err:
        LandmarkFeatures(weights=tmp_path / "other.pth")
    assert f"missing keys {len(sd)} (" in str(err.value) and "unexpected keys 500 (" in str(err.value)
    assert len(str(err.value)) < 600
    key = "conv_4.model.3.conv_dw.prelu.weight"
    torch.save({"state_dict": dict(sd, **{key: [1.0, 2.0]})}, tmp_path / "lists.pth")
    with pytest.raises(ValueError, match=rf"lists\.pth: expected tensors, found other values for 1 \({key}\)"):
        LandmarkFeatures(weights=tmp_path / "lists.pth")


def test_wrong_shape_is_named(tmp_path, fixture_json):
    sd = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])
    sd["output_layer.linear.weight"] = torch.randn(10, 512)  # a 5-point head instead of 68 points
    torch.save({"state_dict": sd}, tmp_path / "five.pth")
    with pytest.raises(ValueError, match=r"output_layer\.linear\.weight: expected \(136, 512\), found \(10, 512\)"):
        LandmarkFeatures(weights=tmp_path / "five.pth")


@pytest.mark.parametrize("size", [112, 224])
@pytest.mark.parametrize("frames", [1, 3])
def test_output_shapes(lm, size, frames):
    video = torch.randn(2, 3, frames, size, size)
    feats, points = lm(video, return_points=True)
    assert feats.shape == (2, frames, 128, 14, 14)
    assert points.shape == (2, frames, 68, 2)
    torch.testing.assert_close(lm(video), feats, rtol=0, atol=0)


def test_resize_is_bilinear_align_corners(lm):
    video = torch.randn(1, 3, 2, 160, 96)
    frames = video.transpose(1, 2).reshape(2, 3, 160, 96)  # (B*T, 3, H, W)
    small = torch.nn.functional.interpolate(frames, size=(112, 112), mode="bilinear", align_corners=True)
    expected = lm(small.reshape(1, 2, 3, 112, 112).transpose(1, 2))
    torch.testing.assert_close(lm(video), expected, rtol=0, atol=0)


def test_frozen_and_always_eval(lm):
    assert not any(p.requires_grad for p in lm.parameters())
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    lm.train()
    assert not lm.training and not any(m.training for m in lm.modules())
    lm(torch.randn(2, 3, 2, 112, 112), return_points=True)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    parent = torch.nn.Sequential(torch.nn.Linear(2, 2), lm).train()
    assert parent.training and not lm.training


def test_random_detector_is_seeded_and_leaves_global_rng_alone(lm):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = LandmarkFeatures()
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in lm.state_dict().items())


def test_features_depend_on_the_frame(lm):
    video = torch.randn(1, 3, 2, 112, 112)
    feats = lm(video)
    assert (feats[0, 0] - feats[0, 1]).abs().max() > 1e-3


@settings(deadline=None, max_examples=5)
@given(frames=st.integers(2, 4), changed=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_frames_are_processed_independently(lm, frames, changed, seed):
    changed = changed % frames
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 3, frames, 112, 112, generator=gen)
    other = video.clone()
    other[:, :, changed] = torch.randn(2, 3, 112, 112, generator=gen)
    (a, pa), (b, pb) = lm(video, return_points=True), lm(other, return_points=True)
    keep = [t for t in range(frames) if t != changed]
    torch.testing.assert_close(a[:, keep], b[:, keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa[:, keep], pb[:, keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, changed], b[:, changed])


def test_untrained_warning_fires_once(monkeypatch):
    monkeypatch.setattr(landmarks, "_warned_untrained", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LandmarkFeatures()
        LandmarkFeatures()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "UNTRAINED" in messages[0] and "paper" in messages[0]


@pytest.mark.parametrize("shape", [(3, 2, 112, 112), (1, 1, 2, 112, 112), (1, 4, 2, 112, 112), (1, 3, 112, 112, 1, 1)])
def test_bad_shapes_raise(lm, shape):
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\).*" + re_shape(shape)):
        lm(torch.zeros(shape))


def re_shape(shape):
    return r"\(" + r", ".join(str(s) for s in shape) + r"\)"


def write_png(path, rgb):
    """Encode an (H, W, 3) uint8 array as a PNG with PyAV."""
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.height, stream.width, stream.pix_fmt = rgb.shape[0], rgb.shape[1], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_read_frames_and_cli(tmp_path, capsys):
    rgb = [np.random.randint(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(2)]
    for t, image in enumerate(rgb):
        write_png(tmp_path / f"{t:03d}.png", image)
    video = landmarks.read_frames(tmp_path)  # (1, 3, T, H, W)
    mean, std = torch.tensor(data.MEAN), torch.tensor(data.STD)
    pixels = (video[0].permute(1, 2, 3, 0) * std + mean) * 255  # (T, H, W, 3)
    torch.testing.assert_close(pixels, torch.from_numpy(np.stack(rgb)).float(), rtol=0, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        landmarks.main(["--video", str(tmp_path / "001.png")])
    assert "features (1, 1, 128, 14, 14), points (1, 1, 68, 2)" in capsys.readouterr().out


def test_cli_reads_every_frame_of_a_video(tmp_path, capsys):
    frames = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    data.write_video(tmp_path / "clip.mp4", frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        landmarks.main(["--video", str(tmp_path / "clip.mp4")])
    out = capsys.readouterr().out
    assert "frames (1, 3, 5, 48, 48) -> features (1, 5, 128, 14, 14)" in out
    per_frame = [line.split(":")[0] for line in out.splitlines() if line.startswith("frame ")]
    assert per_frame == [f"frame {t}" for t in range(5)]


def test_training_on_ground_truth_points_lowers_the_nme():
    # 96 frames whose 68 points are a fixed face shifted with a bright square (64 to train): the net must follow it
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(68, 2, generator=gen) * 0.3 + 0.35
    shift = torch.rand(96, 1, 2, generator=gen) * 0.3 - 0.15
    frames = torch.zeros(96, 3, 112, 112, dtype=torch.uint8)
    for i, (dx, dy) in enumerate(shift[:, 0]):
        x, y = int((0.5 + dx) * 112), int((0.5 + dy) * 112)
        frames[i, :, y - 12:y + 12, x - 12:x + 12] = 255
    points = base + shift
    train, test = (frames[:64], points[:64]), (frames[64:], points[64:])
    checkpoint, history = landmarks.train_landmarks(train, test, epochs=6, batch_size=16, lr=3e-3)
    assert history[-1]["test_nme"] < history[0]["test_nme"] and checkpoint["preset"] == "mobilefacenet_tiny"



def test_a_trained_checkpoint_records_its_preset(tmp_path):
    net = landmarks.MobileFaceNet(**landmarks.PRESETS["mobilefacenet_tiny"])
    torch.save(dict(state_dict=net.state_dict(), config=landmarks.PRESETS["mobilefacenet_tiny"]), tmp_path / "lm.pt")
    loaded = LandmarkFeatures(tmp_path / "lm.pt")
    assert loaded.feature_width == 32 and loaded(torch.randn(1, 3, 2, 112, 112)).shape == (1, 2, 32, 14, 14)
    with pytest.raises(ValueError, match="train_landmarks: 8 training frames give 0 steps"):
        landmarks.train_landmarks((torch.zeros(8, 3, 112, 112, dtype=torch.uint8), torch.rand(8, 68, 2)),
                                  (torch.zeros(2, 3, 112, 112, dtype=torch.uint8), torch.rand(2, 68, 2)))


def test_folded_batchnorm_gives_the_unfolded_networks_features_and_points(tmp_path, fixture_json):
    sd = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])  # BatchNorm statistics far from 0 / 1
    torch.save({"state_dict": sd}, tmp_path / "lm.pth")
    folded = LandmarkFeatures(weights=tmp_path / "lm.pth")
    plain = landmarks.MobileFaceNet().eval()
    plain.load_state_dict(sd)
    assert all(hasattr(m, "fused_weight") for m in folded.modules() if isinstance(m, landmarks.ConvBlock))
    assert all(torch.equal(folded.state_dict()[k], v) for k, v in sd.items())  # the checkpoint's tensors, as loaded
    video = torch.randn(2, 3, 3, 112, 112)
    feats, points = folded(video, return_points=True)
    with torch.no_grad():
        want_feats, want_points = plain(video.transpose(1, 2).reshape(6, 3, 112, 112))
    torch.testing.assert_close(feats, want_feats.reshape(feats.shape), rtol=0, atol=1e-4)
    torch.testing.assert_close(points, want_points.reshape(points.shape), rtol=0, atol=1e-4)
    # loading other weights afterwards folds again from them
    other = fake_checkpoint_sd(fixture_json(FIXTURE)["state_dict"])
    folded.load_state_dict(other)
    plain.load_state_dict(other)
    with torch.no_grad():
        want = plain.features(video.transpose(1, 2).reshape(6, 3, 112, 112))
    torch.testing.assert_close(folded(video), want.reshape(feats.shape), rtol=0, atol=1e-4)


def test_frames_in_chunks_give_what_one_pass_gives(monkeypatch):
    """On CPU the frames go through the network a few at a time (cache-sized chunks); results, features and
    points, and their order, are those of one pass over all frames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained detector's warning
        lm = LandmarkFeatures(preset="mobilefacenet_tiny")
    assert lm.chunk_frames() == 16  # 32 channels at 56 x 56 in float32: 401,408 bytes a frame
    video = torch.randn(2, 3, 5, 112, 112)
    monkeypatch.setattr(landmarks, "CHUNK_BYTES", 10**12)  # all 10 frames in one pass
    want_feats, want_points = lm(video, return_points=True)
    monkeypatch.setattr(landmarks, "CHUNK_BYTES", 3 * 401_408)  # 3 frames a pass: chunks of 3, 3, 3, 1
    assert lm.chunk_frames() == 3
    feats, points = lm(video, return_points=True)
    torch.testing.assert_close(feats, want_feats, rtol=0, atol=1e-5)
    torch.testing.assert_close(points, want_points, rtol=0, atol=1e-5)
