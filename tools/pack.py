"""`pgolf quantize RUN_DIR` (the quantize stage alone) and `pgolf pack RUN_DIR --out DIR` (the shippable folder)."""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from submission.config import ModelConfig, apply_recipe, from_dict, parse_overrides, resolve
from submission.model import SWITCHES, uses_switches
from submission.runtime import Logger, check_tokenizer, tokenizer_identity
from tools.artifact import CODE_FILENAME, DECIMAL_CAP, MODEL_FILENAME, read_contents
from tools.bundle import BundleResult, bundle, write_bundle
from tools.calibrate import CalibConfig
from tools.cli import expect_output, expect_path
from tools.gptq import QuantConfig
from tools.quantize import load_checkpoint, quantize_run
from tools.size import SizeReport, size_report

KIT_ROOT = Path(__file__).resolve().parents[1]
ENTRY = KIT_ROOT / "submission" / "train_gpt.py"


def optional_modules(model_config: ModelConfig | dict | None) -> tuple[str, ...]:
    """The lazily imported kit modules a packed program of this model needs: submission/switches.py when a speedrun
    switch is on."""
    if isinstance(model_config, dict):
        model_config = from_dict(ModelConfig, model_config)
    return (SWITCHES,) if model_config is not None and uses_switches(model_config) else ()


def bundle_entry(model_config: ModelConfig | dict | None = None) -> BundleResult:
    """The packed single-file program of the pipeline entry (its size is the code bytes the challenge counts), with
    what `model_config` needs."""
    return bundle(ENTRY, KIT_ROOT, optional=optional_modules(model_config))


def pack(run_dir: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> tuple[BundleResult, SizeReport]:
    """Write OUT/train_gpt.py (+ .sha256) and OUT/model.pgz, after checking code + model bytes fit the decimal cap.

    Nothing is written when the run has no valid artifact or the total is over the cap.
    """
    run_dir, out = Path(run_dir), Path(out)
    if run_dir.exists():  # a file there would read as "model.pgz not found" below
        expect_path(run_dir, "folder", "run directory", f"pass the folder that holds {MODEL_FILENAME}")
    model_path = expect_path(run_dir / MODEL_FILENAME, "file", "", f"run `pgolf quantize {run_dir}` first")
    expect_output(out, "folder", "--out")
    blob = model_path.read_bytes()
    contents = read_contents(blob, str(model_path))  # a truncated or corrupted artifact stops here
    result = bundle_entry(contents.model_config)
    code = result.sizes.packed
    total = code + len(blob)
    if total > DECIMAL_CAP:
        raise ValueError(f"{model_path}: code {code:,} (packed {ENTRY.name}) + model {len(blob):,} = {total:,} bytes "
                         f"exceeds the cap {DECIMAL_CAP:,} (decimal bytes) by {total - DECIMAL_CAP:,}: re-fit the "
                         f"model to this code with `pgolf quantize {run_dir} --code-bytes {code}`")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILENAME}.tmp{os.getpid()}"
    try:
        shutil.copyfile(model_path, tmp)
        write_bundle(result, out)
        os.replace(tmp, out / MODEL_FILENAME)
    finally:
        tmp.unlink(missing_ok=True)
    return result, size_report(out / MODEL_FILENAME, out / CODE_FILENAME, progress=progress)


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
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    result, report = pack(args.run_dir, args.out, progress=not args.quiet)
    print(f"pack: out:{args.out} source_sha256:{result.sha256[:16]} modules:{len(result.modules)} "
          f"readable_bytes:{result.sizes.readable} packed_bytes:{result.sizes.packed}")
    print("\n".join(report.lines()))
    return 0


class _RawEpilogDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Options with their defaults, and the settings tables in the epilog as written (one line per field)."""


def add_commands(subparsers) -> None:
    from tools.train_cmd import settings_help  # the settings tables of `pgolf train --help`, here for quantization

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

    p = subparsers.add_parser("pack", help="write the shippable folder: packed train_gpt.py (+ .sha256) and model.pgz,"
                                           " checked against 16,000,000 bytes")
    p.add_argument("run_dir", help=f"run directory holding {MODEL_FILENAME}")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pack)
