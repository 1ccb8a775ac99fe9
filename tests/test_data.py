"""data.py readers on fixtures in the official formats, and every bad-input case of issue 3 in its own test."""
import logging
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import data
from data import ClipDataset, ClipError, Sample, SplitError, read_split


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_image(path, image, codec="mjpeg"):
    """A JPEG (mjpeg) or PNG file of uint8 (H, W, 3), grey (H, W) or, as PNG, RGBA (H, W, 4)."""
    fmt = "gray" if image.ndim == 2 else {3: "rgb24", 4: "rgba"}[image.shape[2]]
    frame = av.VideoFrame.from_ndarray(image, format=fmt)
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = image.shape[1], image.shape[0]
    ctx.pix_fmt = fmt if codec == "png" else ("gray" if fmt == "gray" else "yuvj444p")
    packets = ctx.encode(frame.reformat(format=ctx.pix_fmt)) + ctx.encode(None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(p) for p in packets))
    return path


# ---- readers, one per official format
def test_dfew_authors_files_count_from_zero(tmp_path):
    split = write(tmp_path / "train_set_1.csv", "video_name,label\n2522,0\n00013,6\n")
    assert read_split("dfew", split) == [Sample("02522", 0), Sample("00013", 6)]


def test_dfew_own_files_count_from_one(tmp_path):
    split = write(tmp_path / "set_1.csv", "video_name,label\n00001,1\n00002,7\n")
    assert [s.label for s in read_split("dfew", split, one_based=True)] == [0, 6]


def test_ferv39k_reads_paths_and_ids(tmp_path):
    split = write(tmp_path / "train.csv", "path,id\nCrime/Angry/0063,0\nTalkShow/Surprise/0001.mp4,6\n")
    assert read_split("ferv39k", split) == [Sample("Crime/Angry/0063", 0), Sample("TalkShow/Surprise/0001.mp4", 6)]
    assert data.CLASSES["ferv39k"][6] == "Surprise"


def test_mafw_txt_maps_class_names(tmp_path):
    split = write(tmp_path / "train.txt", "03747.mp4 anger\n00012.mp4 helplessness\n\n10045.mp4 surprise\n")
    assert read_split("mafw", split) == [Sample("03747.mp4", 0), Sample("00012.mp4", 7), Sample("10045.mp4", 10)]


def test_mafw_csv_reads_indices(tmp_path):
    split = write(tmp_path / "train.csv", "video_name,labels\n03747,0\n00012,10\n")
    assert read_split("mafw", split) == [Sample("03747", 0), Sample("00012", 10)]


def test_rafdb_selects_split_and_aligned_images(tmp_path):
    split = write(tmp_path / "list_patition_label.txt", "train_00001.jpg 5\ntest_0001.jpg 1\ntrain_00002.jpg 7\n")
    train = read_split("rafdb", f"{split}#train")
    assert train == [Sample("train_00001_aligned.jpg", 4), Sample("train_00002_aligned.jpg", 6)]
    assert read_split("rafdb", split, split="test") == [Sample("test_0001_aligned.jpg", 0)]
    assert data.CLASSES["rafdb"][4] == "Sadness"


AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,"
                    "valence,arousal\n")


@pytest.mark.parametrize("dataset, kept", [("affectnet7", [0, 6]), ("affectnet8", [0, 6, 7])])
def test_affectnet_excludes_and_counts_non_emotions(tmp_path, caplog, dataset, kept):
    rows = "".join(f'689/img{e}.jpg,10,10,200,200,"1.0;2.0",{e},0.5,-0.2\n' for e in (0, 6, 7, 8, 9, 10))
    split = write(tmp_path / "training.csv", AFFECTNET_HEADER + rows)
    with caplog.at_level(logging.INFO, logger="data"):
        samples = read_split(dataset, split)
    assert [s.label for s in samples] == kept and samples[0].path == "689/img0.jpg"
    assert f"{6 - len(kept)} excluded" in caplog.text


def ferplus_files(tmp_path):
    """Four images: clear happiness, single stray votes removed, no majority, and 'not a face'."""
    grey = " ".join(str(v % 256) for v in range(48 * 48))
    write(tmp_path / "fer2013.csv", "emotion,pixels,Usage\n" + "".join(
        f"{e},{grey},{u}\n" for e, u in ((3, "Training"), (0, "Training"), (2, "Training"), (4, "PrivateTest"))))
    votes = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
    votes += "Training,fer0000000.png,0,10,0,0,0,0,0,0,0,0\n"
    votes += "Training,fer0000001.png,1,1,1,3,0,0,0,0,0,0\n"  # single votes dropped: sadness 3 of 3
    votes += "Training,fer0000002.png,4,0,4,0,0,0,0,0,2,0\n"  # no class over half
    votes += "PrivateTest,,0,0,0,0,0,0,0,0,0,10\n"
    return write(tmp_path / "fer2013new.csv", votes)


def test_ferplus_majority_vote_and_pixels(tmp_path):
    train = read_split("ferplus", f"{ferplus_files(tmp_path)}#train")
    assert [(s.path, s.label) for s in train] == [("fer0000000.png", 1), ("fer0000001.png", 3)]
    frames = data.load_clip(train[0], tmp_path)
    assert frames.shape == (1, 48, 48, 3) and frames[0, 0, 5].tolist() == [5, 5, 5] and frames[0, 47, 47, 0] == 255


def test_ferplus_pixels_out_of_range_name_file_and_line(tmp_path):
    votes = ferplus_files(tmp_path)
    pixels = (tmp_path / "fer2013.csv").read_text().splitlines()
    pixels[2] = pixels[2].replace(",0 1 2 ", ",0 300 2 ", 1)  # row 2 of the pixels, its second value
    (tmp_path / "fer2013.csv").write_text("\n".join(pixels) + "\n")
    with pytest.raises(SplitError, match=r"fer2013\.csv:3: expected 2304 pixel values 0-255, found 2304 values, 1 of "
                                         r"them not in 0-255 \(first '300'\)"):
        read_split("ferplus", f"{votes}#train")


def test_a_video_without_a_video_stream_is_named(tmp_path):
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(data.ClipError, match=r"sound\.mp4: no video stream"):
        data.load_clip(Sample("sound.mp4", 0), tmp_path)


def test_ferplus_test_split_excludes_not_a_face(tmp_path):
    with pytest.raises(SplitError, match="no samples"):
        read_split("ferplus", f"{ferplus_files(tmp_path)}#test")


def test_dataset_files_official_layouts(tmp_path):
    dfew = data.dataset_files("dfew", tmp_path, fold=3)
    assert dfew.train == str(tmp_path / "EmoLabel_DataSplit/train(single-labeled)/train_set_3.csv")
    assert dfew.test == str(tmp_path / "EmoLabel_DataSplit/test(single-labeled)/test_set_3.csv")
    assert data.dataset_files("affectnet8", tmp_path).test.endswith("Manually_Annotated_file_lists/validation.csv")
    assert data.dataset_files("rafdb", tmp_path).train.endswith("list_patition_label.txt#train")
    demo = data.dataset_files("demo", tmp_path)
    assert (demo.train, demo.media_root) == (str(tmp_path / "train.csv"), str(tmp_path))
    # the media folders of the releases, as the authors' split files and scripts use them
    assert dfew.media_root == str(tmp_path / "Clip/clip_224x224_16f")
    assert data.dataset_files("ferv39k", tmp_path).media_root == str(tmp_path / "2_ClipsforFaceCrop")
    mafw = data.dataset_files("mafw", tmp_path, fold=2)
    assert mafw.train == str(tmp_path / "anno/single/no_caption/set_2/train.txt")
    assert mafw.media_root == str(tmp_path / "data/frames/frames_crop_align_224")


# ---- bad input: split files fail at load with file and line
def test_wrong_header_names_file_and_line(tmp_path):
    split = write(tmp_path / "train.csv", "video,label\n00001,1\n")
    with pytest.raises(SplitError, match=r"train\.csv:1: expected header 'path,id'"):
        read_split("ferv39k", split)


def test_unknown_class_name_names_file_and_line(tmp_path):
    split = write(tmp_path / "train.txt", "03747.mp4 anger\n03748.mp4 joy\n")
    with pytest.raises(SplitError, match=r"train\.txt:2: unknown class 'joy'"):
        read_split("mafw", split)


def test_label_out_of_range_names_file_and_line(tmp_path):
    split = write(tmp_path / "test.csv", "path,id\nCrime/Angry/0063,0\nCrime/Angry/0064,7\n")
    with pytest.raises(SplitError, match=r"test\.csv:3: label 7 outside 0\.\.6"):
        read_split("ferv39k", split)


def test_dfew_one_based_file_read_as_zero_based_hints_the_option(tmp_path):
    split = write(tmp_path / "set_1.csv", "video_name,label\n00001,7\n")
    with pytest.raises(SplitError, match="set_1.csv:2: .*one_based=True"):
        read_split("dfew", split)


def test_non_integer_label_names_file_and_line(tmp_path):
    split = write(tmp_path / "train.csv", "path,id\nCrime/Angry/0063,angry\n")
    with pytest.raises(SplitError, match=r"train\.csv:2: label 'angry' is not an integer"):
        read_split("ferv39k", split)


def test_a_byte_order_mark_is_read_past(tmp_path):
    """Spreadsheet programs save CSV and text with a UTF-8 byte-order mark; it is not part of the header or name."""
    dfew = tmp_path / "train_set_1.csv"
    dfew.write_bytes(b"\xef\xbb\xbfvideo_name,label\r\n2522,0\r\n")
    assert read_split("dfew", dfew) == [Sample("02522", 0)]
    mafw = tmp_path / "train.txt"
    mafw.write_bytes("\ufeff03747.mp4 anger\n".encode())
    assert read_split("mafw", mafw) == [Sample("03747.mp4", 0)]
    rafdb = tmp_path / "list_patition_label.txt"
    rafdb.write_bytes("\ufefftrain_00001.jpg 5\n".encode())
    assert read_split("rafdb", f"{rafdb}#train") == [Sample("train_00001_aligned.jpg", 4)]


@pytest.mark.parametrize("dataset, name, text, message", [
    ("ferv39k", "train.csv", b"path,id\nCrime/Angry/0063,0\nCaf\xe9/Happy/0001,3\n",
     r"train\.csv:3: not UTF-8 text \(byte 0xe9\); save it as UTF-8"),
    ("ferv39k", "train.csv", "path,id\nCrime/Angry/0063,\u00b2\n".encode(),
     r"train\.csv:2: label '\u00b2' is not an integer"),
    ("ferv39k", "train.csv", b"path,id\n,3\n", r"train\.csv:2: expected a path, found ''"),
    ("dfew", "set_1.csv", b"video_name,label\n25x2,0\n", r"set_1\.csv:2: expected a clip number, found '25x2'"),
    ("dfew", "set_1.csv", b"video_name,label\n,0\n", r"set_1\.csv:2: expected a clip number, found ''"),
    ("rafdb", "list_patition_label.txt#train", b"train_00001.jpg 5\nTrain_00002.jpg 1\n",
     r"list_patition_label\.txt:2: expected a 'train_' or 'test_' image name, found 'Train_00002.jpg'"),
])
def test_bad_text_in_a_split_file_names_file_and_line(tmp_path, dataset, name, text, message):
    path, _, suffix = name.partition("#")
    (tmp_path / path).write_bytes(text)
    with pytest.raises(SplitError, match=message):
        read_split(dataset, f"{tmp_path / path}" + (f"#{suffix}" if suffix else ""))


def test_missing_split_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_split("ferv39k", tmp_path / "nowhere.csv")


# ---- bad input: media
def test_missing_frame_folder_is_reported_with_its_path(tmp_path):
    with pytest.raises(ClipError, match=f"{tmp_path}/Crime/Angry/0063: no such frame folder"):
        data.load_clip(Sample("Crime/Angry/0063", 0), tmp_path)


def test_missing_video_file_is_reported_with_its_path(tmp_path):
    with pytest.raises(ClipError, match=f"{tmp_path}/03747.mp4: no such"):
        data.load_clip(Sample("03747.mp4", 0), tmp_path)


def test_empty_frame_folder_is_reported(tmp_path):
    (tmp_path / "clip" / "notes").mkdir(parents=True)
    with pytest.raises(ClipError, match="clip.*no frames"):
        data.load_clip(Sample("clip", 0), tmp_path)


def test_corrupt_jpeg_frame_is_reported(tmp_path):
    write_image(tmp_path / "clip" / "1.jpg", np.zeros((8, 8, 3), np.uint8))
    good = (tmp_path / "clip" / "1.jpg").read_bytes()
    (tmp_path / "clip" / "2.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(ClipError, match=r"clip/2\.jpg: truncated"):
        data.load_clip(Sample("clip", 0), tmp_path)


def test_corrupt_video_is_reported(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(ClipError, match="broken.mp4: InvalidDataError"):
        data.load_clip(Sample("broken.mp4", 0), tmp_path)


def two_clips_one_missing(tmp_path):
    for k in range(3):
        write_image(tmp_path / "good" / f"{k}.jpg", np.full((40, 40, 3), 50 * k, np.uint8))
    return [Sample("missing", 0), Sample("good", 1)]


def test_training_replaces_a_failed_clip_and_logs_it(tmp_path, caplog):
    ds = ClipDataset(two_clips_one_missing(tmp_path), tmp_path, "train", num_frames=4, image_size=32)
    with caplog.at_level(logging.WARNING, logger="data"):
        item = ds[0]
    assert item["replaced"] and item["index"] == 1 and item["label"] == 1 and item["video"].shape == (3, 4, 32, 32)
    assert f"{tmp_path}/missing" in caplog.text
    assert not ds[1]["replaced"]


def test_evaluation_never_substitutes(tmp_path):
    ds = ClipDataset(two_clips_one_missing(tmp_path), tmp_path, "eval", num_frames=4, image_size=32)
    assert ds[4]["index"] == 1
    with pytest.raises(ClipError, match=f"{tmp_path}/missing"):
        ds[0]


def test_check_lists_bad_items_and_exits_non_zero(tmp_path, capsys):
    two_clips_one_missing(tmp_path)
    write(tmp_path / "train.csv", "path,id\nmissing,0\ngood,1\n")
    write(tmp_path / "test.csv", "path,id\ngood,1\n")
    assert data.main(["check", "--dataset", "demo", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"BAD missing (label 0): {tmp_path}/missing: no such frame folder" in out
    assert "Angry 1, Disgust 1" in out and "1 bad item(s)" in out


def test_check_passes_a_good_split(tmp_path, capsys):
    two_clips_one_missing(tmp_path)
    split = write(tmp_path / "test.csv", "path,id\ngood,1\n")
    assert data.main(["check", "--dataset", "ferv39k", "--root", str(tmp_path), "--media-root", str(tmp_path),
                      "--split", str(split)]) == 0
    assert "all items readable" in capsys.readouterr().out


def test_split_warnings_name_repeats_conflicts_and_overlap(tmp_path, capsys):
    a, b, c = Sample("a", 0), Sample("b", 1), Sample("c", 2)
    assert data.split_warnings([("train.csv", [a, b]), ("test.csv", [c])]) == []
    assert data.split_warnings([("train.csv", [a, b, a])]) == [
        "train.csv: 1 sample(s) listed more than once, so they count more than once (e.g. 'a', labels [0, 0])"]
    assert data.split_warnings([("train.csv", [a, b, a, Sample("b", 3)])]) == [
        "train.csv: 2 sample(s) listed more than once, so they count more than once (e.g. 'b', labels [1, 3]); "
        "1 of them with different labels"]
    assert data.split_warnings([("train.csv", [a, b]), ("test.csv", [c, b])]) == [
        "1 sample(s) of test.csv are also in train.csv (e.g. 'b'): they are not held out"]
    two_clips_one_missing(tmp_path)  # `data.py check` prints them and still passes a readable split
    split = write(tmp_path / "test.csv", "path,id\ngood,1\ngood,1\n")
    assert data.main(["check", "--dataset", "ferv39k", "--root", str(tmp_path), "--media-root", str(tmp_path),
                      "--split", str(split)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {split}: 1 sample(s) listed more than once" in out and "all items readable" in out


def _with_display_matrix(path, matrix):
    """Rewrite an mp4's track header matrix (a, b, u, c, d, v, x, y, w; 16.16 fixed point, w 2.30), as phones
    write a rotation for portrait video."""
    import struct

    raw = bytearray(path.read_bytes())
    at = raw.find(b"tkhd")
    version = raw[at + 4]
    # tkhd: version/flags, then times and ids (v0: 20 bytes, v1: 32), 8 reserved, layer, group, volume, 2 reserved
    offset = at + 8 + (32 if version == 1 else 20) + 8 + 8
    raw[offset:offset + 36] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(raw))


def test_a_video_with_a_display_rotation_is_turned_upright(tmp_path):
    frames = np.zeros((4, 32, 64, 3), np.uint8)
    frames[:, :, :32] = 255  # the left half white
    data.write_video(tmp_path / "flat.mp4", frames)
    assert data.load_clip(Sample(str(tmp_path / "flat.mp4"), 0), "")[0, :, :32].min() == 255
    turned = tmp_path / "portrait.mp4"
    turned.write_bytes((tmp_path / "flat.mp4").read_bytes())
    _with_display_matrix(turned, (0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30))  # show it turned 90 degrees clockwise
    clip = data.load_clip(Sample(str(turned), 0), "")
    assert clip.shape == (4, 64, 32, 3)  # portrait, as a player shows it
    assert clip[:, :28].min() > 200 and clip[:, 36:].max() < 50  # the left half, turned clockwise, is on top
    for matrix, white in (((-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30), (slice(None), slice(36, None))),  # 180
                          ((0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30), (slice(36, None), slice(None)))):  # 90 ccw
        _with_display_matrix(turned, matrix)
        frames = list(data.iter_frames(turned))
        assert all(f.flags.c_contiguous for f in frames)  # torch.from_numpy (the detector) refuses negative strides
        assert frames[0][white].min() > 200 and frames[0].mean() < 150
        np.testing.assert_array_equal(np.stack(frames), data.load_clip(Sample(str(turned), 0), ""))


def test_iter_frames_refuses_a_folder_of_frames_of_different_sizes(tmp_path):
    data.write_frames(tmp_path / "f", np.zeros((2, 16, 16, 3), np.uint8))
    data.write_frames(tmp_path / "g", np.zeros((1, 24, 16, 3), np.uint8))
    (tmp_path / "g" / "1.jpg").rename(tmp_path / "f" / "3.jpg")
    with pytest.raises(ClipError, match=r"frames differ in size: .*3\.jpg is \(24, 16, 3\), the first \(16, 16, 3\)"):
        list(data.iter_frames(tmp_path / "f"))


def test_more_video_extensions_and_an_unknown_one_is_named(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    data.write_video(tmp_path / "a.mp4", frames)
    (tmp_path / "a.mp4").rename(tmp_path / "a.m4v")  # an iPhone export: mp4 inside
    assert data.load_clip(Sample(str(tmp_path / "a.m4v"), 0), "").shape == (3, 16, 16, 3)
    (tmp_path / "b.m4a").write_bytes(b"\0\0\0\x18ftypM4A ")
    with pytest.raises(ClipError, match=r"b\.m4a: .*read as an image \(JPEG or PNG only\), because \.m4a is not one"):
        data.load_clip(Sample(str(tmp_path / "b.m4a"), 0), "")
    assert data.frame_rate(tmp_path / "a.m4v") == 25 and data.frame_rate(tmp_path) == 25
    data.write_video(tmp_path / "c.mp4", frames, fps=60)
    assert data.frame_rate(tmp_path / "c.mp4") == 60


def test_iter_frames_gives_what_load_clip_gives(tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (5, 16, 24, 3), dtype=np.uint8)
    data.write_video(tmp_path / "v.mp4", iter(frames))  # write_video takes an iterable too
    data.write_frames(tmp_path / "f", iter(frames))
    for path in (tmp_path / "v.mp4", tmp_path / "f", tmp_path / "f" / "1.jpg"):
        expected = data.load_clip(Sample(str(path), 0), "")
        np.testing.assert_array_equal(np.stack(list(data.iter_frames(path))), expected)
    with pytest.raises(ClipError, match="garbage.mp4"):
        (tmp_path / "garbage.mp4").write_bytes(b"\0" * 100)
        list(data.iter_frames(tmp_path / "garbage.mp4"))


STOP_WHILE_WORKERS_START = """
import os, signal, sys
import torch
from torch.utils.data._utils import signal_handling
sys.path.insert(0, {root!r})
import data

install = signal_handling._set_worker_signal_handlers
def install_then_stop():  # in each worker: SIGTERM just after torch's own handlers, before worker_init_fn runs
    install()
    os.kill(os.getpid(), signal.SIGTERM)
signal_handling._set_worker_signal_handlers = install_then_stop
got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
start = torch.utils.data.dataloader._MultiProcessingDataLoaderIter.__init__
def start_then_stop(self, loader):  # and in this process, while its workers start
    os.kill(os.getpid(), signal.SIGTERM)
    start(self, loader)
torch.utils.data.dataloader._MultiProcessingDataLoaderIter.__init__ = start_then_stop
loader = {loader}(list(range(8)), batch_size=2, num_workers=2)
print(sum(len(b) for b in loader), got)
"""


@pytest.mark.parametrize("loader", ["data.batches", "torch.utils.data.DataLoader"])
def test_loader_workers_ignore_a_sigterm_that_comes_while_they_start(loader):
    """scancel's SIGTERM reaches every process of the group, also a worker that is just starting. data.batches:
    the worker discards it and the main process handles it once; a plain DataLoader's worker dies of it."""
    script = STOP_WHILE_WORKERS_START.format(root=str(Path(__file__).parent.parent), loader=loader)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if loader == "data.batches":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["8", "[15]"]
    else:  # what data.batches prevents: the race is real
        assert proc.returncode != 0 and "killed by signal: Terminated" in proc.stderr


ERROR_IN_A_WORKER = """
import sys
sys.path.insert(0, {root!r})
import data
class Failing:
    def __len__(self):
        return 40
    def __getitem__(self, i):
        if i == 0:
            raise ValueError("clip 0 is bad")
        return i
batches = data.batches(Failing(), batch_size=2, num_workers=2)  # still referenced at exit
try:
    for _ in batches:
        pass
except ValueError as err:
    print(err)
sys.exit(3)
"""


def test_a_process_whose_worker_failed_exits():
    """At exit, multiprocessing ends the workers still alive with SIGTERM from their parent: they must obey that one
    (before, validation hung here after a clip failed to decode)."""
    script = ERROR_IN_A_WORKER.format(root=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "clip 0 is bad" in proc.stdout, proc.stderr[-2000:]
