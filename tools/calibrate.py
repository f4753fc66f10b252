"""GPTQ calibration data: the model samples its own tokens through a KV-cached decoder, or (flagged) train tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from submission.data import read_shard, shard_paths
from submission.model import (GPT, CastedLinear, apply_partial_rope, bigram_bucket, remove_self_value, rms_norm,
                              rope_tables)
from tools.gptq import HessianStats, collect_hessians

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

    def __post_init__(self):
        if self.calib_source not in CALIB_SOURCES:
            raise ValueError(f"CalibConfig.calib_source={self.calib_source!r}: choose one of {CALIB_SOURCES}")
        if self.calib_seqs < 1 or self.calib_seq_len < 2 or self.calib_batch_seqs < 1:
            raise ValueError(f"CalibConfig: need calib_seqs >= 1, calib_seq_len >= 2, calib_batch_seqs >= 1; got "
                             f"{self.calib_seqs}, {self.calib_seq_len}, {self.calib_batch_seqs}")
        if not self.calib_temperature > 0:
            raise ValueError(f"CalibConfig.calib_temperature={self.calib_temperature}: must be > 0")


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype GPT.hidden computes in: bfloat16 on CUDA, the parameters' float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class KVCacheDecoder:
    """One-token-at-a-time GPT forward with per-layer key/value caches; its logits equal GPT.logits at every position.

    The step mirrors GPT.hidden, Block.forward and Attention.forward with the model's own weights and functions:
    BigramHash buckets (prev, cur) with bucket 0 at position 0 and at a BOS; SmearGate mixes the previous position's
    embedding (kept from the last step) except at position 0 and at a BOS; partial RoPE at the absolute position;
    XSA against the current value; value embeddings on the last layers; U-Net skips; the second embedding; resid_mix;
    the softcap; and the speedrun switches when on (per-layer bigram rows, and the key offset from the previous
    position's key, kept from the last step).
    Linears use plain weights (cast once): CastedLinear's late-QAT blend costs ~12 kernels per call, and it is the
    identity with QAT off, which the constructor checks. Shapes never change between steps and the position is a
    device tensor, so a step can be captured in a CUDA graph.
    """

    def __init__(self, model: GPT, batch: int, max_len: int):
        cfg = self.cfg = model.cfg
        self.model = model
        device = model.tok_emb.weight.device
        on = [name for name, m in model.named_modules() if isinstance(m, CastedLinear) and float(m.qat_mix) != 0]
        if on:
            raise ValueError(f"KVCacheDecoder: late QAT is on in {on[:3]} (call model.set_qat(False) first)")
        self.dtype = compute_dtype(device)
        hd, kv = cfg.head_dim, cfg.num_kv_heads
        self.k = torch.zeros(cfg.num_layers, batch, kv, max_len, hd, dtype=self.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.prev_embed = torch.zeros(batch, cfg.model_dim, device=device)
        self.prev_k = torch.zeros(cfg.num_layers, batch, 1, kv, hd, dtype=self.dtype, device=device) \
            if cfg.key_offset_last_n else None
        self.cos, self.sin = rope_tables(max_len, max(cfg.rope_dims, 2), cfg.rope_base, device)
        self.positions = torch.arange(max_len, device=device)

        def w(m: CastedLinear) -> Tensor:
            return m.weight.detach().to(self.dtype)
        # q, k and v read the same input: one matmul instead of three
        self.qkv = [torch.cat([w(b.attn.c_q), w(b.attn.c_k), w(b.attn.c_v)]) for b in model.blocks]
        self.attn_out = [w(b.attn.c_proj) for b in model.blocks]
        self.mlp_in = [w(b.mlp.c_fc) for b in model.blocks]
        self.mlp_out = [w(b.mlp.c_proj) for b in model.blocks]
        self.value_proj = w(model.value_proj) if cfg.value_embed_last_n else None
        head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
        self.head = head.detach().to(self.dtype)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.prev_embed.zero_()
        if self.prev_k is not None:
            self.prev_k.zero_()

    def _embed(self, tok: Tensor, prev: Tensor, first: Tensor) -> Tensor:
        m = self.model
        x = m.tok_emb(tok)
        pair = torch.stack((prev, tok), 1)
        if m.bigram is not None:
            bucket = bigram_bucket(pair, m.bigram.buckets, m.bigram.bos_id)[:, 1].masked_fill(first, 0)
            table = m.bigram.table(bucket)
            x = x + (m.bigram.scale * F.linear(table, m.bigram.proj.weight.to(table.dtype))).to(x.dtype)
        if m.smear is not None:
            # At position 0 the "previous" embedding is the current one, so SmearGate's (prev - x) term is exactly 0.
            prev_embed = torch.where(first, x, self.prev_embed)
            self.prev_embed.copy_(x)
            x = m.smear(torch.stack((prev_embed, x), 1), pair)[:, 1]
        return x

    def _attention(self, i: int, x: Tensor, ve: Tensor | None, pos: Tensor, key_shift=None) -> Tensor:
        cfg, attn = self.cfg, self.model.blocks[i].attn
        B, H, Hkv, D = x.size(0), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = F.linear(x, self.qkv[i]).split([H * D, Hkv * D, Hkv * D], dim=-1)
        if ve is not None:
            v = v + ve
        q, k, v = q.view(B, 1, H, D), k.view(B, 1, Hkv, D), v.view(B, 1, Hkv, D)
        if cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if cfg.rope_dims:
            cos, sin = self.cos.index_select(1, pos), self.sin.index_select(1, pos)
            q = apply_partial_rope(q, cos, sin, cfg.rope_dims)
            k = apply_partial_rope(k, cos, sin, cfg.rope_dims)
        if key_shift is not None:  # the transform sees (previous key, this key), as the model's sees a sequence
            k, prev = key_shift(torch.cat((self.prev_k[i], k), 1))[:, 1:], k
            self.prev_k[i].copy_(prev)
        q = q * attn.q_gain.to(q.dtype)[None, None, :, None]
        self.k[i].index_copy_(2, pos, k.transpose(1, 2).to(self.dtype))
        self.v[i].index_copy_(2, pos, v.transpose(1, 2).to(self.dtype))
        # Query heads grouped under their KV head ([B, Hkv, H/Hkv, D]), as SDPA's repeat_interleave pairs them.
        scores = (q.view(B, Hkv, H // Hkv, D) @ self.k[i].transpose(-1, -2)).float() * D ** -0.5
        scores = scores.masked_fill(self.positions > pos, float("-inf"))
        y = (scores.softmax(-1).to(self.v.dtype) @ self.v[i]).reshape(B, 1, H, D).to(q.dtype)
        if attn.xsa:
            y = remove_self_value(y, v)
        return F.linear(y.reshape(B, 1, H * D), self.attn_out[i])

    def step(self, tok: Tensor, prev: Tensor, pos: Tensor) -> Tensor:
        """Logits [B, V] (float32) after token `tok` [B] at position `pos` (a 1-element long tensor), `prev` [B] being
        the token before it (ignored at position 0). Writes this position's keys and values into the cache."""
        m, cfg, dtype = self.model, self.cfg, self.dtype
        first = pos == 0
        x = x0 = rms_norm(self._embed(tok, prev, first)).to(dtype)[:, None]
        ve = None
        if cfg.value_embed_last_n:
            ve = F.linear(m.value_embed(tok[:, None]).to(dtype), self.value_proj)
        skips, shift = [], None
        e2 = rms_norm(m.embed2(tok)).to(dtype)[:, None] if m.embed2 is not None else None
        extra = m.speedrun and m.speedrun.decode_inputs(torch.stack((prev, tok), 1), first, bigram_bucket, dtype)
        for i, block in enumerate(m.blocks):
            if i >= m.num_encoder and skips:
                x = x + m.skip_weights[i - m.num_encoder].to(dtype) * skips.pop()
            if e2 is not None:
                x = x + m.embed2_weights[i].to(dtype) * e2
            if extra:
                x, shift = m.speedrun.before_block(i, x, extra)
            j = i - (cfg.num_layers - cfg.value_embed_last_n)
            if block.resid_mix is not None:
                mix = block.resid_mix.to(x.dtype)
                x = mix[0] * x + mix[1] * x0
            layer_ve = ve * m.value_scales[j].to(dtype) if ve is not None and j >= 0 else None
            x = x + block.attn_scale.to(x.dtype) * self._attention(i, rms_norm(x) * block.norm_scale, layer_ve, pos,
                                                                   shift)
            h = F.linear(rms_norm(x) * block.norm_scale, self.mlp_in[i])
            x = x + block.mlp_scale.to(x.dtype) * F.linear(F.leaky_relu(h, 0.5).square(), self.mlp_out[i])
            if i < m.num_encoder:
                skips.append(x)
        z = F.linear(rms_norm(x), self.head).float()[:, 0]
        c = cfg.logit_softcap
        return c * torch.tanh(z / c) if c else z


@torch.no_grad()
def generate(model: GPT, cfg: CalibConfig, cuda_graph: bool = True, progress: bool = True) -> Tensor:
    """cfg.calib_seqs sequences of cfg.calib_seq_len tokens [N, T] (long, on the model's device), each BOS then
    temperature samples; deterministic for a seed on a given device.

    Sampling is Gumbel-max (argmax of logits / temperature + Gumbel noise): no host sync inside the loop, unlike
    torch.multinomial's checks. Noise is drawn outside the step in chunks of positions from a seeded generator, so the
    step holds no random state and can be replayed as a CUDA graph (on CUDA when cuda_graph). Record model, 64 x 2048
    tokens, one H100: 2.7 ms per step replayed, 13.3 ms eager (launch-bound); 5.6 s in all, against 174 s for 8 x 2048
    with the record stack's cache-less generator. Graph and eager gave the same tokens.
    """
    device = model.tok_emb.weight.device
    n, length, bos, vocab = cfg.calib_seqs, cfg.calib_seq_len, model.cfg.bos_id, model.cfg.vocab_size
    was_training = model.training
    model.eval()
    decoder = KVCacheDecoder(model, n, length)
    tokens = torch.full((n, length), bos, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    chunk = min(64, length - 1)
    noise = torch.empty(chunk, n, vocab, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.calib_seed)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)

    def one_step() -> None:
        tok = tokens.index_select(1, pos).squeeze(1)
        prev = tokens.index_select(1, (pos - 1).clamp_min(0)).squeeze(1)
        with autocast:
            logits = decoder.step(tok, prev, pos)
        sample = (logits / cfg.calib_temperature + noise.index_select(0, pos % chunk).squeeze(0)).argmax(-1)
        tokens.index_copy_(1, pos + 1, sample[:, None])
        pos.add_(1)

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
    pos.zero_()
    decoder.reset()
    for t in tqdm(range(length - 1), desc="calibration decode", unit="tok", disable=not progress):
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
    """Every CastedLinear by its state-dict weight name (attention, MLP, BigramHash and value-embedding projections)."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, CastedLinear)}


@dataclass
class Calibration:
    """Hessians of every CastedLinear's input and what producing them took."""
    stats: HessianStats
    source: str
    sequences: int
    tokens: int
    data_seconds: float      # generating the sequences, or reading them from the train shards
    hessian_seconds: float


def _synced_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def calibrate(model: GPT, cfg: CalibConfig, data_dir: str = "", progress: bool = True) -> Calibration:
    """Calibration tokens (generated, or the train shards' first tokens) and the Hessians of a full forward on them."""
    device = model.tok_emb.weight.device
    t0 = _synced_clock(device)
    tokens = generate(model, cfg, progress=progress) if cfg.calib_source == "generated" else train_tokens(data_dir, cfg)
    t1 = _synced_clock(device)
    batches = [tokens[i:i + cfg.calib_batch_seqs].to(device) for i in range(0, len(tokens), cfg.calib_batch_seqs)]

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            return model.hidden(x)
    stats = collect_hessians(model, batches, hessian_modules(model), forward=forward, progress=progress)
    t2 = _synced_clock(device)
    return Calibration(stats, cfg.calib_source, len(tokens), tokens.numel(), t1 - t0, t2 - t1)
