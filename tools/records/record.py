"""A record folder (README, submission.json, logs, train_gpt.py, plots) written from seed run dirs; `pgolf record`
(tools/commands/record.py) writes it."""
from __future__ import annotations

import ast
import contextlib
import datetime
import importlib.metadata
import json
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tools.pack.artifact import CODE_FILENAME, DECIMAL_CAP, MODEL_FILENAME
from tools.pack.bundle import BundleError, bundle, unpack, write_bundle
from tools.pack.ship import optional_modules
from tools.records.check import CheckReport, check_record, format_check
from tools.records.plots import plot_loss_curves, plot_seed_bpb
from tools.records.results import KEY_VALUE, SeedResult, check_consistent, load_record, load_run, run_dirs, \
    train_loss_curve
from tools.records.stats import StatsReport, build_report, summary_lines

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "submission" / "train_gpt.py"
# The challenge repository's two tracks; folders are records/track_<track>/<date>_<Name>/.
TRACKS = ("10min_16mb", "non_record_16mb")
CONDITIONS = {"C1": "causal", "C2": "normalized", "C3": "score before update", "C4": "single pass"}
LOSS_PLOT, BPB_PLOT = "loss_curves.png", "val_bpb_by_seed.png"
# `override setting:num_layers:11->4(cli)`: submission/train.py logs each changed config field this way
OVERRIDE_LINE = re.compile(r"^override setting:(?P<name>\w+):(?P<old>.*)->(?P<new>.*)\((?:env|cli)\)$")
PER_SEED_SETTINGS = ("seed", "run_dir")
@dataclass
class RecordConfig:
    """What `pgolf record` writes and from which runs."""
    run_dirs: list[Path]                 # one run directory per seed (or a `pgolf seeds` output folder)
    name: str                            # submission.json name; the folder is <date>_<name with _ for spaces>
    track: str                           # one of TRACKS
    author: str
    github_id: str
    blurb: str | None = None             # None: a summary of the results
    reference: Path | None = None        # record folder to test significance against
    pack_dir: Path | None = None         # `pgolf pack` output holding train_gpt.py; None: a run dir's, else bundled
    out: Path = Path("records")
    date: str | None = None              # YYYY-MM-DD; None: today
    hardware: str | None = None          # None: from the train logs' run line
    overwrite: bool = False


@dataclass
class SeedRun:
    """One seed's run directory as the record uses it."""
    run_dir: Path
    result: SeedResult
    eval_data: dict                      # eval.json as written by the pipeline
    log_lines: list[str]                 # train.log
    model_bytes: int                     # the compressed model the seed produced


def folder_slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_")
    if not slug:
        raise ValueError(f"--name {name!r} has no letters or digits for the folder name (e.g. --name 'Int6 GPTQ')")
    return slug


def normalize_track(track: str) -> str:
    short = track.removeprefix("track_")
    if short not in TRACKS:
        raise ValueError(f"--track {track!r}: expected one of {', '.join(TRACKS)} (folders records/track_<track>/)")
    return short


def run_info(lines: list[str]) -> dict[str, str]:
    """The fields of the trainer's first `run ...` line (world_size, device, torch, python, code_hash, ...)."""
    for line in lines:
        if line.startswith("run "):
            return dict(KEY_VALUE.findall(line))
    return {}


def collect_runs(paths: list[Path]) -> list[SeedRun]:
    """Each path is a run directory or a folder of them; every run needs eval.json, train.log and its model size."""
    runs = []
    for path in paths:
        if path.is_file():
            raise NotADirectoryError(f"{path} is a file, expected a run directory or a folder of them (pass "
                                     "runs/exp/seed*)")
        found = run_dirs(path)
        if not found:
            raise FileNotFoundError(f"{path}: no eval.json here or in its subfolders (a seed that failed or is still "
                                    "running; `pgolf seeds` re-runs it)")
        for run_dir in found:
            train_log = run_dir / "train.log"
            if not train_log.is_file():
                raise FileNotFoundError(f"{train_log}: missing; the record ships each seed's train log (pass the run "
                                        "directory the pipeline wrote, not a copy of its eval.json)")
            eval_data = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
            model = run_dir / MODEL_FILENAME
            if model.is_file():
                model_bytes = model.stat().st_size
            elif isinstance(eval_data.get("bytes_model"), int):
                model_bytes = eval_data["bytes_model"]
            else:
                raise FileNotFoundError(f"{run_dir}: no {MODEL_FILENAME} and eval.json states no bytes_model (the "
                                        "record needs the model size; re-run the pipeline for this seed)")
            runs.append(SeedRun(run_dir, load_run(run_dir), eval_data,
                                train_log.read_text(encoding="utf-8", errors="replace").splitlines(), model_bytes))
    check_consistent([r.result for r in runs])
    return sorted(runs, key=lambda r: r.result.seed)


def find_code(pack_dir: Path | None, runs: list[SeedRun]) -> tuple[bytes, str, str | None]:
    """The packed train_gpt.py bytes (as counted), where they came from, and its train_gpt.py.sha256 listing."""
    candidates = [pack_dir / CODE_FILENAME] if pack_dir is not None else \
        [r.run_dir / CODE_FILENAME for r in runs if (r.run_dir / CODE_FILENAME).is_file()]
    if pack_dir is not None and not candidates[0].is_file():
        raise FileNotFoundError(f"{candidates[0]}: missing (run `pgolf pack RUN_DIR --out {pack_dir}` first)")
    if candidates:
        texts = {path: path.read_bytes() for path in candidates}
        if len(set(texts.values())) > 1:
            raise ValueError(f"the run directories hold different {CODE_FILENAME} files ({', '.join(map(str, texts))})"
                             f": the seeds ran different code; pass --pack-dir with the one to ship")
        path = candidates[0]
        sha = path.with_name(CODE_FILENAME + ".sha256")
        origin = f"`pgolf pack` output {path.parent.name}/" if pack_dir is not None else \
            f"copied from run directory {path.parent.name}/"
        return texts[path], origin, sha.read_text(encoding="utf-8") if sha.is_file() else None
    configs = [json.loads(c.read_text(encoding="utf-8")).get("model") for c in (r.run_dir / "config.json" for r in runs)
               if c.is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        script = write_bundle(bundle(ENTRY, ROOT, optional=optional_modules(configs[0] if configs else None)),
                              Path(tmp))
        return (script.read_bytes(), f"bundled by `pgolf record` from {ENTRY.relative_to(ROOT)}",
                script.with_name(CODE_FILENAME + ".sha256").read_text(encoding="utf-8"))


def unpacked_source(packed: bytes, source: str) -> str:
    """The program a self-extracting train_gpt.py runs (its lzma payload), or the text itself if plain."""
    try:
        program = unpack(packed, source)
    except BundleError as err:
        raise ValueError(str(err)) from None
    return packed.decode("utf-8", errors="replace") if program is None else program


IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _guards_imports(handler: ast.ExceptHandler) -> bool:
    """Whether an except clause catches a failed import (bare, ImportError, its subclass or a base of it)."""
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS for n in names)


def imported_modules(source: str) -> tuple[set[str], set[str]]:
    """Top-level module names a program imports: (required, optional). Optional ones are imported inside a try
    whose except catches ImportError (e.g. FA3 kernels used when installed)."""
    required, optional = set(), set()

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            body_guarded = guarded or any(_guards_imports(h) for h in node.handlers)
            for child in node.body:
                visit(child, body_guarded)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        (optional if guarded else required).update(name.split(".")[0] for name in names)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    try:
        tree = ast.parse(source)
    except SyntaxError:  # e.g. a program packed by Python 3.12, whose ast.unparse nests same-quote f-strings
        return _scan_imports(source)
    visit(tree, False)
    return required, optional - required


_IMPORT_LINE = re.compile(r"^(?:import\s+(?P<names>[\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+(?:\s+as\s+\w+)?)*)"
                          r"|from\s+(?P<module>\w[\w.]*)\s+import\b)")
_GUARD_EXCEPT = re.compile(rf"^except\s*(?::|\(?.*\b(?:{'|'.join(sorted(IMPORT_ERRORS))})\b)")


def _scan_imports(source: str) -> tuple[set[str], set[str]]:
    """imported_modules for a program this Python cannot parse: a line scan of the bundler's one-statement-per-line
    output, where an import is optional when it sits in a try block whose first except at the try's indent catches
    ImportError (or a base of it)."""
    lines = source.splitlines()
    required, optional = set(), set()
    tries: list[tuple[int, bool]] = []  # (indent of an open try block's `try:`, whether its except guards imports)
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped:
            continue
        indent = len(line) - len(stripped)
        while tries and indent <= tries[-1][0]:
            tries.pop()
        if stripped.startswith("try:"):
            handler = next((ln.lstrip() for ln in lines[i + 1:]
                            if len(ln) - len(ln.lstrip()) == indent and ln.lstrip().startswith("except")), "")
            tries.append((indent, bool(_GUARD_EXCEPT.match(handler))))
            continue
        match = _IMPORT_LINE.match(stripped)
        if match:
            names = [n.split()[0] for n in match["names"].split(",")] if match["names"] else [match["module"]]
            guarded = any(g for _, g in tries)
            (optional if guarded else required).update(n.strip().split(".")[0] for n in names)
    return required, optional - required


def requirements(packed: bytes, source: str, runs: list[SeedRun]) -> str:
    """requirements.txt: the third-party distributions the shipped program imports, at the versions the runs
    logged (torch, numpy) or else those installed here; optional imports are listed as a comment."""
    required, optional = imported_modules(unpacked_source(packed, source))

    def third_party(modules: set[str]) -> list[str]:
        return sorted(m for m in modules if m not in sys.stdlib_module_names and m != "__future__")

    owners = importlib.metadata.packages_distributions()
    logged = run_info(runs[0].log_lines)
    lines = [f"# imported by {CODE_FILENAME}; versions of the environment the seeds ran in"]
    for module in third_party(required):
        dist = owners.get(module, [module])[0]
        if run_version := logged.get(dist.lower()):
            version = run_version.split("+")[0]
            if "+" in run_version:
                lines.append(f"# the runs used {dist} {run_version}: a local build (e.g. CUDA), from its own index")
        else:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = None
        lines.append(f"{dist}=={version}" if version else dist)
    if extras := third_party(optional):
        lines.append(f"# optional, used when installed: {', '.join(extras)}")
    return "\n".join(lines) + "\n"


def _round(value: float | None, digits: int = 8) -> float | None:
    return None if value is None else round(float(value), digits)


def _condition(report: dict, condition: str) -> tuple[bool, str]:
    """(passed, detail) of one condition in an eval.json compliance report; anything malformed has not passed."""
    entry = report.get(condition)
    if not isinstance(entry, dict):
        return False, f"no result for {condition} in eval.json"
    return entry.get("passed") is True, str(entry.get("detail") or "")


def compliance_summary(runs: list[SeedRun]) -> dict[str, bool] | None:
    """{"C1": passed on every seed, ...}; None when a seed's eval.json has no compliance report."""
    reports = [r.eval_data.get("compliance") for r in runs]
    if not all(isinstance(rep, dict) and rep for rep in reports):
        return None
    conditions = sorted({c for rep in reports for c in rep})
    return {c: all(_condition(rep, c)[0] for rep in reports) for c in conditions}


def hardware(runs: list[SeedRun]) -> str:
    info = run_info(runs[0].log_lines)
    device = info.get("gpu") or info.get("device", "unknown device").split(":")[0]
    return f"{info.get('world_size', '1')}x {device}"


def significance_json(report: StatsReport) -> dict | None:
    if report.record is None:
        return None
    out = {"reference": Path(report.record).name, "reference_val_loss": _round(report.record_val_loss),
           "reference_val_bpb": _round(report.record_val_bpb), "same_tokenizer": report.same_tokenizer,
           "delta_val_bpb": _round(report.val_bpb.mean - report.record_val_bpb)}
    if report.same_tokenizer:
        out["delta_val_loss"] = _round(report.val_loss.mean - report.record_val_loss)
    if (rule := report.rule_test) is not None:
        out.update(rule_test_metric=rule.metric, rule_test_t=round(rule.t, 4), rule_test_df=rule.df,
                   rule_test_p=rule.p, rule_test_significant=rule.significant)
    if (welch := report.welch_bpb) is not None:
        out.update(welch_bpb_t=round(welch.t, 4), welch_bpb_df=round(welch.df, 4),
                   welch_bpb_p_one_sided=welch.p_one_sided)
    return out


def submission_json(cfg: RecordConfig, runs: list[SeedRun], report: StatsReport, bytes_code: int, blurb: str,
                    date: str, code_sha: str | None) -> dict:
    """submission.json in the challenge's schema (fields as in the merged records), plus the kit's extras."""
    results = [r.result for r in runs]
    data = {"author": cfg.author, "github_id": cfg.github_id, "name": cfg.name, "blurb": blurb, "date": date,
            "track": normalize_track(cfg.track),
            "val_loss": _round(report.val_loss.mean), "val_bpb": _round(report.val_bpb.mean)}
    if len(results) > 1:
        data.update(val_loss_std=_round(report.val_loss.std), val_bpb_std=_round(report.val_bpb.std))
    data["seeds"] = [r.seed for r in results]
    seed_results = {}
    for run in runs:
        r = run.result
        entry = {"val_loss": _round(r.val_loss), "val_bpb": _round(r.val_bpb),
                 "artifact_bytes": r.bytes_total if r.bytes_total is not None else run.model_bytes + bytes_code,
                 "steps": r.steps, "step_avg_ms": r.step_avg_ms}
        seed_results[str(r.seed)] = {k: v for k, v in entry.items() if v is not None}
    data["seed_results"] = seed_results
    data.update(bytes_total=max(r.model_bytes for r in runs) + bytes_code, bytes_code=bytes_code,
                hardware=cfg.hardware or hardware(runs))
    if torch_version := run_info(runs[0].log_lines).get("torch"):
        data["pytorch_version"] = torch_version
    if (compliance := compliance_summary(runs)) is not None:
        data["compliance"] = compliance
    if (significance := significance_json(report)) is not None:
        data["significance"] = significance
    if code_sha:
        data["code_source_sha256"] = code_sha
    return data


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def overrides(lines: list[str]) -> list[str]:
    """KEY=VALUE for every setting the run changed from the recipe (as logged), except the per-seed ones."""
    out = []
    for line in lines:
        match = OVERRIDE_LINE.match(line.strip())
        if match and match["name"] not in PER_SEED_SETTINGS:
            value = match["new"]
            if value.startswith("(") and value.endswith(")"):  # tuples are logged as (0.9,0.95), parsed from 0.9,0.95
                value = value[1:-1]
            out.append(f"{match['name'].upper()}={shlex.quote(value)}")
    return out


def reproduce_section(cfg: RecordConfig, runs: list[SeedRun]) -> str:
    slug = folder_slug(cfg.name)
    info = run_info(runs[0].log_lines)
    world_size = int(info.get("world_size", "1"))
    launch = f"torchrun --standalone --nproc_per_node={world_size} {CODE_FILENAME}" if world_size > 1 or \
        info.get("device", "cpu").startswith("cuda") else f"python {CODE_FILENAME}"
    settings = {r.result.seed: overrides(r.log_lines) for r in runs}
    seeds = " ".join(str(s) for s in settings)
    first = next(iter(settings.values()))
    if all(v == first for v in settings.values()):
        extra = " ".join(first)
        command = (f"for seed in {seeds}; do\n  {launch} SEED=$seed RUN_DIR=runs/seed$seed {extra}".rstrip() +
                   "\ndone")
        kit = f"pgolf seeds --seeds {seeds.replace(' ', ',')} --out runs/{slug} {extra}".rstrip()
    else:
        command = "\n".join(f"{launch} SEED={s} RUN_DIR=runs/seed{s} {' '.join(v)}".rstrip()
                            for s, v in settings.items())
        kit = "(the seeds ran with different settings: run them one by one as above)"
    return "\n".join([
        "## Reproduce", "",
        f"From inside this folder (settings as the train logs record them; data and tokenizer paths are those of "
        f"the original runs, relative to where they ran):", "", "```bash", command, "```", "",
        "With the kit (one run directory per seed, resumable; then this folder again):", "", "```bash", kit,
        shlex.join(["pgolf", "record", f"runs/{slug}", "--name", cfg.name, "--track", normalize_track(cfg.track),
                    "--author", cfg.author, "--github-id", cfg.github_id]), "```"])


def readme(cfg: RecordConfig, runs: list[SeedRun], report: StatsReport, data: dict, code_source: str) -> str:
    """The record folder's README.md: headline, results, significance, compliance, evaluation time and ablation,
    size, how to reproduce, files; one section function each."""
    results = [r.result for r in runs]
    std_bpb = f" (std {report.val_bpb.std:.8f})" if report.val_bpb.std is not None else ""
    parts = [f"# {cfg.name}", "", data["blurb"], "",
             f"**val_bpb {report.val_bpb.mean:.8f}{std_bpb}, val_loss {report.val_loss.mean:.8f} nats/token, "
             f"{len(results)} seed(s)** - track {data['track']}, {data['date']}, {data['hardware']}, "
             f"torch {data.get('pytorch_version', '?')}", ""]
    parts += _results_section(runs, report, data)
    parts += _significance_section(report)
    parts += _compliance_section(runs, data)
    parts += _evaluation_sections(runs)
    parts += _size_section(runs, data, code_source)
    parts += [reproduce_section(cfg, runs), ""]
    parts += ["## Files", "",
              f"- `README.md`, `submission.json`, `requirements.txt`",
              f"- `{CODE_FILENAME}`: the submission (self-extracting; `{CODE_FILENAME}.sha256` lists the modules)",
              *(f"- `train_seed{r.seed}.log`: the train log of seed {r.seed}" for r in results),
              f"- `{LOSS_PLOT}`, `{BPB_PLOT}`: plots from the logs", ""]
    return "\n".join(parts)


def _results_section(runs: list[SeedRun], report: StatsReport, data: dict) -> list[str]:
    """Per-seed score, steps, speed and artifact size with their mean and std, and the two plots."""
    results = [r.result for r in runs]
    n = len(results)
    rows = [[str(r.seed), f"{r.val_loss:.8f}", f"{r.val_bpb:.8f}", _fmt(r.steps), _fmt(r.step_avg_ms, ".2f"),
             f"{data['seed_results'][str(r.seed)]['artifact_bytes']:,}"] for r in results]
    rows.append(["mean", f"{report.val_loss.mean:.8f}", f"{report.val_bpb.mean:.8f}",
                 _fmt(np.mean([r.steps for r in results]) if all(r.steps for r in results) else None, ".0f"),
                 _fmt(np.mean([r.step_avg_ms for r in results]) if all(r.step_avg_ms for r in results) else None,
                      ".2f"), ""])
    if n > 1:
        rows.append(["std", f"{report.val_loss.std:.8f}", f"{report.val_bpb.std:.8f}", "", "", ""])
    return ["## Results", "",
            _table(["seed", "val_loss (nats)", "val_bpb", "steps", "ms/step", "artifact bytes"], rows), "",
            "The score of each seed is the last `final_eval_exact` line of its `train_seed<N>.log` (the kit's "
            "evaluation of the artifact reloaded from its bytes); `val_loss` is mean NLL per token in nats.", "",
            f"![training loss per seed]({LOSS_PLOT})", "", f"![val_bpb per seed]({BPB_PLOT})", ""]


def _significance_section(report: StatsReport) -> list[str]:
    """The rules' t-test against the reference record, when one was given, and the stats summary."""
    parts = ["## Significance", ""]
    if report.record is None:
        parts += ["No reference record was given (`pgolf record ... --record-folder REF` runs the rules' tests "
                  "against it).", ""]
    else:
        rule = report.rule_test
        verdict = ""
        if rule is not None:
            verdict = (f"The rules' test (one-sided one-sample t-test, H1: mean {rule.metric} < record - "
                       f"{rule.margin:.6g} = {rule.threshold:.8f}): t = {rule.t:.4f}, df = {rule.df}, "
                       f"p = {rule.p:.3g}: **{'significant' if rule.significant else 'not significant'}** at "
                       f"p < {rule.alpha}; seeds needed at this mean and std: "
                       f"{rule.seeds_needed if rule.seeds_needed is not None else 'unreachable'}.")
        parts += [f"Against `{Path(report.record).name}` (val_loss {report.record_val_loss:.8f}, val_bpb "
                  f"{report.record_val_bpb:.8f}): delta val_bpb {report.val_bpb.mean - report.record_val_bpb:+.8f}"
                  + (f", delta val_loss {report.val_loss.mean - report.record_val_loss:+.8f} nats"
                     if report.same_tokenizer else " (different tokenizer: nats per token are not comparable)")
                  + ".", "", verdict, ""]
    # the reference by its folder name: the README must not carry paths of the machine that wrote it
    named = replace(report, record=Path(report.record).name) if report.record else report
    parts += ["```", *summary_lines(named), "```", ""]
    return parts


def _compliance_section(runs: list[SeedRun], data: dict) -> list[str]:
    """C1-C4 per seed, the kit's verification of a packed run, and any condition's details."""
    parts = ["## Compliance", "",
             "Conditions of challenge issue #1017, checked by the evaluation on the real run (eval.json of each "
             "seed): C1 causal, C2 normalized, C3 score before update, C4 single pass.", ""]
    if data.get("compliance") is None:
        parts += ["**Not checked**: at least one seed's eval.json has no compliance report (evaluate with "
                  "compliance on).", ""]
    else:
        conditions = list(data["compliance"])
        rows = []
        for run in runs:
            rows.append([str(run.result.seed)] + [
                "passed" if _condition(run.eval_data["compliance"], c)[0] else "**FAILED**" for c in conditions])
        parts += [_table(["seed"] + [f"{c} {CONDITIONS.get(c, '')}".strip() for c in conditions], rows), ""]
        verified = [run for run in runs if isinstance(run.eval_data.get("verification"), dict)]
        if verified:  # tools/commands/eval.py merge_verification: the packed program's run, checked by the kit
            parts += ["The packed train_gpt.py does not carry the checks (their code would count against the cap): "
                      "`pgolf eval RUN_DIR` re-evaluated each seed's model.pgz with the run's settings and checked "
                      "them there. Its own score of the same artifact, against the run's: " + "; ".join(
                          f"seed {run.result.seed} {_fmt(run.eval_data['verification'].get('val_bpb'), '.8f')} vs "
                          f"{_fmt(run.eval_data.get('val_bpb'), '.8f')}" for run in verified)
                      + " (TTT's GPU backward is not bit-deterministic).", ""]
        for run in runs:
            details = [(c, _condition(run.eval_data["compliance"], c)[1]) for c in conditions]
            if any(detail for _, detail in details):
                parts.append(f"- seed {run.result.seed}: " + "; ".join(f"{c}: {d}" for c, d in details if d))
        parts.append("")
    return parts


def _evaluation_sections(runs: list[SeedRun]) -> list[str]:
    """Evaluation time per stage with the 8-GPU projection, and the evaluation ablation, where the runs have them."""
    parts: list[str] = []
    stage_names = sorted({s for r in runs for s in (r.eval_data.get("stages") or {})})
    if stage_names:
        rows = []
        for run in runs:
            stages, projection = run.eval_data.get("stages") or {}, run.eval_data.get("projection") or {}
            over = " (**over 600 s**)" if projection.get("over_limit") else ""
            rows.append([str(run.result.seed)] + [_fmt(stages.get(s), ".1f") for s in stage_names] +
                        [_fmt(projection.get("seconds"), ".1f") + over])
        parts += ["## Evaluation time", "",
                  _table(["seed"] + [f"{s} (s)" for s in stage_names] + ["projected full val, 8 GPUs (s)"], rows),
                  "", "Projection: the measured throughput scaled to the full FineWeb validation set "
                  "(40,540,160 sp8192 or 62,021,632 sp1024 tokens) on 8 GPUs; the evaluation cap is 600 s.", ""]
    ablations = [(run.result.seed, row) for run in runs for row in run.eval_data.get("ablation") or []]
    if ablations:
        rows = [[str(seed), str(row.get("name")), _fmt(row.get("val_loss"), ".8f"), _fmt(row.get("val_bpb"), ".8f"),
                 _fmt(row.get("seconds"), ".1f")] for seed, row in ablations]
        parts += ["## Ablation", "", _table(["seed", "evaluation", "val_loss", "val_bpb", "seconds"], rows), ""]
    return parts


def _size_section(runs: list[SeedRun], data: dict, code_source: str) -> list[str]:
    """Code, model and total bytes per seed against the decimal cap."""
    code_bytes = data["bytes_code"]
    rows = [[str(run.result.seed), f"{code_bytes:,}", f"{run.model_bytes:,}", f"{code_bytes + run.model_bytes:,}",
             f"{DECIMAL_CAP - code_bytes - run.model_bytes:,}"] for run in runs]
    return ["## Size", "",
            _table(["seed", f"code ({CODE_FILENAME})", f"model ({MODEL_FILENAME})", "total", "under the cap by"],
                   rows), "",
            f"Decimal bytes; the cap is {DECIMAL_CAP:,}. bytes_total in submission.json is the largest seed's. "
            f"{CODE_FILENAME} ({code_source}) is generated by the kit's bundler from its readable modules"
            + (f" (source sha256 {data['code_source_sha256']})" if data.get("code_source_sha256") else "") + ".",
            ""]


def default_blurb(report: StatsReport) -> str:
    text = f"{report.val_bpb.n}-seed mean val_bpb {report.val_bpb.mean:.5f}"
    if report.val_bpb.std is not None:
        text += f" (std {report.val_bpb.std:.5f})"
    text += f", val_loss {report.val_loss.mean:.5f} nats"
    if report.record is not None:
        text += f"; {report.val_bpb.mean - report.record_val_bpb:+.5f} BPB vs {Path(report.record).name}"
    return text + "."


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


@dataclass
class RecordInputs:
    """Everything read and computed from the runs before a single file of the record is written."""
    runs: list[SeedRun]
    report: StatsReport
    packed: bytes                        # train_gpt.py as shipped
    code_source: str                     # where it came from
    code_sha_text: str | None            # its train_gpt.py.sha256 listing
    submission: dict


def prepare(cfg: RecordConfig) -> RecordInputs:
    """Read the runs, the reference and the code; compute the statistics and submission.json (no writes)."""
    runs = collect_runs(cfg.run_dirs)
    reference = load_record(cfg.reference) if cfg.reference is not None else None
    report = build_report([r.result for r in runs], record=reference)
    packed, code_source, code_sha_text = find_code(cfg.pack_dir, runs)
    code_sha = None
    if code_sha_text:
        code_sha = dict(line.split(":", 1) for line in code_sha_text.splitlines() if ":" in line).get("source_sha256")
    data = submission_json(cfg, runs, report, len(packed), cfg.blurb or default_blurb(report),
                           cfg.date, code_sha)
    return RecordInputs(runs, report, packed, code_source, code_sha_text, data)


def write_files(cfg: RecordConfig, inputs: RecordInputs, folder: Path) -> None:
    """Every file of the record, into `folder` (new; the caller publishes it)."""
    runs, report = inputs.runs, inputs.report
    folder.mkdir(parents=True)
    (folder / CODE_FILENAME).write_bytes(inputs.packed)
    if inputs.code_sha_text:
        _write_text(folder / (CODE_FILENAME + ".sha256"), inputs.code_sha_text)
    for run in runs:
        shutil.copyfile(run.run_dir / "train.log", folder / f"train_seed{run.result.seed}.log")
    _write_text(folder / "requirements.txt", requirements(inputs.packed, inputs.code_source, runs))
    _write_text(folder / "submission.json", json.dumps(inputs.submission, indent=2) + "\n")
    plot_loss_curves({r.result.seed: train_loss_curve(r.log_lines) for r in runs}, folder / LOSS_PLOT,
                     f"{cfg.name}: training loss")
    plot_seed_bpb([r.result for r in runs], folder / BPB_PLOT, f"{cfg.name}: val_bpb per seed",
                  report.record_val_bpb, Path(report.record).name if report.record else None)
    _write_text(folder / "README.md", readme(cfg, runs, report, inputs.submission, inputs.code_source))


class Terminated(SystemExit):
    """SIGTERM arrived while the record was being written; exits 128 + 15 like a process the signal killed."""


@contextlib.contextmanager
def _terminate_like_interrupt():
    """Let SIGTERM (a scheduler's kill, `timeout`) unwind like Ctrl-C does, so the finally blocks that remove the
    staging folder run: its default action kills the process on the spot and left records/track_*/.record-XXXX/
    behind, which a later `git add records/` would commit. A second SIGTERM during the clean-up is ignored; the
    previous handler is restored afterwards. Signal handlers can only be set from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back from here
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def files_to_remove(old: Path, new: Path) -> list[str]:
    """Paths under an existing record folder that replacing it with `new` deletes without a replacement (files added
    by hand), sorted."""
    ours = {p.relative_to(new) for p in new.rglob("*") if not p.is_dir()}
    return sorted(str(rel) for p in old.rglob("*") if not p.is_dir() and (rel := p.relative_to(old)) not in ours)


def write_record(cfg: RecordConfig) -> tuple[Path, CheckReport]:
    """Build the record in a temp folder, validate it with check_record, then move it into place in one rename.
    Nothing is published when the check finds an error, nor when SIGINT or SIGTERM stops it. With cfg.overwrite,
    the files of the old folder that the new one does not have are printed before they go."""
    track = normalize_track(cfg.track)
    cfg = replace(cfg, date=cfg.date or datetime.date.today().isoformat())
    try:
        datetime.date.fromisoformat(cfg.date)
    except ValueError:
        raise ValueError(f"--date {cfg.date!r} is not YYYY-MM-DD (e.g. 2026-05-01)") from None
    parent = Path(cfg.out) / f"track_{track}"
    final = parent / f"{cfg.date}_{folder_slug(cfg.name)}"
    if final.exists() and not cfg.overwrite:
        raise ValueError(f"record folder {final} exists (pass --overwrite to replace it, or another --name)")
    inputs = prepare(cfg)
    parent.mkdir(parents=True, exist_ok=True)
    with _terminate_like_interrupt():
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".record-"))
        replaced = tmp / "replaced"
        try:
            staged = tmp / final.name
            write_files(cfg, inputs, staged)
            report = check_record(staged)
            if report.errors:
                raise RuntimeError(f"the record folder fails its check, so it was not written:\n"
                                   f"{format_check(report)}")
            if final.exists():
                for rel in files_to_remove(final, staged):
                    print(f"overwrite: removing {final / rel} (not in the new record)", flush=True)
                final.rename(replaced)
            staged.rename(final)
        except Terminated:
            print(f"pgolf record: stopped by SIGTERM; {final} was not written", file=sys.stderr, flush=True)
            raise
        finally:
            if replaced.exists() and not final.exists():  # stopped between the two renames: put the old one back
                replaced.rename(final)
            shutil.rmtree(tmp, ignore_errors=True)
    report.folder = final
    return final, report
