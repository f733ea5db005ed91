#!/usr/bin/env python
"""Tokenise raw data into Megatron/ModelLink-compatible ``.bin/.idx`` datasets.

Example (pretraining)::

    python scripts/preprocess_data.py --input data/c4_demo.jsonl --json-keys text \\
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path path/to/llama2 \\
        --output-prefix out/c4 --append-eod --workers 4

Example (instruction data)::

    python scripts/preprocess_data.py --input alpaca.json --handler-name AlpacaStyleInstructionHandler \\
        --prompt-type llama2 --tokenizer-model tokenizer.model --output-prefix out/alpaca \\
        --seq-length 2048 --pack

See docs/data.md for every flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_common import TOKENIZER_TYPES  # noqa: E402
from pmodel.data.preprocess import HANDLERS, PreprocessConfig, PreprocessError, preprocess  # noqa: E402
from pmodel.data.templates import TEMPLATES  # noqa: E402

# ModelLink names -> our loader kinds: the table pretrain.py and finetune.py use too.
_TOKENIZER_TYPES = TOKENIZER_TYPES

# PreprocessConfig field -> the flag that sets it: the library's messages name its fields
# (``PreprocessConfig.workers``); a user of this script typed flags.
_FLAGS = {
    "inputs": "--input", "output_prefix": "--output-prefix", "tokenizer_kind": "--tokenizer-type",
    "json_keys": "--json-keys", "handler": "--handler-name", "prompt_type": "--prompt-type",
    "map_keys": "--map-keys", "append_eod": "--append-eod", "seq_length": "--seq-length", "pack": "--pack",
    "workers": "--workers", "chunk_size": "--chunk-size", "strict": "--strict", "log_interval": "--log-interval",
    "bos": "--bos", "use_fast": "--tokenizer-not-use-fast", "streaming": "--streaming", "n_subs": "--n-subs",
    "subset_index": "--subset-index", "task_bytes": "--task-bytes", "pack_buffer": "--pack-buffer",
}


def flag_message(msg: str) -> str:
    """A library message with ``PreprocessConfig.<field>`` replaced by the field's flag."""
    return re.sub(r"PreprocessConfig\.(\w+)", lambda m: _FLAGS.get(m.group(1), m.group(0)), msg)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+",
                   help="file(s) or directory: .jsonl / .json / .txt (one document per line) / .parquet")
    g.add_argument("--json-keys", nargs="+", default=None,
                   help="keys to tokenise (GeneralPretrainHandler only; default: text)")
    g.add_argument("--handler-name", default="GeneralPretrainHandler", choices=HANDLERS)
    g.add_argument("--streaming", action="store_true",
                   help="read every input as one sequential stream (pipes / FIFOs; no byte-range splitting)")
    g.add_argument("--n-subs", type=int, default=None,
                   help="cut the corpus into N disjoint parts by byte offset; alone: write the parts and merge them "
                        "(as ModelLink); with --subset-index K: write only part K (merge with scripts/merge_datasets.py)")
    g.add_argument("--subset-index", type=int, default=None, help="the part of --n-subs this run writes (0-based)")
    g.add_argument("--split-sentences", action="store_true",
                   help="refused: ModelLink splits with NLTK's punkt model, which pmodel does not ship")
    g.add_argument("--keep-newlines", action="store_true",
                   help="refused: a --split-sentences option (NLTK punkt)")
    g.add_argument("--cache-dir", default=None,
                   help="refused: pmodel streams its inputs and keeps no Hugging Face datasets cache")
    g.add_argument("--overwrite-cache", action="store_true", help="refused: see --cache-dir")
    g.add_argument("--prompt-type", default=None, choices=sorted(TEMPLATES),
                   help="chat template for instruction handlers (default: empty)")
    g.add_argument("--map-keys", default=None,
                   help='JSON object renaming fields, e.g. \'{"prompt":"instruction","query":"input"}\'')
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=sorted(_TOKENIZER_TYPES))
    g.add_argument("--tokenizer-model", default=None, help="tokenizer file (.model, .tiktoken, tokenizer.json)")
    g.add_argument("--tokenizer-name-or-path", default=None, help="folder holding the tokenizer files")
    g.add_argument("--tokenizer-not-use-fast", action="store_true",
                   help="in a folder, load the model's own tokenizer file (what HF's slow tokenizer reads) instead "
                        "of tokenizer.json")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--append-eod", action="store_true", help="append EOS to each pretraining document")
    g.add_argument("--bos", default="auto", choices=("auto", "always", "never"),
                   help="BOS per document: auto = as the tokenizer's Hugging Face call adds it (ModelLink's path)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="instruction handlers only: drop later turns / drop and count samples longer than this "
                        "(refused for GeneralPretrainHandler: pretrain.py cuts samples at training time)")
    g.add_argument("--pack", action="store_true", help="pack instruction samples up to --seq-length")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--chunk-size", type=int, default=256, help="records per work item (.json / parquet inputs)")
    g.add_argument("--task-bytes", type=int, default=4 << 20, help="input bytes per work item (line files)")
    g.add_argument("--log-interval", type=int, default=1000)
    g.add_argument("--strict", action="store_true", help="stop at the first bad record")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.workers > 1:
        # one core per worker process: HF tokenizers' own thread pool would oversubscribe them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.tokenizer_model and args.tokenizer_name_or_path:
        print("error: give one of --tokenizer-model and --tokenizer-name-or-path (both name the tokenizer)",
              file=sys.stderr)
        return 2
    tok = args.tokenizer_model or args.tokenizer_name_or_path
    if tok is None and args.tokenizer_type != "ByteTokenizer":
        print("error: give --tokenizer-model or --tokenizer-name-or-path", file=sys.stderr)
        return 2
    if tok is not None and args.tokenizer_type == "ByteTokenizer":
        print(f"error: --tokenizer-type ByteTokenizer reads no file; drop {tok} or pick the type that reads it",
              file=sys.stderr)
        return 2
    refused = [(args.split_sentences, "--split-sentences", "ModelLink splits sentences with NLTK's punkt model, "
                "which pmodel does not ship; documents are written whole (one sequence each)"),
               (args.keep_newlines, "--keep-newlines", "it configures --split-sentences (NLTK punkt), which is refused"),
               (args.cache_dir is not None, "--cache-dir", "pmodel streams its inputs and keeps no Hugging Face datasets "
                "cache, so there is nothing to store there"),
               (args.overwrite_cache, "--overwrite-cache", "pmodel keeps no datasets cache (every run reads the "
                "inputs afresh)")]
    for given, flag, why in refused:
        if given:
            print(f"error: {flag} is not supported: {why}", file=sys.stderr)
            return 2
    if args.tokenizer_not_use_fast and args.tokenizer_type == "ByteTokenizer":
        print("error: --tokenizer-not-use-fast: ByteTokenizer has no fast / slow variants", file=sys.stderr)
        return 2
    if args.json_keys is not None and args.handler_name not in ("GeneralPretrainHandler", "AlpacaPretrainHandler",
                                                                "StackOverflowPythonPretrainHandler"):
        print(f"error: --json-keys applies to the pretraining handlers; {args.handler_name} reads its fields "
              "by name" + (" (rename them with --map-keys)" if "Style" in args.handler_name else ""), file=sys.stderr)
        return 2
    map_keys = {}
    if args.map_keys:
        try:
            map_keys = json.loads(args.map_keys)
        except json.JSONDecodeError as e:
            print(f"error: --map-keys is not valid JSON: {e}", file=sys.stderr)
            return 2
        if not isinstance(map_keys, dict) or not all(isinstance(v, str) for v in map_keys.values()):
            print("error: --map-keys must be a JSON object of strings", file=sys.stderr)
            return 2
    try:
        cfg = PreprocessConfig(
            inputs=tuple(args.input), output_prefix=args.output_prefix, tokenizer=tok or "bytes",
            tokenizer_kind=_TOKENIZER_TYPES[args.tokenizer_type], json_keys=tuple(args.json_keys or ["text"]),
            handler=args.handler_name, prompt_type=args.prompt_type, map_keys=map_keys,
            append_eod=args.append_eod, seq_length=args.seq_length, pack=args.pack,
            workers=args.workers, chunk_size=args.chunk_size, strict=args.strict, bos=args.bos,
            use_fast=not args.tokenizer_not_use_fast, streaming=args.streaming, n_subs=args.n_subs,
            subset_index=args.subset_index, task_bytes=args.task_bytes,
            log_interval=args.log_interval, progress=not args.no_progress)
        report = preprocess(cfg)
    except (PreprocessError, FileNotFoundError, ValueError) as e:  # e.g. an unreadable tokenizer file
        print(f"error: {flag_message(str(e))}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.written == 0:
        why = (f"all {report.records} records were rejected (see {report.rejects_path})" if report.num_rejected
               else "the input holds no records")
        print(f"error: nothing was written: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
