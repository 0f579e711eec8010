"""CLIP's byte-level BPE, in plain Python (standard library only).

Two uses:
- `train` learns a small CLIP-style vocabulary (the same file format and algorithm as OpenAI's
  CLIP tokenizer, with far fewer merges) for the tiny test models, so nothing is downloaded;
- `ClipTokenizer.encode` is the reference the runner's tokenizer is tested against: a port of
  OpenAI's `simple_tokenizer.py` (ftfy clean-up left out, as Hugging Face's fast tokenizer does).

The vocabulary is laid out as CLIP's is: the 256 byte symbols, the same with `</w>`, one entry
per merge in rank order, then `<|startoftext|>` and `<|endoftext|>`.
"""

import collections
import json
import re
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CONTEXT = 77

# CLIP's pattern with \p{L} and \p{N} spelled for Python's `re` (letters: word characters that
# are neither digits nor `_`).
PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
    re.IGNORECASE,
)


def bytes_to_unicode():
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


BYTE_SYMBOLS = bytes_to_unicode()


def clean(text):
    return re.sub(r"\s+", " ", text).strip().lower()


def symbols(word):
    encoded = "".join(BYTE_SYMBOLS[b] for b in word.encode("utf-8"))
    return tuple(encoded[:-1]) + (encoded[-1] + "</w>",)


def train(corpus, merges):
    """Learns `merges` merges from `corpus` (a text): the most frequent adjacent pair each time,
    ties broken by the pair itself, so the result is the same on every machine."""
    words = collections.Counter(symbols(w) for w in PATTERN.findall(clean(corpus)))
    learned = []
    for _ in range(merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        learned.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            merged[merge_pair(word, best)] += count
        words = merged
    return learned


def merge_pair(word, pair):
    out = []
    i = 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def vocabulary(merges):
    base = list(BYTE_SYMBOLS.values())
    entries = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {entry: index for index, entry in enumerate(entries)}


def write(directory, merges):
    """Writes the tokenizer as Hugging Face's CLIPTokenizer files (what optimum exports)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=CONTEXT, tokenizer_class="CLIPTokenizer", do_lower_case=True)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab


class ClipTokenizer:
    def __init__(self, directory):
        directory = Path(directory)
        self.vocab = json.loads((directory / "vocab.json").read_text())
        lines = (directory / "merges.txt").read_text().splitlines()[1:]
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines) if line}
        config = json.loads((directory / "special_tokens_map.json").read_text())
        self.pad = self.vocab[config.get("pad_token", EOS)]

    def bpe(self, word):
        word = symbols(word)
        while len(word) > 1:
            ranked = [(self.ranks.get(pair, float("inf")), pair) for pair in zip(word, word[1:])]
            rank, pair = min(ranked)
            if rank == float("inf"):
                break
            word = merge_pair(word, pair)
        return word

    def encode(self, text):
        """Token ids without the start and end tokens."""
        ids = []
        for word in PATTERN.findall(clean(text)):
            if word in (BOS, EOS):
                ids.append(self.vocab[word])
                continue
            ids.extend(self.vocab[piece] for piece in self.bpe(word))
        return ids

    def encode_padded(self, text):
        """What a Stable Diffusion pipeline feeds its text encoder: start, up to 75 tokens, end,
        padding to 77. Returns the ids and how many tokens were cut."""
        body = self.encode(text)
        kept = body[: CONTEXT - 2]
        ids = [self.vocab[BOS]] + kept + [self.vocab[EOS]]
        return ids + [self.pad] * (CONTEXT - len(ids)), len(body) - len(kept)


# A small corpus of the words prompts use, for the tiny vocabulary.
CORPUS = """
a photo of a cat sitting on a wooden table, soft light, high detail
a lighthouse on a rocky coast at dusk, waves crashing, oil painting
portrait of an astronaut riding a horse on the moon, cinematic lighting
a watercolor painting of a mountain landscape with a lake and pine trees
a futuristic city skyline at night, neon lights, rain, reflections
a bowl of fresh fruit on a kitchen counter, morning sunlight, photograph
an ancient castle on a hill surrounded by fog, fantasy art, detailed
a red sports car driving along a coastal road, sunset, motion blur
a cozy cabin in a snowy forest, warm light from the windows, winter
a close up photo of a flower with dew drops, macro, shallow depth of field
a dragon flying over a medieval village, epic, dramatic clouds
a cup of coffee and a book on a rainy day, window, calm, peaceful
a robot painting a picture in a studio, digital art, vibrant colors
the northern lights over a frozen lake, stars, long exposure, beautiful
a golden retriever puppy playing in the grass, happy, bright, sharp focus
a bustling market street in the old town, people, colorful, evening
an underwater scene with coral reef and tropical fish, blue, clear water
a minimalist poster of a mountain and the sun, flat design, pastel
a steaming bowl of ramen, food photography, studio light, delicious
a hot air balloon floating above green hills at sunrise, aerial view
"""
