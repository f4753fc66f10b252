"""GPTQ calibration data: the model samples its own tokens through a KV-cached decoder, or (flagged) train tokens."""
from __future__ import annotations

import time
import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from eval.progress import packable_progress_bar
from submission.config import check_ranges, within
from submission.data import read_shard, shard_paths
from submission.model import GPT, CastedLinear, KVCache, plain_linears
from tools.quant.gptq import HessianStats, collect_hessians

CALIB_SOURCES = ("generated", "train")


@dataclass
class CalibConfig:
    """Where GPTQ's Hessians come from. Defaults follow the record: 64 x 2048 self-generated tokens, temperature 0.8."""
    calib_source: str = "generated"
    """"generated": the trained model samples its own tokens (data-free, legal after the training cap); "train": the
    first tokens of the train shards, legal only if reading them and collecting the Hessians fits inside the 600 s
    training budget (lower MAX_WALLCLOCK_SECONDS to leave room; the quantize stage checks and logs it)."""
    calib_seqs: int = 64
    """Calibration sequences. Generation decodes all of them as one batch."""
    calib_seq_len: int = 2048
    """Tokens per sequence, the leading BOS included."""
    calib_temperature: float = 0.8
    """Sampling temperature: below 1 keeps the samples on the model's typical text (the record's choice)."""
    calib_seed: int = 1234
    """Seed of the sampling noise, so a run's calibration set is reproducible."""
    calib_batch_seqs: int = 8
    """Sequences per forward while collecting Hessians (activation memory, not the result, depends on it)."""

    # Each number's allowed values (submission.config.check_ranges); the others are checked in __post_init__.
    RANGES: typing.ClassVar[dict] = {
        "calib_seqs": ">= 1", "calib_temperature": "> 0", "calib_seed": ">= 0", "calib_batch_seqs": ">= 1"}

    def __post_init__(self):
        check_ranges(self)
        if self.calib_source not in CALIB_SOURCES:
            raise ValueError(f"CALIB_SOURCE={self.calib_source!r}: choose one of {', '.join(CALIB_SOURCES)} "
                             f"(CalibConfig.calib_source={self.calib_source!r})")
        if not within(self.calib_seq_len, ">= 2"):
            raise ValueError(f"CALIB_SEQ_LEN={self.calib_seq_len!r}: need calib_seq_len >= 2, the leading BOS and "
                             "at least one token")


@torch.no_grad()
def generate(model: GPT, cfg: CalibConfig, cuda_graph: bool = True, progress: bool = True) -> Tensor:
    """cfg.calib_seqs sequences of cfg.calib_seq_len tokens [N, T] (long, on the model's device), each BOS then
    temperature samples; deterministic for a seed on a given device. The model decodes one position per step from
    a KVCache (GPT.logits(tok, cache=...): the model's own forward, so nothing here can drift from it), with the
    late-QAT blend skipped (plain_linears: it must be off, and costs ~12 kernels per linear per step).

    Sampling is Gumbel-max (argmax of logits / temperature + Gumbel noise): no host sync inside the loop, unlike
    torch.multinomial's checks. Noise is drawn outside the step in chunks of positions from a seeded generator, so the
    step holds no random state and can be replayed as a CUDA graph (on CUDA when cuda_graph). Record model, 64 x 2048
    tokens, one H100: 2.7 ms per step replayed, 13.3 ms eager (launch-bound); 5.6 s in all, against 174 s for 8 x 2048
    with the record stack's cache-less generator. Graph and eager gave the same tokens. Through the model's own
    forward, the sp8192 recipe (15 block runs per token, vocabulary 8192) decoded 64 x 2048 in 7.1 s on one H200.
    """
    device = model.tok_emb.weight.device
    n, length, bos, vocab = cfg.calib_seqs, cfg.calib_seq_len, model.cfg.bos_id, model.cfg.vocab_size
    was_training = model.training
    model.eval()
    cache = KVCache(model, n, length)
    tokens = torch.full((n, length), bos, dtype=torch.long, device=device)
    chunk = min(64, length - 1)
    noise = torch.empty(chunk, n, vocab, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.calib_seed)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)

    def one_step() -> None:
        pos = cache.pos.clone()
        with autocast:
            logits = model.logits(tokens.index_select(1, pos), cache=cache)[:, 0]  # advances cache.pos
        sample = (logits / cfg.calib_temperature + noise.index_select(0, pos % chunk).squeeze(0)).argmax(-1)
        tokens.index_copy_(1, pos + 1, sample[:, None])

    with plain_linears(model):
        run = one_step
        if cuda_graph and device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up before capture, as CUDA graphs require
                for _ in range(2):
                    one_step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_step()
            run = graph.replay
        tokens.fill_(bos)
        cache.reset()
        for t in packable_progress_bar(range(length - 1), desc="calibration decode", unit="tok", disable=not progress):
            if t % chunk == 0:  # Gumbel noise -log(E), E ~ Exp(1), for the next `chunk` positions
                noise.exponential_(generator=gen).log_().neg_()
            run()
    model.train(was_training)
    return tokens


def train_tokens(data_dir: str, cfg: CalibConfig) -> Tensor:
    """The first calib_seqs * calib_seq_len tokens of the train shards as [N, T] (CPU, long)."""
    need = cfg.calib_seqs * cfg.calib_seq_len
    parts, have = [], 0
    for path in shard_paths(f"{data_dir}/fineweb_train_*.bin"):
        parts.append(torch.from_numpy(read_shard(path)[:need - have].astype("int64")))
        have += len(parts[-1])
        if have == need:
            return torch.cat(parts).view(cfg.calib_seqs, cfg.calib_seq_len)
    raise ValueError(f"train shards in {data_dir} hold {have} tokens, fewer than calib_seqs * calib_seq_len = {need} "
                     "(lower CALIB_SEQS or CALIB_SEQ_LEN)")


def hessian_modules(model: GPT) -> dict[str, CastedLinear]:
    """Every CastedLinear by its state-dict weight name (attention, MLP, BigramHash and value-embedding projections),
    except an untied output head, whose Hessian is head_hessian's."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, CastedLinear)
            and m is not model.lm_head}


def head_hessian(model: GPT) -> dict[str, torch.nn.Module]:
    """The output head's weight name -> the module whose output the head reads (the final norm): the tied
    embedding's Hessian as a head, for GPTQ of the embedding (QuantConfig.gptq_tied_embedding)."""
    return {"tok_emb.weight" if model.lm_head is None else "lm_head.weight": model.final_norm}


@dataclass
class Calibration:
    """Hessians of every CastedLinear's input and what producing them took."""
    stats: HessianStats
    source: str
    sequences: int
    tokens: int
    data_seconds: float      # generating the sequences, or reading them from the train shards
    hessian_seconds: float
    token_ids: Tensor | None = None  # the calibration sequences [N, T] (the bit allocation's probes score on them)


def synced_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def calibrate(model: GPT, cfg: CalibConfig, data_dir: str = "", progress: bool = True) -> Calibration:
    """Calibration tokens (generated, or the train shards' first tokens) and the Hessians of a full forward on them."""
    device = model.tok_emb.weight.device
    t0 = synced_clock(device)
    tokens = generate(model, cfg, progress=progress) if cfg.calib_source == "generated" else train_tokens(data_dir, cfg)
    t1 = synced_clock(device)
    batches = [tokens[i:i + cfg.calib_batch_seqs].to(device) for i in range(0, len(tokens), cfg.calib_batch_seqs)]

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            return model.hidden(x)
    stats = collect_hessians(model, batches, hessian_modules(model), forward=forward, progress=progress,
                             outputs=head_hessian(model))
    t2 = synced_clock(device)
    return Calibration(stats, cfg.calib_source, len(tokens), tokens.numel(), t1 - t0, t2 - t1, tokens)
