"""The dataset work behind `pgolf data` (tools/commands/data.py): download the challenge's shards, build shards from
documents, train a tokenizer, hold out a tune split, verify a dataset."""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import tempfile
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np
import sentencepiece as spm
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from eval.progress import progress_bar
from submission.data import (HEADER_BYTES, TOKENS_PER_SHARD, ShardError, read_header, read_shard, shard_paths,
                             write_shard)
from tools.paths import expect_path

SPLITS = ("val", "train")
# Held-out training documents for choosing evaluation settings (issue 21): never trained on (the trainer globs only
# fineweb_train_*.bin) and never the val set, so tuning cannot fit the score it is judged by.
TUNE = "tune"


def _bar(progress: bool, **kwargs):
    # off a terminal (a log, CI) a few `progress:...` lines instead of the bar's redraws
    return progress_bar(disable=not progress, **kwargs)


def _shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


# ---------------------------------------------------------------------------------------------------- documents

def open_documents(path: Path) -> TextIO:
    """Open a jsonl, jsonl.xz or jsonl.gz file as UTF-8 text (universal newlines, like the reference prep script)."""
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a document file; undecodable or corrupt files are a ValueError naming the file."""
    line_no = 0
    try:
        with open_documents(path) as f:
            for line_no, line in enumerate(f, 1):
                yield line_no, line
    except (UnicodeDecodeError, lzma.LZMAError, gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{path}: unreadable after line {line_no} ({err}); expected UTF-8 jsonl, "
                         "optionally .xz or .gz compressed") from None


def iter_documents(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield the "text" of each line of each file in order; blank lines are skipped, anything else malformed is
    a ValueError naming the file and line."""
    for path in map(Path, paths):
        for line_no, line in _lines(path):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno}); each "
                                 'line must be one object like {"text": "..."}') from None
            text = doc.get("text") if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{line_no}: no "text" string in this line (keys: '
                                 f'{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}); each '
                                 'line must be one object like {"text": "..."}')
            yield text


def count_documents(paths: Iterable[str | os.PathLike]) -> int:
    """Number of non-blank lines (documents) without parsing them: sizes a --val-fraction split."""
    return sum(1 for path in map(Path, paths) for _, line in _lines(path) if line.strip())


def _existing_files(paths: Iterable[str | os.PathLike], what: str) -> list[Path]:
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"no {what} given")
    for path in paths:
        expect_path(path, "file", what, "pass .jsonl, .jsonl.gz, .jsonl.xz or text files")
    return paths


def _load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found (a SentencePiece .model: `pgolf data download` "
                                "fetches the challenge's, `pgolf data tokenizer` trains one)")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise ValueError(f"tokenizer {path}: not a SentencePiece model ({err})") from None


# ---------------------------------------------------------------------------------------------------- build

# Documents per worker task: large enough to amortize the pickling, small enough to keep every core busy
# (the reference prep_shards.py uses the same 512).
DOC_CHUNK = 512
_worker_sp: spm.SentencePieceProcessor | None = None


def _init_encoder(model_path: str) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode_chunk(task: tuple[str, list[str]]) -> tuple[str, np.ndarray, int]:
    """BOS + ids for each document, no EOS (the challenge's format), concatenated in order."""
    split, texts = task
    bos = _worker_sp.bos_id()
    ids: list[int] = []
    for text in texts:
        ids.append(bos)
        ids.extend(_worker_sp.encode(text))
    return split, np.array(ids, dtype=np.uint16), len(texts)


def _tasks(texts: Iterator[str], split: str | None, val_docs: int | None,
           tune_docs: int = 0) -> Iterator[tuple[str, list[str]]]:
    """Chunks of documents tagged with their split: the first val_docs val (none with split), the next tune_docs
    tune, the rest split or train. A chunk never straddles a split boundary."""
    val_end = 0 if split else val_docs
    tune_end = val_end + tune_docs
    chunk: list[str] = []
    chunk_split = None
    for index, text in enumerate(texts):
        doc_split = "val" if index < val_end else TUNE if index < tune_end else split or "train"
        if chunk and (doc_split != chunk_split or len(chunk) == DOC_CHUNK):
            yield chunk_split, chunk
            chunk = []
        chunk_split = doc_split
        chunk.append(text)
    if chunk:
        yield chunk_split, chunk


def _ordered_imap(pool, fn, tasks: Iterator, in_flight: int) -> Iterator:
    # Pool.imap reads its whole input eagerly (all document text in memory); this keeps at most in_flight
    # chunks queued and still returns results in input order.
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class _ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens (the last one shorter)."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.parts: list[np.ndarray] = []
        self.buffered = self.tokens = self.docs = 0
        self.names: list[str] = []
        self.sha256 = hashlib.sha256()

    def add(self, tokens: np.ndarray, docs: int) -> None:
        self.sha256.update(tokens.astype("<u2", copy=False).tobytes())
        self.tokens += tokens.size
        self.docs += docs
        self.parts.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.parts)
            self._write(flat[:self.shard_tokens])
            self.parts, self.buffered = [flat[self.shard_tokens:]], flat.size - self.shard_tokens

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.parts))
            self.parts, self.buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        name = _shard_name(self.split, len(self.names))
        write_shard(self.folder / name, tokens)
        self.names.append(name)


@dataclass
class BuildReport:
    """What `build_shards` wrote: per written split the document count, token count and shard file names;
    val_fingerprint is sha256 of the val tokens (as `pgolf data verify` computes it), None without val;
    tune_fingerprint the same of the tune tokens, None without a tune split (it identifies the documents a setting
    was tuned on, as val_fingerprint identifies the scored ones)."""
    out: str
    tokenizer: str
    docs: dict[str, int]
    tokens: dict[str, int]
    shards: dict[str, list[str]]
    val_fingerprint: str | None
    tune_fingerprint: str | None = None


def build_shards(docs: Iterable[str | os.PathLike], tokenizer: str | os.PathLike, out: str | os.PathLike, *,
                 split: str | None = None, val_docs: int | None = None, val_fraction: float | None = None,
                 tune_docs: int = 0, workers: int | None = None, shard_tokens: int = TOKENS_PER_SHARD,
                 overwrite: bool = False, progress: bool = True) -> BuildReport:
    """Tokenize documents into challenge shards `fineweb_<split>_%06d.bin` in out.

    Exactly one of: split ("val" or "train": every document goes there), val_docs (the first N documents are
    val, the rest train) or val_fraction (the first round(F * total) documents are val). tune_docs N > 0 sends the
    next N documents (after val; the first N with split="train") to a third split, tune (fineweb_tune_*.bin): held-out
    training documents to choose evaluation settings on, so they are not in train. Splits are by whole document, so
    no document is in two. Output is byte-identical to the reference prep_shards.py. Shards are staged in a hidden
    folder inside out and renamed into place only when every document was encoded, so bad input leaves nothing
    behind; existing shards of a written split are an error unless overwrite (writing train also counts existing
    tune shards: left beside a new train split they would hold train documents).
    """
    docs = _existing_files(docs, "documents file")
    tokenizer, out = Path(tokenizer), Path(out)
    if sum(x is not None for x in (split, val_docs, val_fraction)) != 1:
        raise ValueError("choose exactly one of split, val_docs, val_fraction (--split, --val-docs, --val-fraction)")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {SPLITS}")
    if val_docs is not None and val_docs < 0:
        raise ValueError(f"val_docs {val_docs} must be >= 0")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction {val_fraction} must be strictly between 0 and 1")
    if tune_docs < 0:
        raise ValueError(f"tune_docs {tune_docs} must be >= 0 (--tune-docs: documents after val held out for tuning)")
    if tune_docs and split == "val":
        raise ValueError(f"tune_docs {tune_docs} with split 'val': tune documents come out of train; use --split "
                         "train, --val-docs or --val-fraction")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens {shard_tokens} must be >= 1")
    sp = _load_tokenizer(tokenizer)
    if sp.get_piece_size() > 65536:
        raise ValueError(f"tokenizer {tokenizer}: {sp.get_piece_size()} pieces do not fit the uint16 shard format")
    if sp.bos_id() < 0:
        raise ValueError(f"tokenizer {tokenizer} has no BOS piece; the challenge format puts BOS before every "
                         "document (train it with bos_id=1, as `pgolf data tokenizer` does)")
    workers = workers or os.cpu_count() or 1

    total = count_documents(docs) if val_fraction is not None else None
    if val_fraction is not None:
        val_docs = round(val_fraction * total)
    written = ((split,) if split else SPLITS) + ((TUNE,) if tune_docs else ())
    replaced = written + ((TUNE,) if "train" in written and not tune_docs else ())
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for s in replaced for p in sorted(out.glob(f"fineweb_{s}_*.bin"))]
    if existing and not overwrite:
        raise ValueError(f"{out} already has {len(existing)} {'/'.join(replaced)} shards ({existing[0].name}, ...); "
                         "pass --overwrite to replace them or choose another --out")

    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        writers = {s: _ShardWriter(staging, s, shard_tokens) for s in written}
        tasks = _tasks(iter_documents(docs), split, val_docs, tune_docs)
        with _bar(progress, total=total, unit="doc", desc="build") as bar:
            if workers == 1:
                _init_encoder(str(tokenizer))
                results: Iterable = map(_encode_chunk, tasks)
                pool = None
            else:
                pool = Pool(workers, initializer=_init_encoder, initargs=(str(tokenizer),))
                results = _ordered_imap(pool, _encode_chunk, tasks, in_flight=4 * workers)
            try:
                for doc_split, tokens, count in results:
                    writers[doc_split].add(tokens, count)
                    bar.update(count)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
        for writer in writers.values():
            writer.close()
        if val_docs is not None and writers["val"].docs < val_docs:
            raise ValueError(f"--val-docs {val_docs} but {', '.join(map(str, docs))} hold only "
                             f"{writers['val'].docs} documents")
        if tune_docs and writers[TUNE].docs < tune_docs:
            held = sum(w.docs for w in writers.values())
            raise ValueError(f"--tune-docs {tune_docs} after {val_docs or 0} val documents needs "
                             f"{(val_docs or 0) + tune_docs} documents but {', '.join(map(str, docs))} hold only "
                             f"{held}; pass --tune-docs {held - (val_docs or 0)} or fewer")
        for path in existing:
            path.unlink()
        for writer in writers.values():
            for name in writer.names:
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildReport(
        out=str(out), tokenizer=str(tokenizer),
        docs={s: w.docs for s, w in writers.items()}, tokens={s: w.tokens for s, w in writers.items()},
        shards={s: w.names for s, w in writers.items()},
        val_fingerprint=writers["val"].sha256.hexdigest() if "val" in writers and writers["val"].tokens else None,
        tune_fingerprint=writers[TUNE].sha256.hexdigest() if TUNE in writers else None)


# ---------------------------------------------------------------------------------------------------- tokenizer

@dataclass(frozen=True)
class TokenizerSpec:
    """SentencePiece trainer settings. Defaults are the challenge's (openai/parameter-golf
    data/download_hf_docs_and_tokenize.py): each document is one training sentence."""
    vocab_size: int
    model_type: str = "bpe"
    character_coverage: float = 0.999
    byte_fallback: bool = True  # unseen characters become <0xNN> byte pieces instead of unk
    split_digits: bool = True
    normalization_rule_name: str = "nmt_nfkc"
    add_dummy_prefix: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3
    hard_vocab_limit: bool = False
    input_sentence_size: int = 0  # 0: train on every document; N: SentencePiece samples N documents
    max_sentence_length: int = 4192  # SentencePiece's default, kept by the challenge: longer documents are skipped

    def __post_init__(self):
        # SentencePiece's own checks, reported before reading any document.
        specials = 4 + (256 if self.byte_fallback else 0)
        if self.vocab_size <= specials:
            raise ValueError(f"vocab_size {self.vocab_size} must exceed the {specials} special and byte pieces")
        if 0 < self.input_sentence_size <= 100:
            raise ValueError(f"input_sentence_size {self.input_sentence_size} must be 0 (all documents) or > 100")


@dataclass
class TokenizerReport:
    """The trained model and vocab files, their piece count, the documents fed to the trainer and how many of
    those SentencePiece skipped for exceeding max_sentence_length bytes."""
    model: str
    vocab: str
    vocab_size: int
    docs: int
    docs_over_max_length: int


def train_tokenizer(docs: Iterable[str | os.PathLike], out_prefix: str | os.PathLike, spec: TokenizerSpec,
                    threads: int | None = None, progress: bool = True) -> TokenizerReport:
    """Train a SentencePiece model on the documents; writes `<out_prefix>.model` and `.vocab` atomically."""
    docs = _existing_files(docs, "documents file")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out_prefix.with_name(f".{out_prefix.name}.tmp{os.getpid()}")
    counts = {"docs": 0, "long": 0}
    input_errors: list[ValueError] = []  # SentencePiece wraps iterator errors in its own; report ours as raised

    def sentences() -> Iterator[str]:
        with _bar(progress, unit="doc", desc="read") as bar:
            try:
                for text in iter_documents(docs):
                    # NUL is SentencePiece's string terminator; the challenge replaced it the same way.
                    text = text.replace("\x00", " ").strip()
                    if text:
                        counts["docs"] += 1
                        counts["long"] += len(text.encode("utf-8")) > spec.max_sentence_length
                        bar.update()
                        yield text
            except ValueError as err:
                input_errors.append(err)
                raise

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_prefix=str(tmp_prefix),
                                       num_threads=threads or os.cpu_count() or 1, minloglevel=1, **asdict(spec))
        model = spm.SentencePieceProcessor(model_file=f"{tmp_prefix}.model")
        os.replace(f"{tmp_prefix}.model", f"{out_prefix}.model")
        os.replace(f"{tmp_prefix}.vocab", f"{out_prefix}.vocab")
    except RuntimeError as err:
        if input_errors:
            raise input_errors[0] from None
        raise RuntimeError(f"SentencePiece training on {', '.join(map(str, docs))} failed: {err}") from None
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
    return TokenizerReport(model=f"{out_prefix}.model", vocab=f"{out_prefix}.vocab",
                           vocab_size=model.get_piece_size(), docs=counts["docs"],
                           docs_over_max_length=counts["long"])


# ---------------------------------------------------------------------------------------------------- verify

@dataclass
class SplitStats:
    """One split's token stream, shards in load order (the trainer's sorted glob). docs counts BOS tokens;
    tokens_before_first_bos > 0 means the stream starts inside a document (or --bos-id is wrong)."""
    shards: list[str] = field(default_factory=list)
    tokens: int = 0
    docs: int = 0
    max_token_id: int = -1
    tokens_before_first_bos: int = 0


@dataclass
class OverlapExample:
    """A val document (its index in the val stream) found verbatim in train, and where it starts in train."""
    val_doc: int
    train_shard: str
    train_offset: int
    tokens: int


@dataclass
class DatasetReport:
    """Shard statistics, the val fingerprint (sha256 of the val tokens as uint16 little-endian, all val shards
    in order) and the train/val document overlap; problems lists what makes `pgolf data verify` fail.

    With a tune split (fineweb_tune_*.bin, held-out training documents for choosing evaluation settings): its
    statistics, tune_fingerprint (computed as val_fingerprint) and the tune documents also found verbatim in train
    (tuning on trained text flatters a setting) and in val (tuning on scored text is fitting the score)."""
    directory: str
    bos_id: int
    val: SplitStats
    train: SplitStats
    val_fingerprint: str | None
    overlap_docs: int
    overlap_examples: list[OverlapExample]
    problems: list[str]
    tune: SplitStats = field(default_factory=SplitStats)
    tune_fingerprint: str | None = None
    tune_train_overlap_docs: int = 0
    tune_val_overlap_docs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _documents(paths: list[str], bos_id: int, stats: SplitStats, bar, keep_lengths: np.ndarray | None = None,
               sha256=None) -> Iterator[tuple[bytes, int, int, str, int]]:
    """Walk a split's stream document by document (a document runs from a BOS to the next one, across shard
    boundaries); fill stats and yield (blake2b digest, length, doc index, shard name, offset) of each document,
    or only of those whose length is in keep_lengths (a document can only equal one of the same length)."""
    keep = None if keep_lengths is None else set(keep_lengths.tolist())
    open_hash = None  # the document still open at the end of the previous shard
    open_len = open_index = open_offset = 0
    open_shard = ""
    for path in paths:
        tokens = read_shard(path)
        bar.update(tokens.size)
        name = Path(path).name
        stats.tokens += tokens.size
        if sha256 is not None:
            sha256.update(tokens.tobytes())
        if not tokens.size:
            continue
        stats.max_token_id = max(stats.max_token_id, int(tokens.max()))
        starts = np.flatnonzero(tokens == bos_id)
        head = int(starts[0]) if starts.size else tokens.size
        if open_hash is None:
            stats.tokens_before_first_bos += head
        else:
            open_hash.update(tokens[:head].tobytes())
            open_len += head
        if not starts.size:
            continue
        if open_hash is not None and (keep is None or open_len in keep):
            yield open_hash.digest(), open_len, open_index, open_shard, open_offset
        lengths = np.diff(starts, append=tokens.size)
        inner = np.arange(starts.size - 1)  # the last document may continue in the next shard
        if keep_lengths is not None:
            inner = inner[np.isin(lengths[:-1], keep_lengths)]
        for i in inner.tolist():
            start = int(starts[i])
            digest = hashlib.blake2b(tokens[start:start + int(lengths[i])].tobytes(), digest_size=16).digest()
            yield digest, int(lengths[i]), stats.docs + i, name, start
        last = int(starts[-1])
        open_hash = hashlib.blake2b(tokens[last:].tobytes(), digest_size=16)
        open_len, open_index, open_shard, open_offset = tokens.size - last, stats.docs + starts.size - 1, name, last
        stats.docs += starts.size
    if open_hash is not None and (keep is None or open_len in keep):
        yield open_hash.digest(), open_len, open_index, open_shard, open_offset


def _split_paths(directory: Path, split: str) -> list[str]:
    try:
        return shard_paths(str(directory / f"fineweb_{split}_*.bin"))
    except FileNotFoundError:
        return []


def vocab_of_directory(directory: str | os.PathLike) -> int | None:
    """The vocabulary a downloaded dataset's folder name promises (fineweb10B_sp8192 -> 8192), else None."""
    match = re.fullmatch(r"fineweb10B_sp(\d+)", Path(directory).resolve().name)
    return int(match[1]) if match else None


def verify_dataset(directory: str | os.PathLike, bos_id: int = 1, max_overlap_docs: int = 0, max_examples: int = 5,
                   progress: bool = True, vocab_size: int | None = None) -> DatasetReport:
    """Check every shard the trainer would load from directory and compare val with train document by document;
    tune shards, when present, are checked too and their documents compared with train and val (each overlap is
    allowed max_overlap_docs documents). With vocab_size, every token id must be below it (a problem names the split,
    the largest id and the vocabulary).

    Raises ShardError listing every invalid shard (bad magic/version, size not matching the header) and
    FileNotFoundError when the directory holds no shards. Overlap and an unusable val stream are reported in
    `problems`, which `pgolf data verify` turns into a non-zero exit and `pgolf data info` only prints.
    """
    directory = expect_path(directory, "folder", "dataset directory", "the folder holding fineweb_*_*.bin shards")
    paths = {split: _split_paths(directory, split) for split in SPLITS + (TUNE,)}
    if not any(paths.values()):
        nested = sorted(p.name for p in (directory / "datasets").glob("fineweb10B_*") if p.is_dir())
        hint = (f" (downloads live one level down: {directory / 'datasets' / nested[0]})" if nested
                else " (run `pgolf data download` or `pgolf data build`)")
        raise FileNotFoundError(f"no fineweb_val_*.bin or fineweb_train_*.bin shards in {directory}{hint}")
    errors, total = [], 0
    for path in paths["val"] + paths[TUNE] + paths["train"]:
        try:
            total += read_header(path)
        except ShardError as err:
            errors.append(str(err))
    if errors:
        raise ShardError("\n".join(errors))

    val, tune, train = (SplitStats(shards=[Path(p).name for p in paths[s]]) for s in ("val", TUNE, "train"))
    sha256, tune_sha256 = hashlib.sha256(), hashlib.sha256()
    val_docs: dict[bytes, list[int]] = {}
    tune_docs: dict[bytes, list[int]] = {}  # digest -> tune document indices, compared with val and train
    examples: list[OverlapExample] = []
    matched: set[bytes] = set()
    tune_matched: set[bytes] = set()
    with _bar(progress, total=total, unit="tok", unit_scale=True, desc="verify") as bar:
        lengths = set()
        for digest, length, index, _, _ in _documents(paths["val"], bos_id, val, bar, sha256=sha256):
            val_docs.setdefault(digest, []).append(index)
            lengths.add(length)
        for digest, length, index, _, _ in _documents(paths[TUNE], bos_id, tune, bar, sha256=tune_sha256):
            tune_docs.setdefault(digest, []).append(index)
            lengths.add(length)
        keep = np.fromiter(lengths, dtype=np.int64, count=len(lengths))
        for digest, length, _, shard, offset in _documents(paths["train"], bos_id, train, bar, keep_lengths=keep):
            if digest in val_docs:
                if len(examples) < max_examples and digest not in matched:
                    examples.append(OverlapExample(val_docs[digest][0], shard, offset, length))
                matched.add(digest)
            if digest in tune_docs:
                tune_matched.add(digest)
    overlap = sum(len(val_docs[d]) for d in matched)
    tune_train = sum(len(tune_docs[d]) for d in tune_matched)
    tune_val = sum(len(indices) for d, indices in tune_docs.items() if d in val_docs)

    problems = []
    if not val.shards:
        problems.append(f"no val shards (fineweb_val_*.bin) in {directory}")
    elif not val.docs:
        problems.append(f"val stream has no BOS token {bos_id} (wrong --bos-id?)")
    elif val.tokens_before_first_bos:
        problems.append(f"val stream starts with {val.tokens_before_first_bos} tokens before the first BOS "
                        f"{bos_id}: its first document is cut (missing shard or wrong --bos-id?)")
    if tune.shards and not tune.docs:
        problems.append(f"tune stream has no BOS token {bos_id} (wrong --bos-id?)")
    elif tune.tokens_before_first_bos:
        problems.append(f"tune stream starts with {tune.tokens_before_first_bos} tokens before the first BOS "
                        f"{bos_id}: its first document is cut (missing shard or wrong --bos-id?)")
    for split, stats in (("val", val), (TUNE, tune), ("train", train)):
        if vocab_size is not None and stats.tokens and stats.max_token_id >= vocab_size:
            problems.append(f"{split} shards hold token id {stats.max_token_id}, outside the vocabulary of "
                            f"{vocab_size} (tokenized with another tokenizer? check --tokenizer/--vocab-size, or "
                            "rebuild the shards with the model's tokenizer)")
    if overlap > max_overlap_docs:
        problems.append(f"{overlap} of {val.docs} val documents also appear verbatim in train (allowed "
                        f"{max_overlap_docs}): a train/val leak; rebuild with a document-level split")
    for count, other, harm in ((tune_train, "train", "settings tuned on trained text"),
                               (tune_val, "val", "settings tuned on the scored text")):
        if count > max_overlap_docs:
            problems.append(f"{count} of {tune.docs} tune documents also appear verbatim in {other} (allowed "
                            f"{max_overlap_docs}): {harm}; rebuild with --tune-docs or re-split with `pgolf data "
                            "split`")
    return DatasetReport(directory=str(directory), bos_id=bos_id, val=val, train=train,
                         val_fingerprint=sha256.hexdigest() if val.shards else None, overlap_docs=overlap,
                         overlap_examples=examples, problems=problems, tune=tune,
                         tune_fingerprint=tune_sha256.hexdigest() if tune.shards else None,
                         tune_train_overlap_docs=tune_train, tune_val_overlap_docs=tune_val)


# ---------------------------------------------------------------------------------------------------- split

@dataclass
class SplitReport:
    """What `split_tune` did: the documents, tokens and shards of the new tune split and its fingerprint (sha256
    of the tune tokens, as `pgolf data verify` computes tune_fingerprint), what the train split keeps, and the
    train shards rewritten shorter or removed."""
    directory: str
    tune_docs: int
    tune_tokens: int
    tune_shards: list[str]
    tune_fingerprint: str
    train_docs: int
    train_tokens: int
    train_shards: list[str]
    rewritten: list[str]
    removed: list[str]


def split_tune(directory: str | os.PathLike, tune_docs: int, bos_id: int = 1,
               shard_tokens: int = TOKENS_PER_SHARD) -> SplitReport:
    """Move the last tune_docs documents of the train split (a document starts at a BOS, as verify counts them) into
    a tune split, fineweb_tune_%06d.bin: held-out training documents to choose evaluation settings on, for data that
    exists only as shards (the challenge's downloads have no text to rebuild from with --tune-docs).

    The train shard holding the cut is rewritten shorter (removed if the cut is its first token) and the train
    shards after it are removed. Loss-free: the tune shards are written to a hidden folder and renamed into place
    before any train shard changes, and the shortened shard replaces the old one by rename, so an interruption leaves
    every document in train or tune (at worst in both, which verify reports as tune/train overlap). Refused when tune
    shards exist or when train would keep no document.
    """
    directory = expect_path(directory, "folder", "dataset directory", "the folder holding fineweb_*_*.bin shards")
    if tune_docs < 1:
        raise ValueError(f"--tune-docs {tune_docs} must be >= 1 (documents moved from the end of train into tune)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens {shard_tokens} must be >= 1")
    existing = _split_paths(directory, TUNE)
    if existing:
        raise ValueError(f"{directory} already has {len(existing)} tune shards ({Path(existing[0]).name}, ...): keep "
                         "that split, or delete fineweb_tune_*.bin (their documents then leave the dataset) and split "
                         "again")
    paths = _split_paths(directory, "train")
    if not paths:
        raise FileNotFoundError(f"no fineweb_train_*.bin shards in {directory} to split (run `pgolf data download` "
                                "or `pgolf data build`)")
    errors, sizes = [], []
    for path in paths:
        try:
            sizes.append(read_header(path))
        except ShardError as err:
            errors.append(str(err))
    if errors:
        raise ShardError("\n".join(errors))

    # Walk back from the last shard to the tune_docs-th last BOS: the cut (shard index, offset).
    tail: list[np.ndarray] = []  # the shards from the cut's to the last, read
    found, cut = 0, None
    for index in range(len(paths) - 1, -1, -1):
        tokens = read_shard(paths[index])
        tail.insert(0, tokens)
        starts = np.flatnonzero(tokens == bos_id)
        if found + starts.size >= tune_docs:
            cut = index, int(starts[starts.size - (tune_docs - found)])
            break
        found += starts.size
    kept_docs = 0 if cut is None else int(np.count_nonzero(tail[0][:cut[1]] == bos_id)) + sum(
        int(np.count_nonzero(np.memmap(p, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,)) == bos_id))
        for p, n in zip(paths[:cut[0]], sizes) if n)
    if cut is None or not kept_docs:
        held = found if cut is None else tune_docs
        raise ValueError(f"--tune-docs {tune_docs} but the train split in {directory} holds {held} documents (BOS "
                         f"{bos_id}) and must keep at least one; pass --tune-docs {held - 1} or fewer")

    index, offset = cut
    staging = Path(tempfile.mkdtemp(prefix=".split-", dir=directory))
    try:
        writer = _ShardWriter(staging, TUNE, shard_tokens)
        for i, tokens in enumerate(tail):
            part = tokens[offset:] if i == 0 else tokens
            writer.add(part, int(np.count_nonzero(part == bos_id)))
        writer.close()
        shortened = Path(paths[index]).name
        if offset:
            write_shard(staging / shortened, tail[0][:offset])
        for name in writer.names:  # tune first: from here on every document is in tune, train or both
            os.replace(staging / name, directory / name)
        rewritten, removed = ([shortened], []) if offset else ([], [shortened])
        if offset:
            os.replace(staging / shortened, paths[index])
        else:
            Path(paths[index]).unlink()
        for path in paths[index + 1:]:
            Path(path).unlink()
            removed.append(Path(path).name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kept = [Path(p).name for p in paths[:index + (1 if offset else 0)]]
    return SplitReport(directory=str(directory), tune_docs=writer.docs, tune_tokens=writer.tokens,
                       tune_shards=writer.names, tune_fingerprint=writer.sha256.hexdigest(), train_docs=kept_docs,
                       train_tokens=sum(sizes[:index]) + offset, train_shards=kept, rewritten=rewritten,
                       removed=removed)


# ---------------------------------------------------------------------------------------------------- download

# The challenge's published data; sp8192 lives in a second repo (the Hugging Face dataset kevclark/parameter-golf).
DEFAULT_REPOS = {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf"}
REMOTE_ROOT = "datasets"  # every file of the export sits under this folder of the dataset repo


@dataclass
class DownloadReport:
    """What `download` left on disk: the shard folder, the tokenizer files, the cached manifest (None if the repo
    has none), files fetched and files already valid locally, validated shard and token counts, and notes
    on anything taken from the naming pattern instead of the manifest."""
    repo_id: str
    variant: str
    shard_dir: str
    tokenizer_files: list[str]
    manifest: str | None
    fetched: list[str]
    skipped: list[str]
    val_shards: int
    train_shards: int
    val_tokens: int
    train_tokens: int
    notes: list[str]


def _check_json(path: Path) -> None:
    try:
        if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
            raise ValueError(f"{path}: manifest is not a JSON object")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: manifest is not valid JSON ({err})") from None


def _check_tokenizer_file(path: Path) -> None:
    if path.suffix == ".model":
        _load_tokenizer(path)
    elif path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")


class _HubFetcher:
    """Makes local files valid copies of repo files: keeps a valid local file, else downloads into a staging
    folder (huggingface_hub resumes partial downloads there), validates, and renames into place."""

    def __init__(self, repo_id: str, staging: Path):
        self.repo_id, self.staging = repo_id, staging
        self.fetched: list[str] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []

    def get(self, remote: str, local: Path, check: Callable[[Path], object]) -> bool:
        """True once local is valid; False if the repo has no such file."""
        if local.exists():
            try:
                check(local)
                self.skipped.append(str(local))
                return True
            except ValueError as err:
                self.notes.append(f"re-fetching {local}: {err}")
        try:
            staged = Path(hf_hub_download(repo_id=self.repo_id, filename=remote, repo_type="dataset",
                                          local_dir=self.staging))
        except LocalEntryNotFoundError as err:
            raise RuntimeError(f"cannot reach the Hugging Face hub for {self.repo_id}/{remote} ({err}); check the "
                               "network, or copy the files into place and run again") from None
        except EntryNotFoundError:
            return False
        except HfHubHTTPError as err:
            raise RuntimeError(f"Hugging Face hub error for dataset {self.repo_id}, file {remote}: {err} "
                               "(check --repo-id and, for a private repo, HF_TOKEN)") from None
        try:
            check(staged)
        except ValueError as err:
            staged.unlink(missing_ok=True)
            invalid = ShardError if remote.endswith(".bin") else ValueError
            raise invalid(f"downloaded {self.repo_id}/{remote} is invalid: {err}") from None
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, local)
        self.fetched.append(str(local))
        return True


def _manifest_plan(manifest: dict | None, dataset: str, variant: str, notes: list[str]
                   ) -> tuple[int | None, int | None, list[str]]:
    """(val shard count, train shard count, tokenizer paths in the repo) from the manifest; a count is None and
    the tokenizer paths follow the naming pattern where the manifest has no usable entry (noted)."""
    pattern_tokenizer = [f"tokenizers/fineweb_{variant[2:]}_bpe.model", f"tokenizers/fineweb_{variant[2:]}_bpe.vocab"]
    if manifest is None:
        notes.append("repo has no manifest.json: using the naming pattern for shards and tokenizer")
        return None, None, pattern_tokenizer
    entries = manifest.get("datasets")
    entry = next((e for e in entries if isinstance(e, dict) and e.get("name") == dataset), None) \
        if isinstance(entries, list) else None
    if entry is None:
        notes.append(f"manifest.json has no datasets entry named {dataset}: using the naming pattern")
        return None, None, pattern_tokenizer
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    counts = []
    for key in ("files_val", "files_train"):
        value = stats.get(key)
        if isinstance(value, int) and value >= 0:
            counts.append(value)
        else:
            counts.append(None)
            notes.append(f"manifest.json entry {dataset} has no stats.{key}: using the naming pattern")
    tokenizers = manifest.get("tokenizers")
    name = entry.get("tokenizer_name")
    tok = next((t for t in tokenizers if isinstance(t, dict) and t.get("name") == name), None) \
        if isinstance(tokenizers, list) and name else None
    paths = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok and tok.get(k)]
    if not paths:
        notes.append(f"manifest.json has no tokenizer files for {dataset} (tokenizer_name {name!r}): "
                     "using the naming pattern")
        paths = pattern_tokenizer
    return counts[0], counts[1], paths


def download(variant: str = "sp8192", train_shards: int = 1, out: str | os.PathLike = "data",
             repo_id: str | None = None, progress: bool = True) -> DownloadReport:
    """Fetch the challenge's published data for a variant into `<out>/datasets/fineweb10B_<variant>/` (val shards
    and the first train_shards train shards) and `<out>/tokenizers/`.

    Manifest-driven (shard counts and tokenizer files from the repo's datasets/manifest.json, cached in
    `<out>/datasets/manifest--<owner>--<name>.json`), falling back to the naming pattern with a note where the
    manifest has no entry. Resumable: files already present and valid are kept; a truncated one is fetched
    again. Every shard header is validated at the end.
    """
    if variant not in DEFAULT_REPOS:
        raise ValueError(f"variant {variant!r} must be one of {sorted(DEFAULT_REPOS)}")
    if train_shards < 0:
        raise ValueError(f"train_shards {train_shards} must be >= 0")
    repo_id = repo_id or DEFAULT_REPOS[variant]
    dataset = f"fineweb10B_{variant}"
    out = Path(out)
    shard_dir, tokenizer_dir = out / "datasets" / dataset, out / "tokenizers"
    staging = out / "datasets" / ".download"
    fetcher = _HubFetcher(repo_id, staging)

    manifest_path = out / "datasets" / f"manifest--{repo_id.replace('/', '--')}.json"
    found = fetcher.get(f"{REMOTE_ROOT}/manifest.json", manifest_path, _check_json)
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if found else None
    val_count, train_available, tokenizer_paths = _manifest_plan(manifest, dataset, variant, fetcher.notes)
    if train_available is not None and train_shards > train_available:
        raise ValueError(f"{repo_id} has {train_available} {variant} train shards, asked for {train_shards}")

    def shard(split: str, index: int) -> bool:
        name = _shard_name(split, index)
        return fetcher.get(f"{REMOTE_ROOT}/datasets/{dataset}/{name}", shard_dir / name, read_header)

    val_shards = 0
    files = (1 if val_count is None else val_count) + train_shards + len(tokenizer_paths)
    with _bar(progress, total=files, unit="file", desc="download") as bar:
        # Without a manifest count, val shards are fetched in order until the next index is missing.
        while val_count is None or val_shards < val_count:
            if not shard("val", val_shards):
                if val_count is None and val_shards:
                    break
                raise FileNotFoundError(f"{repo_id} has no {REMOTE_ROOT}/datasets/{dataset}/"
                                        f"{_shard_name('val', val_shards)} (wrong --variant or --repo-id?)")
            val_shards += 1
            bar.update()
        for index in range(train_shards):
            if not shard("train", index):
                raise FileNotFoundError(f"{repo_id} has no {REMOTE_ROOT}/datasets/{dataset}/"
                                        f"{_shard_name('train', index)}: it holds {index} train shards")
            bar.update()
        tokenizer_files = []
        for remote in tokenizer_paths:
            local = tokenizer_dir / PurePosixPath(remote).name
            if not fetcher.get(f"{REMOTE_ROOT}/{remote}", local, _check_tokenizer_file):
                raise FileNotFoundError(f"{repo_id} has no {REMOTE_ROOT}/{remote}")
            tokenizer_files.append(str(local))
            bar.update()
    shutil.rmtree(staging, ignore_errors=True)

    val_tokens = sum(read_header(shard_dir / _shard_name("val", i)) for i in range(val_shards))
    train_tokens = sum(read_header(shard_dir / _shard_name("train", i)) for i in range(train_shards))
    return DownloadReport(repo_id=repo_id, variant=variant, shard_dir=str(shard_dir), tokenizer_files=tokenizer_files,
                          manifest=str(manifest_path) if found else None, fetched=fetcher.fetched,
                          skipped=fetcher.skipped, val_shards=val_shards, train_shards=train_shards,
                          val_tokens=val_tokens, train_tokens=train_tokens, notes=fetcher.notes)


TUNE_RECORD = "tune_split.txt"  # in a run directory: the tuning split its data held out when it trained


def fingerprint(tokens: np.ndarray) -> str:
    """sha256 of the tokens as uint16 little-endian, as `pgolf data verify` prints tune_fingerprint."""
    return hashlib.sha256(np.asarray(tokens).astype("<u2").tobytes()).hexdigest()


def tune_split_fingerprint(directory: str | os.PathLike) -> str | None:
    """fingerprint() of the tuning split's tokens in `directory`, None when it has no fineweb_tune_*.bin."""
    paths = _split_paths(Path(directory), TUNE)
    return fingerprint(np.concatenate([read_shard(path) for path in paths])) if paths else None


def held_out_at_start(argv: list[str]) -> str:
    """The fingerprint of the tuning split ("none" without one) in the data directory a run of these KEY=VALUE
    settings (and the environment) will train on, read before it trains: a split made while it trains was not held
    out of what it read."""
    from submission.config import parse_overrides, resolve
    from submission.train import overwrite_asked
    from submission.train_gpt import Settings
    cli = parse_overrides(argv)
    overwrite_asked(cli)  # not a setting
    settings = Settings()
    resolve(settings, cli=cli)
    return tune_split_fingerprint(settings.train.data_dir) or "none"


def record_tune_split(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                      held_out: str | None = None) -> str | None:
    """Write RUN_DIR/tune_split.txt: the fingerprint of the tuning split held out of the data a run trained on
    ("none" without one), in the key:value form `pgolf data split` prints; data_dir defaults to the one the run's
    config.json names. held_out: the fingerprint as the run started (held_out_at_start; default: read now). Returns
    the fingerprint written (None on a rank other than 0 of a torchrun, which writes nothing)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    if data_dir is None:
        data_dir = json.loads((Path(run_dir) / "config.json").read_text())["train"]["data_dir"]
    held_out = held_out or tune_split_fingerprint(data_dir) or "none"
    path = Path(run_dir) / TUNE_RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"tune_fingerprint:{held_out}\ndata_dir:{data_dir}\n")
    os.replace(tmp, path)
    return held_out


def check_tune_split(run_dir: str | os.PathLike, split_dir: str | os.PathLike, split_fingerprint: str) -> str | None:
    """Whether a run may be tuned on this tuning split: its RUN_DIR/tune_split.txt must name the split's fingerprint
    (the split was held out of its training data). ValueError when it names another split or none; a warning (str)
    when the run has no record (a packed program's run, or one trained before runs kept it); None when it matches."""
    path = Path(run_dir) / TUNE_RECORD
    if not path.is_file():
        return (f"{path} is missing, so whether {split_dir}'s tuning split was held out of this run's training "
                "cannot be checked: tune only runs trained after `pgolf data split`")
    held = re.search(r"^tune_fingerprint:(\S+)$", path.read_text(), re.M)
    held_out = held.group(1) if held else "unreadable"
    if held_out != split_fingerprint:
        what = "no tuning split" if held_out == "none" else f"the tuning split {held_out[:16]}..."
        raise ValueError(f"{path}: the run trained with {what} held out, but {split_dir}'s tuning split is "
                         f"{split_fingerprint[:16]}...: its documents may be in the run's training data, and settings "
                         "tuned there would be tuned on training text. Hold the split out first (pgolf data split "
                         "DIR --tune-docs N), then train, then tune")
    return None


# ---------------------------------------------------------------------------------------------------- CLI
