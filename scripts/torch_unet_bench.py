"""Plain PyTorch eager step of diffusers' UNet2DConditionModel: the baseline for the
host's calibration step (BENCHMARKS.md).

    python3 scripts/torch_unet_bench.py [--family sdxl|sd15] [--checkpoint CKPT]
        [--batch 2] [--size 1024] [--warmup 3] [--steps 10] [--dtype bf16]

Defaults: SDXL at 1024x1024 (latent 128x128), batch 2 (a CFG pair), bf16, diffusers'
own random init (or the weights of CKPT, an LDM-layout file such as `run-recipe
synth sdxl --scale full` writes). SD1.5: `--family sd15 --size 512`. Each step is one
UNet call under inference_mode with fresh inputs prepared beforehand; the median of
`--steps` timed calls (CUDA events) after `--warmup` untimed ones. Peak memory is
torch's peak allocation over the timed steps, weights included. Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import time

import torch

import unet_reference as R


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(R.KNOWN_LDM_PARAMS), default="sdxl")
    ap.add_argument("--checkpoint", help="LDM-layout weights instead of random init")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, help="image side in pixels (default: 1024 SDXL, 512 SD1.5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", choices=list(R.DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the code path on a tiny checkpoint")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    cuda = dev.type == "cuda"
    size = a.size or (1024 if a.family == "sdxl" else 512)
    latent = size // 8
    dtype = R.DTYPES[a.dtype]

    t0 = time.perf_counter()
    unet, params, _ = R.load_or_random_unet(a.checkpoint, a.family, dtype, dev)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated() if cuda else 0
    n_params = sum(p.numel() for p in unet.parameters())

    # distinct inputs per call, like a sampler's steps, built before timing
    calls = [R.random_inputs(params, a.batch, latent, dtype, dev, seed=i, timestep=(999 - 50 * i) % 1000)
             for i in range(a.warmup + a.steps)]
    times = []
    with torch.inference_mode():
        for i, (x, t, ctx, kw) in enumerate(calls):
            if i == a.warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = unet(x, t, ctx, return_dict=False, **kw)[0]
                end.record()
                end.synchronize()
                dt = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                out = unet(x, t, ctx, return_dict=False, **kw)[0]
                dt = time.perf_counter() - t0
            if i >= a.warmup:
                times.append(dt)
    finite = bool(torch.isfinite(out).all())
    print(json.dumps({
        "what": f"PyTorch {a.dtype} eager step, diffusers UNet2DConditionModel",
        "family": a.family, "weights": a.checkpoint or "random init (diffusers default)",
        "image": f"{size}x{size}", "latent": [a.batch, params["in_channels"], latent, latent],
        "params_M": round(n_params / 1e6, 1),
        "step_s_median": round(statistics.median(times), 4), "step_s_min": round(min(times), 4),
        "step_s_mean": round(statistics.fmean(times), 4), "steps": a.steps, "warmup": a.warmup,
        "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "weights_GiB": round(weights / 2**30, 2), "load_s": round(load_s, 2), "output_finite": finite,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
    }))


if __name__ == "__main__":
    main()
