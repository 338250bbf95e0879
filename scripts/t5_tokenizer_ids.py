"""Token ids of T5's tokenizer.json for the prompts of the host's tokenizer test.

The host (host/src/models/text/t5_tokenizer.rs, `T5Tokenizer::tokenize`) encodes
a prompt's whole text with the `tokenizers` library, newlines read as spaces,
without the tokenizer's own special tokens. ComfyUI (`comfy/sd1_clip.py`,
`SDTokenizer.tokenize_with_weights`, through `T5XXLTokenizer`) splits the text
on spaces and tokenizes each word alone, dropping the end token each word gets.
This prints both for every prompt, fails if they differ, and prints the ids as
the Rust table `REAL_TOKENIZER_IDS` in that file records them:

    pip install tokenizers
    python3 scripts/t5_tokenizer_ids.py path/to/comfy/text_encoders/t5_tokenizer/tokenizer.json

The prompts are those of `REAL_TOKENIZER_PROMPTS` (keep both lists in step).
"""

import sys

from tokenizers import Tokenizer

PROMPTS = [
    "a photo of a cat",
    "A majestic lion resting on a rock, golden hour, 85mm lens, bokeh",
    "cyberpunk street market in the rain, neon signs, night",
    "Portrait of an old fisherman; weathered face -- dramatic lighting!",
    "two  spaces and a trailing space ",
    "a line\nbreak",
    "café, naïve, Übermensch, crème brûlée",
    "“curly quotes” and ‘single’ — em dash",
    "1024x1024, 3.5 guidance, 50% off, #hashtag @user",
    "emoji 🐱 and 猫 are unknown",
    "UPPERCASE lowercase MiXeD",
    "don't can't won't it's",
]


def main():
    tok = Tokenizer.from_file(sys.argv[1])
    rows = []
    for p in PROMPTS:
        text = p.replace("\n", " ")
        whole = tok.encode(text, add_special_tokens=False).ids
        per_word = [i for w in text.split(" ") if w for i in tok.encode(w, add_special_tokens=False).ids]
        if whole != per_word:
            sys.exit(f"{p!r}: whole text {whole} but word by word (ComfyUI) {per_word}")
        rows.append(whole)
    for p, ids in zip(PROMPTS, rows):
        print(f"    &{ids},  // {p!r}")


if __name__ == "__main__":
    main()
