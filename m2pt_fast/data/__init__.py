"""Data for M²PT training: LLaVA-format records, the Vicuna v1 template, the embedded synthetic set.

Imports go one way: data knows nothing of the model or the trainer.
"""
from m2pt_fast.data.conversation import IGNORE_INDEX, BadRecord, ConversationEncoder
from m2pt_fast.data.image import ImagePreprocessor
from m2pt_fast.data.llava_json import (
    LlavaJsonDataset,
    SampleBuilder,
    SkipReport,
    SyntheticInstructDataset,
    check_images_decode,
    load_llava_records,
    longest_sample,
    make_collate,
)
from m2pt_fast.data.sampler import EpochShardSampler
from m2pt_fast.data.synthetic import held_out_record, synthetic_record, synthetic_texts, write_llava_json
from m2pt_fast.data.tokenizer import IMAGE, build_word_tokenizer, words_of

__all__ = [
    "IGNORE_INDEX", "IMAGE", "BadRecord", "ConversationEncoder", "EpochShardSampler", "ImagePreprocessor",
    "LlavaJsonDataset",
    "SampleBuilder", "SkipReport", "SyntheticInstructDataset", "build_word_tokenizer", "check_images_decode",
    "load_llava_records", "longest_sample",
    "held_out_record", "make_collate", "synthetic_record", "synthetic_texts", "words_of", "write_llava_json",
]
