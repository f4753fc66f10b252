"""tools/pack/ship.py (`pgolf pack`) and submission/train_gpt.py: the packed single file runs the whole pipeline
alone and matches the kit."""
from __future__ import annotations

import argparse
import dataclasses
import json
import linecache
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from submission import config, train_gpt
from submission.config import RECIPES, ModelConfig
from tools.commands.pack import add_commands
from tools.data import tune_split_fingerprint
from tools.pack.artifact import MODEL_FILENAME, ArtifactError, pack_artifact
from tools.pack.bundle import VIRTUAL_FILENAME
from tools.pack.ship import bundle_entry, pack
from tools.quant.gptq import QuantTensor, rtn_quantize

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data/sample/fineweb_1024_bpe.model"
# 2 layers x 64, seq 128, 20 steps; 4 x 64 calibration tokens; matrices this small go through GPTQ only with a
# lower passthrough size. EMA stays on, as in the recipe. Every feature of both recipes on (the sp8192 structure with
# layer 1 looped, the sp1024 tables), on the sp1024 sample.
TINY = ["NUM_LAYERS=2", "MODEL_DIM=64", "NUM_HEADS=2", "NUM_KV_HEADS=1", "XSA_LAST_N=2", "ROPE_DIMS=8",
        "BIGRAM_BUCKETS=64", "BIGRAM_DIM=16", "VALUE_EMBED_DIM=16", "VALUE_EMBED_LAST_N=2", "EMBED2=1", "NUM_LOOPS=1",
        "LOOP_LAYERS=1,1", "PARALLEL_LAST_N=1", "VOCAB_SIZE=1024", "SEQ_LEN=128", "TRAIN_BATCH_TOKENS=2048",
        "MICRO_BATCH_TOKENS=2048", "MAX_STEPS=20", "WARMUP_STEPS=0", "LOG_EVERY=10", "VAL_BATCH_SEQS=16",
        "CALIB_SEQS=4", "CALIB_SEQ_LEN=64", "PASSTHROUGH_MAX_NUMEL=1024", "SEED=7",
        "CONTEXT_LEN=512"]  # eval windows 4x the training length, not 16x: 10 s less per pipeline run


def pipeline_env() -> dict[str, str]:
    """No inherited config variables (SEED=... in a CI environment would change the run); one thread per process,
    since the test machines are shared and torch's thread pool oversubscribed them 30x in the decode loop."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "OMP_NUM_THREADS": "1"}


def run_pipelines(*runs: tuple[list[str], Path, Path, Path]) -> list[list[str]]:
    """Each (cmd, cwd, data, run_dir) run side by side (each on one thread: the test machine has two cores); the
    stdout lines of each, in order."""
    procs = [subprocess.Popen([*cmd, f"DATA_DIR={data}", f"TOKENIZER_PATH={TOKENIZER}", f"RUN_DIR={run_dir}", *TINY],
                              cwd=cwd, env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, cwd, data, run_dir in runs]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
            outs.append(stdout.splitlines())
    finally:  # one failed: the others stop with it
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outs


def value(lines: list[str], key: str) -> float:
    (line,) = [line for line in lines if line.startswith(key + " ")]
    return float(re.search(r"val_loss:(\S+)", line).group(1))


@pytest.fixture(scope="module")
def data(sample_shards) -> Path:
    return sample_shards


def test_packed_file_runs_the_pipeline_alone_and_matches_the_kit(data, tmp_path):
    kit_run, packed_run = tmp_path / "kit_run", tmp_path / "packed_run"
    # The packed program runs alone beside the kit's run: the bundle `pgolf pack` writes below (checked to be these
    # bytes), in a folder of its own.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "train_gpt.py").write_bytes(bundle_entry().packed)
    # C1's prefix: two chunks of 1,024 tokens, a third of the sample's 6,283 val tokens that the default's covers
    kit_lines, packed_lines = run_pipelines(
        ([sys.executable, "-m", "tools.pipeline", "COMPLIANCE_CHUNK_TOKENS=1024"], REPO, data, kit_run),
        ([sys.executable, "train_gpt.py"], alone, data, packed_run))
    out = tmp_path / "packed"
    result, report = pack(kit_run, out, progress=False)
    assert (out / "train_gpt.py").read_bytes() == result.packed
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILENAME, "train_gpt.py", "train_gpt.py.sha256"]
    assert f"source_sha256:{result.sha256}" in (out / "train_gpt.py.sha256").read_text().splitlines()
    code_bytes = (out / "train_gpt.py").stat().st_size
    assert report.code_bytes == code_bytes == result.sizes.packed and report.fits
    assert report.total_bytes == code_bytes + (kit_run / MODEL_FILENAME).stat().st_size <= 16_000_000
    (out / "train_gpt.py").read_bytes().decode("utf-8")  # the rules count UTF-8 bytes: the default packing is ASCII
    # The kit counted the code as the bundle it would ship: the same bytes.
    assert f"Code size: {code_bytes} bytes" in kit_lines

    assert (alone / "train_gpt.py").read_bytes() == result.packed  # what ran alone is what `pgolf pack` ships
    assert sorted(p.name for p in alone.iterdir()) == ["train_gpt.py"]  # the run wrote only into RUN_DIR
    assert f"Code size: {code_bytes} bytes" in packed_lines  # packed: the running file's own size
    assert packed_lines[-1].startswith("final_eval_exact val_loss:")
    assert any(line.startswith("gptq ") and "gptq:14" in line for line in packed_lines)  # + the tied embedding
    for key in ("quantized_roundtrip_exact", "final_eval_exact"):
        assert value(packed_lines, key) == pytest.approx(value(kit_lines, key), abs=1e-6)
    assert (packed_run / "eval.json").is_file() and (packed_run / MODEL_FILENAME).is_file()
    # The kit records the tuning split its data held out, which `pgolf eval --tune` checks (the packed one cannot).
    held_out = tune_split_fingerprint(data) or "none"
    assert (kit_run / "tune_split.txt").read_text() == f"tune_fingerprint:{held_out}\ndata_dir:{data}\n"
    assert not (packed_run / "tune_split.txt").exists()
    # Verification is the kit's: it ran in the kit's process, and the packed one says where to run it.
    kit_eval, packed_eval = (json.loads((run / "eval.json").read_text()) for run in (kit_run, packed_run))
    assert all(check["passed"] for check in kit_eval["compliance"].values()) and "compliance" in kit_eval["stages"]
    assert "compliance" not in packed_eval and "compliance" not in packed_eval["stages"]
    assert f"`pgolf eval {packed_run}`" in packed_eval["compliance_not_run"]
    assert [line for line in packed_lines if line.startswith("eval_compliance ")] == [
        f"eval_compliance status:not_run_in_process verify:`pgolf eval {packed_run}`"]
    assert any(line.startswith("eval_compliance C1:pass C2:pass C3:pass C4:pass") for line in kit_lines)

    # `pgolf eval` of the packed run verifies it and keeps the packed program's score as the run's score.
    proc = subprocess.run([sys.executable, "-m", "tools.commands.cli", "eval", str(packed_run)], cwd=REPO,
                          env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((packed_run / "eval.json").read_text())
    assert "compliance_not_run" not in merged and all(c["passed"] for c in merged["compliance"].values())
    assert (merged["val_bpb"], merged["bytes_total"]) == (packed_eval["val_bpb"], packed_eval["bytes_total"])
    assert merged["verification"]["val_bpb"] == pytest.approx(packed_eval["val_bpb"], abs=1e-6)


def test_packed_code_filename_is_the_bundlers():
    assert config.PACKED_CODE_FILENAME == VIRTUAL_FILENAME


def test_the_packed_program_knows_it_is_packed_while_the_kit_is_importable(monkeypatch):
    """PYTHONPATH may point at a kit checkout while the packed file runs: the packed program must still skip the
    kit's verification and count its own bytes. Here the kit is importable (this process imports it)."""
    program = types.ModuleType("packed_under_test")  # not __main__: defines everything, runs nothing
    program.__file__ = str(REPO / "train_gpt.py")
    monkeypatch.setitem(sys.modules, program.__name__, program)  # dataclasses look their module up there
    source = bundle_entry().readable_source
    # as the packed file's stub does: Triton's jit reads the kernels' source through linecache
    monkeypatch.setitem(linecache.cache, VIRTUAL_FILENAME, (len(source), None, source.splitlines(True),
                                                            VIRTUAL_FILENAME))
    exec(compile(source, VIRTUAL_FILENAME, "exec"), program.__dict__)
    assert program.packed() and not train_gpt.packed()


def small_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    codes, scales, _ = rtn_quantize(torch.randn(64, 64), 6)
    (run / MODEL_FILENAME).write_bytes(pack_artifact({"w": QuantTensor(codes, scales, 6)}, {}, {}))
    return run


def test_pack_enforces_the_cap_and_writes_nothing_on_bad_input(tmp_path, monkeypatch):
    run = small_run(tmp_path)
    model_bytes = (run / MODEL_FILENAME).stat().st_size
    out = tmp_path / "out"
    monkeypatch.setattr("tools.pack.ship.DECIMAL_CAP", model_bytes + 1000)  # a cap the code alone overflows
    with pytest.raises(ValueError, match=rf"code [\d,]+ \(packed train_gpt.py\) \+ model {model_bytes:,} = [\d,]+ "
                                         rf"bytes exceeds the cap {model_bytes + 1000:,} .*pgolf quantize"):
        pack(run, out, progress=False)
    assert not out.exists()
    monkeypatch.undo()
    (run / MODEL_FILENAME).write_bytes((run / MODEL_FILENAME).read_bytes()[:-5])
    with pytest.raises(ArtifactError, match="truncated"):
        pack(run, out, progress=False)
    with pytest.raises(FileNotFoundError, match=r"model.pgz not found \(run `pgolf quantize"):
        pack(tmp_path / "empty", out, progress=False)
    assert not out.exists()


def test_cli_pack_prints_the_size_report(tmp_path, capsys):
    run = small_run(tmp_path)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["pack", str(run), "--out", str(tmp_path / "out"), "--quiet"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"pack: out:{tmp_path / 'out'} source_sha256:")
    assert lines[-1].startswith("size: code_bytes:") and lines[-1].endswith("fits:true")


SWITCHES_ON = ["KEY_OFFSET_LAST_N=1", "LAYER_BIGRAM_BUCKETS=128"]


def test_the_speedrun_switches_are_packed_only_when_on_and_then_match_the_kit(data, tmp_path):
    from dataclasses import asdict

    from tools.pack.ship import optional_modules
    off, on = bundle_entry(), bundle_entry(ModelConfig(key_offset_last_n=1))
    # `pgolf pack` decides from the artifact's stored model config (a dict)
    assert optional_modules(asdict(ModelConfig(layer_bigram_buckets=8))) == ("submission.switches",)
    assert optional_modules(asdict(ModelConfig())) == () == optional_modules(None)
    assert "submission/switches.py" not in off.modules and on.modules[-1] == "submission/switches.py"
    assert on.sizes.packed > off.sizes.packed

    # Bundled with the switches off, the program refuses them instead of importing a kit it finds on the path.
    alone = tmp_path / "off"
    alone.mkdir()
    (alone / "train_gpt.py").write_bytes(off.packed)
    proc = subprocess.run([sys.executable, "train_gpt.py", f"DATA_DIR={data}", f"TOKENIZER_PATH={TOKENIZER}",
                           f"RUN_DIR={tmp_path / 'off_run'}", *TINY, *SWITCHES_ON], cwd=alone,
                          env={**pipeline_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    where = re.search(r"ImportError: model\.py:(\d+)", proc.stderr)  # the only model.py: named alone
    assert proc.returncode != 0 and where, proc.stderr[-2000:]  # short message: the kit's line holds the full text
    lines = (REPO / "submission/model.py").read_text().splitlines()
    assert "bundled with the speedrun switches off" in "".join(lines[int(where.group(1)) - 1:int(where.group(1)) + 1])

    # Bundled with them on, it runs the pipeline alone and matches the kit's run of the same settings.
    # (C1-C4 off in the kit's run: the test above checks them on the pipeline; here only the scores are compared)
    (tmp_path / "on").mkdir()
    (tmp_path / "on" / "train_gpt.py").write_bytes(on.packed)
    kit_lines, packed_lines = run_pipelines(
        ([sys.executable, "-m", "tools.pipeline", *SWITCHES_ON, "COMPLIANCE=0"], REPO, data, tmp_path / "kit_run"),
        ([sys.executable, "train_gpt.py", *SWITCHES_ON], tmp_path / "on", data, tmp_path / "packed_run"))
    assert f"Code size: {on.sizes.packed} bytes" in kit_lines and f"Code size: {on.sizes.packed} bytes" in packed_lines
    for key in ("final_prequant", "quantized_roundtrip_exact", "final_eval_exact"):
        assert value(packed_lines, key) == pytest.approx(value(kit_lines, key), abs=1e-6)

    # `pgolf quantize` on its own fits the model under the code this checkpoint ships with (switches included).
    from tools.commands.cli import main
    calib = [s for s in TINY if s.startswith("CALIB_")]  # the defaults would decode 64 x 2,048 tokens on the CPU
    assert main(["quantize", str(tmp_path / "kit_run"), "--quiet", "--device", "cpu", *calib]) == 0
    log = (tmp_path / "kit_run" / "quantize.log").read_text()
    assert f"Code size: {on.sizes.packed} bytes" in log, log[-500:]


def test_the_pipelines_eval_json_names_the_tokenizer(tmp_path, monkeypatch):
    """eval.json says which tokenizer scored the run (path, sha256 of its bytes, pieces), in the packed program too."""
    import hashlib

    from eval.run import EvalConfig

    (tmp_path / "train.log").write_text("training_done steps:3 step_avg_ms:1.5\n")
    monkeypatch.setattr(train_gpt, "packed", lambda: True)
    monkeypatch.setattr(train_gpt, "load_tokens", lambda pattern, vocab_size: None)
    monkeypatch.setattr(train_gpt, "evaluate", lambda *args, **kwargs: {"val_loss": 6.0, "val_bpb": 3.0, "stages": {}})
    model = types.SimpleNamespace(cfg=config.ModelConfig(vocab_size=1024))
    train_gpt.evaluate_final(model, tmp_path, config.TrainConfig(tokenizer_path=str(TOKENIZER)), EvalConfig(),
                             lambda *a, **kv: None, 0, 1, {}, {})
    assert json.loads((tmp_path / "eval.json").read_text())["tokenizer"] == {
        "path": str(TOKENIZER), "sha256": hashlib.sha256(TOKENIZER.read_bytes()).hexdigest(), "pieces": 1024}


# The limit for the whole packed pipeline (train, calibration, GPTQ, bit allocation, budget fit, artifact,
# reload, evaluation). Every code byte is a model byte less; brotli moves a few dozen bytes between Python versions.
PACKED_LIMIT = 42_000


def test_the_packed_program_stays_within_its_byte_limit():
    for cfg in (ModelConfig(), ModelConfig(**{k: v for k, v in RECIPES["sp1024"].items()
                                              if k in {f.name for f in dataclasses.fields(ModelConfig)}})):
        packed = bundle_entry(cfg).sizes.packed
        assert packed <= PACKED_LIMIT, (f"packed train_gpt.py is {packed:,} bytes, over the {PACKED_LIMIT:,} limit: "
                                        "shrink what the entry imports before adding more")
