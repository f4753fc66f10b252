"""`python -m tools.pipeline [KEY=VALUE ...]` (or `torchrun --nproc_per_node=N -m tools.pipeline ...`): the
challenge's pipeline as the kit runs it.

submission/train_gpt.py composes train -> quantize -> reload -> evaluate and is what gets packed. The kit calls it
with what the packed program must not carry (its code would count against the cap): the counted code size, which is
the size the packed bundle of this very configuration would have (tools/pack/ship.py), and the evaluation that also
checks C1-C4 (eval/verify.py). The run directory is then the one the packed program would write, verified, plus
tune_split.txt: the tuning split its data held out as training began, which `pgolf eval RUN_DIR --tune` checks
before tuning on one.
"""
from __future__ import annotations

import sys

from eval.verify import evaluate_verified
from submission import train_gpt
from submission.config import ModelConfig
from tools.data import held_out_at_start, record_tune_split
from tools.pack.ship import bundle_entry


def packed_code_bytes(model_cfg: ModelConfig) -> int:
    """The code bytes a run counts: the packed train_gpt.py bundled for this model (its switches pack their code)."""
    return bundle_entry(model_cfg).sizes.packed


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    held_out = held_out_at_start(argv)  # as training starts: a split made while it trains was not held out
    run_dir = train_gpt.main(argv, code_bytes=packed_code_bytes, verify=evaluate_verified)
    record_tune_split(run_dir, held_out=held_out)
    return run_dir


if __name__ == "__main__":
    main()
