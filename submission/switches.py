"""Two NanoGPT-speedrun techniques as model switches, off by default (ModelConfig: key_offset_last_n,
layer_bigram_buckets): partial key offset and a bigram hash embedding injected before every block. The third one
measured, a second token embedding mixed in before every block, won its P1 ablation and is part of the model
(submission/model.py, ModelConfig.embed2); docs/MEASUREMENTS.md ("Speedrun techniques, measured") has the table.

The model imports this module only when a switch is on (submission/model.py `switches`), and the bundler packs it
only when the bundled configuration turns one on (tools/pack/bundle/, optional modules), so a submission with them
off carries none of this code. It may import no kit module: a packed optional module runs in its own namespace.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def offset_keys(k: Tensor, shift: Tensor, dims: int) -> Tensor:
    """Partial key offset: k [B, T, H, D]; where shift[b, t] is true, the last `dims` of each head's key at position t
    become those of position t-1. Those are dims RoPE does not rotate, so a query matching them finds "the token
    after the previous occurrence of me" (induction in one layer). shift is false at position 0 and at every BOS:
    a document's first key never carries the previous document's last token.
    """
    prev = F.pad(k[:, :-1, :, -dims:], (0, 0, 0, 0, 1, 0))
    moved = torch.where(shift[:, :, None, None], prev, k[..., -dims:])
    return torch.cat((k[..., :-dims], moved), dim=-1)


class Speedrun(nn.Module):
    """The switches that are on for one ModelConfig, and what they add before each block."""

    def __init__(self, cfg):
        super().__init__()
        L, d = cfg.num_layers, cfg.model_dim
        self.bos_id, self.buckets = cfg.bos_id, cfg.layer_bigram_buckets
        free = cfg.head_dim - cfg.rope_dims  # the head dims RoPE leaves alone
        self.key_dims = cfg.key_offset_dims or free
        if cfg.key_offset_last_n and not 0 < self.key_dims <= free:
            raise ValueError(f"key_offset_dims={cfg.key_offset_dims}: must be in 1..{free}, the head dims RoPE does "
                             f"not rotate (head_dim {cfg.head_dim} - rope_dims {cfg.rope_dims}); 0 means all of them")
        self.key_offset_from = L - cfg.key_offset_last_n  # layers i >= this offset their keys
        # Per-layer bigram (the speedrun's form): one zero-initialized table, added before block i x scales[i].
        self.layer_bigram = nn.Embedding(self.buckets, d) if self.buckets else None
        if self.layer_bigram is not None:
            nn.init.zeros_(self.layer_bigram.weight)
            self.layer_bigram_scales = nn.Parameter(torch.full((L,), 0.1))

    def inputs(self, bucket, starts: Tensor, cached: bool, dtype) -> tuple:
        """What every block reads, computed once per forward: (key shift mask, bigram rows). `bucket(n)` is the
        model's bigram hash into n buckets (bucket 0 at sequence starts and BOS); starts [B, T] marks those
        positions. cached: a KV-cached decode step, whose key transform sees (previous key, this key), so the mask
        gets a leading position that never moves."""
        shift = ~starts
        if cached:
            shift = F.pad(shift, (1, 0))
        rows = None if self.layer_bigram is None else self.layer_bigram(bucket(self.buckets)).to(dtype)
        return shift, rows

    def before_block(self, i: int, x: Tensor, inputs: tuple):
        """The residual entering block i, and the key transform its attention applies (None: keys unchanged)."""
        shift, rows = inputs
        if rows is not None:
            x = x + self.layer_bigram_scales[i].to(x.dtype) * rows
        if i < self.key_offset_from:
            return x, None
        return x, lambda k: offset_keys(k, shift, self.key_dims)
