#!/usr/bin/env python
"""Merge ``.bin/.idx`` datasets in order (e.g. the parts of ``preprocess_data.py --n-subs N
--subset-index K`` run on separate machines) into one dataset, byte-identical to a single run.

    python scripts/merge_datasets.py --input out/part0_text_document out/part1_text_document ... \\
        --output-prefix out/corpus_text_document

``--input`` may also be one folder: every ``*.idx`` in it, sorted by name (Megatron's
``tools/merge_datasets.py`` convention).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmodel.data.preprocess import PreprocessError, merge_datasets  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes in corpus order, or one folder")
    p.add_argument("--output-prefix", required=True, help="the merged dataset's prefix")
    args = p.parse_args(argv)
    inputs = args.input
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        inputs = [str(f.with_suffix("")) for f in sorted(Path(inputs[0]).glob("*.idx"))]
    inputs = [i[:-4] if i.endswith((".bin", ".idx")) else i for i in inputs]
    try:
        merge_datasets(inputs, args.output_prefix)
    except (PreprocessError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(inputs)} datasets into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
