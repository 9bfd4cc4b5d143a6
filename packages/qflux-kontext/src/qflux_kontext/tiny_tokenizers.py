"""Tokenizers for ``builtin:tiny``, made locally and deterministically (no download, no trainer RNG).

- CLIP: a byte-level BPE with CLIP's ``</w>`` end-of-word suffix, wrapped in ``CLIPTokenizer`` (the
  tokenizers-backed class, ``CLIPTokenizerFast`` in transformers 5). The merges come from a small pure-Python
  BPE learner over a fixed word list with a total order on ties: the ``tokenizers`` BpeTrainer is not
  deterministic across processes.
- T5: a Unigram model with hand-set scores (whole words beat characters), wrapped in ``T5TokenizerFast``; a
  Unigram model is what ``T5TokenizerFast.from_pretrained`` rebuilds, so it round-trips ``save_pretrained``.
"""

from __future__ import annotations

import string
from collections import Counter

# Words of typical edit instructions: the tiny tokenizers give them one token each.
WORDS: tuple[str, ...] = tuple(
    """
    a an the of to in on at and or with without into from by is are it its this that make turn change move add
    remove replace put keep set give use color colour red green blue yellow orange purple pink black white gray
    grey brown dark light bright circle square triangle star shape shapes ring dot line object objects background
    foreground left right up down top bottom center middle corner larger smaller big small bigger tiny large
    photo image picture style painting drawing cat dog person man woman face hair sky tree house car text sign
    edit recolor recolour shift rotate flip mirror one two three
    """.split()
)

CLIP_MAX_LENGTH = 77  # CLIP's context; the pipeline pads CLIP prompts to tokenizer.model_max_length
T5_MAX_LENGTH = 32  # tiny default for max_sequence_length (FLUX's real T5 tokenizer says 512)


def _learn_bpe(words: tuple[str, ...], end: str = "</w>") -> list[tuple[str, str]]:
    """Merges of a byte-pair encoding learnt on ``words`` (each counted once), until every word is one token.

    Ties (equal pair counts) go to the lexicographically smallest pair, so the result is the same everywhere.
    """
    vocab = Counter(tuple(w[:-1]) + (w[-1] + end,) for w in words)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in vocab.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, n in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += n
        vocab = merged


def build_clip_tokenizer(vocab_size: int | None = None):
    """A CLIP byte-level BPE tokenizer: 256 byte symbols, the same with ``</w>``, the learnt merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the layout of openai/clip-vit-large-patch14's vocab).

    ``vocab_size``: pad with unreachable filler tokens before the two specials so that they get the real ids
    (49406 / 49407 at the real 49408): CLIP's pooling depends on where ``<|endoftext|>`` sits."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = list(alphabet) + [c + "</w>" for c in alphabet]
    merges = _learn_bpe(WORDS)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    if vocab_size is not None:
        tokens += [f"<|filler{i}|>" for i in range(vocab_size - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A T5 Unigram tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then word pieces and characters."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -4.0 - 1e-3 * i) for i, w in enumerate(WORDS)]
    chars = [c for c in string.printable if not c.isspace()]
    pieces += [("\u2581" + c, -7.0 - 1e-3 * i) for i, c in enumerate(chars)]
    pieces += [(c, -8.0 - 1e-3 * i) for i, c in enumerate(chars)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
