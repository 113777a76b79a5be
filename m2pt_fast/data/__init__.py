"""Data for M²PT training: LLaVA-format records, the Vicuna v1 template, the embedded synthetic set.

Imports go one way: data knows nothing of the model or the trainer.
"""
from .conversation import IGNORE_INDEX, BadRecord, ConversationEncoder
from .image import ImagePreprocessor
from .llava_json import (
    LlavaJsonDataset,
    SampleBuilder,
    SkipReport,
    SyntheticInstructDataset,
    check_images_decode,
    load_llava_records,
    longest_sample,
    make_collate,
)
from .sampler import EpochShardSampler
from .synthetic import held_out_record, synthetic_record, synthetic_texts, write_llava_json
from .tokenizer import IMAGE, build_word_tokenizer, words_of

__all__ = [
    "IGNORE_INDEX", "IMAGE", "BadRecord", "ConversationEncoder", "EpochShardSampler", "ImagePreprocessor",
    "LlavaJsonDataset",
    "SampleBuilder", "SkipReport", "SyntheticInstructDataset", "build_word_tokenizer", "check_images_decode",
    "load_llava_records", "longest_sample",
    "held_out_record", "make_collate", "synthetic_record", "synthetic_texts", "words_of", "write_llava_json",
]
