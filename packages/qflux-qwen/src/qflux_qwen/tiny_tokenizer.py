"""The ``builtin:tiny`` Qwen2 tokenizer, made locally with the ``tokenizers`` library (no download).

A byte-level BPE with Qwen2's pre-tokenizer (the regex and byte-level mapping of ``Qwen2Tokenizer``), trained
on the Qwen-Image-Edit prompt templates plus a small vocabulary of edit instructions, wrapped in transformers'
``Qwen2Tokenizer`` (the fast, ``tokenizers``-backed class; ``Qwen2TokenizerFast`` is the same class in
transformers 5) with Qwen's special tokens after the learned vocabulary.

Every word of the template's system prompt is one token, so the prefix that the pipelines drop
(``prompt_template_encode_start_idx = 64``: ``<|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n``) is
exactly 64 tokens, as with the real Qwen2.5-VL tokenizer. Training is deterministic (fixed corpus, sorted
byte alphabet, BPE merge ties broken by token id).
"""

from __future__ import annotations

import json
import re
from typing import Any

# The system prompt of QwenImageEditPipeline / QwenImageEditPlusPipeline.prompt_template_encode (diffusers 0.42).
SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
TEMPLATE = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"

# Qwen2.5's special tokens in the order of the real vocabulary (<|endoftext|> = 151643, ... <|video_pad|> = 151656).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

EDIT_WORDS = """
Picture 1: Picture 2: Picture 3: assistant user system
make turn change replace remove add move put place paint recolor colour color fill swap keep shift rotate flip
scale enlarge shrink grow erase draw insert into onto from to into the a an of and with without in on at by
left right up down top bottom center centre middle corner background foreground edge border side
red green blue yellow orange purple pink cyan magenta white black gray grey brown gold silver
circle square triangle rectangle star ellipse disc box shape shapes object objects line dot
big small bigger smaller large tiny larger same other one two three first second third each all every
image picture photo style light dark bright sky sea tree house person cat dog car text sign
""".split()


def _corpus() -> list[str]:
    segments = [s for s in re.split(r"<\|[a-z_]+\|>", TEMPLATE) if s]
    return segments + [" ".join(EDIT_WORDS), " ".join(EDIT_WORDS).title(), "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ( ) ' \""]


def _backend_tokenizer() -> Any:
    """An untrained ``tokenizers.Tokenizer`` set up like ``Qwen2Tokenizer`` (NFC, Qwen regex split, byte level)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE (every corpus word fully merged) and return its vocabulary and merges."""
    from tokenizers import pre_tokenizers, trainers

    tok = _backend_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,  # more than the corpus can fill: training stops when every word is one token
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return dict(model["vocab"]), [tuple(m) for m in model["merges"]]


def build_tiny_tokenizer() -> Any:
    """The tiny ``Qwen2Tokenizer``: learned vocabulary, then Qwen's special tokens (ids in ``special_token_ids``)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = tiny_vocab_and_merges()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)  # adds <|endoftext|>
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Token id of each special token; unknown ones would map to <|endoftext|> (the unk token) and collide."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if len(set(ids.values())) != len(ids):
        raise RuntimeError(f"tiny tokenizer special tokens are not distinct: {ids}")
    return ids
