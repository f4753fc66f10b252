"""A/B of the attention's KV-head grouping inside the full training step, on the GPU:

    python3 scripts/bench_attn.py repeat|gqa [pgolf bench arguments]

`repeat` is the kit's default (K/V repeated to the query heads, then SDPA); `gqa` passes the 4 KV heads to SDPA
with enable_gqa=True. Same math; only the kernels differ. Run both on one lease: timings from different machines
are not comparable.
"""
import sys

import torch.nn.functional as F

import submission.model
from tools.cli import main


def gqa_attention(q, k, v):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return y.transpose(1, 2)


if __name__ == "__main__":
    variant, args = sys.argv[1], sys.argv[2:]
    if variant == "gqa":
        submission.model.causal_attention = gqa_attention
    elif variant != "repeat":
        sys.exit(f"unknown variant {variant!r}: expected repeat or gqa")
    print(f"variant:{variant}", flush=True)
    sys.exit(main(["bench", *args]))
