"""Small real CLIP BPE tokenizers built offline, for text encoders with a small vocabulary.

The vocabulary keeps CLIP's layout (Radford et al. 2021; the GPT-2 byte-level BPE) in small:
the 256 byte-level characters, the same with "</w>" (end of word), one token per BPE merge, and
"<|startoftext|>", "<|endoftext|>" last. The merges are learned like BPE training (merge the most
frequent adjacent pair until every given word is one token), so known words become one token
"word</w>" and any other word falls back to smaller pieces, down to single bytes, as in CLIP.

The synthetic captions ("a red circle in the top left") need 564 tokens, within the 1000 of the
tiny text encoders (``CLIPTextConfig.tiny()``). Their token strings equal real CLIP's
(tests/data/test_tokenizer.py): each word is one token in CLIP too, except "cyan", which CLIP
splits into "cy" + "an</w>" and ``SYNTHETIC_SPLITS`` reproduces.

``load_tokenizer`` reads any CLIP tokenizer folder (these, or a checkpoint's ``tokenizer/``).
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdxl_jax.data import synthetic

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END = "</w>"
SYNTHETIC_SPLITS: dict[str, tuple[str, ...]] = {"cyan": ("cy", "an")}  # real CLIP's BPE split


def bytes_to_unicode() -> dict[int, str]:
    """byte -> the character standing for it, in CLIP's vocabulary order: the printable bytes
    as themselves (in byte order), then the others as chr(256), chr(257), ..."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _normalize(word: str) -> str:
    return unicodedata.normalize("NFC", word).lower()  # as CLIPTokenizer's normalizer


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Merge every occurrence of ``pair``, left to right (as CLIP's BPE applies a merge)."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(tokens: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges making each token (byte-level characters, maybe "</w>" last) one symbol.

    As BPE training: merge the most frequent adjacent pair (the first seen on ties) until done.
    """
    units = []
    for token in dict.fromkeys(tokens):
        body = token.removesuffix(END)
        units.append((*body[:-1], body[-1] + token[len(body) :]))
    merges = []
    while any(len(u) > 1 for u in units):
        counts = Counter(p for u in units for p in zip(u[:-1], u[1:], strict=True))
        best = max(counts, key=counts.get)  # first of the most frequent, in insertion order
        merges.append(best)
        units = [_merge(u, best) for u in units]
    return merges


def write_clip_tokenizer(
    folder: str | Path,
    words: Iterable[str],
    *,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = 77,
    max_vocab: int = 1000,
    splits: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a CLIP tokenizer folder in which each of ``words`` (lowercased) is one token.

    ``splits`` maps a word to the pieces it should become instead (``{"cyan": ("cy", "an")}``).
    SDXL's ``tokenizer`` pads with "<|endoftext|>", its ``tokenizer_2`` with "!". The folder holds
    vocab.json + merges.txt (as released SDXL folders) and what ``save_pretrained`` writes;
    ``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it offline.
    """
    from transformers import CLIPTokenizer  # heavy import, only where needed

    splits = {_normalize(w): [_normalize(p) for p in ps] for w, ps in (splits or {}).items()}
    byte_map = bytes_to_unicode()
    want = {}  # word -> its token strings
    for word in dict.fromkeys(map(_normalize, words)):
        if not word:
            raise ValueError("words must not be empty")
        parts = splits.get(word, [word])
        if "".join(parts) != word or not all(parts):
            raise ValueError(f"splits[{word!r}] = {parts} does not spell the word")
        parts = ["".join(byte_map[b] for b in p.encode("utf-8")) for p in parts]
        want[word] = [*parts[:-1], parts[-1] + END]
    merges = learn_merges(t for ts in want.values() for t in ts)
    chars = list(byte_map.values())
    tokens = [*chars, *(c + END for c in chars), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    if len(vocab) > max_vocab:
        raise ValueError(
            f"{len(want)} words need {len(vocab)} tokens, more than max_vocab={max_vocab}: use "
            "fewer or shorter words, or a text encoder with a larger vocab_size"
        )
    if pad_token not in vocab:
        raise ValueError(
            f"pad_token {pad_token!r} is not in the vocabulary; use {EOS_TOKEN!r} or '!'"
        )
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    for word, expected in want.items():
        if (got := tokenizer.tokenize(word)) != expected:
            raise ValueError(
                f"word {word!r} tokenizes as {got}, not {expected}: a word must be letters only "
                "(CLIP splits at spaces, digits and punctuation), and splits must not clash"
            )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 saves tokenizer.json only; released SDXL folders ship these two files.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, "utf-8")
    return folder


def load_tokenizer(folder: str | Path) -> Any:
    """A CLIP tokenizer from a ``tokenizer/`` folder (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").exists() and not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{folder} holds no CLIP tokenizer (vocab.json + merges.txt). Single-file "
            f"checkpoints carry none: pass --tokenizers DIR, a diffusers SDXL folder that has "
            f"tokenizer/ and tokenizer_2/."
        )
    return CLIPTokenizer.from_pretrained(str(folder))


def synthetic_words() -> list[str]:
    """The words of all synthetic captions, in order of first appearance."""
    captions = (
        synthetic.caption_for(c, s, p)
        for c in synthetic.COLOURS
        for s in synthetic.SHAPES
        for p in synthetic.POSITIONS
    )
    return list(dict.fromkeys(w for caption in captions for w in caption.split()))


def write_synthetic_tokenizers(folder: str | Path) -> None:
    """Write ``folder/tokenizer`` (pads with "<|endoftext|>") and ``folder/tokenizer_2`` (pads
    with "!") for the synthetic captions, as in a diffusers SDXL folder."""
    words = synthetic_words()
    for sub, pad in (("tokenizer", EOS_TOKEN), ("tokenizer_2", "!")):
        write_clip_tokenizer(Path(folder) / sub, words, pad_token=pad, splits=SYNTHETIC_SPLITS)
