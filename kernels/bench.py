"""Benchmark: the fused Triton kernels against their PyTorch references and torch.compile(reference), and the
whole s2d_base video training step in bf16 with kernels="triton" against kernels="torch".

    python kernels/bench.py                  # kernels and training step on the current CUDA device
    python kernels/bench.py --only kernels   # kernels only
Times are triton.testing.do_bench medians with 20% / 80% quantiles, in ms. GB/s counts each kernel's minimum
traffic (the bytes the fused kernel must move), the same for every provider, so it reads as effective bandwidth.
Prints markdown tables and appends rows to kernels/results/bench.csv (GPU name, date, torch and triton versions).
Without CUDA it says so, times the references on CPU at a small size (not a GPU figure) and exits 0.
"""
import argparse
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python kernels/bench.py` from the repo root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.mcp_gate import mcp_gate, mcp_gate_ref  # noqa: E402
from kernels.temporal_attention import temporal_attention, temporal_attention_ref  # noqa: E402

CSV_PATH = ROOT / "kernels" / "results" / "bench.csv"
FIELDS = ["date", "gpu", "torch", "triton", "bench", "shape", "dtype", "provider", "mode", "ms", "ms_p20", "ms_p80",
          "gb_s", "bw_frac", "tflop_s", "mfu", "peak_mem_mb", "clips_s", "max_err"]
QUANTILES = [0.5, 0.2, 0.8]
# device name fragment -> (memory bandwidth B/s, dense bf16 FLOP/s); first match wins
PEAKS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12)]


def device_peaks():
    name = torch.cuda.get_device_name()
    return next(((bw, fl) for key, bw, fl in PEAKS if key in name), (None, None))


# ---------------------------------------------------------------- the two kernels: inputs, bytes, FLOPs
def attention_case(B, T, N, H, D, dtype):
    """T-MSA on qkv (B, T, N, 3, H, D). Bytes: read qkv, write out; backward reads qkv, dout, writes dqkv."""
    qkv = torch.randn(B, T, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=True)
    scale = D ** -0.5
    elem, qkv_n, out_n = qkv.element_size(), qkv.numel(), B * T * N * H * D
    fwd_bytes, bwd_bytes = (qkv_n + out_n) * elem, (2 * qkv_n + out_n) * elem
    fwd_flops = 4 * B * N * H * T * T * D  # Q K^T and A V
    providers = {"triton": lambda q: temporal_attention(q, scale), "torch": lambda q: temporal_attention_ref(q, scale)}
    return [qkv], providers, (fwd_bytes, bwd_bytes), (fwd_flops, 2 * fwd_flops), providers["torch"]


def gate_case(BT, N, C, dtype, autocast=False):
    """MCP gate on x, a (BT, N, C); autocast: fp32 x, a and parameters under bf16 autocast, as in training."""
    act = torch.float32 if autocast else dtype
    x, a = (torch.randn(BT, N, C, device="cuda", dtype=act, requires_grad=True) for _ in range(2))
    w_x, w_a = (torch.randn(8, C, device="cuda", dtype=act).mul(C ** -0.5).requires_grad_() for _ in range(2))
    b_x, b_a = (torch.zeros(8, device="cuda", dtype=act, requires_grad=True) for _ in range(2))
    s = torch.full((1,), 10.0, device="cuda", requires_grad=True)
    big = BT * N * C * x.element_size()
    fwd_bytes, bwd_bytes = 2 * big, 4 * big  # read x, a; backward reads x, a and writes dx, da
    fwd_flops = 2 * 2 * BT * N * C * 8
    wrap = (lambda fn: lambda *t: under_autocast(fn, *t)) if autocast else (lambda fn: fn)
    providers = {"triton": wrap(mcp_gate), "torch": wrap(mcp_gate_ref)}
    return [x, a, w_x, b_x, w_a, b_a, s], providers, (fwd_bytes, bwd_bytes), (fwd_flops, 2 * fwd_flops), mcp_gate_ref


def under_autocast(fn, *inputs):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return fn(*inputs)


# ---------------------------------------------------------------- checking and timing
def max_error(fn, exact, inputs):
    """The largest error of fn's output and of its gradient for every input (one random grad_output), each
    measured on the scale max(1, max |exact value|), against exact: the reference run in float64 on the same
    inputs. The tables show it for every provider, so a kernel that computes wrongly is not timed unnoticed."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    doubles = [t.detach().double().requires_grad_() for t in inputs]
    out, ref = fn(*inputs), exact(*doubles)
    grad = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    pairs = [(out, ref), *zip(torch.autograd.grad(out, inputs, grad.to(out.dtype)),
                              torch.autograd.grad(ref, doubles, grad), strict=True)]
    return max(((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item() for a, b in pairs)


def peak_memory_mb(fn, inputs, grad):
    """Memory allocated on top of the inputs at the peak of one forward + backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(*inputs), inputs, grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_modes(fn, inputs):
    """{mode: (median, p20, p80) ms} for fwd, bwd, full (= fwd + bwd), and the peak memory of one full pass."""
    grad = torch.randn_like(fn(*inputs))
    peak_mb = peak_memory_mb(fn, inputs, grad)
    out = fn(*inputs)  # the graph that the backward-only timing runs through again and again
    times = {
        "fwd": do_bench(lambda: fn(*inputs), quantiles=QUANTILES),
        "bwd": do_bench(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), quantiles=QUANTILES),
        "full": do_bench(lambda: torch.autograd.grad(fn(*inputs), inputs, grad), quantiles=QUANTILES),
    }
    return times, peak_mb


def bench_kernel(name, shape, dtype_name, case, peaks):
    """Rows for the fused kernel, the reference and torch.compile(reference) at one shape."""
    inputs, providers, (fwd_bytes, bwd_bytes), (fwd_flops, bwd_flops), exact = case
    torch._dynamo.reset()  # a fresh compile per shape, clear of the recompile limit
    torch._functorch.config.donated_buffer = False  # the backward-only timing replays one graph (retain_graph)
    providers = {**providers, "compiled": torch.compile(providers["torch"])}
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "full": fwd_bytes + bwd_bytes}
    flops = {"fwd": fwd_flops, "bwd": bwd_flops, "full": fwd_flops + bwd_flops}
    rows = []
    for provider, fn in providers.items():
        err = max_error(fn, exact, inputs)
        times, peak_mb = time_modes(fn, inputs)
        for mode, (ms, p20, p80) in times.items():
            gb_s = nbytes[mode] / ms * 1e-6
            rows.append(dict(bench=name, shape=shape, dtype=dtype_name, provider=provider, mode=mode, ms=ms,
                             ms_p20=p20, ms_p80=p80, gb_s=gb_s, bw_frac=gb_s * 1e9 / peaks[0] if peaks[0] else None,
                             tflop_s=flops[mode] / ms * 1e-9, peak_mem_mb=peak_mb, max_err=err))
    return rows


# ---------------------------------------------------------------- the whole training step
def train_step_flops(cfg, clips, frames):
    """Matmul FLOPs (2 per multiply-add) of one video-stage step: the ViT is frozen, MCP / TMA / landmark
    embedding / head train. Forward once; backward: input gradients of every layer after the patch embedding
    (1x forward), weight gradients of trainable layers (1x more), two gradients for each attention matmul."""
    C, L, d, K, P = cfg.width, cfg.depth, cfg.adapter_dim, cfg.prompt_dim, cfg.patch_size
    N = cfg.grid ** 2
    S = N + 1  # tokens with CLS

    def mm(m, k, n):
        return 2 * m * k * n

    patch = mm(N, 3 * P * P, C)  # per frame
    frozen = L * (mm(S, C, 3 * C) + mm(S, C, C) + 2 * mm(S, C, int(cfg.mlp_ratio * C)))  # ViT linears
    vit_attn = L * 2 * mm(S, S, C)  # Q K^T and A V
    mcp = L * (2 * mm(N, C, K) + mm(N, K, C))
    tma = L * (2 * mm(N, C, d) + mm(N, d, 3 * d) + mm(N, d, d) + 2 * mm(N, d, C))
    landmark = mm(N, cfg.landmark_channels, C)
    t_attn = L * 2 * mm(N * frames, d, frames)  # per clip: Q K^T and A V over the T frames, all positions
    per_frame = patch + 2 * frozen + 3 * vit_attn + 3 * (mcp + tma) + 2 * landmark
    return clips * frames * per_frame + clips * 3 * t_attn


def bench_train_step(kernels, clips, frames, peaks):
    from model import build_model, set_trainable

    model = build_model("s2d_base", 7, frames, kernels=kernels).cuda()
    set_trainable(model, "video")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05)
    S = model.cfg.img_size
    video = torch.randn(clips, 3, frames, S, S, device="cuda")
    landmarks = torch.randn(clips, frames, 128, 14, 14, device="cuda")  # the frozen landmark net is not timed
    labels = torch.randint(0, 7, (clips,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(video, landmarks)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms, p20, p80 = do_bench(step, warmup=500, rep=3000, quantiles=QUANTILES)
    flops = train_step_flops(model.cfg, clips, frames)
    tflop_s = flops / ms * 1e-9
    return dict(bench="train_step", shape=f"s2d_base B={clips} T={frames}", dtype="bf16-autocast", provider=kernels,
                mode="full", ms=ms, ms_p20=p20, ms_p80=p80, tflop_s=tflop_s,
                mfu=tflop_s * 1e12 / peaks[1] if peaks[1] else None,
                peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, clips_s=clips / ms * 1e3)


# ---------------------------------------------------------------- reporting
def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def kernel_table(rows):
    """One line per (shape, dtype, provider): fwd / bwd / full times, full-pass GB/s, % of peak, memory, speedups,
    and the largest error against the float64 reference (output and gradients, see max_error)."""
    lines = ["| shape | dtype | provider | fwd ms (p20-p80) | bwd ms | fwd+bwd ms | fwd+bwd GB/s | % peak BW "
             "| peak MB | fwd+bwd speedup vs torch | vs compiled | max error vs fp64 |", "|" + "---|" * 12]
    by_key = {(r["shape"], r["dtype"], r["provider"], r["mode"]): r for r in rows}
    for shape, dtype, provider in dict.fromkeys((r["shape"], r["dtype"], r["provider"]) for r in rows):
        fwd, bwd, full = (by_key[(shape, dtype, provider, m)] for m in ("fwd", "bwd", "full"))
        speedup = by_key[(shape, dtype, "torch", "full")]["ms"] / full["ms"]
        vs_compiled = by_key[(shape, dtype, "compiled", "full")]["ms"] / full["ms"]
        bw = None if full["bw_frac"] is None else 100 * full["bw_frac"]
        lines.append(f"| {shape} | {dtype} | {provider} | {fwd['ms']:.3f} ({fwd['ms_p20']:.3f}-{fwd['ms_p80']:.3f}) "
                     f"| {bwd['ms']:.3f} | {full['ms']:.3f} | {full['gb_s']:.0f} | {fmt(bw, '.0f')} "
                     f"| {full['peak_mem_mb']:.0f} | {speedup:.2f}x | {vs_compiled:.2f}x | {full['max_err']:.1e} |")
    return "\n".join(lines)


def train_table(rows):
    lines = ["| model | kernels | step ms (p20-p80) | clips/s | TFLOP/s | MFU | peak MB |", "|" + "---|" * 7]
    for r in rows:
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"| {r['shape']} | {r['provider']} | {r['ms']:.1f} ({r['ms_p20']:.1f}-{r['ms_p80']:.1f}) "
                     f"| {r['clips_s']:.1f} | {r['tflop_s']:.0f} | {fmt(mfu, '.1f')}% "
                     f"| {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines)


def append_csv(rows):
    CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
    if CSV_PATH.exists() and CSV_PATH.read_text().partition("\n")[0] != ",".join(FIELDS):  # older columns
        kept = CSV_PATH.with_name(f"bench-{datetime.date.today().isoformat()}-old-columns.csv")
        CSV_PATH.rename(kept)
        print(f"{CSV_PATH.name} had other columns: kept as {kept.name}, a new one begun")
    new = not CSV_PATH.exists()
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    with CSV_PATH.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**stamp, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}})


def cpu_reference_only():
    """No CUDA: time the two references (forward + backward) on CPU at a small size; no GPU figure."""
    print("No CUDA device: the Triton kernels are not benchmarked and no GPU figure is measured.")
    print("The references on CPU at a small size, forward + backward, median of 5 runs (not a GPU figure):")
    cases = {"temporal_attention_ref (B=1, T=16, N=196, H=8, D=24)":
             (lambda q: temporal_attention_ref(q, 24 ** -0.5), [torch.randn(1, 16, 196, 3, 8, 24)]),
             "mcp_gate_ref (BT=16, N=196, C=768)":
             (mcp_gate_ref, [torch.randn(16, 196, 768), torch.randn(16, 196, 768), torch.randn(8, 768),
                             torch.zeros(8), torch.randn(8, 768), torch.zeros(8), torch.full((1,), 10.0)])}
    for name, (fn, inputs) in cases.items():
        inputs = [t.requires_grad_() for t in inputs]
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn(*inputs).sum().backward()
            times.append(time.perf_counter() - start)
        print(f"  {name}: {1e3 * statistics.median(times):.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["kernels", "train", "all"], default="all",
                        help="benchmark the two kernels, the s2d_base training step, or both (default)")
    parser.add_argument("--clips", type=int, default=8, help="clips per training step (default 8, as released)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    args = parser.parse_args()
    if args.clips < 1 or args.frames < 1:
        parser.error(f"--clips and --frames must be at least 1, got {args.clips} and {args.frames}")
    if not torch.cuda.is_available():
        given = [f"--{k}" for k in ("only", "clips", "frames") if getattr(args, k) != parser.get_default(k)]
        if given:
            print(f"{', '.join(given)}: for the GPU benchmark; not used without CUDA")
        cpu_reference_only()
        return
    peaks = device_peaks()
    bandwidth, flops = (None if p is None else p / 1e12 for p in peaks)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"peak bandwidth {fmt(bandwidth, '.2f')} TB/s, dense bf16 {fmt(flops, '.0f')} TFLOP/s")
    rows = []
    if args.only in ("kernels", "all"):
        attention = []
        for B, T in [(8, 16), (8, 8), (8, 32), (32, 16)]:  # S2D: 8 clips x 16 frames, N = 196, H = 8, D = 24
            attention += bench_kernel("temporal_attention", f"B={B} T={T} N=196 H=8 D=24", "bf16",
                                      attention_case(B, T, 196, 8, 24, torch.bfloat16), peaks)
        print("\n## Temporal attention (T-MSA), forward + backward\n" + kernel_table(attention))
        gate = []
        for BT in [128, 32, 512]:  # S2D: 128 frames, N = 196, C = 768
            gate += bench_kernel("mcp_gate", f"BT={BT} N=196 C=768", "bf16",
                                 gate_case(BT, 196, 768, torch.bfloat16), peaks)
        gate += bench_kernel("mcp_gate", "BT=128 N=196 C=768", "fp32 in, bf16 autocast",
                             gate_case(128, 196, 768, torch.bfloat16, autocast=True), peaks)
        print("\n## MCP spatial gating, forward + backward\n" + kernel_table(gate))
        rows += attention + gate
    if args.only in ("train", "all"):
        train = [bench_train_step(k, args.clips, args.frames, peaks) for k in ("torch", "triton")]
        print("\n## s2d_base video training step (bf16 autocast, AdamW, landmark net not timed)\n" + train_table(train))
        rows += train
    append_csv(rows)
    print(f"\nappended {len(rows)} rows to {CSV_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
