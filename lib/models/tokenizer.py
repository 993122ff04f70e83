"""A tiny CLIP BPE tokenizer, written from scratch for the demo Stable Diffusion pipeline.

The real CLIP vocabulary (49,408 tokens) is a download we cannot make offline, and a model with
random weights gains nothing from it. What the pipeline needs is a tokenizer with the same *shape*
as CLIP's: byte-level BPE, every word ending in ``</w>``, ``<|startoftext|>``/``<|endoftext|>``
framing and a fixed ``model_max_length``. Every byte has a token, so any prompt tokenizes without
an unknown token. The files follow the Stable Diffusion 1.x ``tokenizer/`` layout (``vocab.json``
+ ``merges.txt`` + ``tokenizer_config.json`` + ``special_tokens_map.json``), which both the slow
and the fast CLIP tokenizers of every transformers version load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# A handful of frequent English pairs, so that merges are exercised (a tokenizer with no merges
# would hide a bug in how merges.txt is read) while the vocabulary stays a few hundred tokens.
MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "f</w>"),
    ("o", "n</w>"),
    ("a", "t</w>"),
    ("e", "r"),
    ("c", "at</w>"),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from each byte to a printable unicode character.

    Byte-level BPE needs a visible, non-whitespace character per byte so that merges.txt (split on
    spaces) can name every token; this is the exact mapping CLIP uses, so the decoder of the
    tokenizers library inverts it.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_vocab() -> dict[str, int]:
    """The token → id map, in CLIP's order: bytes, bytes + ``</w>``, merges, then specials."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars]
    tokens += [left + right for left, right in MERGES]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate token in the demo vocabulary")
    return vocab


def write_clip_tokenizer(directory: Path, *, model_max_length: int) -> dict[str, int]:
    """Write the tokenizer files into ``directory`` (created if needed); return the vocabulary.

    ``model_max_length`` must equal the text encoder's ``max_position_embeddings``: the pipeline
    pads every prompt to it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab()
    _write_json(directory / "vocab.json", vocab)
    merges = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    specials = {
        "bos_token": START_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,
    }
    _write_json(directory / "special_tokens_map.json", specials)
    _write_json(
        directory / "tokenizer_config.json",
        {
            **specials,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": model_max_length,
            "do_lower_case": True,
            "clean_up_tokenization_spaces": True,
        },
    )
    return vocab


def _write_json(path: Path, data: Any) -> None:
    # Sorted keys and a fixed layout keep the files byte-identical from one build to the next.
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
