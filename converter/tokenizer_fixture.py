"""A real, small Gemma-style tokenizer built offline (no downloads) for fixture checkpoints.

Byte-fallback BPE with Gemma's pipeline, exactly as transformers 5.x `GemmaTokenizer.__init__` rebuilds it from a
`tokenizer.json` (normaliser `" " -> "▁"`, a no-op `Split(" ")` pre-tokeniser, BPE with `fuse_unk` and
`byte_fallback`, decoder `▁ -> " "`, ByteFallback, Fuse), so `AutoTokenizer`, `PaliGemmaProcessor` and
`tokenizers.Tokenizer.from_file` give the same ids.

Id layout (mirrors the real Gemma/PaliGemma vocabulary where it matters; `base` is 512 for tiny configs and 256000
for full-size ones):

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>        special tokens, as in Gemma
    5..99    the 95 printable ASCII characters ("▁" stands for the space)
    100..105 <unused0>..<unused5>
    106 <start_of_turn>  107 <end_of_turn>  108 "\\n"    as in Gemma (PaliGemma 2 stops on 107; "\\n" is 108)
    109..364 <0x00>..<0xFF>                             byte fallback: any text can be tokenised
    365..    BPE merges learned from a small built-in English corpus, then <unusedN> filler up to `base`
    base + 0..1023 <loc0000>..<loc1023>,  base + 1024..1151 <seg000>..<seg127>,  base + 1152 <image>
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["SPECIALS", "build_tokenizer", "tokenizer_files", "CORPUS"]

SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
TURN_TOKENS = {"<start_of_turn>": 106, "<end_of_turn>": 107}
NEWLINE_ID = 108
BYTES_START = 109
NUM_LOC, NUM_SEG = 1024, 128
SPACE = "▁"

# Small built-in corpus: PaliGemma-style prompts and answers, so common prompt words become single pieces.
CORPUS = """\
caption en
describe the image in detail
answer en what is in the image
answer en where is the cow standing
answer en how many people are there
answer en what color is the car
detect cat ; dog ; person
segment the red ball
ocr
question en what is the man holding
a cow standing on the beach near the water
a cat sitting on a red chair in the kitchen
two dogs playing with a ball in the green park
a person riding a bicycle down the street
a small boat on a lake with mountains in the background
the sky is blue and the sun is shining over the sea
there are three people walking on the beach
a black and white photo of a city street at night
a bowl of fruit on a wooden table
a red car parked in front of a white house
the man is holding an umbrella in the rain
a woman reading a book under a tree
children are playing football on the grass
an airplane flying over the clouds
a train is stopped at the station
the picture shows a snowy mountain and a forest
a plate of food with rice and vegetables
this is a photo of the old bridge over the river
the answer is yes
the answer is no
there is a dog, a cat and a bird in the garden.
What is this? It is a picture of the beach!
Where is the cow? The cow is on the sand, next to the sea.
"""

PRINTABLE = [SPACE] + [chr(c) for c in range(0x21, 0x7F)]  # space (as ▁) and the 94 visible ASCII characters
assert len(PRINTABLE) == 95


def _learn_merges(corpus: str, n_merges: int, alphabet: set[str]) -> list[tuple[str, str]]:
    """Greedy BPE merges over SentencePiece-style words ("▁" glued to the next word); ties broken by the pair."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus.splitlines():
        pieces = line.replace(" ", SPACE).split(SPACE)
        for j, word in enumerate(pieces):
            text = (SPACE if j else "") + word
            if text and all(ch in alphabet for ch in text):
                words[tuple(text)] += 1
    merges: list[tuple[str, str]] = []
    seen = set(alphabet)
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        candidates = [p for p in pairs if p[0] + p[1] not in seen]
        if not candidates:
            break
        best = min(candidates, key=lambda p: (-pairs[p], p))  # deterministic: highest count, then lexicographic
        merges.append(best)
        seen.add(best[0] + best[1])
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def _base_vocab(base: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = dict(SPECIALS)
    for ch in PRINTABLE:
        vocab[ch] = len(vocab)
    for i in range(106 - len(vocab)):
        vocab[f"<unused{i}>"] = len(vocab)
    vocab.update(TURN_TOKENS)
    vocab["\n"] = NEWLINE_ID
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = BYTES_START + b
    n_learned = min(base, 512) - len(vocab)
    merges = _learn_merges(CORPUS, n_learned, set(PRINTABLE))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    unused = 6
    while len(vocab) < base:  # full-size vocabularies: unreachable filler pieces, like Gemma's <unusedN>
        vocab[f"<unused{unused}>"] = len(vocab)
        unused += 1
    assert len(vocab) == base and sorted(vocab.values()) == list(range(base))
    return vocab, merges


def build_tokenizer(base: int = 512, *, add_bos_token: bool = True) -> Tokenizer:
    """The fixture tokenizer with `base` plain pieces followed by <loc>, <seg> and <image> (see module docstring)."""
    if base < 512:
        raise ValueError(f"base vocabulary must have at least 512 pieces, got {base}")
    vocab, merges = _base_vocab(base)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Hub PaliGemma 1 tokenizers add <bos> (trap 14); PaliGemmaProcessor switches that off, and so does ours.
    bos = "<bos>:0 " if add_bos_token else ""
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}$A:0", pair=f"{bos}$A:0 {bos.replace(':0', ':1')}$B:1",
        special_tokens=[("<bos>", SPECIALS["<bos>"])] if add_bos_token else [],
    )
    tok.add_special_tokens([_added(t, special=True) for t in [*SPECIALS, *TURN_TOKENS]])
    # The id order matters: add_tokens assigns consecutive ids after the base vocabulary.
    tok.add_tokens([_added(f"<loc{i:04d}>", special=False) for i in range(NUM_LOC)])
    tok.add_tokens([_added(f"<seg{i:03d}>", special=False) for i in range(NUM_SEG)])
    tok.add_special_tokens([_added("<image>", special=True)])
    assert tok.token_to_id("<image>") == base + NUM_LOC + NUM_SEG
    return tok


def _added(content: str, *, special: bool) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def tokenizer_files(base: int = 512, *, add_bos_token: bool = True) -> dict[str, str]:
    """File name -> text for tokenizer.json, tokenizer_config.json and special_tokens_map.json (hub style)."""
    tok = build_tokenizer(base, add_bos_token=add_bos_token)
    decoder = {}
    for tid, tk in sorted(tok.get_added_tokens_decoder().items()):
        decoder[str(tid)] = {"content": tk.content, "lstrip": tk.lstrip, "normalized": tk.normalized,
                             "rstrip": tk.rstrip, "single_word": tk.single_word, "special": tk.special}
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<image>"],
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "PaliGemmaProcessor",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    }
    special_map = {"additional_special_tokens": ["<image>"], "bos_token": "<bos>", "eos_token": "<eos>",
                   "pad_token": "<pad>", "unk_token": "<unk>"}
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, sort_keys=True) + "\n",
    }


def write_tokenizer(directory: Path, base: int = 512, *, add_bos_token: bool = True) -> None:
    for name, text in tokenizer_files(base, add_bos_token=add_bos_token).items():
        (Path(directory) / name).write_text(text, encoding="utf-8")
