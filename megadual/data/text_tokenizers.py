"""Text tokenizers behind one small interface: the byte tokenizer or a local Hugging Face one.

`load_text_tokenizer("bytes")` is the embedded debug tokenizer (UTF-8 bytes; no files);
any other value is a local directory read with transformers' AutoTokenizer (e.g. a
Qwen2.5 checkpoint's tokenizer files; never downloaded). Both encode captions without
special tokens: the sequence layouts add their own (mm_sequence.SpecialTokens).
"""

from __future__ import annotations

import os
from typing import Protocol

from .text_lm import ByteTokenizer

BYTES = "bytes"


class TextTokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class BytesTextTokenizer:
    """Captions as UTF-8 bytes (ids 0-255); decoding skips every id above 255."""

    name = BYTES

    def __init__(self):
        self._bytes = ByteTokenizer()

    def encode(self, text: str) -> list[int]:
        return self._bytes.encode(text, bos=False, eos=False)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTextTokenizer:
    """A Hugging Face tokenizer from a local directory."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text tokenizer directory {path!r} does not exist (use 'bytes' for the debug one)")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = os.path.basename(os.path.normpath(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_text_tokenizer(spec: str) -> TextTokenizer:
    return BytesTextTokenizer() if spec == BYTES else HFTextTokenizer(spec)
