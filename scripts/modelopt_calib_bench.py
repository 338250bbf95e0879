"""ModelOpt FP8 post-training calibration of diffusers' UNet2DConditionModel: the
anchor the host's calibration is compared with (BENCHMARKS.md).

    python3 scripts/modelopt_calib_bench.py [--family sdxl|sd15] [--checkpoint CKPT]
        [--calib-steps 16] [--batch 2] [--size 1024] [--baseline-steps 3] [--after-steps 3]

Does what ModelOpt's diffusers example (examples/diffusers/quantization, `--format fp8`,
default algorithm `max`, MHA not quantized) does to the backbone:
  1. config = the preset it loads, `configs/ptq/presets/diffusers/fp8` (shipped in the
     wheel): disable all quantizers, then per-tensor E4M3 on every `*weight_quantizer`
     and `*input_quantizer` (Linear and Conv2d alike) and `*softmax_quantizer`, with
     `trt_high_precision_dtype` "Half" as the example sets;
  2. mtq.quantize(unet, config, forward_loop): forward_loop runs `--calib-steps` UNet
     calls (1024x1024, batch 2 = a CFG pair, one call per denoising step; the example
     runs whole pipelines, so its steps are these calls plus text encoding);
  3. mtq.disable_quantizer over the layers it keeps in high precision (the names in
     SPEC §5), and the attention (bmm / softmax) quantizers, as its check_conv_and_mha
     does without --quantize-mha.
Times the whole mtq.quantize call and each calibration call (CUDA-synchronised),
an unquantized bf16 step first (`--baseline-steps`, same card, same process) and a
step of the fake-quantized model after (`--after-steps`). Peak memory is torch's peak
allocation during quantize, weights included. Prints one JSON line.
"""

import argparse
import json
import re
import statistics
import sys
import time

import torch

import unet_reference as R

# SPEC §5: diffusers module names ModelOpt leaves in high precision for diffusion models
HIGH_PRECISION = re.compile(
    r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed"
    r"|time_text_embed|context_embedder|norm_out|x_embedder).*"
)
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer",
                        "bmm2_output_quantizer")


def fp8_config():
    from modelopt.torch.opt.config_loader import load_config
    from modelopt.torch.quantization.config import QuantizeConfig

    cfg = load_config("configs/ptq/presets/diffusers/fp8", schema_type=QuantizeConfig).model_dump(exclude_unset=True)
    cfg["algorithm"] = {"method": "max"}
    for entry in cfg["quant_cfg"]:
        c = entry.get("cfg", {})
        if isinstance(c, dict) and "num_bits" in c:
            c.setdefault("trt_high_precision_dtype", "Half")
    return cfg


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(unet, calls, dev):
    # no_grad, not inference_mode: the calibrators' amax buffers are written here and
    # updated again after the loop, which inference tensors forbid (diffusers'
    # pipelines, which the example calibrates through, use no_grad too)
    times = []
    with torch.no_grad():
        for x, t, ctx, kw in calls:
            sync(dev)
            t0 = time.perf_counter()
            unet(x, t, ctx, return_dict=False, **kw)
            sync(dev)
            times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(R.KNOWN_LDM_PARAMS), default="sdxl")
    ap.add_argument("--checkpoint", help="LDM-layout weights instead of random init")
    ap.add_argument("--calib-steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, help="image side in pixels (default: 1024 SDXL, 512 SD1.5)")
    ap.add_argument("--baseline-steps", type=int, default=3, help="bf16 steps before quantizing (after 1 warm-up)")
    ap.add_argument("--after-steps", type=int, default=3, help="fake-quant steps after (after 1 warm-up)")
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test the code path on a tiny checkpoint")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    cuda = dev.type == "cuda"
    import modelopt
    import modelopt.torch.quantization as mtq

    size = a.size or (1024 if a.family == "sdxl" else 512)
    latent = size // 8
    dtype = torch.bfloat16
    unet, params, _ = R.load_or_random_unet(a.checkpoint, a.family, dtype, dev)
    weights = torch.cuda.memory_allocated() if cuda else 0

    def calls(n, seed0):
        # one call per denoising step, timesteps spread over the schedule like a sampler's
        return [R.random_inputs(params, a.batch, latent, dtype, dev, seed=seed0 + i,
                                timestep=999 - i * 999 // max(1, n - 1)) for i in range(n)]

    base = timed_steps(unet, calls(1 + a.baseline_steps, 1000), dev)[1:] if a.baseline_steps else []

    calib_calls = calls(a.calib_steps, 0)
    step_times = []

    def forward_loop(model):
        step_times.extend(timed_steps(model, calib_calls, dev))

    cfg = fp8_config()
    ext_s = None
    if cuda:
        # ModelOpt JIT-builds its FP8 fake-quant CUDA extension (nvcc) on first use;
        # build it here so no timed step pays for it (a fresh machine has no cache).
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        t0 = time.perf_counter()
        ext = get_cuda_ext_fp8(raise_if_failed=False)
        ext_s = round(time.perf_counter() - t0, 1) if ext is not None else "failed: eager fallback"
    sync(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    mtq.quantize(unet, cfg, forward_loop)
    sync(dev)
    quantize_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0

    mtq.disable_quantizer(unet, lambda name: HIGH_PRECISION.match(name) is not None)
    mtq.disable_quantizer(unet, lambda name: name.rsplit(".", 1)[-1] in ATTENTION_QUANTIZERS)
    enabled = {"Linear": 0, "Conv2d": 0}
    for _name, m in unet.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            kind = "Linear" if isinstance(m, torch.nn.Linear) else "Conv2d" if isinstance(m, torch.nn.Conv2d) else type(m).__name__
            enabled[kind] = enabled.get(kind, 0) + 1

    after = timed_steps(unet, calls(1 + a.after_steps, 2000), dev)[1:] if a.after_steps else []
    med = statistics.median
    print(json.dumps({
        "what": "ModelOpt mtq.quantize, diffusers FP8 preset, max calibration",
        "family": a.family, "weights": a.checkpoint or "random init (diffusers default)",
        "image": f"{size}x{size}", "batch": a.batch, "calib_steps": a.calib_steps,
        "quantize_total_s": round(quantize_s, 2),
        "calib_step_s_median": round(med(step_times), 4), "calib_step_s_first": round(step_times[0], 4),
        "calib_loop_s": round(sum(step_times), 2), "quantize_overhead_s": round(quantize_s - sum(step_times), 2),
        "bf16_step_s_median": round(med(base), 4) if base else None,
        "calib_step_over_bf16": round(med(step_times) / med(base), 2) if base else None,
        "fakequant_step_s_median": round(med(after), 4) if after else None,
        "quantized_layers": enabled, "fp8_extension_build_s": ext_s,
        "peak_alloc_GiB": round(peak / 2**30, 2), "weights_GiB": round(weights / 2**30, 2),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "modelopt": modelopt.__version__, "diffusers": __import__("diffusers").__version__,
    }))


if __name__ == "__main__":
    main()
