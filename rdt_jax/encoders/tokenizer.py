"""The T5 tokenizer with RDT's settings.

RDT tokenises instructions with ``AutoTokenizer.from_pretrained(t5_dir, model_max_length=1024)``
(the SentencePiece T5 tokenizer: pad id 0, EOS id 1 appended, no BOS), ``padding="longest"``
and no truncation; more than 1024 tokens is an error (the policy's language position table
has 1024 rows). The attention mask is ``ids != pad`` (only padding is masked).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_LANG_TOKENS", "load_t5_tokenizer", "tokenize"]

MAX_LANG_TOKENS = 1024


_TOKENIZER_FILES = ("spiece.model", "tokenizer.json")


def load_t5_tokenizer(tokenizer_dir: str | pathlib.Path) -> Any:
    """The (fast) T5 tokenizer from a local directory (``spiece.model`` and/or ``tokenizer.json``; a
    ``tokenizer_config.json`` is read when present, not needed)."""
    # The T5 class by name, not AutoTokenizer: that needs a config file to choose the class and fails
    # (blaming sentencepiece) on a folder holding only spiece.model. Heavy import: only when needed.
    from transformers import T5TokenizerFast

    tokenizer_dir = pathlib.Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: no such tokenizer directory")
    if not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES):
        # transformers would build an empty-vocabulary tokenizer that maps every word to <unk>.
        raise FileNotFoundError(f"{tokenizer_dir}: no T5 tokenizer ({' or '.join(_TOKENIZER_FILES)}); "
                                "point --tokenizer-dir at google/t5-v1_1-xxl's files")
    return T5TokenizerFast.from_pretrained(str(tokenizer_dir), model_max_length=MAX_LANG_TOKENS)


def tokenize(
    tokenizer: Any, texts: Sequence[str], *, pad_to_multiple_of: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32 (B, L), attention_mask bool (B, L))``, EOS appended, right-padded to the longest.

    ``pad_to_multiple_of`` pads further (still masked) so a jitted encoder sees few distinct
    lengths; the encoder outputs of the real tokens do not depend on the extra padding.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    enc = tokenizer(
        list(texts),
        padding="longest",
        # RDT right-pads (its collator pads with id 0 after the tokens); a tokenizer_config.json that sets
        # padding_side "left" must not move the real tokens to the end.
        padding_side="right",
        truncation=False,
        add_special_tokens=True,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="np",
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.asarray(enc["attention_mask"]).astype(bool)
    lengths = mask.sum(axis=1)
    if lengths.max(initial=0) > MAX_LANG_TOKENS:
        i = int(lengths.argmax())
        raise ValueError(f"instruction {i} has {int(lengths[i])} tokens, more than {MAX_LANG_TOKENS}: {texts[i]!r}")
    return ids, mask
