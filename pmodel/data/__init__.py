"""Data: tokenizers, Megatron ``.bin/.idx`` datasets, pretraining samples, instruction data
with chat templates, packing, collation and loading. See ``docs/data.md``."""

from .collate import CollatorConfig, MicroBatchLoader, collate
from .indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype, write_indexed_dataset
from .instruction import (Examples, InstructionDataset, RecordError, alpaca_messages, encode_examples, encode_record,
                          read_records,
                          greedy_knapsack, pack_examples, sharegpt_messages, shift_example,
                          truncate_turns)
from .preprocess import PreprocessConfig, PreprocessError, PreprocessReport, merge_datasets, preprocess
from .pretrain import (BlendedDataset, PretrainConfig, PretrainDataset, build_pretrain_datasets,
                       parse_data_path, split_ranges)
from .templates import (IGNORE_INDEX, TEMPLATES, ChatTemplate, Message, Rendered, get_template,
                        render, render_text)
from .tokenizers import (BPERankTokenizer, ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                         Tokenizer, check_vocab_size, load_tokenizer)

__all__ = [
    "load_tokenizer", "check_vocab_size", "Tokenizer", "SentencePieceTokenizer", "BPERankTokenizer",
    "HFTokenizer", "ByteTokenizer",
    "IndexedDataset", "IndexedDatasetWriter", "write_indexed_dataset", "optimal_dtype",
    "PretrainConfig", "PretrainDataset", "BlendedDataset", "build_pretrain_datasets",
    "parse_data_path", "split_ranges",
    "IGNORE_INDEX", "Message", "ChatTemplate", "TEMPLATES", "get_template", "render", "render_text",
    "Rendered",
    "RecordError", "alpaca_messages", "sharegpt_messages", "encode_record", "truncate_turns",
    "shift_example", "greedy_knapsack", "pack_examples", "InstructionDataset", "read_records",
    "encode_examples", "Examples",
    "CollatorConfig", "collate", "MicroBatchLoader",
    "PreprocessConfig", "PreprocessReport", "PreprocessError", "preprocess", "merge_datasets",
]
