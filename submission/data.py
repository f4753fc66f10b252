"""Challenge-format token shards: validated reading, atomic writing, and the deterministic distributed loader."""
from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKENS_PER_SHARD = 100_000_000


class ShardError(ValueError):
    """A file that is not a valid challenge shard; the message names the file and the fix."""


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header "
                         "(truncated download? delete it and fetch/build again)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"shard {path}: header magic {header[0]} != {SHARD_MAGIC} (not a challenge shard?)")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"shard {path}: header version {header[1]} != {SHARD_VERSION} (unsupported format)")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise ShardError(f"shard {path}: header says {num_tokens} tokens = {expected} bytes but the file has "
                         f"{size} bytes (truncated or corrupt: delete it and fetch/build again)")
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Return the shard's tokens as uint16 after validating header and size."""
    num_tokens = read_header(path)
    return np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write tokens as a shard atomically (temp file + rename), so a crash never leaves a half shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 65535):
        raise ValueError(f"shard {path}: token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_paths(pattern: str) -> list[str]:
    """Sorted shard files matching a glob (or a directory + split given as 'dir/fineweb_val_*.bin')."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r} (run `pgolf data download` or `pgolf data build`)")
    return paths


def check_vocab(tokens: np.ndarray, vocab_size: int | None, source: str | os.PathLike) -> np.ndarray:
    """The tokens, after checking every id is below vocab_size (None: not checked). An id beyond the model's
    embedding table would crash training with an IndexError (a device-side assert on the GPU) or be scored wrong."""
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"shard {source}: token id {int(tokens[bad])} at position {bad} is outside the model's "
                         f"vocabulary of {vocab_size} (shards tokenized with another tokenizer? use the matching "
                         "data, or set VOCAB_SIZE for this tokenizer)")
    return tokens


def load_tokens(pattern: str, vocab_size: int | None = None) -> np.ndarray:
    """Concatenate every shard matching the pattern (used for the validation set); ids checked below vocab_size."""
    return np.concatenate([check_vocab(read_shard(p), vocab_size, p) for p in shard_paths(pattern)])


class DataAccessError(RuntimeError):
    """Training data was read after the training time cap (illegal under the challenge rules)."""


class TokenLoader:
    """Deterministic training batches for any world size and gradient accumulation.

    In order (the default), each optimizer step consumes one contiguous chunk of the token stream, cut into
    world_size * grad_accum micro-batches of (micro_tokens + 1) tokens; rank r at accumulation step a takes
    micro-batch a * world + r. Shuffled, each step takes the next windows of seq_len + 1 tokens from the epoch's
    seeded permutation of all windows (cut at a new seeded phase every epoch, never across a shard's end), micro-batch
    m getting windows m * B .. m * B + B - 1. Either way the step's token set depends only on the global batch, so
    1 GPU with 8x accumulation sees exactly what 8 GPUs see. Reads are logged; after close() any read raises
    DataAccessError.
    """

    def __init__(self, pattern: str, global_tokens: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, vocab_size: int | None = None, shuffle: bool = False, seed: int = 0):
        micro = world_size * grad_accum
        if global_tokens % (micro * seq_len):
            raise ValueError(f"global batch {global_tokens} tokens is not divisible by world_size*grad_accum*seq_len"
                             f" = {micro}*{seq_len}")
        self.paths = shard_paths(pattern)
        self.seq_len, self.rank, self.world_size, self.grad_accum = seq_len, rank, world_size, grad_accum
        self.vocab_size = vocab_size  # every shard read is checked against it (check_vocab)
        self.micro_tokens = global_tokens // micro
        self.shard_index, self.pos = -1, 0
        self.tokens = np.empty(0, dtype=np.uint16)
        self.tokens_read = 0
        self.last_read_time: float | None = None
        self.closed_at: float | None = None
        self.shuffle, self.seed, self.epoch = shuffle, seed, -1
        if shuffle:  # memory-mapped shards (checked once each) and the windows not yet taken this epoch
            self.shards = [check_vocab(np.memmap(p, dtype="<u2", mode="r", offset=HEADER_BYTES,
                                                 shape=(read_header(p),)), vocab_size, p) for p in self.paths]
            self.windows = np.empty((0, 2), dtype=np.int64)

    def _epoch_windows(self) -> np.ndarray:
        """[N, 2] (shard, offset) of every window of the next epoch, in its seeded random order."""
        self.epoch += 1
        rng = np.random.default_rng([self.seed, self.epoch])
        phase = int(rng.integers(self.seq_len))
        counts = [max(0, (len(shard) - 1 - phase) // self.seq_len) for shard in self.shards]
        parts = [np.stack([np.full(n, i), phase + self.seq_len * np.arange(n)], 1) for i, n in enumerate(counts) if n]
        if not parts:
            raise ValueError(f"train shards {self.paths[0]}...: fewer than seq_len + 1 = {self.seq_len + 1} tokens "
                             "per shard, no training window fits")
        windows = np.concatenate(parts)
        return windows[rng.permutation(len(windows))]

    def _take_windows(self, n: int) -> np.ndarray:
        """The next n windows' tokens [n, seq_len + 1], moving on to the next epoch's order when one runs out."""
        while len(self.windows) < n:
            self.windows = np.concatenate([self.windows, self._epoch_windows()])
        take, self.windows = self.windows[:n], self.windows[n:]
        return np.stack([self.shards[s][o:o + self.seq_len + 1] for s, o in take.tolist()])

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.shard_index = (self.shard_index + 1) % len(self.paths)
                path = self.paths[self.shard_index]
                self.tokens, self.pos = check_vocab(read_shard(path), self.vocab_size, path), 0
            part = self.tokens[self.pos:self.pos + n]
            parts.append(part)
            self.pos += len(part)
            n -= len(part)
        return np.concatenate(parts)

    def next_batch(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's grad_accum micro-batches of one step, each (inputs, targets) shaped [B, seq_len]."""
        if self.closed_at is not None:
            raise DataAccessError(f"training data read {time.perf_counter() - self.closed_at:.1f}s after the "
                                  "training cap closed the loader (only data-free work may run after the cap)")
        if self.shuffle:
            rows = self.micro_tokens // self.seq_len
            batch = self._take_windows(rows * self.world_size * self.grad_accum).astype(np.int64)
            self.tokens_read += batch.size
            self.last_read_time = time.perf_counter()
            mine = [batch[m * rows:(m + 1) * rows] for m in (a * self.world_size + self.rank
                                                               for a in range(self.grad_accum))]
            return [(w[:, :-1], w[:, 1:]) for w in mine]
        span = self.micro_tokens + 1
        chunk = self._take(span * self.world_size * self.grad_accum)
        self.tokens_read += len(chunk)
        self.last_read_time = time.perf_counter()
        out = []
        for a in range(self.grad_accum):
            i = (a * self.world_size + self.rank) * span
            buf = chunk[i:i + span].astype(np.int64)
            out.append((buf[:-1].reshape(-1, self.seq_len), buf[1:].reshape(-1, self.seq_len)))
        return out

    def close(self) -> float | None:
        """Mark the training cap: later reads are errors. Returns the time of the last read (perf_counter)."""
        self.closed_at = time.perf_counter()
        return self.last_read_time
