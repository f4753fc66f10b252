"""How many more bytes a quantization gap would need: the bit allocation's own model, replayed at larger budgets.

    python3 scripts/gap_budget.py LOG [LOG ...] [--config config.json] [--extra-mb 0.5,1,2,3,4] [--grid 0.3,...]

LOG: the logs of one quantization with BIT_ALLOCATION=1 (the packed program's train.log holds it all; for
`pgolf quantize`, its quantize.log and the run's train.log). They give each quantized matrix's measured
sensitivity a_t (its `allocation:` line: rounding it at m x the recipe's step costs a_t m^2 nats per token), the
EMA val_bpb before quantization, the roundtrip val_bpb after it and the val's tokens per byte. config.json (default:
beside the first LOG) builds the model on the meta device for each matrix's shape. The code widths and SD-clip
k are QuantConfig's defaults (the sp8192 recipe's): a run quantized with other MATRIX_BITS, EMBED_BITS or
SDCLIP_* settings is modelled wrongly.

Each matrix's code bytes at a multiplier m are modelled as the entropy of a Gaussian row rounded at that step and
clipped at its code range (the rows of a trained P1 model are close to Gaussian; brotli came within 1% of the codes'
order-0 entropy), plus its float16 scales. The allocation (tools/quant/allocate.py's `allocate`) is then replayed
at the budget the model predicts for the log's own choice, and at that budget plus each extra: the predicted gap in
val_bpb, also scaled by measured / predicted at the log's own choice. Nothing runs on the GPU; CPU, a second.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from submission.config import ModelConfig
from submission.model import GPT
from tools.quant.allocate import Probe, allocate
from tools.quant.gptq import QuantConfig

ALLOCATION = re.compile(r"^allocation:(\S+) loss_coef:(\S+) multiplier:(\S+)", re.M)


def last_float(pattern: str, text: str, source: str) -> float:
    found = re.findall(pattern, text, re.M)
    if not found:
        raise SystemExit(f"{source}: no line matching {pattern!r}: pass the logs of a run quantized with "
                         "BIT_ALLOCATION=1 (train.log, and quantize.log for `pgolf quantize`)")
    return float(found[-1])


def gaussian_code_bits(step: float, qmax: int) -> float:
    """Entropy in bits of N(0, 1) rounded to the nearest multiple of `step`, codes clipped to [-qmax, qmax]."""
    edges = torch.arange(-qmax - 1, qmax + 1, dtype=torch.float64) + 0.5  # between neighbouring codes, and both ends
    edges[0], edges[-1] = -math.inf, math.inf
    cdf = torch.special.ndtr(edges * step)
    p = cdf.diff().clamp_min(1e-300)
    return float(-(p * p.log2()).sum())


def matrix_bytes(shape: tuple[int, int], bits: int, sigmas: float, multiplier: float) -> float:
    """Modelled bytes of one matrix rounded with SD clip k = sigmas x multiplier: entropy-coded codes + fp16 scales."""
    qmax = 2 ** (bits - 1) - 1
    rows, cols = shape
    return rows * cols * gaussian_code_bits(sigmas * multiplier / qmax, qmax) / 8 + 2 * rows


def probes_from_log(text: str, shapes: dict[str, tuple[int, int]], cfg: QuantConfig,
                    grid: list[float]) -> tuple[list[Probe], float, float]:
    """The logged matrices as probes on `grid`, and the modelled bytes and loss (nats) of the log's own choice."""
    probes, own_bytes, own_loss = [], 0.0, 0.0
    for name, coef, multiplier in ALLOCATION.findall(text):
        if name not in shapes:
            raise SystemExit(f"allocation line names {name}, which the model of config.json does not have: "
                             "pass the config.json of the run the log belongs to (--config)")
        embedding = name == "tok_emb.weight"
        bits, sigmas = (cfg.embed_bits, cfg.sdclip_embed_sigmas) if embedding else (cfg.matrix_bits,
                                                                                  cfg.sdclip_sigmas)
        grid_bytes = [matrix_bytes(shapes[name], bits, sigmas, m) for m in grid]
        probes.append(Probe(name, math.prod(shapes[name]), float(coef), [], grid_bytes))
        own_bytes += matrix_bytes(shapes[name], bits, sigmas, float(multiplier))
        own_loss += float(coef) * float(multiplier) ** 2
    if not probes:
        raise SystemExit("no `allocation:` lines in the logs: quantize with BIT_ALLOCATION=1")
    return probes, own_bytes, own_loss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--config", type=Path, help="the run's config.json (default: beside the first log)")
    p.add_argument("--extra-mb", default="0.5,1,2,3,4", help="extra budgets to replay, in MB (default %(default)s)")
    p.add_argument("--grid", help="multipliers the replay may choose (default: the recipe's ALLOCATION_GRID)")
    args = p.parse_args(argv)
    text = "\n".join(path.read_text() for path in args.logs)
    config_path = args.config or args.logs[0].parent / "config.json"
    model_cfg = ModelConfig(**json.loads(config_path.read_text())["model"])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in GPT(model_cfg).state_dict().items() if t.ndim == 2}
    cfg = QuantConfig()
    grid = [float(x) for x in args.grid.split(",")] if args.grid else list(cfg.allocation_grid)
    probes, own_bytes, own_loss = probes_from_log(text, shapes, cfg, grid)
    source = ", ".join(map(str, args.logs))
    ema = last_float(r"^final_prequant val_loss:\S+ val_bpb:(\S+)", text, source)
    roundtrip = last_float(r"^quantized_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", text, source)
    tokens = last_float(r"^roundtrip_eval .*tokens:(\d+)", text, source)
    val_bytes = last_float(r"^roundtrip_eval .*bytes:(\d+)", text, source)
    to_bpb = tokens / val_bytes / math.log(2)  # nats per token -> bits per byte
    own_loss *= to_bpb
    measured = roundtrip - ema
    scale = measured / own_loss
    print(f"{len(probes)} matrices; measured gap {measured:+.5f} bpb, modelled {own_loss:+.5f} at the log's choice "
          f"({own_bytes / 1e6:.3f} MB of modelled code bytes); scale {scale:.3f}")
    print("| code bytes | multipliers at the grid's ends | predicted gap (bpb) | scaled to the measured |")
    print("|---|---|---|---|")
    for extra in [0.0] + [float(x) for x in args.extra_mb.split(",")]:
        try:
            a = allocate(probes, grid, own_bytes + extra * 1e6)
        except ValueError as err:
            print(f"| +{extra:g} MB | {err} | | |")
            continue
        loss = a.predicted_loss * to_bpb
        ends = sum(m in (min(grid), max(grid)) for m in a.multipliers.values())
        print(f"| +{extra:g} MB | {ends} of {len(probes)} | {loss:+.5f} | {loss * scale:+.5f} |")


if __name__ == "__main__":
    sys.exit(main())
