"""`pgolf data download|build|tokenizer|split|inspect`: the dataset commands (tools/data.py does the work)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import sentencepiece as spm

from submission.data import TOKENS_PER_SHARD
from tools.data import (DEFAULT_REPOS, SPLITS, TUNE, DatasetReport, SplitStats, TokenizerSpec, build_shards, download,
                        split_tune, train_tokenizer, verify_dataset, vocab_of_directory)
from tools.paths import expect_path


def _print_json(report) -> None:
    print(json.dumps(asdict(report), indent=2))


def _cmd_download(args: argparse.Namespace) -> int:
    report = download(args.variant, args.train_shards, args.out, args.repo_id, progress=not args.quiet)
    if args.json:
        _print_json(report)
        return 0
    for note in report.notes:
        print(f"note:{note}")
    print(f"repo:{report.repo_id}\nshard_dir:{report.shard_dir}\nmanifest:{report.manifest}")
    for path in report.tokenizer_files:
        print(f"tokenizer_file:{path}")
    print(f"val_shards:{report.val_shards}\nval_tokens:{report.val_tokens}\ntrain_shards:{report.train_shards}\n"
          f"train_tokens:{report.train_tokens}")
    print(f"download:ok fetched:{len(report.fetched)} already_present:{len(report.skipped)} "
          f"next:pgolf data verify {report.shard_dir}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    report = build_shards(args.docs, args.tokenizer, args.out, split=args.split, val_docs=args.val_docs,
                          val_fraction=args.val_fraction, tune_docs=args.tune_docs, workers=args.workers,
                          shard_tokens=args.shard_tokens, overwrite=args.overwrite, progress=not args.quiet)
    if args.json:
        _print_json(report)
        return 0
    for split in report.docs:
        print(f"{split}_docs:{report.docs[split]}\n{split}_tokens:{report.tokens[split]}\n"
              f"{split}_shards:{len(report.shards[split])}")
    if report.val_fingerprint:
        print(f"val_fingerprint:{report.val_fingerprint}")
    if report.tune_fingerprint:
        print(f"tune_fingerprint:{report.tune_fingerprint}")
    print(f"build:ok out:{report.out}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    spec = TokenizerSpec(vocab_size=args.vocab_size, input_sentence_size=args.input_sentence_size,
                         max_sentence_length=args.max_sentence_length)
    report = train_tokenizer(args.docs, args.out, spec, threads=args.threads, progress=not args.quiet)
    if args.json:
        _print_json(report)
        return 0
    print(f"docs:{report.docs}\ndocs_over_max_length:{report.docs_over_max_length}")
    if report.docs_over_max_length:
        print(f"note:SentencePiece skipped {report.docs_over_max_length} documents longer than "
              f"{spec.max_sentence_length} bytes (--max-sentence-length)")
    print(f"vocab_size:{report.vocab_size}\nvocab:{report.vocab}\ntokenizer:ok model:{report.model}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    report = split_tune(args.dir, args.tune_docs, bos_id=args.bos_id, shard_tokens=args.shard_tokens)
    if args.json:
        _print_json(report)
        return 0
    print(f"tune_docs:{report.tune_docs}\ntune_tokens:{report.tune_tokens}\ntune_shards:{len(report.tune_shards)}\n"
          f"tune_fingerprint:{report.tune_fingerprint}")
    for name in report.rewritten:
        print(f"train_shard_rewritten:{name}")
    for name in report.removed:
        print(f"train_shard_removed:{name}")
    print(f"train_docs:{report.train_docs}\ntrain_tokens:{report.train_tokens}\n"
          f"train_shards:{len(report.train_shards)}")
    print(f"split:ok dir:{report.directory} next:pgolf data verify {report.directory}")
    return 0


def _print_dataset(report: DatasetReport) -> None:
    print(f"dir:{report.directory}\nbos_id:{report.bos_id}")
    for split in SPLITS + ((TUNE,) if report.tune.shards else ()):
        stats: SplitStats = getattr(report, split)
        print(f"{split}_shards:{len(stats.shards)}\n{split}_tokens:{stats.tokens}\n{split}_docs:{stats.docs}\n"
              f"{split}_max_token_id:{stats.max_token_id}")
        if stats.tokens_before_first_bos:
            print(f"{split}_tokens_before_first_bos:{stats.tokens_before_first_bos}")
    print(f"val_fingerprint:{report.val_fingerprint or 'none'}\noverlap_docs:{report.overlap_docs}")
    for ex in report.overlap_examples:
        print(f"overlap_example:val_doc={ex.val_doc} train_shard={ex.train_shard} train_offset={ex.train_offset} "
              f"tokens={ex.tokens}")
    if report.tune.shards:
        print(f"tune_fingerprint:{report.tune_fingerprint}\ntune_train_overlap_docs:{report.tune_train_overlap_docs}\n"
              f"tune_val_overlap_docs:{report.tune_val_overlap_docs}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    vocab, source = args.vocab_size, "--vocab-size"
    if vocab is None and args.tokenizer:
        expect_path(args.tokenizer, "file", "tokenizer", "--tokenizer takes a SentencePiece .model file")
        vocab, source = spm.SentencePieceProcessor(model_file=args.tokenizer).get_piece_size(), args.tokenizer
    if vocab is None:
        vocab, source = vocab_of_directory(args.dir), "the folder name"
    report = verify_dataset(args.dir, bos_id=args.bos_id, max_overlap_docs=args.max_overlap_docs,
                            max_examples=args.examples, progress=not args.quiet, vocab_size=vocab)
    strict = args.data_command == "verify"
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        _print_dataset(report)
        for problem in report.problems:
            print(f"problem:{problem}", file=sys.stderr if strict else sys.stdout)
        print(f"vocab_checked:{vocab} (from {source})" if vocab else "vocab_checked:no (pass --tokenizer or "
              "--vocab-size to check the ids)")
        if strict:
            print(f"verify:{'ok' if report.ok else 'fail'} val_fingerprint:{report.val_fingerprint or 'none'}"
                  + (f" tune_fingerprint:{report.tune_fingerprint}" if report.tune_fingerprint else ""))
    return 1 if strict and not report.ok else 0


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="get, build, tokenize and verify challenge datasets",
                          description="Challenge data: download the published shards, build shards from your own "
                                      "documents, train a tokenizer, split a tune set off train, verify shards and "
                                      "the splits.")
    cmds = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print the report as JSON instead of key:value lines")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = cmds.add_parser("download", help="fetch the challenge's FineWeb shards and tokenizer from Hugging Face",
                        description="Fetch val shards, the first N train shards and the tokenizer of a variant into "
                                    "<out>/datasets/fineweb10B_<variant>/ and <out>/tokenizers/. Resumable: valid "
                                    "files are kept, truncated ones fetched again.")
    p.add_argument("--variant", choices=sorted(DEFAULT_REPOS), default="sp8192",
                   help="tokenizer family (sp8192: the default recipe's; sp1024: RECIPE=sp1024)")
    p.add_argument("--train-shards", type=int, required=True,
                   help="train shards to fetch (100M tokens, 200 MB each); val is always fetched whole")
    p.add_argument("--repo-id", default=None, help="Hugging Face dataset repo (default: " +
                   ", ".join(f"{v}: {r}" for v, r in DEFAULT_REPOS.items()) + ")")
    p.add_argument("--out", default="data", help="local data root (default: data)")
    common(p)
    p.set_defaults(func=_cmd_download)

    p = cmds.add_parser("build", help="tokenize jsonl documents into challenge shards",
                        description="Documents (jsonl, .jsonl.xz or .jsonl.gz, one {\"text\": ...} per line) -> "
                                    "fineweb_<split>_%06d.bin shards: BOS + ids per document, no EOS, uint16. "
                                    "Byte-identical to the reference prep_shards.py.")
    p.add_argument("docs", nargs="+", help="document files, read in the order given")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    p.add_argument("--out", required=True, help="output folder for the shards")
    split = p.add_mutually_exclusive_group(required=True)
    split.add_argument("--split", choices=SPLITS, help="write every document to this split")
    split.add_argument("--val-docs", type=int, help="first N documents to val, the rest to train")
    split.add_argument("--val-fraction", type=float, help="first round(F * documents) to val, the rest to train")
    p.add_argument("--tune-docs", type=int, default=0,
                   help="the next N documents after val (the first N with --split train) to a tune split "
                        "(fineweb_tune_*.bin), held out of train to choose evaluation settings on (default 0: none)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=TOKENS_PER_SHARD,
                   help=f"tokens per shard (default: the challenge's {TOKENS_PER_SHARD:,})")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the splits written")
    common(p)
    p.set_defaults(func=_cmd_build)

    p = cmds.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer with the challenge's settings",
                        description="Train SentencePiece BPE (character_coverage 0.999, byte_fallback, split_digits, "
                                    "nmt_nfkc, no dummy prefix, pad 0 / bos 1 / eos 2 / unk 3); each document is "
                                    "one training sentence. Writes PREFIX.model and PREFIX.vocab.")
    p.add_argument("docs", nargs="+", help="document files (jsonl, .jsonl.xz or .jsonl.gz)")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces, including 4 specials and 256 bytes")
    p.add_argument("--out", required=True, help="output prefix, e.g. data/tokenizers/fineweb_1024_bpe")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of N documents (default 0: all)")
    p.add_argument("--max-sentence-length", type=int, default=TokenizerSpec.max_sentence_length,
                   help="documents longer than this many bytes are skipped by SentencePiece (default %(default)s, "
                        "as in the challenge)")
    p.add_argument("--threads", type=int, default=None, help="trainer threads (default: all cores)")
    common(p)
    p.set_defaults(func=_cmd_tokenizer)

    p = cmds.add_parser("split", help="move the last N train documents into a tune split (for downloaded shards)",
                        description="Move the last N documents of the train split (each starts at a BOS) into "
                                    "fineweb_tune_%06d.bin: held-out training documents to choose evaluation settings "
                                    "on, never trained on. The train shard holding the cut is rewritten shorter and "
                                    "later train shards removed; tune shards are in place before train changes, so "
                                    "no document is lost. Refused when tune shards exist.")
    p.add_argument("dir", help="folder with fineweb_train_*.bin shards")
    p.add_argument("--tune-docs", type=int, required=True, help="documents to move from the end of train into tune")
    p.add_argument("--bos-id", type=int, default=1, help="BOS token id that starts each document (default 1)")
    p.add_argument("--shard-tokens", type=int, default=TOKENS_PER_SHARD,
                   help=f"tokens per tune shard (default: the challenge's {TOKENS_PER_SHARD:,})")
    common(p)  # --quiet is accepted for uniform scripts; the split has no progress bar
    p.set_defaults(func=_cmd_split)

    for name, summary in (("verify", "check shards and the train/val/tune splits; exit 1 on a problem"),
                          ("info", "report shard statistics, fingerprints and overlap between splits")):
        p = cmds.add_parser(name, help=summary,
                            description=summary[0].upper() + summary[1:] + ". Checks every shard's header and "
                            "size, counts tokens and documents (BOS), prints val_fingerprint (sha256 of the val "
                            "tokens, uint16 little-endian, shards in order) and val documents found in train; with "
                            "tune shards also tune_fingerprint and tune documents found in train or val.")
        p.add_argument("dir", help="folder with fineweb_{val,train,tune}_*.bin shards")
        p.add_argument("--bos-id", type=int, default=1, help="BOS token id that starts each document (default 1)")
        p.add_argument("--max-overlap-docs", type=int, default=0,
                       help="documents allowed to appear in two splits (val in train, tune in train, tune in val; "
                            "each counted apart) before verify fails (default 0)")
        p.add_argument("--examples", type=int, default=5, help="overlapping documents to list (default 5)")
        p.add_argument("--tokenizer", help="SentencePiece model the shards should match: every id must be below its "
                                           "piece count (default: the vocabulary a fineweb10B_spN folder name says)")
        p.add_argument("--vocab-size", type=int, help="check every id against this vocabulary instead")
        common(p)
        p.set_defaults(func=_cmd_inspect)
