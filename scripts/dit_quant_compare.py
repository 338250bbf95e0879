"""Output error of our calibrated FP8 DiT file against ModelOpt's fake-quantized model:
same weights, same held-out inputs (issue 10 part 8, third benchmark).

    python3 scripts/dit_quant_compare.py CKPT OURS [--held-out 16] [--calib-steps 16]
        [--latent 128] [--tokens 512|154] [--device cuda] [--dtype bf16] [--no-modelopt]

CKPT: the original-layout checkpoint (`run-recipe synth flux|sd3 --scale full --init
conditioned`); OURS: our FP8 output of it (`run-recipe run CKPT -o OURS --set format=fp8`).
Three models run through diffusers, built by scripts/dit_reference.py's single-file
conversion, on the same K held-out inputs:

- reference: CKPT in `--dtype`;
- ours, as ComfyUI executes the file (docs/comfyui-format.md, SPEC section 3): every
  layer with a `comfy_quant` of format `float8_e4m3fn` gets the weight e4m3 x
  `weight_scale`, and its input fake-quantized per tensor as clamp(x / input_scale,
  +-448) -> e4m3 -> x input_scale. Without `input_scale`: no activation quantization when
  `full_precision_matrix_mult` is set, else ComfyUI's scale 1.0 (`--absent-input-scale
  dynamic` uses the input's own amax / 448 instead). The dequantized weights go into an
  original-layout state dict and through the same conversion, so the fused layers
  (FLUX `img_attn.qkv`, `txt_attn.qkv`, `linear1`; SD3 `attn.qkv`) are split by
  diffusers itself; the input hooks sit on the diffusers Linears the table below maps
  each original layer to (split parts share their source's `input_scale`, having the
  same input). The table is checked against the converted weights (each part must be
  its rows of the source) and every hook must fire on the first call;
- ModelOpt: `mtq.quantize` with its diffusers FP8 preset (scripts/modelopt_calib_bench.py's
  `fp8_config`, `max`) on the reference model, calibrated over `--calib-steps` forward
  calls of a walk like the host's (recipes/sdk/src/calibration.rs): Euler from noise on
  the flow schedule (host/src/calibrate/schedule.rs: FLUX-dev shift 1.15, schnell 1.0,
  SD3 3.0), random N(0,1) conditioning with the host's token counts (FLUX 256, SD3 154),
  FLUX-dev guidance 3.5 as a model input, SD3 CFG pairs (batch 2) at 4.5. Evaluated twice:
  `modelopt_preset` with the exclusions modelopt_dit_bench.py applies (for FLUX its
  `proj_out` pattern also keeps every single block's `proj_out` = `linear2` in bf16; the
  preset also fake-quantizes the inputs of the LayerNorms, which ComfyUI never does),
  and `modelopt_same_layers` with weight and input quantizers on exactly the diffusers
  Linears our file quantizes and nothing else (like for like), and `modelopt_fused_scales`,
  the same with each split part's weight amax raised to its fused tensor's (ModelOpt
  scales to_q, to_k, to_v and proj_mlp separately, which the fused layout ComfyUI loads
  cannot store: this is what a ComfyUI file from ModelOpt's calibration could carry).
  On a tiny SD3 in f32 our emulation given ModelOpt's own amax as `input_scale` matched
  `modelopt_fused_scales` to 2e-7, which checks the emulation. `modelopt_all_disabled`
  (every quantizer off) is the control: ModelOpt's module wrappers alone should leave
  the reference's output as it was.

Held-out inputs: K seeded N(0,1) latents and conditioning (seeds disjoint from the
walk's), at the K sigmas of a K-step walk on the same schedule (1.0 down), FLUX
guidance 3.5, batch 1, `--tokens` text tokens. Each model's error on input i is the
relative L2 of its output against the reference's; the JSON gives mean and standard
error over inputs, the paired difference ours - ModelOpt (mean, SE) and the verdict
"ours no worse within 2 SE": mean difference <= 2 SE. `ours_weights_only` (dequantized
weights, activations unquantized) is there for context, and `input_scale_ours_over_modelopt`
(our `input_scale` over ModelOpt's amax / 448, per original layer) says whether the two
walks saw activations of the same size.

The emulation rounds the dequantized weight and input to the model dtype before a
`--dtype` matmul, as ModelOpt's fake quantization does; ComfyUI's FP8 matmul multiplies
the e4m3 values exactly and scales afterwards. The difference is one bf16 rounding
(2^-9 relative) per operand, far below FP8's own error.

Needs torch, safetensors, diffusers, and nvidia-modelopt unless --no-modelopt
(scripts/device-wheels.sh carries them to the GPU machine). On a machine without a GPU,
`--device cpu --dtype f32 --latent 32 --held-out 4 --calib-steps 4` runs every path on a
tiny SD3 (`run-recipe synth sd3`, then `run ... --set format=fp8 --calibrate on --device cpu
--set resolution=256`) in a few minutes.
"""

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch

import dit_reference as D

FP8_MAX = 448.0

# Original-layout Linear (module path after the block prefix) -> the diffusers Linears
# that take its input, in the order diffusers' conversion splits its weight rows.
FLUX_DOUBLE = {  # double_blocks.{i}. -> transformer_blocks.{i}.
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
FLUX_SINGLE = {  # single_blocks.{i}. -> single_transformer_blocks.{i}.
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
FLUX_TOP = {  # outside the blocks (ModelOpt's and our presets keep these in bf16)
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}
SD3_JOINT = {  # joint_blocks.{i}. -> transformer_blocks.{i}.
    "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "x_block.attn.proj": ["attn.to_out.0"],
    "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
    "x_block.attn2.proj": ["attn2.to_out.0"],
    "x_block.mlp.fc1": ["ff.net.0.proj"],
    "x_block.mlp.fc2": ["ff.net.2"],
    "x_block.adaLN_modulation.1": ["norm1.linear"],
    "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "context_block.attn.proj": ["attn.to_add_out"],
    "context_block.mlp.fc1": ["ff_context.net.0.proj"],
    "context_block.mlp.fc2": ["ff_context.net.2"],
    "context_block.adaLN_modulation.1": ["norm1_context.linear"],
}
SD3_TOP = {
    "context_embedder": ["context_embedder"],
    "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
    "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
    "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],
}
def diffusers_targets(fam, layer):
    """The diffusers Linears fed by original Linear `layer` (None: not in the table)."""
    parts = layer.split(".")
    if fam == "flux":
        blocks = [("double_blocks", "transformer_blocks", FLUX_DOUBLE), ("single_blocks", "single_transformer_blocks", FLUX_SINGLE)]
        top = FLUX_TOP
    else:
        blocks = [("joint_blocks", "transformer_blocks", SD3_JOINT)]
        top = SD3_TOP
    for orig, ours, table in blocks:
        if parts[0] == orig and len(parts) > 2 and parts[1].isdigit():
            mods = table.get(".".join(parts[2:]))
            return None if mods is None else [f"{ours}.{parts[1]}.{m}" for m in mods]
    return top.get(layer)


def check_targets(layer, mods, original_weight, converted):
    """Each diffusers part must hold its rows of the original weight, in order, all of
    them. A single part may hold them with its two halves swapped: diffusers'
    AdaLayerNormContinuous takes (scale, shift) where SAI and BFL store (shift, scale)
    (the final layer, and SD3's last context block), which leaves the input unchanged."""
    row = 0
    for m in mods:
        part = converted.get(m + ".weight")
        if part is None:
            sys.exit(f"mapping table: {layer} -> {m}, but diffusers' conversion has no {m}.weight")
        n = part.shape[0]
        rows = original_weight[row:row + n]
        if not (torch.equal(part, rows) or len(mods) == 1 and torch.equal(part, torch.cat(rows.chunk(2)[::-1]))):
            sys.exit(f"mapping table: {m}.weight is not rows {row}..{row + n} of {layer}.weight")
        row += n
    if row != original_weight.shape[0]:
        sys.exit(f"mapping table: {mods} cover {row} of the {original_weight.shape[0]} rows of {layer}.weight")


def read_ours(path, dtype):
    """Our file as ComfyUI loads it: original-layout state with each FP8 weight dequantized
    to `dtype`, and per quantized layer its activation handling."""
    sd = D.load_state(path)
    layers = {}
    for key in sorted(k for k in sd if k.endswith(".comfy_quant")):
        layer = key[: -len(".comfy_quant")]
        q = json.loads(bytes(sd.pop(key).tolist()).decode("utf-8"))
        if q.get("format") != "float8_e4m3fn":
            sys.exit(f"{layer}: comfy_quant format {q.get('format')!r}; this comparison covers float8_e4m3fn only")
        w = sd[layer + ".weight"]
        if w.dtype != torch.float8_e4m3fn:
            sys.exit(f"{layer}.weight is {w.dtype}, not float8_e4m3fn")
        ws = sd.pop(layer + ".weight_scale").float()
        if ws.numel() != 1:
            sys.exit(f"{layer}.weight_scale has {ws.numel()} values; FP8 is per tensor")
        sd[layer + ".weight"] = (w.float() * ws).to(dtype)
        s = sd.pop(layer + ".input_scale", None)
        layers[layer] = {
            "input_scale": None if s is None else float(s.float().reshape(())),
            "full_precision_matrix_mult": bool(q.get("full_precision_matrix_mult", False)),
        }
    stray = [k for k in sd if k.endswith((".weight_scale", ".input_scale", ".weight_scale_2"))]
    if stray:
        sys.exit(f"scale tensors without a comfy_quant layer: {stray[:5]}")
    if not layers:
        sys.exit(f"{path}: no comfy_quant layers (not a quantized comfy-layout file)")
    return sd, layers


def fake_fp8(x, scale):
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


class InputQuant:
    """Forward pre-hooks quantizing the inputs of the diffusers Linears of our FP8 layers."""

    def __init__(self, model, plan, absent):
        self.model, self.plan, self.absent = model, plan, absent
        self.handles, self.fired = [], set()
        modules = dict(model.named_modules())
        for name in plan:
            if not isinstance(modules.get(name), torch.nn.Linear):
                sys.exit(f"mapping table: {name} is not a Linear of this diffusers model")

    def attach(self):
        modules = dict(self.model.named_modules())
        for name, how in self.plan.items():
            self.handles.append(modules[name].register_forward_pre_hook(self.hook(name, how)))

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def hook(self, name, how):
        def pre(_module, args):
            self.fired.add(name)
            (x,) = args
            if how["input_scale"] is not None:
                return (fake_fp8(x, how["input_scale"]),)
            if how["full_precision_matrix_mult"]:
                return None
            if self.absent == "dynamic":
                return (fake_fp8(x, max(x.abs().max().item(), 1e-12) / FP8_MAX),)
            return (fake_fp8(x, 1.0),)

        return pre


def schedule(fam, cfg, steps):
    """`steps` + 1 sigmas of ComfyUI's `simple` spacing (the host's Spacing::Uniform), last 0."""
    if fam == "flux" and cfg["guidance_embeds"]:
        e = math.exp(1.15)  # ModelSamplingFlux, shift 1.15 (1024²), 10000 entries
        table = [e / (e + (1.0 / (i / 10000.0) - 1.0)) for i in range(1, 10001)]
    else:
        shift = 1.0 if fam == "flux" else 3.0  # schnell / SD3 ModelSamplingDiscreteFlow
        table = [shift * t / (1.0 + (shift - 1.0) * t) for t in (i / 1000.0 for i in range(1, 1001))]
    stride = len(table) / steps
    return [table[len(table) - 1 - int(i * stride)] for i in range(steps)] + [0.0]


def random_inputs(fam, cfg, g, batch, latent, tokens, sigma, guidance):
    c = cfg["in_channels"] // 4 if fam == "flux" else cfg["in_channels"]
    t = {
        "x": torch.randn(batch, c, latent, latent, generator=g),
        "context": torch.randn(batch, tokens, cfg["joint_attention_dim"], generator=g),
        "y": torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        "timesteps": torch.full((batch,), sigma if fam == "flux" else sigma * 1000.0),
    }
    if fam == "flux" and cfg["guidance_embeds"]:
        t["guidance"] = torch.full((batch,), guidance)
    return t


def held_out(fam, cfg, a):
    sig = schedule(fam, cfg, a.held_out)
    return [random_inputs(fam, cfg, torch.Generator().manual_seed(1_000_000 + a.seed + i), 1, a.latent, a.tokens,
                          sig[i], 3.5) for i in range(a.held_out)]


def calibration_walk(model, fam, cfg, a, dtype, device):
    """The host's walk shape (recipes/sdk/src/calibration.rs) with this model: Euler over
    `calib_steps` sigmas from noise; SD3 a CFG pair per call, FLUX-dev guidance 3.5."""
    sig = schedule(fam, cfg, a.calib_steps)
    g = torch.Generator().manual_seed(a.seed)
    cond = random_inputs(fam, cfg, g, 2 if fam == "sd3" else 1, a.latent, a.calib_tokens, 1.0, 3.5)
    x = cond.pop("x")[:1] * sig[0]
    calls = 0
    with torch.no_grad():
        for i in range(a.calib_steps):
            inp = dict(cond)
            if fam == "sd3":
                inp["x"] = torch.cat([x, x])
                inp["timesteps"] = torch.full((2,), sig[i] * 1000.0)
                both = D.call(model, fam, inp, dtype, device).float().cpu()
                d = both[:1] + 4.5 * (both[1:] - both[:1])
            else:
                inp["x"] = x
                inp["timesteps"] = torch.full((1,), sig[i])
                d = D.call(model, fam, inp, dtype, device).float().cpu()
            x = x + (sig[i + 1] - sig[i]) * d
            calls += 1
    return calls


def outputs(model, fam, inputs, dtype, device):
    with torch.no_grad():
        return [D.call(model, fam, t, dtype, device).float().cpu() for t in inputs]


def mean_se(v):
    return {"mean": statistics.fmean(v), "se": statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else math.nan}


def errors(outs, refs):
    e = [D.rel_l2(o, r) for o, r in zip(outs, refs)]
    return {"per_input": e, **mean_se(e)}


def verdict(ours, theirs):
    d = [a - b for a, b in zip(ours["per_input"], theirs["per_input"])]
    m = mean_se(d)
    return {**m, "ours_no_worse_within_2se": m["mean"] <= 2 * m["se"]}


def free(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def modelopt_phase(model, fam, cfg, a, dtype, device, inputs, refs, ours_inputs, groups, res):
    import modelopt
    import modelopt.torch.quantization as mtq

    import modelopt_calib_bench as M
    import modelopt_dit_bench as B

    if device.type == "cuda":
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        # built before the timed part; the accuracy does not depend on it
        get_cuda_ext_fp8(raise_if_failed=False)
    calls = []
    t0 = time.perf_counter()
    mtq.quantize(model, M.fp8_config(), lambda m: calls.append(calibration_walk(m, fam, cfg, a, dtype, device)))
    res["modelopt"] = {"version": modelopt.__version__, "calibration_calls": sum(calls),
                       "quantize_s": round(time.perf_counter() - t0, 2)}
    weight_or_input = ("weight_quantizer", "input_quantizer")
    ours_modules = {m for _, mods in ours_inputs.values() for m in mods}

    def module_of(qname):
        mod, _, leaf = qname.rpartition(".")
        return mod if leaf in weight_or_input else None

    def enabled_modules():
        return sorted(n for n, m in model.named_modules()
                      if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled)

    # our static scales against ModelOpt's (amax / 448) on the same layers: where a verdict
    # goes against us, this says whether our walk saw larger or smaller activations
    modules = dict(model.named_modules())
    ratios = sorted((how["input_scale"] / (float(modules[mods[0]].input_quantizer.amax) / FP8_MAX), layer)
                    for layer, (how, mods) in ours_inputs.items() if how["input_scale"] is not None)
    if ratios:
        res["input_scale_ours_over_modelopt"] = {
            "median": ratios[len(ratios) // 2][0], "min": list(ratios[0]), "max": list(ratios[-1]),
            "above_1.25": sum(1 for r, _ in ratios if r > 1.25), "below_0.8": sum(1 for r, _ in ratios if r < 0.8),
            "layers": len(ratios)}
    # control: every quantizer off, so only ModelOpt's module wrappers differ from the reference
    mtq.disable_quantizer(model, lambda n: True)
    res["relative_l2"]["modelopt_all_disabled"] = errors(outputs(model, fam, inputs, dtype, device), refs)
    # like for like: weight and input quantizers on exactly the Linears our file quantizes
    # (attention quantizers stay off, as modelopt_dit_bench turns them off)
    mtq.enable_quantizer(model, lambda n: module_of(n) in ours_modules)
    same = enabled_modules()
    if set(same) != ours_modules:
        sys.exit(f"ModelOpt like-for-like: {len(same)} quantized Linears, ours {len(ours_modules)}")
    res["relative_l2"]["modelopt_same_layers"] = errors(outputs(model, fam, inputs, dtype, device), refs)
    # ModelOpt gives each split part (to_q, to_k, to_v, proj_mlp) its own weight amax; a
    # fused original tensor has one weight_scale. The same with the parts' largest amax:
    # what a ComfyUI file could carry from ModelOpt's calibration.
    saved = {}
    for parts in groups:
        top = max(modules[p].weight_quantizer.amax for p in parts)
        for p in parts:
            saved[p] = modules[p].weight_quantizer.amax.clone()
            modules[p].weight_quantizer.amax = top.clone()
    res["relative_l2"]["modelopt_fused_scales"] = errors(outputs(model, fam, inputs, dtype, device), refs)
    for p, amax in saved.items():
        modules[p].weight_quantizer.amax = amax
    # ModelOpt's own choice: all of its preset, less what modelopt_dit_bench keeps in bf16
    mtq.enable_quantizer(model, lambda n: module_of(n) is not None)
    mtq.disable_quantizer(model, lambda n: B.HIGH_PRECISION.match(n) is not None)
    preset = enabled_modules()
    # the preset also fake-quantizes the inputs of modules without weights (LayerNorms)
    input_only = sorted(n for n, m in model.named_modules()
                        if getattr(m, "input_quantizer", None) is not None and m.input_quantizer.is_enabled
                        and (getattr(m, "weight_quantizer", None) is None or not m.weight_quantizer.is_enabled))
    res["relative_l2"]["modelopt_preset"] = errors(outputs(model, fam, inputs, dtype, device), refs)
    res["layers"]["modelopt_preset_quantized"] = len(preset)
    res["layers"]["modelopt_preset_input_only"] = {"count": len(input_only), "first": input_only[:4]}
    res["layers"]["modelopt_preset_not_ours"] = sorted(set(preset) - ours_modules)[:8]
    res["layers"]["ours_not_modelopt_preset"] = len(ours_modules - set(preset))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="original-layout checkpoint")
    ap.add_argument("ours", help="our FP8 output of it (comfy layout)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out inputs K")
    ap.add_argument("--calib-steps", type=int, default=16, help="ModelOpt's calibration calls (walk steps)")
    ap.add_argument("--latent", type=int, default=128, help="latent side (pixels / 8)")
    ap.add_argument("--tokens", type=int, help="held-out text tokens (default FLUX 512, SD3 154)")
    ap.add_argument("--calib-tokens", type=int, help="walk text tokens (default the host's: FLUX 256, SD3 154)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(D.DTYPES), default="bf16")
    ap.add_argument("--absent-input-scale", choices=["comfy", "dynamic"], default="comfy",
                    help="an FP8 layer without input_scale: ComfyUI's scale 1.0 (or none with full_precision_matrix_mult), or dynamic per tensor")
    ap.add_argument("--no-modelopt", action="store_true", help="reference and ours only")
    a = ap.parse_args()
    if a.held_out < 2:
        sys.exit("--held-out must be at least 2 (a standard error needs two inputs)")
    dtype, device = D.DTYPES[a.dtype], torch.device(a.device)
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()

    # Ours, read first (CPU): the layer plan and the dequantized original-layout state.
    ours_sd, ours_layers = read_ours(a.ours, dtype)
    fam = D.family(ours_sd)
    Model, fam_c, cfg, converted = D.convert_state(ours_sd)
    if fam_c != fam:
        sys.exit("family changed in conversion")
    plan, unmapped, groups, ours_inputs = {}, [], [], {}
    for layer, how in ours_layers.items():
        mods = diffusers_targets(fam, layer)
        if mods is None:
            unmapped.append(layer)
            continue
        check_targets(layer, mods, ours_sd[layer + ".weight"], converted)
        for m in mods:
            plan[m] = how
        ours_inputs[layer] = (how, mods)
        if len(mods) > 1:
            groups.append(mods)
    if unmapped:
        sys.exit(f"quantized layers without a diffusers mapping (no hook): {unmapped[:8]}")
    ours_modules = set(plan)
    a.tokens = a.tokens or (512 if fam == "flux" else 154)
    a.calib_tokens = a.calib_tokens or (256 if fam == "flux" else 154)
    # What ComfyUI loads unquantized from our file should be the original's tensors
    # (a SmoothQuant fold would change norms and biases: part of "ours", so counted, not refused).
    orig = D.load_state(a.checkpoint)
    quantized_weights = {layer + ".weight" for layer in ours_layers}
    changed = sorted(k for k in ours_sd if k not in quantized_weights and
                     (k not in orig or orig[k].dtype != ours_sd[k].dtype or not torch.equal(orig[k], ours_sd[k])))
    missing = sorted(set(orig) - set(ours_sd))
    if missing:
        sys.exit(f"{a.ours} lacks tensors of {a.checkpoint}: {missing[:8]}")
    res = {
        "what": "relative L2 vs the reference model on held-out inputs: our FP8 file as ComfyUI runs it, ModelOpt fake-quantized",
        "family": fam, "checkpoint": a.checkpoint, "ours": a.ours, "device": str(device), "dtype": a.dtype,
        "held_out": a.held_out, "latent": a.latent, "tokens": a.tokens,
        "layers": {
            "ours_quantized": len(ours_layers), "ours_diffusers_linears_hooked": len(plan),
            "ours_static_input_scale": sum(1 for h in ours_layers.values() if h["input_scale"] is not None),
            "ours_full_precision_matrix_mult": sum(1 for h in ours_layers.values() if h["input_scale"] is None and h["full_precision_matrix_mult"]),
            "ours_no_input_scale": sum(1 for h in ours_layers.values() if h["input_scale"] is None and not h["full_precision_matrix_mult"]),
            "absent_input_scale": a.absent_input_scale,
            "ours_pass_through_tensors_changed": changed[:8], "ours_pass_through_changed_count": len(changed),
        },
        "relative_l2": {},
    }

    # Reference (then ModelOpt on the same weights, in place).
    inputs = held_out(fam, cfg, a)
    model, _, _ = D.build_state(orig, dtype, device)
    refs = outputs(model, fam, inputs, dtype, device)
    if not all(torch.isfinite(r).all() for r in refs):
        sys.exit("the reference gave non-finite outputs")
    res["reference_out_rms"] = statistics.fmean(r.pow(2).mean().sqrt().item() for r in refs)
    if not a.no_modelopt:
        res["modelopt_calibration"] = {"steps": a.calib_steps, "tokens": a.calib_tokens,
                                       "walk": "Euler from noise, random N(0,1) conditioning" +
                                               (", CFG pairs at 4.5" if fam == "sd3" else ", guidance 3.5")}
        # ModelOpt prints progress on stdout, which is this script's JSON
        with contextlib.redirect_stdout(sys.stderr):
            modelopt_phase(model, fam, cfg, a, dtype, device, inputs, refs, ours_inputs, groups, res)
    del model
    free(device)

    # Ours.
    model, _, _ = D.load_converted(Model, fam, cfg, converted, dtype, device)
    del converted, ours_sd
    quant = InputQuant(model, plan, a.absent_input_scale)
    res["relative_l2"]["ours_weights_only"] = errors(outputs(model, fam, inputs, dtype, device), refs)
    quant.attach()
    res["relative_l2"]["ours"] = errors(outputs(model, fam, inputs, dtype, device), refs)
    missed = ours_modules - quant.fired
    if missed:
        sys.exit(f"hooks that never fired (diffusers bypassed these Linears): {sorted(missed)[:8]}")
    quant.detach()
    del model
    free(device)

    e = res["relative_l2"]
    if "modelopt_same_layers" in e:
        res["ours_minus_modelopt_same_layers"] = verdict(e["ours"], e["modelopt_same_layers"])
        res["ours_minus_modelopt_fused_scales"] = verdict(e["ours"], e["modelopt_fused_scales"])
        res["ours_minus_modelopt_preset"] = verdict(e["ours"], e["modelopt_preset"])
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    if device.type == "cuda":
        res["peak_alloc_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["gpu"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
