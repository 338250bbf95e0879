"""PyTorch's own FP8 (E4M3) quantization on the GPU, for BENCHMARKS.md.

Usage: python3 scripts/torch_fp8_bench.py DIR
DIR holds fp8_in.bf16 (a bf16 3072x12288 tensor), fp8_q.bin and fp8_scale.f32
(Quantsmith's GPU result), written by `gpu_bench --dump DIR`. Times two naive
eager versions on the same GPU and checks that comfy-kitchen's formula, run by
PyTorch on CUDA, gives the same bytes as Quantsmith.
"""
import sys

import torch

d = sys.argv[1]
rows, cols = 3072, 12288
raw = open(f"{d}/fp8_in.bf16", "rb").read()
x = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(rows, cols).cuda()
ours_q = torch.frombuffer(bytearray(open(f"{d}/fp8_q.bin", "rb").read()), dtype=torch.uint8).reshape(rows, cols)
ours_s = torch.frombuffer(bytearray(open(f"{d}/fp8_scale.f32", "rb").read()), dtype=torch.float32)


def comfy_fp8(x):
    # comfy-kitchen eager: scale = amax / 448 in the input dtype; q = e4m3(clamp(x * T(1/scale)))
    scale = x.abs().amax() / 448.0
    inv = (1.0 / scale.float()).to(x.dtype)
    q = (x * inv).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale.float()


def naive_fp8(x):
    # the plainest version: amax, divide, cast
    scale = x.abs().amax().float() / 448.0
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def bench(f, iters=30):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


n = rows * cols
moved = 2 * n + n  # bf16 in, fp8 out
y = torch.empty_like(x)
t_copy = bench(lambda: y.copy_(x))
t_comfy = bench(lambda: comfy_fp8(x))
t_naive = bench(lambda: naive_fp8(x))
q, s = comfy_fp8(x)
same_q = torch.equal(q.view(torch.uint8).cpu(), ours_q)
same_s = torch.equal(s.reshape(1).cpu(), ours_s)
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: bf16 {rows}x{cols}")
print(f"| what | ms | GB/s (in+out) |")
print(f"|---|---|---|")
print(f"| torch copy_ (bf16 -> bf16) | {t_copy:.4f} | {2 * 2 * n / t_copy / 1e6:.0f} (read+write) |")
print(f"| torch comfy-kitchen eager FP8 (amax, scale, mul, clamp, cast) | {t_comfy:.4f} | {moved / t_comfy / 1e6:.0f} |")
print(f"| torch naive FP8 (amax, divide, cast) | {t_naive:.4f} | {moved / t_naive / 1e6:.0f} |")
print(f"torch comfy-kitchen FP8 == Quantsmith GPU FP8: codes {same_q}, scale {same_s}")
if not same_q:
    diff = (q.view(torch.uint8).cpu() != ours_q).sum().item()
    print(f"  {diff} codes differ")
