"""`make demo`: build shards from the shipped sample, verify them, train a tiny config on CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = ROOT / "runs/demo"
    data = out / "data"
    tok = ROOT / "data/sample/fineweb_1024_bpe.model"
    py = sys.executable
    steps = [
        [py, "-m", "tools.cli", "data", "build", str(ROOT / "data/sample/sample_wiki.jsonl.xz"), "--tokenizer", str(tok),
         "--out", str(data), "--val-docs", "20", "--overwrite"],
        [py, "-m", "tools.cli", "data", "verify", str(data)],
        [py, "-m", "submission.train_gpt", f"DATA_DIR={data}", f"TOKENIZER_PATH={tok}", f"RUN_DIR={out / 'train'}",
         "NUM_LAYERS=4", "MODEL_DIM=128", "NUM_HEADS=4", "NUM_KV_HEADS=2", "XSA_LAST_N=4", "SEQ_LEN=256",
         "TRAIN_BATCH_TOKENS=8192", "MICRO_BATCH_TOKENS=8192", "MAX_STEPS=150", "WARMUP_STEPS=2", "LOG_EVERY=25"],
    ]
    for cmd in steps:
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
