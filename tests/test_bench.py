"""tools/bench.py on the CPU: the throughput figures, the phase split and the op table of a tiny config."""
from __future__ import annotations

import re

from submission.config import ModelConfig, TrainConfig
from tools.bench import run_bench


def test_bench_reports_throughput_phases_and_an_op_table(tmp_path):
    model_cfg = ModelConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, xsa_last_n=2, rope_dims=8,
                            bigram_buckets=64, bigram_dim=16, value_embed_dim=16)
    cfg = TrainConfig(seq_len=64, train_batch_tokens=256, micro_batch_tokens=128, data_dir=str(tmp_path))
    result = run_bench(model_cfg, cfg, steps=3, warmup=1, profile_steps=1, top=4)
    assert result["data"] == "random tokens" and result["steps"] == 3  # no shards in tmp_path
    assert result["tokens_per_s"] > 0 and result["ms_per_step"] > 0
    assert abs(result["tokens_per_s"] * result["ms_per_step"] / 1000 - 256) < 1  # tokens per step
    phases = dict(p.split("=") for p in result["phases_ms"].split(","))
    assert set(phases) == {"fwd_bwd", "optim", "ema"} and all(float(v) > 0 for v in phases.values())
    rows = [line for line in result["profile"].splitlines() if re.match(r"\s*aten::|\s*Optimizer", line)]
    assert 1 <= len(rows) <= 4
