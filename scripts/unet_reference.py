"""Reference UNet forward pass: diffusers' UNet2DConditionModel on an LDM-layout checkpoint.

The host's UNet (original LDM names, SD1.5 / SDXL) must match diffusers' to relative
L2 <= 1e-2 in bf16 on the same weights and inputs. The weights go through diffusers'
own single-file machinery (`create_unet_diffusers_config_from_ldm`,
`convert_ldm_unet_checkpoint`), fed with an LDM config inferred from tensor shapes,
so nothing here restates diffusers' name mapping.

    python3 scripts/unet_reference.py config CKPT
    python3 scripts/unet_reference.py make-inputs CKPT -o in.safetensors [--batch 2 --latent 128]
    python3 scripts/unet_reference.py run CKPT --inputs in.safetensors -o ref.safetensors \
        [--device cuda] [--dtype bf16|f32] [--trace]
    python3 scripts/unet_reference.py compare ours.safetensors ref.safetensors [--max-rel-l2 1e-2] \
        [--f32-reference ref-f32.safetensors]

CKPT is a diffusion-model-only file or a full single-file checkpoint (UNet under
`model.diffusion_model.`), e.g. from `run-recipe synth sd15|sdxl`.

Inputs file (all F32): `x` [B,4,H,W] latents, `timesteps` [B] (LDM's `timesteps`
argument; diffusers takes the same values), `context` [B,77,ctx]; for SDXL also
`y` [B,adm] (what LDM's `label_emb` reads) plus `text_embeds` [B,adm-1536] and
`time_ids` [B,6], from which diffusers builds the same `y` itself (the pooled text
embedding followed by the 256-wide sinusoidal embedding of each of the 6 size/crop
numbers). Outputs file: `out` [B,4,H,W] F32.

bf16 alone moves the output of a randomly initialised UNet far: diffusers in bf16
against diffusers in f32 differs by 2e-2 to 1.0 relative L2 on the synthetic weights
(peaky attention, deep residual stacks), so give `compare` the f32 output too
(`--f32-reference`) and read the host's distance next to that floor.

Needs torch, safetensors and diffusers (scripts/device-wheels.sh carries it to the
GPU machine).
"""

import argparse
import json
import math
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LDM_PREFIX = "model.diffusion_model."
CONTEXT_TOKENS = 77
# SDXL's `y`: pooled text embedding, then 6 conditioning numbers (original size,
# crop top-left, target size) each embedded to 256 sinusoidal features.
TIME_IDS = 6
TIME_ID_DIM = 256


def load_unet_state(path):
    """LDM-named UNet tensors, prefix stripped, as stored (no dtype change)."""
    out = {}
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        full = any(k.startswith(LDM_PREFIX) for k in keys)
        for k in keys:
            if full:
                if k.startswith(LDM_PREFIX):
                    out[k[len(LDM_PREFIX):]] = f.get_tensor(k)
            else:
                out[k] = f.get_tensor(k)
    if "input_blocks.0.0.weight" not in out:
        sys.exit(f"{path}: no UNet here (no input_blocks.0.0.weight, with or without {LDM_PREFIX!r})")
    return out


def infer_ldm_params(sd, num_heads=None, head_channels=None):
    """The `unet_config.params` of the LDM / sgm yaml that would build this state dict.

    Heads can't be read off shapes: SD1.x fixes 8 heads per attention (num_heads: 8),
    SD2.x and SDXL fix 64 channels per head (num_head_channels: 64) and use linear
    proj_in; that is the default picked from proj_in's rank unless told otherwise.
    """
    w0 = sd["input_blocks.0.0.weight"]
    model_channels, in_channels = int(w0.shape[0]), int(w0.shape[1])
    out_channels = int(sd["out.2.weight"].shape[0])

    n_input = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    levels = [[]]  # per level: input block indices of its ResBlocks
    for i in range(1, n_input):
        if f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(i)
    res_blocks = {len(lv) for lv in levels}
    if len(res_blocks) != 1:
        sys.exit(f"uneven ResBlocks per level {[len(lv) for lv in levels]}: not an LDM UNet this script knows")
    num_res_blocks = res_blocks.pop()

    channel_mult, depth, attention_resolutions = [], [], []
    for lvl, blocks in enumerate(levels):
        ch = int(sd[f"input_blocks.{blocks[0]}.0.out_layers.3.weight"].shape[0])
        assert ch % model_channels == 0, (ch, model_channels)
        channel_mult.append(ch // model_channels)
        counts = []
        for i in blocks:
            p = f"input_blocks.{i}.1.transformer_blocks."
            counts.append(len({k[len(p):].split(".")[0] for k in sd if k.startswith(p)}))
        if len(set(counts)) != 1:
            sys.exit(f"level {lvl}: transformer depths {counts} differ between ResBlocks")
        depth.append(counts[0])
        if counts[0]:
            attention_resolutions.append(2**lvl)

    to_k = next(k for k in sorted(sd) if k.endswith("attn2.to_k.weight"))
    context_dim = int(sd[to_k].shape[1])
    proj_in = next(k for k in sorted(sd) if k.endswith(".proj_in.weight"))
    linear = sd[proj_in].ndim == 2

    p = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "model_channels": model_channels,
        "num_res_blocks": num_res_blocks,
        "channel_mult": channel_mult,
        "attention_resolutions": attention_resolutions,
        "context_dim": context_dim,
        "use_linear_in_transformer": linear,
    }
    # The SD1.x/2.x yamls give one int depth; sgm's SDXL yaml a per-level list with
    # 0 where there is no attention. diffusers' config builder takes either, and
    # gives the middle block the int, or the list's last entry.
    attn_depths = {d for d in depth if d}
    p["transformer_depth"] = attn_depths.pop() if len(attn_depths) == 1 else depth
    mid = "middle_block.1.transformer_blocks."
    mid_depth = len({k[len(mid):].split(".")[0] for k in sd if k.startswith(mid)})
    diffusers_mid = p["transformer_depth"] if isinstance(p["transformer_depth"], int) else depth[-1]
    if mid_depth != diffusers_mid:
        sys.exit(f"middle block depth {mid_depth}, per-level depths {depth}: diffusers' config can't express it")
    if num_heads is None and head_channels is None:
        if linear:
            head_channels = 64
        else:
            num_heads = 8
    if num_heads is not None:
        p["num_heads"] = num_heads
    else:
        p["num_head_channels"] = head_channels
    if "label_emb.0.0.weight" in sd:
        p["num_classes"] = "sequential"
        p["adm_in_channels"] = int(sd["label_emb.0.0.weight"].shape[1])
    return p


# unet_config.params of the original yamls (v1-inference.yaml, sgm's sd_xl_base.yaml),
# for runs on randomly initialised weights; they give diffusers' published configs.
KNOWN_LDM_PARAMS = {
    "sd15": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": 2,
             "channel_mult": [1, 2, 4, 4], "attention_resolutions": [4, 2, 1], "context_dim": 768,
             "use_linear_in_transformer": False, "transformer_depth": 1, "num_heads": 8},
    "sdxl": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": 2,
             "channel_mult": [1, 2, 4], "attention_resolutions": [4, 2], "context_dim": 2048,
             "use_linear_in_transformer": True, "transformer_depth": [0, 2, 10], "num_head_channels": 64,
             "num_classes": "sequential", "adm_in_channels": 2816},
}


def diffusers_config(ldm_params, prefixed_state):
    """diffusers' own LDM -> UNet2DConditionModel config, with one fix for narrow test models."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": ldm_params},
                # only read for the VAE scale factor (sample_size, unused by forward)
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    cfg = create_unet_diffusers_config_from_ldm(original_config, prefixed_state)
    hc = ldm_params.get("num_head_channels")
    if hc is not None:
        # diffusers' "attention_head_dim" is a head COUNT per level. It derives it as
        # (model_channels // head_channels) * mult, which is 0 once model_channels < 64
        # (the tiny synthetic models); the true count is channels // head_channels.
        cfg["attention_head_dim"] = [max(1, ldm_params["model_channels"] * m // hc) for m in ldm_params["channel_mult"]]
    return cfg


def build_unet(path, dtype, device, num_heads=None, head_channels=None, verbose=True):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = load_unet_state(path)
    params = infer_ldm_params(sd, num_heads, head_channels)
    prefixed = {LDM_PREFIX + k: v for k, v in sd.items()}
    del sd
    cfg = diffusers_config(params, prefixed)
    converted = convert_ldm_unet_checkpoint(prefixed, cfg)
    del prefixed
    # Build on the meta device: a full SDXL in f32 would otherwise be initialised
    # randomly for nothing (~10 GB, minutes of CPU).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    # strict: any name diffusers' conversion leaves out or invents raises here
    unet.load_state_dict(converted, strict=True, assign=True)
    unet = unet.to(device=device, dtype=dtype).eval()
    # Buffers created in __init__ (none today) would still be on meta: fail loudly.
    meta = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if meta:
        sys.exit(f"left on the meta device: {meta[:5]}")
    if verbose:
        n = sum(p.numel() for p in unet.parameters())
        print(f"diffusers UNet2DConditionModel: {n / 1e6:.1f} M parameters, {len(converted)} tensors loaded strictly",
              file=sys.stderr)
    return unet, params, cfg


def random_unet(family, dtype, device):
    """diffusers' UNet for a known family with its own (PyTorch default) random init."""
    from diffusers import UNet2DConditionModel

    params = KNOWN_LDM_PARAMS[family]
    # diffusers' builder only looks at the state dict to guess an image size
    cfg = diffusers_config(params, {})
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    return unet.to(dtype).eval(), params, cfg


def load_or_random_unet(checkpoint, family, dtype, device):
    """For the benchmarks: a synthetic/real LDM checkpoint, else random init of `family`."""
    if checkpoint:
        return build_unet(checkpoint, dtype, device)
    return random_unet(family, dtype, device)


def random_inputs(params, batch, latent, dtype, device, seed=0, timestep=None):
    """One UNet call's arguments (x, t, context, extra kwargs) on `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, params["in_channels"], latent, latent, generator=g)
    t = torch.full((batch,), float(timestep)) if timestep is not None else torch.randint(0, 1000, (batch,), generator=g).float()
    ctx = torch.randn(batch, CONTEXT_TOKENS, params["context_dim"], generator=g)
    kw = {}
    adm = params.get("adm_in_channels")
    if adm:
        px = latent * 8
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, adm - TIME_IDS * TIME_ID_DIM, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32, device=device),
        }
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype), kw


def cmd_config(a):
    sd = load_unet_state(a.checkpoint)
    params = infer_ldm_params(sd, a.num_heads, a.head_channels)
    cfg = diffusers_config(params, {LDM_PREFIX + k: v for k, v in sd.items()})
    print(json.dumps({"ldm_unet_params": params, "diffusers_config": cfg}, indent=1))


def cmd_make_inputs(a):
    from diffusers.models.embeddings import Timesteps

    sd = load_unet_state(a.checkpoint)
    params = infer_ldm_params(sd)
    del sd
    g = torch.Generator().manual_seed(a.seed)
    b, hw = a.batch, a.latent
    t = {
        "x": torch.randn(b, params["in_channels"], hw, hw, generator=g),
        # distinct timesteps across the batch, as integers like the samplers' grid
        "timesteps": torch.randint(0, 1000, (b,), generator=g).float(),
        "context": torch.randn(b, CONTEXT_TOKENS, params["context_dim"], generator=g),
    }
    adm = params.get("adm_in_channels")
    if adm:
        text = adm - TIME_IDS * TIME_ID_DIM
        if text <= 0:
            sys.exit(f"adm_in_channels {adm} is not pooled text + {TIME_IDS} x {TIME_ID_DIM} time ids")
        pixels = hw * 8
        t["text_embeds"] = torch.randn(b, text, generator=g)
        # original size, crop top-left, target size, as SDXL pipelines pass them
        t["time_ids"] = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * b, dtype=torch.float32)
        # the same embedding diffusers applies in get_aug_embed (flip_sin_to_cos=True,
        # freq_shift=0 are UNet2DConditionModel's defaults, used by every SDXL config)
        proj = Timesteps(TIME_ID_DIM, True, 0)
        t["y"] = torch.cat([t["text_embeds"], proj(t["time_ids"].flatten()).reshape(b, -1)], dim=-1)
        assert t["y"].shape == (b, adm)
    t = {k: v.contiguous() for k, v in t.items()}
    save_file(t, a.output)
    print(f"wrote {a.output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in t.items()))


DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def forward(unet, inputs, dtype, device, use_raw_y=False):
    x = inputs["x"].to(device, dtype)
    ts = inputs["timesteps"].to(device)
    ctx = inputs["context"].to(device, dtype)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        if "time_ids" in inputs and not use_raw_y:
            kw["added_cond_kwargs"] = {
                "text_embeds": inputs["text_embeds"].to(device, dtype),
                "time_ids": inputs["time_ids"].to(device),
            }
        elif "y" in inputs:
            # Only `y` given (as LDM takes it): feed it to add_embedding directly.
            y = inputs["y"].to(device)
            unet.get_aug_embed = lambda emb, **_: unet.add_embedding(y.to(emb.dtype))
            kw["added_cond_kwargs"] = {}
        else:
            sys.exit("SDXL-style UNet: inputs need `y`, or `text_embeds` and `time_ids`")
    with torch.inference_mode():
        return unet(x, ts, ctx, return_dict=False, **kw)[0]


def add_trace(unet):
    """Print RMS and max |.| after each top-level stage: how random weights carry activations."""
    rows = []

    def hook(name):
        def f(_m, _i, out):
            o = out[0] if isinstance(out, tuple) else out
            o = o.float()
            rows.append((name, o.pow(2).mean().sqrt().item(), o.abs().max().item(),
                         (~torch.isfinite(o)).sum().item()))
        return f

    stages = [("conv_in", unet.conv_in)]
    stages += [(f"down_blocks.{i}", m) for i, m in enumerate(unet.down_blocks)]
    stages += [("mid_block", unet.mid_block)]
    stages += [(f"up_blocks.{i}", m) for i, m in enumerate(unet.up_blocks)]
    stages += [("conv_norm_out", unet.conv_norm_out), ("conv_out", unet.conv_out)]
    for name, m in stages:
        m.register_forward_hook(hook(name))
    return rows


def cmd_run(a):
    dtype, device = DTYPES[a.dtype], torch.device(a.device)
    if dtype == torch.float32:
        # cuDNN convolutions default to TF32 (10-bit mantissa): an "f32" reference
        # would carry ~1e-3 relative error per convolution.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    unet, params, cfg = build_unet(a.checkpoint, dtype, device, a.num_heads, a.head_channels)
    inputs = load_file(a.inputs)
    rows = add_trace(unet) if a.trace else None
    t0 = time.perf_counter()
    out = forward(unet, inputs, dtype, device, use_raw_y=a.raw_y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = out.float().cpu().contiguous()
    save_file({"out": out}, a.output)
    if rows:
        print(f"{'stage':<16} {'rms':>12} {'max|.|':>12} {'non-finite':>10}", file=sys.stderr)
        for name, rms, mx, nf in rows:
            print(f"{name:<16} {rms:12.4g} {mx:12.4g} {nf:10d}", file=sys.stderr)
    print(json.dumps({
        "what": "diffusers UNet2DConditionModel forward",
        "checkpoint": a.checkpoint, "device": str(device), "dtype": a.dtype,
        "shape": list(out.shape), "seconds_first_call": round(dt, 4),
        "out_rms": out.pow(2).mean().sqrt().item(), "out_max_abs": out.abs().max().item(),
        "non_finite": int((~torch.isfinite(out)).sum()),
        "attention_head_dim": cfg["attention_head_dim"],
        "transformer_layers_per_block": cfg["transformer_layers_per_block"],
    }))


def compare(ours, ref):
    a, b = ours.double().flatten(), ref.double().flatten()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    rel = ((a - b).norm() / b.norm()).item() if finite else math.inf
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item() if finite else math.nan
    return {"rel_l2": rel, "cosine": cos, "max_abs_diff": (a - b).abs().max().item(),
            "ref_rms": b.pow(2).mean().sqrt().item(), "ours_rms": a.pow(2).mean().sqrt().item(),
            "all_finite": finite}


def cmd_compare(a):
    x = load_file(a.ours)[a.key]
    y = load_file(a.reference)[a.key]
    if x.shape != y.shape:
        sys.exit(f"shapes differ: {list(x.shape)} vs {list(y.shape)}")
    r = compare(x, y)
    r["ours"], r["reference"] = a.ours, a.reference
    if a.f32_reference:
        # bf16 rounding alone moves the output this far: the floor any bf16
        # implementation can be held to, on these weights.
        z = load_file(a.f32_reference)[a.key]
        r["ours_vs_f32_ref"] = compare(x, z)["rel_l2"]
        r["ref_vs_f32_ref"] = compare(y, z)["rel_l2"]
        r["f32_reference"] = a.f32_reference
    if a.max_rel_l2 is not None:
        r["max_rel_l2"] = a.max_rel_l2
        r["pass"] = r["rel_l2"] <= a.max_rel_l2
    print(json.dumps(r))
    if a.max_rel_l2 is not None and not r["pass"]:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def heads(p):
        p.add_argument("--num-heads", type=int, help="heads per attention (SD1.x: 8, the default without linear proj_in)")
        p.add_argument("--head-channels", type=int, help="channels per head (SD2.x/SDXL: 64, the default with linear proj_in)")

    p = sub.add_parser("config", help="print the inferred LDM params and diffusers config")
    p.add_argument("checkpoint")
    heads(p)
    p.set_defaults(f=cmd_config)

    p = sub.add_parser("make-inputs", help="write seeded F32 inputs for this checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="latent height = width (pixels / 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(f=cmd_make_inputs)

    p = sub.add_parser("run", help="run diffusers' UNet on an inputs file, write `out`")
    p.add_argument("checkpoint")
    p.add_argument("--inputs", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--raw-y", action="store_true", help="feed `y` to add_embedding instead of text_embeds/time_ids")
    p.add_argument("--trace", action="store_true", help="print activation RMS / max per stage")
    heads(p)
    p.set_defaults(f=cmd_run)

    p = sub.add_parser("compare", help="relative L2 and cosine of two outputs (reference second)")
    p.add_argument("ours")
    p.add_argument("reference")
    p.add_argument("--key", default="out")
    p.add_argument("--max-rel-l2", type=float, help="exit 1 above this")
    p.add_argument("--f32-reference", help="diffusers' f32 output too: also report both bf16 outputs' distance to it")
    p.set_defaults(f=cmd_compare)

    a = ap.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
