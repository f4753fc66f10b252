"""Challenge entry point: train -> quantize (self-calibrated GPTQ, model.pgz) -> reload from the bytes -> evaluate.

Packed: `torchrun --nproc_per_node=N train_gpt.py [KEY=VALUE ...]`; KEY is any setting of Settings (upper case also
read from the environment). This is the composition root: the one submission/ module that imports from eval/ and
tools/ as well. The bundler (tools/pack/bundle/) packs it and everything it imports into the single train_gpt.py a
record ships. The kit runs it through tools/pipeline.py, which passes in what the packed program does not carry: its
counted code size (the packed bundle's) and the verified evaluation (C1-C4).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from eval.bpb import byte_luts
from eval.run import EvalConfig, evaluate
from submission.config import ModelConfig, TrainConfig, packed, parse_overrides, resolve
from submission.data import load_tokens
from submission.runtime import Logger, setup_distributed, tokenizer_identity
from submission.train import overwrite_asked, train
from tools.pack.artifact import MODEL_FILENAME
from tools.quant.calibrate import CalibConfig
from tools.quant.gptq import QuantConfig
from tools.quant.quantize import quantize_run, read_training_done


@dataclass
class Settings:
    """Every setting of a run, one tree by area; KEY=VALUE names any field of any area (the n-gram's as
    NGRAM_<FIELD>), resolved by submission.config.resolve."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def own_size(model_cfg: ModelConfig) -> int:
    """The packed program's counted code bytes: its own size, exactly what is submitted."""
    return Path(__file__).stat().st_size


def evaluate_final(model, run_dir: Path, train_cfg: TrainConfig, eval_cfg: EvalConfig, log, rank: int,
                   world_size: int, stages: dict[str, float], sizes: dict[str, int], verify=None) -> None:
    """The score: the legal evaluation (eval/run.py) of the model reloaded from the artifact's bytes; eval.json.
    verify: the kit's evaluation, which also checks C1-C4 (eval/verify.py); without it (the packed program) the
    result says where to verify it, whatever COMPLIANCE and ABLATION are."""
    val_tokens = load_tokens(f"{train_cfg.data_dir}/fineweb_val_*.bin", model.cfg.vocab_size)
    luts = byte_luts(train_cfg.tokenizer_path, model.cfg.vocab_size)
    unverified = {}
    if verify is None:
        unverified["compliance_not_run"] = f"packed program: verify in the kit with `pgolf eval {run_dir}`"
        log("eval_compliance", status="not_run_in_process", verify=f"`pgolf eval {run_dir}`")
    body = (verify or evaluate)(model, val_tokens, luts, eval_cfg, rank, world_size, log=log)
    if rank:
        return
    done = read_training_done(run_dir)
    result = {"seed": train_cfg.seed, **body, **unverified, "tokenizer": tokenizer_identity(train_cfg.tokenizer_path),
              "steps": int(done["steps"]), "step_avg_ms": float(done["step_avg_ms"]), **sizes,
              "stages": {**{k: round(v, 3) for k, v in stages.items()}, **body["stages"]}}
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run_dir / "eval.json")


def main(argv: list[str] | None = None, code_bytes=None, verify=None) -> Path:
    """Settings from the defaults (a recipe), then environment variables (upper-case names), then KEY=VALUE
    arguments; train -> quantize -> reload -> evaluate. OVERWRITE=1 replaces a run already in RUN_DIR (refused
    otherwise). code_bytes(model_cfg) -> the counted code size, and verify (evaluate_final's): what the kit passes in
    (tools/pipeline.py); without them this is the packed program, which counts its own size."""
    if code_bytes is None and not packed():
        raise SystemExit("submission/train_gpt.py counts its own bytes only when packed: in the kit run "
                         "`python -m tools.pipeline KEY=VALUE ...` (it passes in the packed size and verification)")
    cli = parse_overrides(sys.argv[1:] if argv is None else argv)
    overwrite = overwrite_asked(cli)
    s = Settings()
    changed = resolve(s, cli=cli)
    model_cfg, train_cfg, quant_cfg, calib_cfg, eval_cfg = s.model, s.train, s.quant, s.calib, s.eval
    t0 = time.perf_counter()
    run_dir = train(model_cfg, train_cfg, changed, overwrite)
    stages = {"train": time.perf_counter() - t0}
    rank, world_size, device = setup_distributed()
    log = Logger(run_dir / "train.log", rank)
    counted = (code_bytes or own_size)(model_cfg) if rank == 0 else 0
    t0 = time.perf_counter()
    model, _ = quantize_run(run_dir, counted, quant_cfg, calib_cfg, log, train_cfg, device)
    stages["quantize"] = time.perf_counter() - t0
    model_bytes = (run_dir / MODEL_FILENAME).stat().st_size
    sizes = {"bytes_total": counted + model_bytes, "bytes_code": counted, "bytes_model": model_bytes}
    evaluate_final(model, run_dir, train_cfg, eval_cfg, log, rank, world_size, stages, sizes, verify)
    if world_size > 1:  # without it a gloo rank could abort at exit ("terminate called without an active exception")
        dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    main()
