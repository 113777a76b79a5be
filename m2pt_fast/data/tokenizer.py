"""A word-level tokenizer built locally from a closed vocabulary (the synthetic data set's words).

The embedded default must run with nothing downloaded, so it cannot use Vicuna's tokenizer. A
word-level vocabulary over the synthetic templates is exact (no unknown words) and tiny, which
keeps the tiny LLaVA's embedding and lm_head small. The special tokens follow LLaMA's numbering
(<unk> 0, <s> 1, </s> 2) so the data code treats it like the real thing; <image> is the last id
because transformers' LLaVA wants the image token id inside the vocabulary.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)

# The same split as the pre-tokenizer below (words, then runs of punctuation), used to collect the
# vocabulary from raw text.
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct words of `texts` as the tokenizer will split them, sorted (a stable vocabulary)."""
    found: set[str] = set()
    for text in texts:
        found.update(_WORD_PATTERN.findall(text))
    return sorted(found)


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast over `words` plus <unk> <s> </s> <pad> (ids 0-3) and <image> (last id).

    Text is split on whitespace and punctuation; decoding joins words with single spaces.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words)):
        if word not in vocab and word != IMAGE:
            vocab[word] = len(vocab)
    vocab[IMAGE] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IMAGE],
        model_max_length=4096,
        padding_side="right",
    )
    return tokenizer
