"""MTCNN face detection and the path of a user's own video: the nets' shapes, NMS, the pyramid, the box algebra,
the face track, the aligned crop, and eval.py --video --detector end to end; the public weights when present."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import landmarks as L
from eval import main as eval_main
from model import build_model

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "mtcnn"  # README, A video of your own: where the two commands put the files


def test_the_three_nets_give_the_documented_shapes():
    prob, offsets = L.PNet()(torch.randn(2, 3, 12, 12))
    assert prob.shape == (2, 1, 1) and offsets.shape == (2, 4, 1, 1)  # one 12 x 12 window, one cell
    prob, offsets = L.PNet()(torch.randn(1, 3, 50, 70))
    assert prob.shape == (1, 20, 30) and offsets.shape == (1, 4, 20, 30)  # stride 2: (50 - 12) // 2 + 1 ... ceil pool
    prob, offsets = L.RNet()(torch.randn(3, 3, 24, 24))
    assert prob.shape == (3,) and offsets.shape == (3, 4) and ((prob >= 0) & (prob <= 1)).all()
    prob, offsets, points = L.ONet()(torch.randn(4, 3, 48, 48))
    assert prob.shape == (4,) and offsets.shape == (4, 4) and points.shape == (4, 10)


def test_nms_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # box 1 overlaps box 0 by 90 / 110 = 0.82; box 3 (best) overlaps box 0 by 50 / 100 = 0.5 (union), 50 / 50 = 1 (min)
    assert L.nms(boxes, scores, 0.7).tolist() == [3, 0, 2]
    assert L.nms(boxes, scores, 0.7, mode="min").tolist() == [3, 2]
    assert L.nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]


def test_pyramid_scales_by_hand():
    # min_face 20: the first scale maps a 20-pixel face to P-Net's 12; each next one is 0.709 of it, while the
    # shorter side, scaled, still holds a 12-pixel window: 100 * 0.6 = 60 -> 60, 42.5, 30.2, 21.4, 15.2 (5 scales)
    scales = L.pyramid_scales(100, 300, min_face=20)
    assert len(scales) == 5 and scales[0] == pytest.approx(0.6)
    assert all(b / a == pytest.approx(0.709) for a, b in zip(scales, scales[1:], strict=False))
    assert L.pyramid_scales(10, 10) == []  # smaller than a face of 20 pixels: nothing to scan


def test_box_algebra_by_hand():
    torch.testing.assert_close(L.square(torch.tensor([[0.0, 0, 10, 4]])), torch.tensor([[0.0, -3, 10, 7]]))
    refined = L.refine(torch.tensor([[10.0, 20, 30, 60]]), torch.tensor([[0.1, -0.1, 0.0, 0.5]]))
    torch.testing.assert_close(refined, torch.tensor([[12.0, 16, 30, 80]]))  # w = 20, h = 40


def detection(x, score=0.9):
    box = torch.tensor([[x, 10.0, x + 20, 30]])
    points = torch.tensor([[[x + 5, 15], [x + 15, 15], [x + 10, 20], [x + 6, 25], [x + 14, 25.0]]])
    return box, torch.tensor([score]), points


def test_face_track_follows_one_face_holds_gaps_and_smooths():
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))
    other = (torch.tensor([[100.0, 100, 120, 120]]), torch.tensor([0.99]), torch.zeros(1, 5, 2))
    two = tuple(torch.cat(parts) for parts in zip(detection(12), other, strict=True))  # a second face appears
    detections = [empty, detection(10), detection(10), two, empty, detection(14)]
    boxes, points, missed = L.face_track(detections, "clip", window=1)
    assert missed == [0, 4]
    assert boxes[0].tolist() == boxes[1].tolist()  # before the first detection: the first face
    assert boxes[3, 0] == 12 and boxes[4, 0] == 12  # the tracked face, not the better-scored other one; gap held
    smooth, _, _ = L.face_track(detections, "clip", window=3)
    assert smooth[5, 0] == pytest.approx((12 + 14 + 14) / 3)  # centred average, the last frame replicated
    with pytest.raises(ValueError, match="clip: no face found in any of its 2 frames"):
        L.face_track([empty, empty], "clip")


def test_align_faces_levels_the_eyes_and_cuts_the_box():
    video = np.zeros((1, 100, 100, 3), np.uint8)
    video[0, 40:60, 20:80] = 255  # a bright bar, tilted below by 30 degrees
    angle = math.radians(30)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    yy, xx = np.mgrid[0:100, 0:100]
    back = rot.T @ torch.tensor(np.stack([xx.ravel() - 50, yy.ravel() - 50]), dtype=torch.float32)
    inside = ((back[0].abs() < 30) & (back[1].abs() < 10)).reshape(100, 100).numpy()
    tilted = np.zeros_like(video)
    tilted[0][inside] = 255
    eyes = torch.tensor([[[50 - 20 * math.cos(angle), 50 - 20 * math.sin(angle)],
                          [50 + 20 * math.cos(angle), 50 + 20 * math.sin(angle)], [50, 50], [45, 55], [55, 55.0]]])
    out = L.align_faces(tilted, torch.tensor([[0.0, 0, 100, 100]]), eyes, size=100)
    level = (out[0, 40:60, 25:75, 0] > 128).mean()
    assert level > 0.9 and (out[0, :30, :, 0] > 128).mean() < 0.02  # the bar is horizontal again


@pytest.fixture
def face_clip(tmp_path):
    """A demo face pasted into a wider, noisy scene, 6 frames: what a phone video of a face looks like to us."""
    root = data.make_demo(tmp_path / "demo", num_clips=7, workers=1)
    sample = next(s for s in data.read_split("demo", root / "train.csv") if not s.path.endswith(".mp4"))
    faces = data.load_clip(sample, root)[:6]
    scene = np.random.default_rng(0).integers(80, 120, (6, 180, 320, 3)).astype(np.uint8)
    scene[:, 30:142, 100:212] = faces
    return scene


def test_eval_video_with_a_detector_finds_aligns_predicts_and_annotates(tmp_path, monkeypatch, capsys, face_clip):
    data.write_video(tmp_path / "me.mp4", face_clip, fps=50)
    model = build_model("s2d_tiny", num_classes=7, num_frames=2)
    ckpt = tmp_path / "ckpt.pth"
    import dataclasses
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, ckpt)

    class KnownFace(torch.nn.Module):  # stands in for the trained MTCNN: the pasted face, every other frame
        def __init__(self, weights):
            super().__init__()
            self.calls = 0

        def forward(self, image):
            self.calls += 1
            if self.calls % 2 == 0:
                return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)
            box = torch.tensor([[100.0, 30, 212, 142]])
            pts = torch.tensor([[[130, 70], [182, 70], [156, 95], [135, 120], [177, 120.0]]])
            return box, torch.tensor([0.99]), pts

    monkeypatch.setattr(L, "MTCNN", KnownFace)
    out = tmp_path / "annotated.mp4"
    eval_main(["--checkpoint", str(ckpt), "--video", str(tmp_path / "me.mp4"), "--detector", "unused",
               "--annotate", str(out), "--dataset", "demo", "--device", "cpu", "--landmark-weights", "none"])
    printed = capsys.readouterr()
    assert "a face in 3 of 6 frames (none in frames 1, 3, 5" in printed.out
    assert "2 views averaged, 2 windows of 2 frames: frames 0-1, 4-5 of 6" in printed.out
    assert "warning" not in printed.err
    written = data.load_clip(data.Sample(str(out), 0), "")
    assert written.shape == (6, 180, 320, 3) and data.frame_rate(out) == 50  # the source's rate


def test_annotate_is_refused_before_any_work_where_it_cannot_be_written(tmp_path, capsys):
    video = tmp_path / "me.mp4"
    video.write_bytes(b"not read")
    base = ["--checkpoint", str(tmp_path / "none.pth"), "--video", str(video), "--detector", "d", "--annotate"]
    for target, why in ((video, "is the --video itself"), (tmp_path / "me.avi", "written as an H.264 .mp4"),
                        (tmp_path / "no" / "a.mp4", "cannot write a file in")):
        with pytest.raises(SystemExit) as stop:
            eval_main(base + [str(target)])
        assert stop.value.code == 2 and why in capsys.readouterr().err
    assert video.read_bytes() == b"not read"
    with pytest.raises(SystemExit) as stop:
        eval_main(["--checkpoint", "c.pth", "--video", str(tmp_path / "missing.mp4")])
    assert stop.value.code == 2 and "missing.mp4: no such frame folder, video or image" in capsys.readouterr().err


def test_a_tiny_video_is_warned_about(tmp_path, capsys):
    data.write_video(tmp_path / "tiny.mp4", np.full((3, 24, 24, 3), 128, np.uint8))
    model = build_model("s2d_tiny", num_classes=7, num_frames=2)
    import dataclasses
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, tmp_path / "c.pth")
    eval_main(["--checkpoint", str(tmp_path / "c.pth"), "--video", str(tmp_path / "tiny.mp4"), "--device", "cpu",
               "--landmark-weights", "none"])
    printed = capsys.readouterr()
    assert "frames of 24 x 24 are enlarged 4.7x to the model's 112 pixels" in printed.err
    assert "frames 0-1, 1-2 of 3" in printed.out


def test_missing_detector_weights_are_named_before_the_video_is_decoded(tmp_path, monkeypatch, capsys):
    model = build_model("s2d_tiny", num_classes=7, num_frames=2)
    import dataclasses
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, tmp_path / "c.pth")
    (tmp_path / "me.mp4").write_bytes(b"never decoded")  # decoding it would fail with another message
    with pytest.raises(SystemExit) as stop:
        eval_main(["--checkpoint", str(tmp_path / "c.pth"), "--video", str(tmp_path / "me.mp4"), "--detector",
                   str(tmp_path / "nothing"), "--device", "cpu", "--landmark-weights", "none"])
    assert f"--detector {tmp_path / 'nothing'}" in str(stop.value) and "fetches the weights" in str(stop.value)


def test_the_label_is_cut_off_at_the_frame_edge():
    from eval import draw_text

    img = np.zeros((20, 30, 3), np.uint8)
    draw_text(img, "DISAPPOINTMENT 63", 15, 20, scale=2, colour=(255, 255, 255))  # runs past the bottom and right
    assert img[15:, 20:].any() and not img[:15].any() and not img[:, :20].any()


def test_an_uncropped_scene_without_a_detector_is_warned_about(tmp_path, capsys, face_clip):
    data.write_video(tmp_path / "scene.mp4", face_clip)
    model = build_model("s2d_tiny", num_classes=7, num_frames=2)
    import dataclasses
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, tmp_path / "c.pth")
    eval_main(["--checkpoint", str(tmp_path / "c.pth"), "--video", str(tmp_path / "scene.mp4"), "--device", "cpu",
               "--landmark-weights", "none"])
    err = capsys.readouterr().err
    assert "look like an uncropped scene" in err and "--detector" in err


@pytest.mark.skipif(not all((WEIGHTS / name).is_file() for name in L.MTCNN_FILES),
                    reason=f"the MTCNN weights are not in {WEIGHTS} (README, A video of your own, gives the two "
                           "commands that put them there)")
def test_public_weights_load_by_name_and_find_the_face(tmp_path):
    for net, name in zip((L.PNet(), L.RNet(), L.ONet()), L.MTCNN_FILES, strict=True):
        sd = torch.load(WEIGHTS / name, weights_only=True)
        assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
    root = data.make_demo(tmp_path / "demo", num_clips=7, workers=1)
    sample = next(s for s in data.read_split("demo", root / "train.csv") if not s.path.endswith(".mp4"))
    clip = data.load_clip(sample, root)
    face = torch.nn.functional.interpolate(torch.from_numpy(clip[len(clip) // 2]).permute(2, 0, 1)[None].float(),
                                           size=(200, 200), mode="bilinear")[0].permute(1, 2, 0).byte().numpy()
    scene = np.random.default_rng(0).integers(80, 120, (360, 640, 3)).astype(np.uint8)
    scene[80:280, 300:500] = face  # the demo's drawn face, 200 pixels, in a noisy 640 x 360 frame
    boxes, scores, points = L.MTCNN(WEIGHTS)(scene)
    assert len(boxes) == 1 and scores[0] > 0.6, (boxes, scores)
    x1, y1, x2, y2 = boxes[0].tolist()
    inter = max(0, min(x2, 500) - max(x1, 300)) * max(0, min(y2, 280) - max(y1, 80))
    assert inter / ((x2 - x1) * (y2 - y1) + 200 * 200 - inter) > 0.5  # on the pasted face
    eyes, mouth = points[0, :2], points[0, 3:]
    assert (eyes[:, 1] < points[0, 2, 1]).all() and (mouth[:, 1] > points[0, 2, 1]).all()  # eyes above the nose
    assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]  # left before right


def test_annotate_without_a_detector_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        eval_main(["--checkpoint", str(tmp_path / "none.pth"), "--video", "x.mp4", "--annotate", "y.mp4"])
    assert stop.value.code == 2 and "--annotate draws the detected face: give --detector too" in capsys.readouterr().err


def test_align_in_chunks_equals_one_pass(face_clip):
    """align_in_chunks aligns 16 frames at a time (memory); the crops are those of align_faces on the whole clip."""
    video = np.concatenate([face_clip] * 4)  # 24 frames: a chunk of 16 and one of 8

    def one_face(image):
        box = torch.tensor([[100.0, 30, 212, 142]])
        pts = torch.tensor([[[130, 72], [182, 68], [156, 95], [135, 120], [177, 120.0]]])
        return box, torch.tensor([0.99]), pts

    boxes, points, missed = L.face_track(L.detect_faces(iter(video), one_face), "the clip")
    crops = np.stack(list(L.align_in_chunks(iter(video), boxes, points, 64)))
    assert crops.shape == (24, 64, 64, 3) and missed == []
    np.testing.assert_array_equal(crops, L.align_faces(video, boxes, points, 64))
    for frames in (video[:23], np.concatenate([video, video[:1]])):  # a second read that differs from the first
        with pytest.raises(ValueError, match="boxes of the"):
            list(L.align_in_chunks(frames, boxes, points, 64))


def test_a_still_image_and_a_video_named_without_its_extension_are_accepted(tmp_path, capsys, face_clip):
    import dataclasses

    model = build_model("s2d_tiny", num_classes=7, num_frames=1, image_model=True)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, tmp_path / "c.pth")
    data.write_frames(tmp_path / "img", face_clip[:1, 30:142, 100:212])
    eval_main(["--checkpoint", str(tmp_path / "c.pth"), "--video", str(tmp_path / "img" / "1.jpg"), "--device",
               "cpu", "--landmark-weights", "none"])
    assert "1 window of 1 frame: frames 0 of 1" in capsys.readouterr().out
    data.write_video(tmp_path / "clip.mp4", face_clip[:, 30:142, 100:212])
    eval_main(["--checkpoint", str(tmp_path / "c.pth"), "--video", str(tmp_path / "clip"), "--device", "cpu",
               "--landmark-weights", "none"])  # data.resolve: clip is clip.mp4
    assert "views averaged" in capsys.readouterr().out


def test_a_face_in_few_frames_is_warned_about(tmp_path, monkeypatch, capsys, face_clip):
    data.write_video(tmp_path / "me.mp4", face_clip)
    model = build_model("s2d_tiny", num_classes=7, num_frames=2)
    import dataclasses
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, tmp_path / "c.pth")

    class FirstFrameOnly:  # the face found in frame 0 of 6
        def __init__(self, weights):
            self.calls = 0

        def __call__(self, image):
            self.calls += 1
            if self.calls > 1:
                return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)
            pts = torch.tensor([[[130, 70], [182, 70], [156, 95], [135, 120], [177, 120.0]]])
            return torch.tensor([[100.0, 30, 212, 142]]), torch.tensor([0.99]), pts

    monkeypatch.setattr(L, "MTCNN", FirstFrameOnly)
    eval_main(["--checkpoint", str(tmp_path / "c.pth"), "--video", str(tmp_path / "me.mp4"), "--detector", "x",
               "--dataset", "demo", "--device", "cpu", "--landmark-weights", "none"])
    printed = capsys.readouterr()
    assert "a face in 1 of 6 frames" in printed.out and "a face in fewer than half of the frames" in printed.err
