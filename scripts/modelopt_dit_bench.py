"""ModelOpt FP8 post-training calibration of diffusers' FluxTransformer2DModel /
SD3Transformer2DModel, on our original-layout file: the same-call baseline of the
host's DiT calibration (BENCHMARKS.md, issue 10).

    python3 scripts/modelopt_dit_bench.py CKPT [--calib-steps 16] [--latent 128] [--tokens 512]

The model is built as scripts/dit_reference.py builds it (diffusers' own single-file
conversion, bf16, CUDA); the quantizer configuration, the layers kept in high precision
and the timing are those of scripts/modelopt_calib_bench.py (ModelOpt's diffusers
example, `--format fp8`, `max`): `mtq.quantize` over `--calib-steps` forward calls at
1024² (batch 1, one call per step, sigmas spread over (0, 1], FLUX-dev guidance 3.5),
ModelOpt's CUDA extension built before the timed part. Prints one JSON line.
"""

import argparse
import json
import re
import statistics
import sys
import time

import torch

import dit_reference as D
import modelopt_calib_bench as M

# SPEC §5 for FLUX adds proj_out and time_guidance_embed to the diffusion list.
HIGH_PRECISION = re.compile(M.HIGH_PRECISION.pattern[:-3] + r"|proj_out|time_guidance_embed).*")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--calib-steps", type=int, default=16)
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=512)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

    dev, dtype = torch.device("cuda"), torch.bfloat16
    model, fam, cfg = D.build(a.checkpoint, dtype, dev)
    weights = torch.cuda.memory_allocated()
    c = cfg["in_channels"] // 4 if fam == "flux" else cfg["in_channels"]

    def inputs(i, n):
        g = torch.Generator().manual_seed(i)
        sigma = 1.0 - i / max(1, n)
        t = {
            "x": torch.randn(1, c, a.latent, a.latent, generator=g),
            "timesteps": torch.tensor([sigma if fam == "flux" else sigma * 1000.0]),
            "context": torch.randn(1, a.tokens, cfg["joint_attention_dim"], generator=g),
            "y": torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        }
        if fam == "flux" and cfg.get("guidance_embeds"):
            t["guidance"] = torch.tensor([3.5])
        return t

    calls = [inputs(i, a.calib_steps) for i in range(a.calib_steps)]
    step_times = []

    def run(m, batch):
        out = []
        with torch.no_grad():
            for inp in batch:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                D.call(m, fam, inp, dtype, dev)
                torch.cuda.synchronize()
                out.append(time.perf_counter() - t0)
        return out

    base = run(model, [inputs(1000 + i, 4) for i in range(4)])[1:]
    t0 = time.perf_counter()
    ext = get_cuda_ext_fp8(raise_if_failed=False)
    ext_s = round(time.perf_counter() - t0, 1) if ext is not None else "failed: eager fallback"
    cfg_q = M.fp8_config()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    mtq.quantize(model, cfg_q, lambda m: step_times.extend(run(m, calls)))
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    mtq.disable_quantizer(model, lambda name: HIGH_PRECISION.match(name) is not None)
    mtq.disable_quantizer(model, lambda name: name.rsplit(".", 1)[-1] in M.ATTENTION_QUANTIZERS)
    enabled = sum(1 for _, m in model.named_modules() if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled)
    med = statistics.median
    print(json.dumps({
        "what": "ModelOpt mtq.quantize, diffusers FP8 preset, max calibration", "family": fam,
        "checkpoint": a.checkpoint, "latent": a.latent, "tokens": a.tokens, "calib_steps": a.calib_steps,
        "quantize_total_s": round(quantize_s, 2), "calib_loop_s": round(sum(step_times), 2),
        "calib_step_s_median": round(med(step_times), 4), "bf16_step_s_median": round(med(base), 4),
        "quantized_linear_layers": enabled, "fp8_extension_build_s": ext_s,
        "peak_alloc_GiB": round(peak / 2**30, 2), "weights_GiB": round(weights / 2**30, 2),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "modelopt": modelopt.__version__,
    }))


if __name__ == "__main__":
    main()
