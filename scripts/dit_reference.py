"""Reference DiT forward passes: diffusers' FluxTransformer2DModel / SD3Transformer2DModel
on an original-layout (BFL / SAI, ComfyUI single-file) checkpoint, against the host's
`run-recipe forward`.

The host's FLUX and MMDiT must match diffusers to relative L2 <= 1e-2 in bf16 (and be
no further from f32 than diffusers' own bf16 is), and to 1e-5 in f32. The weights go
through diffusers' own single-file conversion (`convert_flux_transformer_checkpoint_to_diffusers`,
`convert_sd3_transformer_checkpoint_to_diffusers`, what `from_single_file` calls), and
the model is built from a config dict derived here from tensor shapes, so nothing needs
the hub and nothing here restates diffusers' name mapping.

    python3 scripts/dit_reference.py config CKPT
    python3 scripts/dit_reference.py make-inputs CKPT -o in.safetensors [--batch 1 --latent 32 --tokens 64]
    python3 scripts/dit_reference.py run CKPT --inputs in.safetensors -o ref.safetensors [--device cuda] [--dtype bf16|f32]
    python3 scripts/dit_reference.py all CKPT --host target/release/run-recipe [--work DIR] [--latent 32 --tokens 64]

`all` does everything: inputs, diffusers in bf16 and f32 (CUDA, TF32 off), the host's
`forward` on cuda (bf16) and cpu (f32), and prints the relative L2 distances as JSON.

CKPT: a diffusion-model-only file or a full single-file checkpoint (`model.diffusion_model.`),
e.g. `run-recipe synth flux --scale full` / `run-recipe synth sd3 [--variant ...]`.
diffusers' FLUX conversion hard-codes the 3072 hidden width, so FLUX needs a full-width
checkpoint; SD3's conversion reads its widths from the weights (tiny works).

Inputs file (F32), as `run-recipe forward` reads it: `x` [B,16,H,W] latents,
`timesteps` [B] (FLUX: sigma in [0,1]; SD3: sigma x 1000, as ComfyUI passes them and
as diffusers takes them), `context` [B,T,4096], `y` [B,768] (FLUX) or [B,2048] (SD3),
FLUX-dev also `guidance` [B]. Outputs file: `out` [B,16,H,W] F32.

diffusers' FLUX rounds `timestep` and `guidance` to the model dtype *before* scaling them
by 1000 (ComfyUI and the host scale in f32), so make-inputs picks values whose x1000
is exact in bf16 (sigma 0.5, 0.25; guidance 4.0) and the comparison measures the models,
not that rounding.

Needs torch, safetensors and diffusers (scripts/device-wheels.sh carries them to the GPU
machine).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PREFIX = "model.diffusion_model."
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def load_state(path):
    """Diffusion-model tensors, prefix stripped, as stored."""
    out = {}
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        full = any(k.startswith(PREFIX) for k in keys)
        for k in keys:
            if full:
                if k.startswith(PREFIX):
                    out[k[len(PREFIX):]] = f.get_tensor(k)
            else:
                out[k] = f.get_tensor(k)
    return out


def family(sd):
    if "double_blocks.0.img_attn.qkv.weight" in sd or "single_blocks.0.linear1.weight" in sd:
        return "flux"
    if "joint_blocks.0.x_block.attn.qkv.weight" in sd:
        return "sd3"
    sys.exit("neither FLUX (double_blocks.*) nor SD3 (joint_blocks.*) weights found")


def count(sd, fmt):
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def flux_config(sd):
    """FluxTransformer2DModel's config for these weights (BFL's FluxParams, by shape)."""
    hidden, patch_in = sd["img_in.weight"].shape
    norm = "double_blocks.0.img_attn.norm.query_norm"
    scale = sd.get(norm + ".scale", sd.get(norm + ".weight"))
    head = int(scale.shape[0])
    return {
        "patch_size": 1,
        "in_channels": int(patch_in),
        "out_channels": None,
        "num_layers": count(sd, "double_blocks.{}.img_attn.qkv.weight"),
        "num_single_layers": count(sd, "single_blocks.{}.linear1.weight"),
        "attention_head_dim": head,
        "num_attention_heads": int(hidden) // head,
        "joint_attention_dim": int(sd["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(sd["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": [head // 8, head * 7 // 16, head * 7 // 16],
    }


def sd3_config(sd):
    """SD3Transformer2DModel's config for these weights (SAI's MMDiT, by shape)."""
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    attn2 = sorted({int(k.split(".")[1]) for k in sd if k.startswith("joint_blocks.") and ".attn2." in k})
    pos = int(sd["pos_embed"].shape[1])
    side = math.isqrt(pos)
    if side * side != pos:
        sys.exit(f"pos_embed has {pos} positions, not a square")
    return {
        "sample_size": 128,
        "patch_size": int(p),
        "in_channels": int(in_ch),
        "num_layers": count(sd, "joint_blocks.{}.x_block.attn.qkv.weight"),
        "attention_head_dim": 64,
        "num_attention_heads": int(hidden) // 64,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(hidden),
        "pooled_projection_dim": int(sd["y_embedder.mlp.0.weight"].shape[1]),
        "out_channels": int(sd["final_layer.linear.weight"].shape[0]) // (int(p) * int(p)),
        "pos_embed_max_size": side,
        "dual_attention_layers": tuple(attn2),
        "qk_norm": "rms_norm" if any(".ln_q." in k for k in sd) else None,
    }


def converter(name):
    """diffusers' own single-file converter `name` (the module moved in 0.33)."""
    import importlib

    for module in ("diffusers.loaders.single_file.single_file_utils", "diffusers.loaders.single_file_utils"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    sys.exit(f"this diffusers has no {name}")


def build(path, dtype, device):
    return build_state(load_state(path), dtype, device)


def convert_state(sd):
    """diffusers' model class, config and converted state dict for original-layout
    tensors `sd` (prefix stripped). The converted tensors share storage with `sd`
    where the conversion only renames or splits."""
    fam = family(sd)
    if fam == "flux":
        from diffusers import FluxTransformer2DModel as Model

        cfg = flux_config(sd)
        if cfg["num_attention_heads"] * cfg["attention_head_dim"] != 3072:
            sys.exit("diffusers' FLUX single-file conversion hard-codes hidden 3072: use a full-width checkpoint")
        convert = converter("convert_flux_transformer_checkpoint_to_diffusers")
    else:
        from diffusers import SD3Transformer2DModel as Model

        cfg = sd3_config(sd)
        convert = converter("convert_sd3_transformer_checkpoint_to_diffusers")
    # a new dict: the converters pop the keys they take
    return Model, fam, cfg, convert({PREFIX + k: v for k, v in sd.items()})


def build_state(sd, dtype, device):
    """The diffusers model for original-layout tensors `sd` (consumed), on `device` in `dtype`."""
    Model, fam, cfg, converted = convert_state(sd)
    sd.clear()
    return load_converted(Model, fam, cfg, converted, dtype, device)


def load_converted(Model, fam, cfg, converted, dtype, device):
    with torch.device("meta"):
        model = Model(**cfg)
    # strict: any name diffusers' conversion leaves out or invents raises here
    model.load_state_dict(converted, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        sys.exit(f"left on the meta device: {meta[:5]}")
    n = sum(p.numel() for p in model.parameters())
    print(f"diffusers {Model.__name__}: {n / 1e6:.1f} M parameters, {len(converted)} tensors loaded strictly",
          file=sys.stderr)
    return model, fam, cfg


def cmd_config(a):
    sd = load_state(a.checkpoint)
    fam = family(sd)
    print(json.dumps({"family": fam, "diffusers_config": flux_config(sd) if fam == "flux" else sd3_config(sd)}, indent=1))


def make_inputs(checkpoint, output, batch, latent, tokens, seed, guidance):
    sd = load_state(checkpoint)
    fam = family(sd)
    cfg = flux_config(sd) if fam == "flux" else sd3_config(sd)
    del sd
    g = torch.Generator().manual_seed(seed)
    c = cfg["in_channels"] // 4 if fam == "flux" else cfg["in_channels"]
    sigmas = torch.tensor([0.5, 0.25] * ((batch + 1) // 2))[:batch]
    t = {
        "x": torch.randn(batch, c, latent, latent, generator=g),
        "timesteps": sigmas if fam == "flux" else sigmas * 1000.0,
        "context": torch.randn(batch, tokens, cfg["joint_attention_dim"], generator=g),
        "y": torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
    }
    if fam == "flux" and cfg["guidance_embeds"]:
        t["guidance"] = torch.full((batch,), float(guidance))
    t = {k: v.float().contiguous() for k, v in t.items()}
    save_file(t, output)
    print(f"wrote {output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in t.items()), file=sys.stderr)


def cmd_make_inputs(a):
    make_inputs(a.checkpoint, a.output, a.batch, a.latent, a.tokens, a.seed, a.guidance)


def forward(model, fam, inputs, dtype, device):
    with torch.inference_mode():
        return call(model, fam, inputs, dtype, device)


def call(model, fam, inputs, dtype, device):
    """One forward call in whatever grad mode the caller holds (ModelOpt's
    calibrators need no_grad, not inference_mode)."""
    x = inputs["x"].to(device, dtype)
    ctx = inputs["context"].to(device, dtype)
    y = inputs["y"].to(device, dtype)
    ts = inputs["timesteps"].to(device)
    b, c, h, w = x.shape
    if fam == "sd3":
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=ts,
                     return_dict=False)[0]
    # diffusers' FluxPipeline._pack_latents / _prepare_latent_image_ids / _unpack_latents
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] = torch.arange(h // 2)[:, None]
    img_ids[..., 2] = torch.arange(w // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(ctx.shape[1], 3, device=device, dtype=dtype)
    g = inputs.get("guidance")
    out = model(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=y, timestep=ts,
                img_ids=img_ids, txt_ids=txt_ids, guidance=None if g is None else g.to(device),
                return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def run_reference(checkpoint, inputs_path, output, dtype_name, device_name, repeat=0):
    dtype, device = DTYPES[dtype_name], torch.device(device_name)
    if dtype == torch.float32:
        # TF32 matmuls (10-bit mantissa) would make an "f32" reference ~1e-3 off.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    model, fam, cfg = build(checkpoint, dtype, device)
    inputs = load_file(inputs_path)
    t0 = time.perf_counter()
    out = forward(model, fam, inputs, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        t1 = time.perf_counter()
        forward(model, fam, inputs, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
    times.sort()
    out = out.float().cpu().contiguous()
    save_file({"out": out}, output)
    r = {"what": f"diffusers {fam} forward", "checkpoint": checkpoint, "device": str(device), "dtype": dtype_name,
         "shape": list(out.shape), "seconds_first_call": round(dt, 4),
         "median_seconds": round(times[len(times) // 2], 4) if times else None,
         "peak_device_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
         "out_rms": out.pow(2).mean().sqrt().item(), "non_finite": int((~torch.isfinite(out)).sum())}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def cmd_run(a):
    print(json.dumps(run_reference(a.checkpoint, a.inputs, a.output, a.dtype, a.device, a.repeat)))


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return ((a - b).norm() / b.norm()).item()


def cmd_all(a):
    os.makedirs(a.work, exist_ok=True)
    p = lambda name: os.path.join(a.work, name)  # noqa: E731
    make_inputs(a.checkpoint, p("in.safetensors"), a.batch, a.latent, a.tokens, a.seed, a.guidance)
    runs = {}
    # One reference at a time in this process (a full FLUX in f32 is 48 GB).
    for dt in ["bf16", "f32"]:
        runs[f"diffusers_{dt}"] = run_reference(a.checkpoint, p("in.safetensors"), p(f"diffusers_{dt}.safetensors"), dt, a.device)
    for dev, name in [("cuda", "host_bf16"), ("cpu", "host_f32")]:
        cmd = [a.host, "forward", a.checkpoint, "--inputs", p("in.safetensors"), "--out", p(f"{name}.safetensors"),
               "--device", dev]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
        runs[name] = {"report": json.loads(r.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - t0, 2)}
    out = {k: load_file(p(f"{k}.safetensors"))["out"] for k in ["diffusers_bf16", "diffusers_f32", "host_bf16", "host_f32"]}
    res = {
        "host_bf16_vs_diffusers_bf16": rel_l2(out["host_bf16"], out["diffusers_bf16"]),
        "host_f32_vs_diffusers_f32": rel_l2(out["host_f32"], out["diffusers_f32"]),
        "diffusers_bf16_vs_f32": rel_l2(out["diffusers_bf16"], out["diffusers_f32"]),
        "host_bf16_vs_diffusers_f32": rel_l2(out["host_bf16"], out["diffusers_f32"]),
    }
    res["pass"] = {
        "bf16_within_1e-2": res["host_bf16_vs_diffusers_bf16"] <= 1e-2,
        "bf16_no_further_from_f32_than_diffusers": res["host_bf16_vs_diffusers_f32"] <= res["diffusers_bf16_vs_f32"] * 1.05,
        "f32_within_1e-5": res["host_f32_vs_diffusers_f32"] <= 1e-5,
    }
    res["runs"] = runs
    res["checkpoint"] = a.checkpoint
    print(json.dumps(res, indent=1))
    if not all(res["pass"].values()):
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def shape_args(p):
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--latent", type=int, default=32, help="latent height = width (pixels / 8)")
        p.add_argument("--tokens", type=int, default=64, help="text tokens in `context`")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--guidance", type=float, default=4.0, help="FLUX-dev guidance (x1000 exact in bf16)")

    p = sub.add_parser("config", help="print the family and diffusers config inferred from the weights")
    p.add_argument("checkpoint")
    p.set_defaults(f=cmd_config)

    p = sub.add_parser("make-inputs", help="write seeded F32 inputs for this checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    shape_args(p)
    p.set_defaults(f=cmd_make_inputs)

    p = sub.add_parser("run", help="run diffusers on an inputs file, write `out`")
    p.add_argument("checkpoint")
    p.add_argument("--inputs", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeat", type=int, default=0, help="timed calls after the first (median reported)")
    p.set_defaults(f=cmd_run)

    p = sub.add_parser("all", help="inputs, diffusers bf16/f32, host cuda/cpu, and the distances")
    p.add_argument("checkpoint")
    p.add_argument("--host", required=True, help="the run-recipe binary")
    p.add_argument("--work", default="dit-ref", help="directory for the inputs and outputs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="diffusers' device")
    shape_args(p)
    p.set_defaults(f=cmd_all)

    a = ap.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
