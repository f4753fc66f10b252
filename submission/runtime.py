"""Run plumbing shared by the trainer, the pipeline and the tools: the key:value log, output checks, the identities a
run records (code hash, tokenizer), CUDA settings and the distributed setup."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed as dist
from torch._inductor import config as inductor_config

from submission.config import packed


class Logger:
    """`key:value` lines to stdout and RUN_DIR/train.log, rank 0 only; `file_only` lines skip stdout."""

    def __init__(self, path: Path | None, rank: int):
        self.rank = rank
        self.file = open(path, "a", buffering=1) if path is not None and rank == 0 else None

    def __call__(self, *fields: str, file_only: bool = False, **kv) -> None:
        if self.rank:
            return
        line = " ".join([*fields, *(f"{k}:{_fmt(v)}" for k, v in kv.items())])
        if not file_only:
            print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def writable_check(path: Path, setting: str = "output") -> None:
    """Before the work: make `path`'s folder and check a file can be written beside it, so a bad output location
    fails at the start in one line naming it (issue 20: `--out` into a missing folder failed after the evaluation)."""
    probe = path.with_name(f".{path.name}.probe{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{setting} {path}: cannot write it ({err.strerror}: {err.filename}); pass a writable "
                         f"{setting}") from None


def read_tokenizer(path: str) -> tuple[spm.SentencePieceProcessor, dict]:
    """The SentencePiece model and its identity, which checkpoints, artifacts, train.log and eval.json record: its
    path, the sha256 of its bytes and its piece count (a tokenizer other than the model's scores a wrong BPB)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path}: {'a folder' if Path(path).is_dir() else 'not found'}, expected a "
                                "SentencePiece .model file (set TOKENIZER_PATH or run `pgolf data download`)")
    data = Path(path).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    return sp, {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "pieces": sp.get_piece_size()}


def tokenizer_identity(path: str) -> dict:
    """{path, sha256, pieces} of a SentencePiece model file (read_tokenizer)."""
    return read_tokenizer(path)[1]


def check_tokenizer(recorded: dict | None, used: dict, source, log, allow: bool = False) -> None:
    """Refuse a tokenizer whose bytes differ from the one `source` (a checkpoint or artifact) records, unless `allow`;
    a source from before identities were recorded is logged as unchecked."""
    if not recorded:
        log("tokenizer_unchecked", source=source)
    elif recorded["sha256"] != used["sha256"] and not allow:
        raise ValueError(f"tokenizer {used['path']} (sha256 {used['sha256'][:16]}, {used['pieces']} pieces) is not "
                         f"the one {source} was made with: {recorded['path']} (sha256 {recorded['sha256'][:16]}, "
                         f"{recorded['pieces']} pieces); pass that tokenizer (TOKENIZER_PATH, --tokenizer), or "
                         "--allow-other-tokenizer to use this one on purpose")


def code_hash() -> str:
    """sha256 of the code that runs: the kit's submission/, eval/ and tools/ sources sorted by path, or, inside the
    packed single file (no kit beside it), the script's own bytes."""
    if packed():
        return "packed:" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    root = Path(__file__).resolve().parents[1]
    paths = sorted(p for d in ("submission", "eval", "tools") for p in root.glob(f"{d}/**/*.py"))
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def configure_cuda() -> None:
    """TF32 matmuls and SDPA's cuDNN backend: measured 405 TF/s vs 267 TF/s for the flash backend at
    48 x 2048, head dim 64 (H100). Inductor's mix-order reductions off: one kernel for a row reduction and column
    sums made the first block's backward a 4.5 ms kernel (13 inputs, 5 column sums; P1 step 83.90 ms without
    them, 87.81 with, H100, torch 2.11)."""
    inductor_config.triton.mix_order_reduction = False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is one process on cuda:0 or the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return rank, world_size, device
