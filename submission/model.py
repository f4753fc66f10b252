"""The record model: GQA attention with XSA and partial RoPE, BigramHash, SmearGate, value embeddings, U-Net skips,
depth recurrence, parallel residuals; one forward for training, scoring and KV-cached decoding."""
from __future__ import annotations

import importlib
import math
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from submission import kernels
from submission.config import ModelConfig, packed

try:  # FA3 (Hopper) when installed; otherwise torch SDPA
    from flash_attn_interface import flash_attn_func as _fa3
except ImportError:
    _fa3 = None


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def fake_quant(w: Tensor, bits: int, clip_sigmas: float = 0.0) -> Tensor:
    """Per-row symmetric int fake-quant with a straight-through gradient (late QAT). The row's step is its absmax /
    qmax, or with clip_sigmas = k > 0 the artifact's SD clip, k x std(row) / qmax (values beyond it clamp)."""
    qmax = 2 ** (bits - 1) - 1
    w_ = w.detach()
    clip = clip_sigmas * w_.std(dim=-1, keepdim=True) if clip_sigmas > 0 else w_.abs().amax(dim=-1, keepdim=True)
    scale = clip.clamp_min(1e-8) / qmax
    q = (w / scale).round().clamp(-qmax, qmax) * scale
    return w + (q - w).detach()


class Embedding(nn.Embedding):
    """nn.Embedding; on the GPU through kernels.embedding (a sort-based backward, steady under torch.compile)."""

    def forward(self, idx: Tensor) -> Tensor:
        return kernels.embedding(self.weight, idx) if kernels.available(idx) else super().forward(idx)


class CastedLinear(nn.Linear):
    """Linear kept in fp32 for the optimizer, computed in the input dtype; `qat_mix` blends in the int6 fake-quant.

    qat_mix is a buffer, not a Python flag: a compiled graph reads its value on every call, so turning QAT on
    after compilation cannot be constant-folded away (a real submission shipped its QAT dead that way).
    """

    def __init__(self, in_features: int, out_features: int, qat_bits: int = 6, qat_clip_sigmas: float = 0.0):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits, self.qat_clip_sigmas = qat_bits, qat_clip_sigmas
        self.register_buffer("qat_mix", torch.zeros(()), persistent=False)
        self.plain = False  # set by plain_linears(): QAT known off, skip the blend

    def qat_weight(self) -> Tensor:
        w = self.weight
        return w if self.plain else w + self.qat_mix * (fake_quant(w, self.qat_bits, self.qat_clip_sigmas) - w)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.qat_weight().to(x.dtype))


@contextmanager
def plain_linears(model: nn.Module):
    """Inside, every CastedLinear uses its weight as is: the QAT blend is the identity with QAT off, but costs ~12
    kernels per call, which dominate a one-token decode step. Refuses a model whose QAT is on."""
    linears = [m for m in model.modules() if isinstance(m, CastedLinear)]
    live = [name for name, m in model.named_modules() if isinstance(m, CastedLinear) and float(m.qat_mix) != 0]
    if live:
        raise ValueError(f"late QAT is on in {live[:3]} (call model.set_qat(False) first)")
    for m in linears:
        m.plain = True
    try:
        yield model
    finally:
        for m in linears:
            m.plain = False


def grouped_linear(x: Tensor, layers: tuple[CastedLinear, ...]) -> Tensor:
    """The layers' outputs side by side from one matrix product (their weights stay separate, e.g. for Muon).
    Layers with hooks are called one by one, so a hook (GPTQ's calibration) still sees its module's input."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in layers):
        return torch.cat([m(x) for m in layers], -1)
    return F.linear(x, torch.cat([m.qat_weight() for m in layers]).to(x.dtype))


def rope_tables(seq_len: int, rope_dims: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor, rope_dims: int) -> Tensor:
    """Rotate the first rope_dims of each head ([B, T, H, D]); the other dims carry no position."""
    rot, keep = x[..., :rope_dims], x[..., rope_dims:]
    half = rope_dims // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rotated, keep), dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]. FA3 if importable, else SDPA (cuDNN on GPU, see train).

    Query head h reads KV head h // (H / Hkv). K/V are repeated rather than passed with SDPA's enable_gqa: with it,
    cuDNN runs the same forward and backward kernels on the 4 KV heads plus a head reduction of the K/V gradients
    (fmha_reduce_head, 108 us per layer at 48 x 2048, H100, torch 2.11), 2.44 vs 2.41-2.43 ms per layer; on the GPU
    the q/k/v kernel writes the repeat and sums it back in its backward for less.
    """
    if _fa3 is not None and q.is_cuda:
        return _fa3(q, k, v, causal=True)
    group = q.size(2) // k.size(2)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2)


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: subtract from each head's output its projection on the normalized value vector of the same position.

    y [B, T, H, D], v [B, T, Hkv, D]; query heads are grouped onto their KV head without repeating v. On the GPU one
    Triton pass (submission/kernels.py) replaces the three Inductor made of this reference.
    """
    if kernels.available(y, y.size(-1)):
        return kernels.xsa(y, v)
    return xsa_reference(y, v)


def xsa_reference(y: Tensor, v: Tensor) -> Tensor:
    B, T, H, D = y.shape
    hkv = v.size(2)
    yg = y.reshape(B, T, hkv, H // hkv, D)
    # v / |v| by rsqrt: F.normalize's clamp/div/masked_fill backward cost 0.4-0.9 ms per P1 step (H100)
    vf = v.float()
    vn = (vf * torch.rsqrt(vf.square().sum(-1, keepdim=True) + 1e-24)).to(y.dtype).unsqueeze(3)
    yg = yg - (yg * vn).sum(-1, keepdim=True) * vn
    return yg.reshape(B, T, H, D)


class KVCache:
    """Keys and values of every block application, for decoding one token per call: GPT.logits(tok [B, 1],
    cache=cache) equals the full forward's logits at the cache's position, which then advances by one.

    The position is a 1-element device tensor and no shape changes between calls, so a decode step can be captured
    in a CUDA graph. Besides keys and values it keeps what features reading position t-1 need: the previous token
    (BigramHash, the per-layer bigram), the previous embedding (SmearGate) and each application's previous key (the
    key offset). Slots follow the layer schedule the model had when the cache was made (depth recurrence runs some
    blocks more than once: each run has its own keys).
    """

    def __init__(self, model: "GPT", batch: int, max_len: int):
        cfg = model.cfg
        device = model.tok_emb.weight.device
        self.dtype = torch.bfloat16 if device.type == "cuda" else model.tok_emb.weight.dtype
        self.slots = len(model.schedule())
        shape = (self.slots, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.prev_k = torch.zeros(self.slots, batch, 1, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype,
                                  device=device) if cfg.key_offset_last_n else None
        self.prev_tok = torch.zeros(batch, dtype=torch.long, device=device)
        self.prev_embed = torch.zeros(batch, 1, cfg.model_dim, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.arange(max_len, device=device)
        self.rope = rope_tables(max_len, max(cfg.rope_dims, 2), cfg.rope_base, device)

    def reset(self) -> None:
        for t in (self.k, self.v, self.prev_k, self.prev_tok, self.prev_embed, self.pos):
            if t is not None:
                t.zero_()

    def rope_at(self) -> tuple[Tensor, Tensor]:
        return self.rope[0].index_select(1, self.pos), self.rope[1].index_select(1, self.pos)

    def shift_key(self, slot: int, k: Tensor, key_shift) -> Tensor:
        """The key offset for one position: the transform sees (previous key, this key), as in a sequence."""
        shifted = key_shift(torch.cat((self.prev_k[slot], k), 1))[:, 1:]
        self.prev_k[slot].copy_(k)
        return shifted

    def attend(self, slot: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store this position's k, v [B, 1, Hkv, D]; attend q [B, 1, H, D] to every cached position up to it."""
        B, _, H, D = q.shape
        Hkv = k.size(2)
        self.k[slot].index_copy_(2, self.pos, k.transpose(1, 2).to(self.dtype))
        self.v[slot].index_copy_(2, self.pos, v.transpose(1, 2).to(self.dtype))
        # query heads grouped under their KV head ([B, Hkv, H/Hkv, D]), as causal_attention's repeat pairs them
        scores = (q.view(B, Hkv, H // Hkv, D) @ self.k[slot].transpose(-1, -2)).float() * D ** -0.5
        scores = scores.masked_fill(self.positions > self.pos, float("-inf"))
        y = scores.softmax(-1).to(self.dtype) @ self.v[slot]
        return y.reshape(B, 1, H, D).to(q.dtype)

    def advance(self, idx: Tensor) -> None:
        self.prev_tok.copy_(idx[:, -1])
        self.pos.add_(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, xsa: bool):
        super().__init__()
        self.cfg, self.xsa = cfg, xsa
        d, hd = cfg.model_dim, cfg.head_dim
        self.c_q = CastedLinear(d, cfg.num_heads * hd)
        self.c_k = CastedLinear(d, cfg.num_kv_heads * hd)
        self.c_v = CastedLinear(d, cfg.num_kv_heads * hd)
        self.c_proj = CastedLinear(cfg.num_heads * hd, d)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.q_gain_init))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], value_embed: Tensor | None, key_shift=None,
                cache: KVCache | None = None, slot: int = 0) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = grouped_linear(x, (self.c_q, self.c_k, self.c_v))
        if cfg.qk_norm and cfg.rope_dims and key_shift is None and cache is None and _fa3 is None and \
                kernels.available(x, D):
            # the lines below, the K/V repeat for SDPA and the gradient of qkv in one Triton pass each way
            q, k, v_rep, v = kernels.qkv_prep(qkv, value_embed, self.q_gain, rope[0][0, :T, 0], rope[1][0, :T, 0],
                                              H, Hkv)
            y = causal_attention(q, k, v_rep)
        else:
            q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), -1)
            q, k = q.view(B, T, H, D), k.view(B, T, Hkv, D)
            if value_embed is not None:
                v = v + value_embed
            v = v.view(B, T, Hkv, D)
            if cfg.qk_norm:
                q, k = rms_norm(q), rms_norm(k)
            if cfg.rope_dims:
                cos, sin = (rope[0][:, :T], rope[1][:, :T]) if cache is None else cache.rope_at()
                q = apply_partial_rope(q, cos, sin, cfg.rope_dims)
                k = apply_partial_rope(k, cos, sin, cfg.rope_dims)
            if key_shift is not None:
                k = key_shift(k) if cache is None else cache.shift_key(slot, k, key_shift)
            q = q * self.q_gain.to(q.dtype)[None, None, :, None]
            y = causal_attention(q, k, v) if cache is None else cache.attend(slot, q, k, v)
        if self.xsa:
            y = remove_self_value(y, v)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.c_fc = CastedLinear(cfg.model_dim, hidden)
        self.c_proj = CastedLinear(hidden, cfg.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.leaky_relu(self.c_fc(x), 0.5).square())


class Block(nn.Module):
    """Pre-norm block with resid_mix; parallel (the last cfg.parallel_last_n layers): attention and MLP read the same
    normed input, x + a * attn(n(x)) + m * mlp(n(x)), instead of the MLP reading the attention's output."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel = layer >= cfg.num_layers - cfg.parallel_last_n
        self.attn = Attention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        # resid_mix[0] weighs the running residual, resid_mix[1] the initial embedding x0
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim)))) \
            if cfg.resid_mix else None

    def forward(self, x: Tensor, x0: Tensor, rope, value_embed: Tensor | None, key_shift=None,
                cache: KVCache | None = None, slot: int = 0) -> Tensor:
        if self.resid_mix is not None:
            mix = self.resid_mix.to(x.dtype)
            x = mix[0] * x + mix[1] * x0
        n = rms_norm(x) * self.norm_scale
        attn = self.attn_scale.to(x.dtype) * self.attn(n, rope, value_embed, key_shift, cache, slot)
        if self.parallel:
            return x + attn + self.mlp_scale.to(x.dtype) * self.mlp(n)
        x = x + attn
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


def starts_of(idx: Tensor, bos_id: int, cache: KVCache | None = None) -> Tensor:
    """[B, T] true where a position has no previous token to read: a BOS, and position 0 of a sequence (or of the
    cache's stream). Features that read position t-1 (BigramHash, SmearGate, the speedrun's) do nothing there."""
    starts = idx == bos_id
    first = torch.ones_like(starts[:, :1]) if cache is None else (cache.pos == 0).expand(idx.size(0), 1)
    return torch.cat((starts[:, :1] | first, starts[:, 1:]), 1)


def previous_tokens(idx: Tensor, cache: KVCache | None = None) -> Tensor:
    """The token before each position (the cache's last token before position 0 of a decode step; else 0)."""
    before = idx.new_zeros(idx.size(0), 1) if cache is None else cache.prev_tok[:, None]
    return torch.cat((before, idx[:, :-1]), 1)


def bigram_bucket(idx: Tensor, buckets: int, bos_id: int, prev: Tensor | None = None,
                  starts: Tensor | None = None) -> Tensor:
    """Hash (previous, current) token into [1, buckets); position 0 and document starts (BOS) use bucket 0."""
    prev = previous_tokens(idx) if prev is None else prev
    starts = starts_of(idx, bos_id) if starts is None else starts
    h = (prev * 36313 ^ idx * 27191) % (buckets - 1) + 1
    return h.masked_fill(starts, 0)


class BigramHash(nn.Module):
    """Hashed (previous, current) token embedding added to the token embedding.

    The table starts at zero so the model starts as if it had none; the projection gets a normal init, because
    with both at zero neither would ever receive a gradient.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets, self.bos_id = cfg.bigram_buckets, cfg.bos_id
        self.table = Embedding(cfg.bigram_buckets, cfg.bigram_dim)
        nn.init.zeros_(self.table.weight)
        self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: Tensor, prev: Tensor | None = None, starts: Tensor | None = None) -> Tensor:
        return self.scale * self.proj(self.table(bigram_bucket(idx, self.buckets, self.bos_id, prev, starts)))


class SmearGate(nn.Module):
    """x_t <- (1 - g) x_t + g x_{t-1} with a learned per-channel gate; no mixing at position 0 or at a BOS."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bos_id = cfg.bos_id
        self.gate = nn.Parameter(torch.full((cfg.model_dim,), -3.0))  # sigmoid(-3) ~ 0.05: starts nearly off

    def forward(self, x: Tensor, idx: Tensor, prev: Tensor | None = None, starts: Tensor | None = None) -> Tensor:
        """prev [B, 1, D]: the embedding before position 0 (a decode step's; default none); starts: starts_of."""
        g = torch.sigmoid(self.gate).to(x.dtype)
        before = x.new_zeros(x[:, :1].shape) if prev is None else prev.to(x.dtype)
        prev = torch.cat((before, x[:, :-1]), 1)
        allowed = ~(starts_of(idx, self.bos_id) if starts is None else starts)
        return x + allowed.to(x.dtype).unsqueeze(-1) * g * (prev - x)


SWITCHES = "submission.switches"


def uses_switches(cfg: ModelConfig) -> bool:
    """Whether a speedrun switch is on, so the model (and a bundle of it) needs submission/switches.py."""
    return bool(cfg.key_offset_last_n or cfg.layer_bigram_buckets)


def switches():
    """submission/switches.py, imported only when a switch is on. A packed program has it only if it was bundled
    with one on; never fall back to a kit on the path, whose code would not be counted."""
    if packed() and SWITCHES not in sys.modules:
        raise ImportError("this packed train_gpt.py was bundled with the speedrun switches off: bundle it with the "
                          "switch on (pgolf pack RUN_DIR of a run that used it, or pgolf bundle --optional "
                          f"{SWITCHES})")
    return importlib.import_module(SWITCHES)


class RMSNorm(nn.Module):
    """rms_norm as a module: the final norm is one, so GPTQ can hook what the output head reads."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


def layer_schedule(cfg: ModelConfig, looping: bool) -> list[int]:
    """The blocks in the order they run. Depth recurrence runs the span loop_layers = (first, last) 1 + num_loops
    times in a row: 11 layers, span (4, 5), 2 loops -> 0 1 2 3 4 5 4 5 4 5 6 7 8 9 10 (the same weights each time)."""
    first, last = cfg.loop_layers
    if not looping or not cfg.num_loops:
        return list(range(cfg.num_layers))
    span = list(range(first, last + 1))
    return [*range(first), *span * (1 + cfg.num_loops), *range(last + 1, cfg.num_layers)]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, qat_bits: int = 6, qat_clip_sigmas: float = 0.0):
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        # Depth recurrence is on in a built model (what is scored and quantized); training turns it off for its
        # first TrainConfig.enable_looping_at of the time. A plain attribute: torch.compile guards on it.
        self.looping = bool(cfg.num_loops)
        self.tok_emb = Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=0.005)
        self.bigram = BigramHash(cfg) if cfg.bigram_buckets else None
        self.smear = SmearGate(cfg) if cfg.smear_gate else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        if cfg.value_embed_last_n:
            self.value_embed = Embedding(cfg.vocab_size, cfg.value_embed_dim)
            nn.init.normal_(self.value_embed.weight, std=0.01)
            self.value_proj = CastedLinear(cfg.value_embed_dim, kv_dim)
            self.value_scales = nn.Parameter(torch.full((cfg.value_embed_last_n,), 0.1))
        # U-Net: the first half of the schedule is the encoder; the decoder's j-th block adds the encoder's output
        # from the mirrored position times skip_weights[j] (pairs from the middle out). One row per encoder position
        # of the longest schedule: with an odd length the last decoder block has no partner, and before depth
        # recurrence switches on the shorter schedule uses the first rows.
        self.num_skips = len(layer_schedule(cfg, True)) // 2 if cfg.unet_skips else 0
        if self.num_skips:
            self.skip_weights = nn.Parameter(torch.ones(self.num_skips, d))
            # sigmoid-gated skips: x <- lerp(w * skip, x, sigmoid(g)), g = 0 at init: half the skip, half x
            self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, d)) if cfg.skip_gates else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(d, cfg.vocab_size)
        self.final_norm = RMSNorm()
        # Second token embedding (the speedrun's): its rows are mixed in before block i x embed2_weights[i], per
        # channel; the weights start at zero, so the model starts as if it had none and their gradient switches it on.
        self.embed2 = Embedding(cfg.vocab_size, d) if cfg.embed2 else None
        if self.embed2 is not None:
            nn.init.normal_(self.embed2.weight, std=0.005)
            self.embed2_weights = nn.Parameter(torch.zeros(cfg.num_layers, d))
        self.speedrun = switches().Speedrun(cfg) if uses_switches(cfg) else None
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_bits, m.qat_clip_sigmas = qat_bits, qat_clip_sigmas
                if cfg.orthogonal_init:
                    nn.init.orthogonal_(m.weight)
        for block in self.blocks:  # output projections start at zero: every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def schedule(self) -> list[int]:
        return layer_schedule(self.cfg, self.looping)

    def embed(self, idx: Tensor, extra_embed: Tensor | None = None, cache: KVCache | None = None,
              context: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Token embedding (+ BigramHash, + an eval-time extra embedding), then SmearGate; before the first norm.
        context: (previous_tokens, starts_of) of idx when the caller has them already."""
        prev, starts = context or (previous_tokens(idx, cache), starts_of(idx, self.cfg.bos_id, cache))
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx, prev, starts).to(x.dtype)
        if extra_embed is not None:
            x = x + extra_embed.to(x.dtype)
        if self.smear is not None:
            smeared = self.smear(x, idx, None if cache is None else cache.prev_embed, starts)
            if cache is not None:
                cache.prev_embed.copy_(x)  # what the next position's SmearGate reads
            x = smeared
        return x

    def hidden(self, idx: Tensor, extra_embed: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Final normed hidden states [B, T, D]. With a KVCache: one position per sequence (T = 1), decoded from the
        cache's keys and values, which it extends (the cache's position advances)."""
        cfg = self.cfg
        if cache is not None and idx.size(1) != 1:
            raise ValueError(f"a KV-cached forward decodes one position per call, got {idx.size(1)}")
        dtype = torch.bfloat16 if idx.is_cuda else self.tok_emb.weight.dtype
        prev, starts = previous_tokens(idx, cache), starts_of(idx, cfg.bos_id, cache)
        extra = self.speedrun and self.speedrun.inputs(lambda n: bigram_bucket(idx, n, cfg.bos_id, prev, starts),
                                                       starts, cache is not None, dtype)
        x = self.embed(idx, extra_embed, cache, (prev, starts))
        x = x0 = rms_norm(x).to(dtype)
        rope = rope_tables(idx.size(1), max(cfg.rope_dims, 2), cfg.rope_base, idx.device) if cache is None else None
        ve = None
        if cfg.value_embed_last_n:
            ve = self.value_proj(self.value_embed(idx).to(dtype))
        e2 = rms_norm(self.embed2(idx)).to(dtype) if self.embed2 is not None else None
        order = self.schedule()
        encoder = len(order) // 2 if self.num_skips else 0
        skips, shift = [], None
        for slot, i in enumerate(order):
            if slot >= encoder and skips:
                j = slot - encoder
                skip = self.skip_weights[j].to(dtype) * skips.pop()
                if self.skip_gates is not None:
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j]).to(dtype))
                else:
                    x = x + skip
            if e2 is not None:
                x = x + self.embed2_weights[i].to(dtype) * e2
            if extra:
                x, shift = self.speedrun.before_block(i, x, extra)
            j = i - (cfg.num_layers - cfg.value_embed_last_n)
            layer_ve = ve * self.value_scales[j].to(dtype) if ve is not None and j >= 0 else None
            x = self.blocks[i](x, x0, rope, layer_ve, shift, cache, slot)
            if slot < encoder:
                skips.append(x)
        if cache is not None:
            cache.advance(idx)
        return self.final_norm(x)

    def head(self, h: Tensor, delta: Tensor | None = None) -> Tensor:
        """Soft-capped logits in fp32 [..., V] from final hidden states (the tied embedding, or lm_head); `delta` is
        added before the cap (a test-time adapter's, eval/lora.py)."""
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(h, w.to(h.dtype)).float()
        if delta is not None:
            z = z + delta.float()
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c) if c else z

    def logits(self, idx: Tensor, extra_embed: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Soft-capped logits in fp32, [B, T, V]."""
        return self.head(self.hidden(idx, extra_embed, cache))

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats."""
        z = self.logits(idx)
        return F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1))

    def set_qat(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_mix.fill_(1.0 if on else 0.0)
