"""Where a run's quantization gap comes from: the val_bpb cost of rounding each group of tensors alone.

    source .bench/prep.sh && python3 scripts/quant_gap.py RUN_DIR [--tokens N]

RUN_DIR holds checkpoint.pt (the weights quantization started from: EMA when the run kept it) and model.pgz (what
`pgolf quantize` packed). The script scores, flat as the roundtrip does, the checkpoint's weights with one group's
tensors replaced by the artifact's dequantized ones: the embedding, each block's attention and MLP, the looped
blocks, and the small tensors stored as they are; then all of them (the roundtrip's gap). Groups that add up to
far less than the whole point at interaction (errors compounding through the layers, the loop in particular).
"""
from __future__ import annotations

import argparse
import time

import torch

from eval.bpb import byte_luts
from eval.flat import evaluate_flat
from submission.data import load_tokens
from submission.model import GPT
from tools.pack.artifact import MODEL_FILENAME, QuantTensor, read_artifact, to_state_dict
from tools.quant.quantize import load_checkpoint


def groups(names: list[str], quantized: set[str], cfg) -> dict[str, list[str]]:
    """Group name -> tensor names: the embedding, blocks.i.attn / blocks.i.mlp, everything quantized elsewhere, and
    what the artifact stores as it is (scalars, gains, norms)."""
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in quantized:
            key = "stored as is"
        elif name.startswith("blocks."):
            parts = name.split(".")
            key = f"block {parts[1]} {parts[2]}"
        else:
            key = name.rsplit(".", 1)[0]
        out.setdefault(key, []).append(name)
    if cfg.num_loops:
        first, last = cfg.loop_layers
        out[f"looped blocks {first}-{last}"] = [n for n in quantized if n.startswith("blocks.") and
                                                first <= int(n.split(".")[1]) <= last]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--tokens", type=int, default=0, help="score the first N val tokens only (0: all)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.run_dir)
    tensors, _, _ = read_artifact(f"{args.run_dir}/{MODEL_FILENAME}")
    model = GPT(ckpt.model_config).to(device).eval()
    reference = {k: v.to(device) for k, v in ckpt.state_dict.items()}
    dequantized = to_state_dict(tensors, model.state_dict(), args.run_dir)
    quantized = {n for n, t in tensors.items() if isinstance(t, QuantTensor)}
    cfg = ckpt.train_config
    val = load_tokens(f"{cfg.data_dir}/fineweb_val_*.bin", ckpt.model_config.vocab_size)
    if args.tokens:
        val = val[:args.tokens + 1]
    luts = byte_luts(cfg.tokenizer_path, ckpt.model_config.vocab_size)

    def score(replaced: list[str]) -> float:
        model.load_state_dict({**reference, **{n: dequantized[n] for n in replaced}})
        with torch.no_grad():
            return evaluate_flat(model, val, luts, cfg.seq_len, cfg.val_batch_seqs).val_bpb

    t0 = time.perf_counter()
    base = score([])
    rows = [(key, names, score(names) - base) for key, names in groups(list(reference), quantized,
                                                                         ckpt.model_config).items()]
    whole = score(sorted(tensors))  # every tensor as the artifact holds it
    print(f"{ckpt.weights} weights val_bpb {base:.5f}; all rounded {whole:.5f} (gap {whole - base:+.5f}); "
          f"{len(val) - 1} tokens, {time.perf_counter() - t0:.0f} s")
    print("| group | parameters | gap alone (bpb) | share of the whole |")
    print("|---|---|---|---|")
    for key, names, gap in sorted(rows, key=lambda r: -r[2]):
        numel = sum(reference[n].numel() for n in names)
        print(f"| {key} | {numel:,} | {gap:+.5f} | {gap / (whole - base):.0%} |")
    singles = sum(gap for key, _, gap in rows if not key.startswith("looped"))
    print(f"sum of the groups alone (looped blocks not counted twice): {singles:+.5f} vs the whole {whole - base:+.5f}")


if __name__ == "__main__":
    main()
