"""Several processes (torchrun, gloo on the CPU): the same code path as a multi-GPU run, without GPUs.

2 processes must train what 1 process with 2x gradient accumulation trains (same global batch, same tokens), and the
packed single file must run the whole pipeline under torchrun with 2 processes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_evaluate import scored_run  # noqa: F401 (a fixture tune_run uses)
from tests.test_tune import tune_run  # noqa: F401 (the fixture)
from tools.pack.ship import bundle_entry
from tools.records.results import train_loss_curve

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data/sample/fineweb_1024_bpe.model"
# Every feature of both recipes on at a tiny size (the sp8192 structure with layer 1 looped, the sp1024 tables), on
# the sp1024 sample shards.
TINY = ["NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=2", "NUM_KV_HEADS=1", "XSA_LAST_N=2", "ROPE_DIMS=8",
        "BIGRAM_BUCKETS=64", "BIGRAM_DIM=16", "VALUE_EMBED_DIM=16", "VALUE_EMBED_LAST_N=2", "EMBED2=1", "NUM_LOOPS=1",
        "LOOP_LAYERS=1,1", "PARALLEL_LAST_N=1", "VOCAB_SIZE=1024", "SEQ_LEN=128", "TRAIN_BATCH_TOKENS=4096",
        "MICRO_BATCH_TOKENS=2048", "WARMUP_STEPS=0", "LOG_EVERY=1", "VAL_BATCH_SEQS=16", "SEED=3"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def env() -> dict[str, str]:
    import os
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO)}


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def data(sample_shards) -> Path:
    return sample_shards


def test_two_processes_train_what_one_process_with_accumulation_trains(data, tmp_path):
    settings = [f"DATA_DIR={data}", f"TOKENIZER_PATH={TOKENIZER}", *TINY, "MAX_STEPS=12", "EMA_DECAY=0"]
    run([sys.executable, "-m", "tools.commands.cli", "train", f"RUN_DIR={tmp_path / 'one'}", *settings], REPO)
    run([*TORCHRUN, "-m", "tools.commands.cli", "train", f"RUN_DIR={tmp_path / 'two'}", *settings], REPO)
    logs = {name: (tmp_path / name / "train.log").read_text().splitlines() for name in ("one", "two")}
    assert any("world_size:1" in line and "grad_accum:2" in line for line in logs["one"])
    assert any("world_size:2" in line and "grad_accum:1" in line for line in logs["two"])
    one, two = (dict(train_loss_curve(lines)) for lines in logs.values())
    assert sorted(one) == sorted(two) == list(range(1, 13))
    # same tokens, same update; only the order of floating-point reductions differs
    assert max(abs(one[s] - two[s]) for s in one) < 2e-4, [(s, one[s], two[s]) for s in one]
    final = {name: [line for line in lines if line.startswith("final_prequant")][0] for name, lines in logs.items()}
    bpb = {name: float(line.split("val_bpb:")[1].split()[0]) for name, line in final.items()}
    assert bpb["one"] == pytest.approx(bpb["two"], abs=2e-4)


def test_the_packed_file_runs_the_whole_pipeline_under_torchrun(data, tmp_path):
    folder = tmp_path / "record"
    folder.mkdir()
    result = bundle_entry()
    (folder / "train_gpt.py").write_bytes(result.packed)
    out = run([*TORCHRUN, "train_gpt.py", f"DATA_DIR={data}", f"TOKENIZER_PATH={TOKENIZER}", *TINY,
               f"RUN_DIR={tmp_path / 'run'}", "MAX_STEPS=6", "CALIB_SEQS=4", "CALIB_SEQ_LEN=64",
               "PASSTHROUGH_MAX_NUMEL=1024", "CONTEXT_LEN=512"], folder)  # eval windows 4x the training length
    lines = out.splitlines()
    assert lines[-1].startswith("final_eval_exact val_loss:"), out[-2000:]
    assert sum(line.startswith("final_eval_exact") for line in lines) == 1  # rank 0 logs, once
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["bytes_code"] == result.sizes.packed and evaluation["tokens"] > 0
    assert any("world_size:2" in line for line in (tmp_path / "run" / "train.log").read_text().splitlines())


def test_a_bounded_tune_under_torchrun_follows_rank_0s_clock(tune_run, tmp_path):  # noqa: F811
    """`pgolf eval --tune --tune-seconds` with 2 processes: every rank must start the same trials (a trial is
    collective), so all follow rank 0's clock. Here the search's clock on rank 1 runs 1,000,000x fast (a
    sitecustomize on its path swaps tools.tune's time module): on its own it would stop after the start trial while
    rank 0 goes on, and the search would hang or fail."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, time, types\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import tools.tune\n"
        "    tools.tune.time = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() * 1e6)\n")
    environment = {**env(), "PYTHONPATH": f"{site}:{REPO}"}
    proc = subprocess.run([*TORCHRUN, "-m", "tools.commands.cli", "eval", str(tune_run), "--tune", "--grid",
                           "TTT_LR=0.001,0.01", "--tune-tokens", "500", "--tune-seconds", "3000"], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tune_run / "tune.json").read_text())
    assert result["complete"] and len(result["trials"]) == 3, result  # the start and both TTT_LR values


def test_lora_ttt_under_torchrun_scores_every_target_once_and_passes_its_checks(scored_run, tmp_path):  # noqa: F811
    """`pgolf eval RUN --lora-ttt` with 2 processes, as the 8-GPU evaluation runs it: each rank warms up and scores
    its share of the targets (the run's one document is cut by the share boundary: its first half is context for
    rank 1), and the checks reduce over both ranks (C4: every target once over 2 shards)."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(scored_run, run_dir)
    settings = ["LORA_RANK=2", "LORA_BATCH_DOCS=4", "LORA_CHUNK=64", "LORA_CONTEXT=128", "LORA_LATE_CHUNK=64",
                "LORA_LR=0.01", "LORA_COMPLIANCE_TOKENS=256", "LORA_WARMUP_DOCS=1"]
    out = run([*TORCHRUN, "-m", "tools.commands.cli", "eval", str(run_dir), *settings, "--lora-ttt",
               "--out", str(tmp_path / "lora.json")], REPO)
    assert "eval_lora_start" in out and "world_size:2" in out
    result = json.loads((tmp_path / "lora.json").read_text())
    assert {k: v["passed"] for k, v in result["compliance"].items()} == {"C1": True, "C2": True, "C3": True,
                                                                            "C4": True}
    assert "(2 shards)" in result["compliance"]["C4"]["detail"], result["compliance"]["C4"]
    assert result["tokens"] == 23 * 128 and result["stages"]["warmup"] > 0
    # the projection counts the warm-up once, at its one-decimal precision (a tiny CPU warm-up may round to 0.0)
    assert result["projection"]["gpus"] == 8
    assert abs(result["projection"]["stages"]["warmup"] - result["stages"]["warmup"]) <= 0.05 + 1e-9


def test_the_verified_evaluation_under_torchrun_scores_what_one_process_scores(scored_run, tmp_path):  # noqa: F811
    """`torchrun ... -m tools.commands.cli eval RUN_DIR`, the README's multi-GPU evaluation, against one process:
    the ranks split every chunk's windows, meet, and then all learn from the whole chunk (score-first TTT with its
    gradients summed over the ranks, the hash embedding it trains, the n-gram's counts and mixing weights), so
    every view scores what one process scores, and C1-C4 pass with their checks reduced over both ranks (docs/RULES.md,
    "More than one GPU"). Measured here: with per-rank adapters, each rank learning from its own half, two processes
    scored the n-gram view 0.034 bpb worse than one (3.0861 vs 3.0520); without the gradient sum, the TTT view moved
    by 7e-4; they now agree to 1e-8."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(scored_run, run_dir)
    settings = ["CHUNK_TOKENS=1024", "EVAL_COMPILE=0", "COMPLIANCE_CHUNK_TOKENS=512", "TTT_LR=0.05"]
    views = {}
    for launcher, name, checks in (([*TORCHRUN], "two", []), ([sys.executable], "one", ["COMPLIANCE=0"])):
        out = run([*launcher, "-m", "tools.commands.cli", "eval", str(run_dir), *settings, *checks, "--out",
                   str(tmp_path / f"{name}.json")], REPO)
        assert f"world_size:{2 if name == 'two' else 1}" in out
        views[name] = {line.split()[0]: float(line.split("val_bpb:")[1].split()[0]) for line in out.splitlines()
                       if line.startswith("eval_") and "_exact " in line}
    two = json.loads((tmp_path / "two.json").read_text())
    assert {k: v["passed"] for k, v in two["compliance"].items()} == {"C1": True, "C2": True, "C3": True, "C4": True}
    assert set(views["two"]) == {"eval_hash_embed_exact", "eval_ngram_exact"} == set(views["one"])
    for view, bpb in views["one"].items():
        assert views["two"][view] == pytest.approx(bpb, abs=1e-7), view
    assert two["val_bpb"] == pytest.approx(json.loads((tmp_path / "one.json").read_text())["val_bpb"], abs=1e-7)
