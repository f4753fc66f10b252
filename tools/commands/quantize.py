"""`pgolf quantize RUN_DIR`: the quantize stage alone (calibrate + GPTQ into RUN_DIR/model.pgz, tools/quant/)."""
from __future__ import annotations

import argparse
from dataclasses import asdict

from submission.config import apply_recipe, parse_overrides, resolve
from submission.runtime import Logger, check_tokenizer, tokenizer_identity
from tools.commands.train import settings_help  # the settings tables of `pgolf train --help`, here for quantization
from tools.pack.artifact import MODEL_FILENAME
from tools.pack.ship import bundle_entry
from tools.pack.size import log_torch_save_baseline
from tools.paths import expect_path
from tools.quant.calibrate import CalibConfig
from tools.quant.gptq import QuantConfig
from tools.quant.quantize import load_checkpoint, quantize_run


def _cmd_quantize(args: argparse.Namespace) -> int:
    run_dir = expect_path(args.run_dir, "folder", "run directory", "pass the folder the trainer wrote: RUN_DIR")
    ckpt = load_checkpoint(run_dir)
    train_cfg = ckpt.train_config
    quant_cfg, calib_cfg = QuantConfig(), CalibConfig()
    # the recipe the run was trained with sets the quantization defaults (e.g. sp8192's SD clipping)
    changed = apply_recipe(train_cfg.recipe, quant_cfg, calib_cfg)
    changed += resolve(quant_cfg, calib_cfg, train_cfg, cli=parse_overrides(args.settings))
    quant_cfg, calib_cfg = QuantConfig(**asdict(quant_cfg)), CalibConfig(**asdict(calib_cfg))  # re-validate
    # the packed program this model ships with: a speedrun switch that is on adds its module's bytes
    code = args.code_bytes if args.code_bytes is not None else bundle_entry(ckpt.model_config).sizes.packed
    if ckpt.tokenizer:  # refused before quantize.log is opened: a refused run leaves the run directory as it was
        check_tokenizer(ckpt.tokenizer, tokenizer_identity(train_cfg.tokenizer_path), run_dir / "checkpoint.pt",
                        print, args.allow_other_tokenizer)
    log = Logger(run_dir / "quantize.log", 0)
    for line in changed:
        log("override", setting=line.replace(" ", ""))
    quantize_run(run_dir, code, quant_cfg, calib_cfg, log, train_cfg, args.device, progress=not args.quiet,
                 allow_other_tokenizer=args.allow_other_tokenizer)
    log_torch_save_baseline(run_dir / MODEL_FILENAME, log)
    return 0


class _RawEpilogDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Options with their defaults, and the settings tables in the epilog as written (one line per field)."""


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="calibrate + GPTQ a run's checkpoint into RUN_DIR/model.pgz and score the reloaded artifact",
        formatter_class=_RawEpilogDefaults,
        epilog="The run's recipe (RECIPE in its config.json) sets these first; KEY=VALUE settings override them.\n\n"
               + settings_help(QuantConfig, CalibConfig))
    p.add_argument("run_dir", help="run directory holding checkpoint.pt (log: RUN_DIR/quantize.log)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="QuantConfig, CalibConfig or TrainConfig fields, e.g. CALIB_SEQS=32 DATA_DIR=data/x")
    p.add_argument("--code-bytes", type=int, default=None,
                   help="code bytes to fit the model under (default: the packed size of submission/train_gpt.py "
                        "for the checkpoint's model settings)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--allow-other-tokenizer", action="store_true",
                   help="quantize with a tokenizer (TOKENIZER_PATH) other than the one the checkpoint records, on "
                        "purpose; the artifact still records the checkpoint's")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quantize)
