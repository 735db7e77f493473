"""A word-level tokenizer built locally, saved in the transformers format (`tokenizer.json`).

Stable Diffusion's CLIP tokenizer is a byte-pair encoder trained on web text; the miniature's
prompts ("a handwritten digit 7") need only a handful of words, so its tokenizer is a fixed
word-level vocabulary with CLIP's framing: `<|startoftext|>` words `<|endoftext|>`, padded to
`max_length` with the end token, lower-cased, unknown words mapped to `<|unk|>`. It loads back with
`transformers.AutoTokenizer.from_pretrained(folder)`, like any pipeline's tokenizer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
DIGIT_WORDS = tuple(str(d) for d in range(10))
MINIATURE_WORDS = ("a", "an", "the", "handwritten", "digit", "number", "of", "photo", "drawing", "picture") + DIGIT_WORDS


def build_word_tokenizer(words=MINIATURE_WORDS, max_length: int = 8):
    """A `PreTrainedTokenizerFast` over `words` (plus the special tokens, ids 0-2), padding and
    truncating to `max_length` tokens as CLIP's tokenizer does to 77."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(w.lower() for w in words))
    if not words or any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError(f"vocabulary words must be non-empty and contain no spaces, got {words!r}")
    if max_length < 3:
        raise ValueError(f"max_length must leave room for a word between the start and end tokens, got {max_length}")
    vocab = {tok: i for i, tok in enumerate([BOS, EOS, UNK] + words)}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=max_length)


def tokenize(tokenizer, prompts) -> "torch.Tensor":
    """Prompts -> token ids (B, model_max_length), padded and truncated as Stable Diffusion does."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
