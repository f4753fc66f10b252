"""What test-time learning can find in a token stream: its documents' lengths and how often its n-grams repeat.

    python3 scripts/stream_stats.py DATA_DIR [--splits val,tune] [--tokens N] [--bos 1]

For each split (DATA_DIR/fineweb_<split>_*.bin) prints the tokens and documents read, the median document length,
the share of tokens in documents longer than 1,024 tokens (per-document LoRA TTT learns within a document, so long
documents give it the most), and the share of 5-grams (a target and the 4 tokens before it) already seen earlier in
the stream (what an n-gram of scored tokens can find). Streams of different lengths are cut to the shortest (or to
--tokens), since a longer stream repeats more. Reads no model: on the CPU, in seconds.

On P1 the dev val's documents are longer and repeat more than the tuning split's, which is why every evaluation
stage gains less on the split (docs/MEASUREMENTS.md, per-document LoRA TTT).
"""
from __future__ import annotations

import argparse
import glob

import numpy as np

from submission.data import load_tokens

LONG_DOC = 1024
NGRAM = 5


def stream_stats(tokens: np.ndarray, bos: int) -> dict[str, float]:
    """Documents (each from its BOS to the next) and 5-gram repeats of one token stream."""
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = np.flatnonzero(tokens == bos)
    if starts.size == 0 or starts[0] != 0:
        starts = np.insert(starts, 0, 0)  # tokens before the first BOS: a document of their own
    lengths = np.diff(np.append(starts, tokens.size))
    keys = np.zeros(max(tokens.size - NGRAM + 1, 0), dtype=np.uint64)
    for j in range(NGRAM):  # one hash per window of NGRAM tokens (wrapping uint64 arithmetic)
        keys = keys * np.uint64(1_000_003) + tokens[j:tokens.size - NGRAM + 1 + j].astype(np.uint64)
    _, first = np.unique(keys, return_index=True)
    return {"tokens": int(tokens.size), "docs": int(lengths.size), "median_doc": float(np.median(lengths)),
            "long_doc_share": float(lengths[lengths > LONG_DOC].sum() / tokens.size),
            "repeat_share": float(1 - first.size / keys.size) if keys.size else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="folder of fineweb_<split>_*.bin shards")
    p.add_argument("--splits", default="val,tune", help="comma-separated split names (default val,tune)")
    p.add_argument("--tokens", type=int, default=0, help="tokens per split (default: the shortest split's)")
    p.add_argument("--bos", type=int, default=1, help="the document-start token id (default 1)")
    args = p.parse_args()
    streams = {}
    for split in args.splits.split(","):
        pattern = f"{args.data_dir}/fineweb_{split}_*.bin"
        if not glob.glob(pattern):
            raise SystemExit(f"stream_stats.py: no shard matches {pattern} (is {args.data_dir} a shard folder? "
                             f"--splits names the splits to read)")
        streams[split] = load_tokens(pattern)
    cut = args.tokens or min(s.size for s in streams.values())
    print(f"| split | tokens | documents | median document | tokens in documents > {LONG_DOC:,} | "
          f"{NGRAM}-grams seen earlier |\n|---|---|---|---|---|---|")
    for split, tokens in streams.items():
        s = stream_stats(tokens[:cut], args.bos)
        print(f"| {split} | {s['tokens']:,} | {s['docs']:,} | {s['median_doc']:.0f} | {s['long_doc_share']:.3f} | "
              f"{s['repeat_share']:.4f} |")


if __name__ == "__main__":
    main()
