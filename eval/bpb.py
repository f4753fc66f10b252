"""Byte-exact bits per byte: per-token byte LUTs from a SentencePiece model and the float64 accumulator."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from submission.runtime import read_tokenizer


@dataclass
class ByteLUTs:
    """base_bytes[id]: UTF-8 bytes of the piece without its leading U+2581 (byte-fallback 1, control/unknown 0);
    has_leading_space[id]: the piece starts with U+2581; is_boundary[id]: control/unknown/unused id (0 bytes)."""
    base_bytes: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray

    def token_bytes(self, prev: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Bytes of each target given the token before it: the leading space counts unless prev is a boundary."""
        return self.base_bytes[target] + (self.has_leading_space[target] & ~self.is_boundary[prev])

    def to_torch(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(self.base_bytes, dtype=torch.int32, device=device),
                torch.as_tensor(self.has_leading_space, device=device),
                torch.as_tensor(self.is_boundary, device=device))


def build_byte_luts(sp, vocab_size: int | None = None) -> ByteLUTs:
    """LUTs for a sentencepiece.SentencePieceProcessor, padded to vocab_size (padding ids are boundaries)."""
    n = sp.get_piece_size()
    size = max(n, vocab_size or n)
    base = np.zeros(size, dtype=np.int32)
    space = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(base, space, boundary)


def byte_luts(tokenizer_path: str, vocab_size: int) -> ByteLUTs:
    """build_byte_luts of the SentencePiece model file at `tokenizer_path` for a model of `vocab_size` ids; a tokenizer
    with more pieces than that is refused (the wrong tokenizer for this model)."""
    sp = read_tokenizer(tokenizer_path)[0]
    if sp.get_piece_size() > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {sp.get_piece_size()} pieces but the model's "
                         f"vocab_size is {vocab_size} (wrong tokenizer? set VOCAB_SIZE)")
    return build_byte_luts(sp, vocab_size)


def token_bytes_torch(luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], prev: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor:
    """Torch version of ByteLUTs.token_bytes for tensors already on the scoring device."""
    base, space, boundary = luts
    return base[target] + (space[target] & ~boundary[prev]).to(base.dtype)


class BPBAccumulator:
    """Sums of NLL (nats), scored tokens and bytes in float64; all-reduced across ranks before reading."""

    def __init__(self, device="cpu"):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, nll: torch.Tensor, num_bytes: torch.Tensor) -> None:
        """nll: per-target NLL in nats; num_bytes: per-target bytes (same shape)."""
        self.sums[0] += nll.double().sum()
        self.sums[1] += nll.numel()
        self.sums[2] += num_bytes.double().sum()

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums)

    @property
    def tokens(self) -> int:
        return int(self.sums[1].item())

    @property
    def bytes(self) -> int:
        return int(self.sums[2].item())

    @property
    def val_loss(self) -> float:
        """Mean NLL per token in nats."""
        return (self.sums[0] / self.sums[1]).item()

    @property
    def val_bpb(self) -> float:
        return (self.sums[0] / math.log(2) / self.sums[2]).item()
