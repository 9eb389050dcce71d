"""An offline CLIP tokenizer, built from the BPE vocabulary that open_clip_torch ships.

Stable Diffusion's tokenizer is OpenAI CLIP's BPE (49,408 tokens). No hub is reachable here, so the
zoo builds the same tokenizer from ``open_clip/bpe_simple_vocab_16e6.txt.gz``: the gzip file holds the
merges; the vocabulary is the 256 byte symbols, the same with the end-of-word mark, one entry per merge
and the two special tokens. ``transformers.CLIPTokenizer(vocab_file, merges_file, ...)`` then gives
open_clip's ids (tested in ``tests/test_tokenizer.py``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def open_clip_bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch does not ship its BPE vocabulary at {path}")
    return path


def write_clip_vocab(out_dir: str | Path, bpe_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for ``CLIPTokenizer`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_path or open_clip_bpe_path()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"BPE file {bpe_path} gives {len(vocab)} tokens, expected {VOCAB_SIZE}")
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_clip_tokenizer(work_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with OpenAI CLIP's ids, padded with end-of-text as Stable Diffusion pads."""
    vocab_file, merges_file = write_clip_vocab(work_dir)
    return CLIPTokenizer(
        str(vocab_file), str(merges_file), pad_token=END_TOKEN, model_max_length=model_max_length
    )
