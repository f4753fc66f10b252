"""What ships: the packed train_gpt.py of the pipeline entry (its size is the code bytes a run counts) and the folder
`pgolf pack` writes (tools/commands/pack.py): that program beside the run's model.pgz, checked against the cap."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from submission.config import ModelConfig, from_dict
from submission.model import SWITCHES, uses_switches
from tools.pack.artifact import CODE_FILENAME, DECIMAL_CAP, MODEL_FILENAME, read_contents
from tools.pack.bundle import BundleResult, bundle, write_bundle
from tools.pack.size import SizeReport, size_report
from tools.paths import expect_output, expect_path

KIT_ROOT = Path(__file__).resolve().parents[2]
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
