"""Tokenizers for ``builtin:tiny``, made locally and deterministically (no download, no trainer RNG).

Both are byte-level BPEs (the kind of the real ones: Mistral's tekken and Qwen's), built without a trainer: every
word of a fixed list gets the merges that spell it left to right, so every listed word is one token and the
merges are the same in every process. Wrapped in the classes the pipelines load:

- ``flux2-dev``: ``PreTrainedTokenizerFast`` with Mistral's control tokens inside a ``PixtralProcessor`` (the
  real folder's ``tokenizer/`` is a Pixtral processor) and a chat template that renders
  ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`` as Mistral-Small-3's does for text messages;
- ``flux2-klein``: ``Qwen2TokenizerFast`` (``Qwen2Tokenizer`` in transformers 5) with Qwen3's chat template
  reduced to what ``Flux2KleinPipeline`` renders: user turns, the generation prompt and the empty think block
  of ``enable_thinking=False``.
"""

from __future__ import annotations

from typing import Any

WORDS: tuple[str, ...] = tuple(
    """
    a an the of to in on at and or with without into from by is are it its this that make turn change move add
    remove replace put keep set give use color colour red green blue yellow orange purple pink black white gray
    grey brown dark light bright circle square triangle star shape shapes ring dot line object objects background
    foreground left right up down top bottom center middle corner larger smaller big small bigger tiny large
    photo image picture style painting drawing cat dog person man woman face hair sky tree house car text sign
    edit recolor recolour shift rotate flip mirror one two three you are helpful assistant user system think
    """.split()
)

MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]")
QWEN3_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

MISTRAL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' -}}{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for block in message['content'] -%}{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] == 'image' -%}{{- '[IMG]' -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '[/SYSTEM_PROMPT]' -}}{%- elif message['role'] == 'user' -%}"
    "{{- '[/INST]' -}}{%- elif message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
QWEN3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


def _byte_level_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (the 256 byte symbols, then each merge result) and merges spelling every word, bare and
    after a space (``Ġword``), left to right."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        for form in (word, "\u0120" + word):  # Ġ: the byte-level symbol of a leading space
            prefix = form[0]
            for char in form[1:]:
                merged = prefix + char
                if merged not in vocab:
                    vocab[merged] = len(vocab)
                    merges.append((prefix, char))
                prefix = merged
    return vocab, merges


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def mistral_tokenizer() -> Any:
    """The tiny Mistral tokenizer: ``<unk> <s> </s> <pad>`` and the control tokens first (as tekken numbers
    them), then the byte-level vocabulary."""
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_bpe()
    shifted = {symbol: i + len(MISTRAL_SPECIALS) for symbol, i in vocab.items()}
    shifted.update({token: i for i, token in enumerate(MISTRAL_SPECIALS)})
    backend = _backend(shifted, merges)
    backend.add_special_tokens(list(MISTRAL_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=131072, chat_template=MISTRAL_TEMPLATE,
    )


def pixtral_processor() -> Any:
    """The tiny ``PixtralProcessor`` (the ``tokenizer`` component of a FLUX.2 [dev] folder)."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    return PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=8, size={"longest_edge": 64}),
        tokenizer=mistral_tokenizer(),
        patch_size=8,
        spatial_merge_size=2,
        chat_template=MISTRAL_TEMPLATE,
    )


def qwen3_tokenizer() -> Any:
    """The tiny Qwen3 tokenizer: the byte-level vocabulary, then Qwen's special tokens."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = _byte_level_bpe()
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=40960)  # adds <|endoftext|>
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN3_SPECIALS[1:])})
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> dict[str, int]:
    """Id of each special token; the ids must be distinct (an unknown token would map to the unk id)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    if len(set(ids.values())) != len(ids):
        raise RuntimeError(f"tiny tokenizer special tokens are not distinct: {ids}")
    return ids
