"""Per-kernel GPU time of one diffusers DiT step (torch.profiler), to set beside the
host's per-kernel profile (`ncu` over `run-recipe forward`) of the same step.

    python3 scripts/dit_profile.py CKPT --inputs in.safetensors [--top 40]

Prints a table of CUDA kernels by total device time for one bf16 forward call
(after two warm-up calls), grouped into coarse classes (GEMM, attention,
elementwise/norm, copy) with their sums, so the two implementations can be
compared class by class.
"""

import argparse
import re
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, __import__("os").path.dirname(__file__))
import dit_reference as ref  # noqa: E402

CLASSES = [
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("copy", re.compile(r"copy|cat|memcpy|memset", re.I)),
]


def classify(name):
    for cls, pat in CLASSES:
        if pat.search(name):
            return cls
    return "elementwise/norm/other"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--inputs", required=True)
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    model, fam, _ = ref.build(a.checkpoint, torch.bfloat16, torch.device("cuda"))
    inputs = load_file(a.inputs)
    for _ in range(2):
        ref.forward(model, fam, inputs, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ref.forward(model, fam, inputs, torch.bfloat16, "cuda")
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        r = rows.setdefault(e.name, [0, 0.0])
        r[0] += 1
        r[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(t for _, t in rows.values())
    classes = {}
    for name, (n, t) in rows.items():
        c = classes.setdefault(classify(name), [0, 0.0])
        c[0] += n
        c[1] += t
    print(f"diffusers {fam} bf16 step: {total / 1e3:.2f} ms of kernel time")
    for c, (n, t) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
        print(f"  {c:28s} {n:6d} launches {t / 1e3:9.2f} ms  {100 * t / total:5.1f}%")
    for name, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"{t / 1e3:9.3f} ms {n:5d}x  {name[:150]}")


if __name__ == "__main__":
    main()
