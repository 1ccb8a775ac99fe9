"""kernels/bench_cpu.py runs and reports every figure of its table (tiny sizes; no timing is asserted)."""
import data
from kernels import bench_cpu


def test_the_cpu_table_reports_loading_and_the_step_breakdown(tmp_path):
    big = data.make_demo(tmp_path / "big", num_clips=7, size=224, mp4_every=10**6, workers=1)
    folders = [s for s in data.read_split("demo", big / "train.csv") if not s.path.endswith(".mp4")][:2]
    rows = bench_cpu.loader_rows(big, folders, (0, 1), repeats=1, batch_size=2)
    names = [f"loading, batch 2, {w} worker(s): clips/s per process / per core" for w in (0, 1)]
    assert [name for name, _ in rows] == names
    assert all(float(a) > 0 and float(b) > 0 for _, v in rows for a, b in [v.split(" / ")])
    small = data.make_demo(tmp_path / "small", num_clips=28, workers=1)  # >= 8 training clips: one batch
    rows = bench_cpu.train_step_rows(small, data.read_split("demo", small / "train.csv"), repeats=1)
    phases = ["data", "landmark view", "forward", "SDL", "backward", "optimizer"]
    assert [name.split(": ")[-1] for name, _ in rows] == phases + ["total"]
