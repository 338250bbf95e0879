"""Reference T5 encoder: transformers' T5EncoderModel on a ComfyUI-layout T5 file.

The host's T5 v1.1 encoder (host/src/models/text/t5.rs) must match transformers'
T5EncoderModel within 1e-5 in f32 on the same weights and token ids. The config is
read from the tensor shapes (d_model, heads from the relative-attention table,
d_kv, d_ff, blocks, vocabulary) with T5 v1.1's fixed settings (gated GELU, 32
buckets, max distance 128, eps 1e-6); scaled-FP8 weights are dequantized as ComfyUI
does (weight * scale_weight).

    python3 scripts/t5_reference.py MODEL.safetensors OUT.safetensors [--batch 2 --tokens 300] [--bf16]

OUT holds `ids` (I64 [B, N], random ids, id 1 and 0 padding at the end of row 0)
and `hidden` (F32 [B, N, d_model], the last hidden state, computed in f32 on the
CPU). With --bf16 it also holds `hidden_bf16`: the same model cast to bf16 as a
whole (as ComfyUI and the host run T5; transformers' `_keep_in_fp32_modules` is
not applied) and run on the GPU when there is one, and prints its relative L2
from `hidden`: T5's own sensitivity to bf16. The host compares with:

    QUANTSMITH_T5_MODEL=MODEL.safetensors QUANTSMITH_T5_REFERENCE=OUT.safetensors \
        target/release/deps/quantsmith-<hash> models::text::t5::tests::matches_transformers --nocapture

which checks our CPU f32 against `hidden` (1e-5) and, with `hidden_bf16` and a
GPU, that our CUDA bf16 is no further from `hidden` than `hidden_bf16` is.
`scripts/dit-device.sh t5` runs all of it on the bf16 GPU test's own weights
(models::text::t5::tests::dump_bf16_test_model) and on a tiny synthetic T5-XXL.

MODEL can be `synth`'s tiny or full T5-XXL (models::text::synth_text) or ComfyUI's
own t5xxl_fp16.safetensors. Needs torch, safetensors and transformers.
"""

import argparse

import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--bf16", action="store_true", help="also run the model in bf16 (GPU if any) and store `hidden_bf16`")
    args = ap.parse_args()

    sd = load_file(args.model)
    sd.pop("scaled_fp8", None)
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        weight = key[: -len("scale_weight")] + "weight"
        sd[weight] = sd[weight].float() * sd.pop(key).float()
    sd = {k: torch.nan_to_num(v.float()) if k == "shared.weight" else v.float() for k, v in sd.items() if not k.endswith(".scale_input")}

    table = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = table.shape[1]
    inner, d_model = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    layers = 0
    while f"encoder.block.{layers}.layer.0.SelfAttention.q.weight" in sd:
        layers += 1
    vocab = sd["shared.weight"].shape[0]
    cfg = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=table.shape[0], relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
    )
    model = T5EncoderModel(cfg)
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    model.load_state_dict(sd, strict=True)
    model.eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (args.batch, args.tokens), generator=g)
    ids[0, args.tokens // 2] = 1
    ids[0, args.tokens // 2 + 1 :] = 0
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    out = {"ids": ids.to(torch.int64).contiguous(), "hidden": hidden.float().contiguous()}
    print(f"T5 d_model {d_model}, {heads} heads of {inner // heads}, d_ff {d_ff}, {layers} blocks: {tuple(hidden.shape)}")
    if args.bf16:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.no_grad():
            half = model.to(device=device, dtype=torch.bfloat16)
            hidden_bf16 = half(input_ids=ids.to(device)).last_hidden_state.float().cpu()
        rel = ((hidden_bf16 - hidden).norm() / hidden.norm()).item()
        print(f"transformers bf16 ({device}) vs f32: relative L2 {rel:.3e}")
        out["hidden_bf16"] = hidden_bf16.contiguous()
    save_file(out, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
