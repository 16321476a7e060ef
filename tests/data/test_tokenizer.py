"""Small offline CLIP tokenizers against the real CLIP BPE (open_clip's 49408-token file)."""

import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from sdxl_jax import conditioning
from sdxl_jax.data import synthetic
from sdxl_jax.data import tokenizer as tok
from sdxl_jax.models.clip import CLIPTextConfig
from tests.diffusion import tiny_pipelines as ref

PADS = {"tokenizer": ref.PAD_TOKEN_1, "tokenizer_2": ref.PAD_TOKEN_2}
CAPTIONS = [
    synthetic.caption_for(c, s, p)
    for c in synthetic.COLOURS
    for s in synthetic.SHAPES
    for p in synthetic.POSITIONS
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_tokenizers")
    tok.write_synthetic_tokenizers(root)
    return root


@pytest.fixture(scope="module")
def real():
    return {sub: ref.make_clip_tokenizer(pad) for sub, pad in PADS.items()}


def test_synthetic_words_are_single_tokens_in_real_clip_except_splits(real):
    words = tok.synthetic_words()
    assert sorted(words) == sorted({w for c in CAPTIONS for w in c.split()})
    assert len(words) == 16
    for word in words:
        pieces = tok.SYNTHETIC_SPLITS.get(word, (word,))
        want = [*pieces[:-1], pieces[-1] + "</w>"]
        assert real["tokenizer"].tokenize(word) == want, word


def test_vocabulary_layout_is_clips_in_small(folder):
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text("utf-8"))
    clip_vocab, _ = ref.clip_vocab_and_merges()
    tokens = sorted(vocab, key=vocab.get)
    assert list(vocab.values()) == list(range(len(vocab)))
    assert tokens[:512] == sorted(clip_vocab, key=clip_vocab.get)[:512]  # bytes, bytes + </w>
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]  # CLIP's special tokens
    merges = (folder / "tokenizer" / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert tokens[512:-2] == ["".join(m.split()) for m in merges[1:]]
    assert len(vocab) == 564 <= CLIPTextConfig.tiny().vocab_size
    assert CLIPTextConfig.tiny_bigg().vocab_size == CLIPTextConfig.tiny().vocab_size


@pytest.mark.parametrize("sub", list(PADS))
def test_captions_match_real_clip_token_strings(sub, folder, real):
    ours = conditioning.load_tokenizer(folder / sub)
    assert ours.pad_token == PADS[sub] and ours.model_max_length == 77
    got, n_trunc = conditioning.tokenize(ours, CAPTIONS)
    want, _ = conditioning.tokenize(real[sub], CAPTIONS)
    assert n_trunc == 0
    assert got.shape == (len(CAPTIONS), 77) and got.dtype == np.int32
    for g, w in zip(got, want, strict=True):
        # Same strings at the same positions: bos, words, eos, then the pad token up to 77.
        assert ours.convert_ids_to_tokens(g.tolist()) == real[sub].convert_ids_to_tokens(w.tolist())
    assert (got < 1000).all() and (got >= 0).all()
    assert len(np.unique(got, axis=0)) == len(CAPTIONS)


def test_vocab_files_alone_load_the_same_tokenizer(folder, tmp_path):
    # Released SDXL folders ship vocab.json + merges.txt only (no tokenizer.json).
    for sub in PADS:
        bare = tmp_path / sub
        bare.mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (bare / name).write_bytes((folder / sub / name).read_bytes())
        a = CLIPTokenizer.from_pretrained(str(folder / sub))
        b = CLIPTokenizer.from_pretrained(str(bare))
        texts = [*CAPTIONS[:5], "an unknown Zebra, café!"]
        assert (
            conditioning.tokenize(a, texts)[0].tolist()
            == conditioning.tokenize(b, texts)[0].tolist()
        )


@pytest.mark.parametrize("word", ["zebra", "Xylophone", "café", "cyanide"])
def test_unknown_words_fall_back_to_byte_pieces(word, folder):
    ours = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    ids = ours(word)["input_ids"]
    assert ids[0] == ours.bos_token_id and ids[-1] == ours.eos_token_id
    assert ours.eos_token_id not in ids[1:-1]  # no unknown token (unk = eos, as in CLIP)
    pieces = ours.convert_ids_to_tokens(ids[1:-1])
    assert len(pieces) > 1 and pieces[-1].endswith("</w>")
    assert ours.decode(ids, skip_special_tokens=True).strip() == word.lower()


def test_any_words_become_one_token_each(tmp_path):
    words = ["Hello", "world", "photograph", "Über", "a"]
    ours = CLIPTokenizer.from_pretrained(str(tok.write_clip_tokenizer(tmp_path, words)))
    assert ours.tokenize("hello World photograph über a") == [
        "hello</w>",
        "world</w>",
        "photograph</w>",
        "Ã¼ber</w>",  # byte-level characters of "über", as in CLIP's vocabulary
        "a</w>",
    ]


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="max_vocab"):
        tok.write_clip_tokenizer(tmp_path, tok.synthetic_words(), max_vocab=520)
    with pytest.raises(ValueError, match="letters only"):
        tok.write_clip_tokenizer(tmp_path, ["red", "top left"])
    with pytest.raises(ValueError, match="pad_token"):
        tok.write_clip_tokenizer(tmp_path, ["red"], pad_token="<pad>")
    with pytest.raises(ValueError, match="does not spell"):
        tok.write_clip_tokenizer(tmp_path, ["cyan"], splits={"cyan": ("c", "an")})
