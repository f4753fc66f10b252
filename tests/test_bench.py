"""tools/bench.py on the CPU: the throughput figures, the phase split and the op table of a tiny config."""
from __future__ import annotations

import re
import sys

import pytest

from submission.config import ModelConfig, TrainConfig
from tools.bench import run_bench


def test_bench_reports_throughput_phases_and_an_op_table(tmp_path):
    model_cfg = ModelConfig(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, xsa_last_n=2, rope_dims=8,
                            bigram_buckets=64, bigram_dim=16, value_embed_dim=16, value_embed_last_n=2, embed2=True,
                            num_loops=1, loop_layers=(1, 1), parallel_last_n=1, vocab_size=1024)
    cfg = TrainConfig(seq_len=64, train_batch_tokens=256, micro_batch_tokens=128, data_dir=str(tmp_path))
    result = run_bench(model_cfg, cfg, steps=3, warmup=1, profile_steps=1, top=4, trace=str(tmp_path / "t.json"))
    assert result["data"] == "random tokens" and result["steps"] == 3  # no shards in tmp_path
    import json
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the profiled step's ops, readable by Perfetto
    assert result["tokens_per_s"] > 0 and result["ms_per_step"] > 0
    assert abs(result["tokens_per_s"] * result["ms_per_step"] / 1000 - 256) < 1  # tokens per step
    phases = dict(p.split("=") for p in result["phases_ms"].split(","))
    assert set(phases) == {"fwd_bwd", "optim", "ema"} and all(float(v) > 0 for v in phases.values())
    rows = [line for line in result["profile"].splitlines() if re.match(r"\s*aten::|\s*Optimizer", line)]
    assert 1 <= len(rows) <= 4


def _variants():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_variants.py"
    spec = importlib.util.spec_from_file_location("bench_variants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_variants"] = module  # torch.compile looks a traced function's module up by name
    spec.loader.exec_module(module)
    return module


def test_every_speed_variant_computes_what_the_kit_computes():
    import torch

    from submission import optim
    v = _variants()
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 12, 20, generator=g)
    assert torch.allclose(v.newton_schulz_baddbmm(G, 5), optim.newton_schulz(G, 5), atol=1e-5)
    assert torch.allclose(v.newton_schulz_baddbmm(G.mT, 5), optim.newton_schulz(G.mT, 5), atol=1e-5)
    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        v.apply("fast")
    import torch._functorch.config as functorch_config
    before = functorch_config.activation_memory_budget
    try:  # a compiler setting, not another computation
        v.apply("recompute")
        assert functorch_config.activation_memory_budget == 0.8
    finally:
        functorch_config.activation_memory_budget = before
    from torch._inductor import config as inductor_config
    with inductor_config.patch(aggressive_fusion=False, combo_kernels=False):  # restored on exit
        v.apply("aggressive_fusion,combo_kernels")
        assert inductor_config.aggressive_fusion and inductor_config.combo_kernels


def test_ema_follows_the_live_weights_through_a_state_dict_load():
    """The EMA reads the tensors it collected at construction; loading a state dict (the warmup restore) copies into
    them, so it must still see every change. Reference: the ramped-decay lerp over a fresh state_dict() per step."""
    import torch

    from submission import model
    from submission.ema import EMA
    torch.manual_seed(0)
    net = model.GPT(model.ModelConfig(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, xsa_last_n=2,
                                      rope_dims=4, vocab_size=64, bigram_buckets=16, bigram_dim=8, value_embed_dim=8,
                                      value_embed_last_n=2, num_loops=1, loop_layers=(1, 1), parallel_last_n=1))
    net.blocks[0].mlp_scale.data = net.blocks[0].mlp_scale.data.half()  # one tensor that is not fp32
    ema = EMA(net, 0.9)
    reference = {k: t.float().clone() for k, t in net.state_dict().items()}
    initial = {k: t.clone() for k, t in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        with torch.no_grad():
            if step == 3:
                net.load_state_dict(initial)
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        ema.update()
        decay = min(0.9, (1 + step) / (10 + step))
        for name, t in net.state_dict().items():
            reference[name].lerp_(t.float(), 1 - decay)
    assert all(torch.allclose(ema.shadow[name], reference[name], atol=1e-6) for name in reference)


def test_curve_comparison_separates_numerical_noise_from_a_shift():
    import random

    from tools.bench import compare_curves, window_means
    rng = random.Random(0)
    base = [6.0 * 0.995 ** s + 0.05 * rng.gauss(0, 1) for s in range(200)]
    noisy = [x + 1e-3 * rng.gauss(0, 1) for x in base]
    shifted = [x + 0.02 for x in noisy]
    assert [end for end, _ in window_means(base)] == [50, 100, 150, 200]
    assert window_means(base)[0][1] == pytest.approx(sum(base[:50]) / 50)
    assert max(abs(r["t"]) for r in compare_curves(noisy, base)) < 4
    assert min(abs(r["t"]) for r in compare_curves(shifted, base)) > 20
    assert [r["step"] for r in compare_curves(base[:120], base)] == [50, 100]  # common full windows only
    assert all(r["t"] == 0 for r in compare_curves(base, base))


def test_bench_cli_writes_a_curve_and_checks_another_against_it(tmp_path, capsys):
    import argparse
    import json

    from tools.commands.bench import add_commands
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    tiny = ["NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=2", "NUM_KV_HEADS=1", "XSA_LAST_N=2", "ROPE_DIMS=8",
            "BIGRAM_BUCKETS=64", "BIGRAM_DIM=16", "VALUE_EMBED_DIM=16", "VALUE_EMBED_LAST_N=2", "EMBED2=1",
            "NUM_LOOPS=1", "LOOP_LAYERS=1,1", "PARALLEL_LAST_N=1", "VOCAB_SIZE=1024", "SEQ_LEN=64",
            "TRAIN_BATCH_TOKENS=256", "MICRO_BATCH_TOKENS=128", f"DATA_DIR={tmp_path}"]
    flags = ["--steps", "45", "--warmup", "5", "--profile-steps", "0"]

    def bench(*extra, overrides=()):
        args = parser.parse_args(["bench", *tiny, *overrides, *flags, *extra])
        return args.func(args), capsys.readouterr().out

    curve = tmp_path / "base.json"
    rc, out = bench("--curve-out", str(curve))
    assert rc == 0 and "loss_by_window 50:" in out and len(json.loads(curve.read_text())["loss_curve"]) == 50
    rc, out = bench("--steps", "3", "--warmup", "1")  # shorter than one window: says so instead of an empty line
    assert rc == 0 and "loss_by_window none (windows are 50 steps from a fresh model; this run had 4)" in out
    rc, out = bench("--against", str(curve))  # the same run on the CPU: identical
    assert rc == 0 and "verdict:within_noise" in out and "max_abs_diff:0.00000" in out
    rc, out = bench("--against", str(curve), overrides=["LOGIT_SOFTCAP=2"])  # a different computation
    assert rc == 1 and "verdict:shifted" in out
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad\.json: not a `pgolf bench --curve-out` file"):
        bench("--against", str(tmp_path / "bad.json"))


def test_qat_flag_variant_computes_the_buffer_blend_and_recompiles_on_toggle(monkeypatch):
    """The qat_flag candidate must compute what the qat_mix blend computes in both states, and a compiled model must
    change its forward when QAT is switched (the dead-QAT bug a flag could bring back if nothing guarded on it)."""
    import torch

    from submission import model
    v = _variants()
    torch.manual_seed(0)
    lin, x = model.CastedLinear(16, 8), torch.randn(4, 16)
    with torch.no_grad():
        lin.weight.mul_(3)  # coarse enough that int6 rounding moves the output
        ref_off = lin(x)
        lin.qat_mix.fill_(1.0)
        ref_on = lin(x)
        lin.qat_mix.fill_(0.0)
    monkeypatch.setattr(model.CastedLinear, "forward", v.casted_linear_flag)
    monkeypatch.setattr(model.GPT, "set_qat", v.set_qat_flag)
    with torch.no_grad():
        assert torch.equal(lin(x), ref_off)
        lin.qat_on = True
        assert torch.equal(lin(x), ref_on) and not torch.equal(ref_on, ref_off)
    net = model.GPT(model.ModelConfig(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, xsa_last_n=2,
                                      rope_dims=4, vocab_size=64, bigram_buckets=16, bigram_dim=8, value_embed_dim=8,
                                      value_embed_last_n=2, num_loops=1, loop_layers=(1, 1), parallel_last_n=1))
    for block in net.blocks:  # nonzero output projections, so the blocks' quantization reaches the loss
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    compiled = torch.compile(net, backend="aot_eager")
    idx = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        base = compiled(idx, idx)
        net.set_qat(True)
        on = compiled(idx, idx)
        net.set_qat(False)
        back = compiled(idx, idx)
    assert not torch.equal(base, on) and torch.equal(base, back)


def test_gpu_time_is_summed_by_kernel_kind_per_step():
    from tools.bench import gpu_ms_by_kind, kernel_kind
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x64": "attention",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "triton_poi_fused__to_copy_add_mul_rms_norm_12": "pointwise",
        "triton_red_fused__to_copy_add_mul_rms_norm_sum_7": "reduction",
        "triton_per_fused_cross_entropy_3": "reduction",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>": "optimizer",
        "Memcpy HtoD (Pageable -> Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "aten_elementwise",
        "some_custom_kernel": "other",
    }
    assert {n: kernel_kind(n) for n in names} == names
    kinds = gpu_ms_by_kind([("nvjet_a", 3000.0), ("triton_poi_x", 1000.0), ("nvjet_b", 1000.0)], steps=2)
    assert kinds == {"matmul": 2.0, "pointwise": 0.5, "total": 2.5} and list(kinds)[0] == "matmul"
    assert gpu_ms_by_kind([], steps=2) == {}


def test_gpu_time_by_kind_leaves_out_annotation_ranges():
    """The profiler reports the optimizers' record_function ranges as GPU events too; they span kernels already
    counted (a 3.2 ms Muon range sat under "other" in the first H100 profile)."""
    from tools.bench import gpu_ms_by_kind
    kinds = gpu_ms_by_kind([("Optimizer.step#Muon.step", 3200.0), ("ProfilerStep#3", 90000.0),
                            ("nvjet_sm90_tst_256x128", 1000.0), ("void at::native::multi_tensor_apply_kernel", 800.0)],
                           steps=1)
    assert kinds == {"matmul": 1.0, "optimizer": 0.8, "total": 1.8}


def test_trace_top_groups_kernels_per_step_and_lists_one_step_in_order(tmp_path):
    import gzip
    import json
    import subprocess
    from pathlib import Path
    events = [{"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}
              for ts, name, dur in ((0, "mm", 100.0), (1, "norm", 50.0), (2, "mm", 300.0), (3, "norm", 50.0))]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 900.0})  # not a kernel
    trace = tmp_path / "t.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    script = Path(__file__).resolve().parents[1] / "scripts" / "trace_top.py"
    top = subprocess.run([sys.executable, script, trace], capture_output=True, text=True, check=True).stdout
    lines = top.splitlines()
    assert "(all kernels: 0.25 ms/step)" in lines[0]
    assert lines[1].split() == ["0.200", "1", "80.0%", "mm"] and lines[2].split() == ["0.050", "1", "20.0%", "norm"]
    order = subprocess.run([sys.executable, script, trace, "--order"], capture_output=True, text=True,
                           check=True).stdout
    assert [line.split()[-1] for line in order.splitlines()] == ["mm", "norm"]


def test_lora_ab_runs_the_probe_with_each_version_of_the_lora_pass(tmp_path):
    """scripts/lora_ab.sh: "new" runs the probe in the tree, "old" in a copy whose eval/lora.py is the given file, and
    each version's own package comes first on the path (a stub python3 reports where it ran and what it would
    import)."""
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    old = tmp_path / "lora_old.py"
    old.write_text("# the old pass\n")
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python3").write_text('#!/bin/sh\necho "docs stub cwd:$PWD path:${PYTHONPATH%%:*} args:$*"\n'
                                  'echo "docs stub lora:$(head -n 1 "${PYTHONPATH%%:*}/eval/lora.py")"\n')
    (stub / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "LORA_AB_DIR": str(tmp_path / "copy"),
           "PYTHONPATH": "/elsewhere"}
    out = subprocess.run(["bash", "scripts/lora_ab.sh", str(old), "--docs", "4"], cwd=repo, env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    new_at, old_at = out.index(f"== new: {repo}/eval/lora.py"), out.index(f"== old: {tmp_path}/copy/eval/lora.py")
    assert new_at < old_at
    assert out[new_at + 1] == f"docs stub cwd:{repo} path:{repo} args:scripts/lora_probe.py --docs 4"
    assert out[new_at + 2] == f"docs stub lora:{(repo / 'eval/lora.py').read_text().splitlines()[0]}"
    assert out[old_at + 1] == f"docs stub cwd:{tmp_path}/copy path:{tmp_path}/copy args:scripts/lora_probe.py --docs 4"
    assert out[old_at + 2] == "docs stub lora:# the old pass"
    missing = subprocess.run(["bash", "scripts/lora_ab.sh", str(tmp_path / "none.py")], cwd=repo, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "none.py is missing" in missing.stderr


def test_p1_lora_tune_searches_then_scores_the_dev_val_with_what_it_chose(tmp_path):
    """scripts/p1_lora_tune.sh: --grid pairs go to the search only, KEY=VALUE settings to both passes, RESUME to the
    search as --resume; the dev-val pass applies the search's tune_lora.json, and both land in $OUT (a stub python3
    logs each call and writes what pgolf eval would)."""
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    run, out, stub = tmp_path / "run", tmp_path / "out", tmp_path / "bin"
    run.mkdir()
    stub.mkdir()
    (stub / "python3").write_text(
        '#!/bin/sh\necho "$*" >> "$CALLS"\n'
        'case "$*" in *--tune*) echo "{}" > "$RUN/tune_lora.json";; *) echo "{}" > "$RUN/eval_lora-ttt.json";; esac\n')
    (stub / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "RUN": str(run), "DATA": "/d", "TOK": "/t.model",
           "OUT": str(out), "CALLS": str(tmp_path / "calls"), "RESUME": "/c/tune_lora.json", "TUNE_S": "100"}
    subprocess.run(["bash", "scripts/p1_lora_tune.sh", "--grid", "LORA_RANK=96", "LORA_CHUNK=64", "--grid",
                    "LORA_LR=1e-3"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    search, score = (tmp_path / "calls").read_text().splitlines()
    assert search == (f"-m tools.commands.cli eval {run} LORA_CHUNK=64 --data-dir /d --tokenizer /t.model --lora-ttt "
                      "--tune --tune-seconds 100 --grid LORA_RANK=96 --grid LORA_LR=1e-3 --resume /c/tune_lora.json")
    assert score == (f"-m tools.commands.cli eval {run} LORA_CHUNK=64 --data-dir /d --tokenizer /t.model --lora-ttt "
                     f"--settings {run}/tune_lora.json")
    assert sorted(p.name for p in out.iterdir()) == ["eval_lora-ttt.json", "tune.log", "tune_lora.json"]
    # a fixed setting the grid also searches (a resumed search's old base) is the search's to choose on the dev val
    (tmp_path / "calls").unlink()
    subprocess.run(["bash", "scripts/p1_lora_tune.sh", "lora_phase_lr=0.003", "--grid", "LORA_PHASE_LR=0.012",
                    "LORA_CHUNK=64"], cwd=repo, env={**env, "RESUME": ""}, capture_output=True, text=True, check=True)
    search, score = (tmp_path / "calls").read_text().splitlines()
    assert search.startswith(f"-m tools.commands.cli eval {run} lora_phase_lr=0.003 LORA_CHUNK=64 --data-dir")
    assert search.endswith("--grid LORA_PHASE_LR=0.012") and "--resume" not in search
    assert score.startswith(f"-m tools.commands.cli eval {run} LORA_CHUNK=64 --data-dir")


def test_stream_stats_counts_documents_long_ones_and_repeated_5_grams(tmp_path, capsys, monkeypatch):
    """scripts/stream_stats.py against counts made by hand: documents at each BOS, the share of tokens in documents
    over 1,024 tokens, and the share of 5-grams seen earlier in the stream; the splits cut to the shortest."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    from submission.data import write_shard
    spec = importlib.util.spec_from_file_location("stream_stats", Path(__file__).parents[1] / "scripts/stream_stats.py")
    stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)
    # two documents: BOS + 1,099 tokens (long), then BOS + 9, which repeats two of the first's 5-grams
    first = np.concatenate([[1], np.arange(2, 1101)])
    second = np.array([1, 2, 3, 4, 5, 2, 3, 4, 5, 6])
    s = stats.stream_stats(np.concatenate([first, second]), bos=1)
    assert s["tokens"] == 1110 and s["docs"] == 2 and s["median_doc"] == (1100 + 10) / 2
    assert s["long_doc_share"] == 1100 / 1110
    # 5-grams: 1,106 windows; seen before: (1,2,3,4,5) at the second BOS and (2,3,4,5,6) at its end, both the first's
    assert s["repeat_share"] == pytest.approx(2 / 1106)
    write_shard(tmp_path / "fineweb_val_000000.bin", np.concatenate([first, second]).astype(np.uint16))
    write_shard(tmp_path / "fineweb_tune_000000.bin", second.astype(np.uint16))
    monkeypatch.setattr(sys, "argv", ["stream_stats.py", str(tmp_path)])
    stats.main()
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("| val | 10 | 1 |") and rows[3].startswith("| tune | 10 | 1 |")  # cut to 10 tokens
    monkeypatch.setattr(sys, "argv", ["stream_stats.py", str(tmp_path), "--splits", "val,dev"])
    with pytest.raises(SystemExit, match="no shard matches .*fineweb_dev_"):
        stats.main()


def test_vs_pr1460_compares_against_an_earlier_kit_log_without_training_the_kit(tmp_path):
    """scripts/vs_pr1460.sh with KIT_LOG: the kit is not trained (no python3 -m call), its log is copied beside the
    script's, and the table reads both: train losses at equal steps, tokens/s, and each one's val_bpb at STEPS (a stub
    .bench/anchors/run-pr1460 writes the script's log lines)."""
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    anchors = tmp_path / ".bench" / "anchors"
    anchors.mkdir(parents=True)
    (anchors / "run-pr1460").write_text(
        '#!/bin/sh\necho "$*" > "$OUT/pr1460_args"\n'
        'printf "50/100 train_loss: 5.0000 train_time: 0.1m tok/s: 500000\\n100/100 train_loss: 4.0000 train_time: '
        '0.2m tok/s: 600000\\n100/100 val_loss: 3.5000 val_bpb: 1.4000\\n" > "$OUT/pr1460.log"\n')
    (anchors / "run-pr1460").chmod(0o755)
    kit_log = tmp_path / "kit_train.log"
    kit_log.write_text("step:50 train_loss:4.9\nstep:100 train_loss:3.9\ntokens_per_s:960000\n"
                       "final_raw val_loss:3.4 val_bpb:1.35\n")
    env = {**os.environ, "KIT_LOG": str(kit_log), "OUT": str(tmp_path / "out"), "PATH": os.environ["PATH"]}
    done = subprocess.run(["bash", str(repo / "scripts/vs_pr1460.sh"), "100"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True)
    out = done.stdout
    assert "kit: not trained again" in out and not (tmp_path / "out/vs_pr1460/kit_stdout.txt").exists()
    assert "| 50 | 4.9000 | 5.0000 | -0.1000 |" in out and "| 100 | 3.9000 | 4.0000 | -0.1000 |" in out
    assert "| kit | 960,000 | 1.35 |" in out and "| PR #1460 | 600,000 | 1.4000 |" in out
    assert "tokens/s ratio kit / script: 1.60" in out
    assert (tmp_path / "out/vs_pr1460/kit_train.log").read_text() == kit_log.read_text()
    assert "ITERATIONS=100" in (tmp_path / "out/vs_pr1460/pr1460_args").read_text()


def test_ablation_speed_times_each_setting_against_the_recipe_timed_twice(tmp_path):
    """scripts/ablation_speed.sh on a tiny CPU model: the recipe timed first and last, one row per setting with its
    ms/step and the difference to the recipe's mean, and a setting pgolf bench refuses reported as failed."""
    import os
    import re
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    tiny = ("RECIPE=sp1024 VOCAB_SIZE=1024 NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=2 NUM_KV_HEADS=1 SEQ_LEN=128 "
            "TRAIN_BATCH_TOKENS=256 MICRO_BATCH_TOKENS=256 COMPILE=0")
    # the script calls python3: the one running the tests (the venv's, not whatever PATH has first, as under CI)
    env = {**os.environ, "OUT": str(tmp_path), "BENCH_STEPS": "2", "BENCH_WARMUP": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "scripts/ablation_speed.sh", tiny, "MLP_MULT=2", "NO_SUCH_KEY=1"], cwd=repo,
                         env=env, capture_output=True, text=True, check=True).stdout
    first, last, mean = map(float, re.search(r"recipe as is: (\S+) ms/step first, (\S+) last \(mean (\S+)\)",
                                             out).groups())
    assert mean == pytest.approx((first + last) / 2, abs=0.01)
    ms, delta = re.search(r"^\| MLP_MULT=2 \| (\S+) \| (\S+) \|$", out, re.M).groups()
    assert float(delta) == pytest.approx(float(ms) - mean, abs=0.011)
    assert "| NO_SUCH_KEY=1 | failed (bench_2.txt) | - |" in out
    assert "unknown setting 'NO_SUCH_KEY'" in (tmp_path / "ablation_speed" / "bench_2.txt").read_text()
