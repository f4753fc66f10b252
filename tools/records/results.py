"""Per-seed results from challenge train logs, record folders (logs + submission.json) and the kit's eval.json."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tools.paths import expect_path

# Final metric lines, highest priority first: a log is scored by the LAST occurrence of the highest-priority key it
# contains. Records print several evaluations (pre-quant, round-trip, sliding window, TTT); the score is the last
# stage of the pipeline, and an `_exact` line (8 decimals) beats its rounded twin.
FINAL_METRIC_KEYS: tuple[str, ...] = (
    # the kit pipeline's score: eval/run.py prints it last, whatever stages (sliding, TTT, n-gram) were on
    "final_eval_exact",
    # score-first TTT on the quantized model
    "legal_ttt_exact",                   # 2026-03-23 record
    "quantized_ttt",                     # sp8192 scripts after the 2026-04-05 record
    "legal_ttt",
    # sliding-window eval of the round-tripped quantized model
    "final_int6_sliding_window_exact",   # 2026-03-25 record
    "final_sliding_window_exact",
    "quantized_sliding_window",          # 2026-04-05 record
    "final_int6_sliding_window",
    "final_sliding_window",
    # flat eval of the round-tripped quantized model (the naive baseline's final line; the kit's quantize stage)
    "quantized_roundtrip_exact",
    "final_int8_zlib_roundtrip_exact",
    "final_int6_roundtrip_exact",
    "quantized",
    "final_int8_zlib_roundtrip",
    "final_int6_roundtrip",
)

LOG_NAME_SEED = re.compile(r"^train_seed(\d+)\.log$")
# `seed:42` (2026-03 records) or `  seed: 42` (hyperparameter dump of the 2026-04-05 record)
SEED_LINE = re.compile(r"^\s*seed:\s*(\d+)\s*$")
METRIC_LINE = re.compile(r"^(?P<key>\S+)\s+val_loss:\s*(?P<loss>\S+)\s+val_bpb:\s*(?P<bpb>\S+)")
# `stopping_early: wallclock_cap train_time:600128ms step:7182/9000` (with or without spaces after the colons)
STOP_LINE = re.compile(r"^stopping_early:.*?train_time:\s*(\d+(?:\.\d+)?)ms\s+step:\s*(\d+)/\d+")
STEP_LINE = re.compile(r"^step:(\d+)/\d+\s")
# per-step training loss: `step:12/20000 train_loss:4.1 ...` (2026-03 records), `12/20000 train_loss: 4.1 ...`
# (2026-04-05 record) or `step:12 train_loss:4.1` (kit)
TRAIN_LOSS_LINE = re.compile(r"^(?:step:(\d+)(?:/\d+)?|(\d+)/\d+)\s+train_loss:\s*(\S+)")
STEP_AVG = re.compile(r"\sstep_avg:\s*(\d+(?:\.\d+)?)ms")
TOTAL_SIZE_LINE = re.compile(r"^Total submission size[^:]*:\s*(\d+) bytes")
CODE_SIZE_LINE = re.compile(r"^Code size:\s*(\d+) bytes")
# the kit trainer's summary line: `training_done steps:7000 train_time_s:599.9 step_avg_ms:85.7 ...`
KIT_DONE_LINE = re.compile(r"^training_done\s")
KEY_VALUE = re.compile(r"(\w+):(\S+)")


class ResultFormatError(ValueError):
    """A results file that cannot be read; `problem` says what was found, `fix` what to do about it."""

    def __init__(self, path: Path, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem} ({fix})")


@dataclass(frozen=True)
class SeedResult:
    """One seed's final evaluation and, where its source records them, training and size figures."""
    seed: int
    val_loss: float                  # mean NLL per scored token, nats
    val_bpb: float                   # bits per byte
    metric_key: str                  # the final log line the numbers came from, or "eval.json"
    source: Path                     # the file they were read from
    steps: int | None = None         # optimizer steps taken inside the time cap
    step_avg_ms: float | None = None
    bytes_total: int | None = None   # artifact: code + compressed model, decimal bytes
    bytes_code: int | None = None    # code bytes as the script counted them
    val_tokens: int | None = None    # scored tokens and their bytes (eval.json only)
    val_bytes: int | None = None

    @property
    def tokens_per_byte(self) -> float:
        """Scored tokens per byte: counted when known, else implied by BPB = nats/ln2 * tokens/bytes."""
        if self.val_tokens and self.val_bytes:
            return self.val_tokens / self.val_bytes
        return self.val_bpb * math.log(2) / self.val_loss


@dataclass(frozen=True)
class TrainingStats:
    """Figures a train log reports besides the metric; None where the log does not say."""
    steps: int | None = None
    step_avg_ms: float | None = None
    bytes_total: int | None = None
    bytes_code: int | None = None


@dataclass
class RecordResults:
    """A record folder's per-seed results (sorted by seed) and its submission.json, if it has one."""
    path: Path
    results: list[SeedResult]
    submission: dict | None


def _number(path: Path, lineno: int, key: str, field: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ResultFormatError(path, f"line {lineno}: {key} {field} {text!r} is not a positive number",
                                f"expected e.g. `{key} val_loss:1.88156874 val_bpb:1.11437394`; "
                                "the log is truncated or edited: use the log the run wrote")
    return value


def training_stats(lines: list[str]) -> TrainingStats:
    """Steps, step time and sizes from a train log's lines (challenge scripts or the kit trainer)."""
    steps = stop_steps = kit_steps = None
    step_avg = kit_step_avg = stop_train_ms = None
    bytes_total = bytes_code = None
    for line in lines:
        if match := STEP_LINE.match(line):
            steps = int(match.group(1))
            if avg := STEP_AVG.search(line):
                step_avg = float(avg.group(1))
        elif match := STOP_LINE.match(line):
            stop_train_ms, stop_steps = float(match.group(1)), int(match.group(2))
        elif match := TOTAL_SIZE_LINE.match(line):
            bytes_total = int(match.group(1))
        elif match := CODE_SIZE_LINE.match(line):
            bytes_code = int(match.group(1))
        elif KIT_DONE_LINE.match(line):
            fields = dict(KEY_VALUE.findall(line))
            kit_steps = int(fields["steps"]) if "steps" in fields else None
            kit_step_avg = float(fields["step_avg_ms"]) if "step_avg_ms" in fields else None
    steps = kit_steps or stop_steps or steps
    if step_avg is None and stop_train_ms is not None and stop_steps:
        # the 2026-04-05 record prints no step_avg; it is the timer's train_time over the steps taken
        step_avg = round(stop_train_ms / stop_steps, 2)
    return TrainingStats(steps, kit_step_avg or step_avg, bytes_total, bytes_code)


def train_loss_curve(lines: list[str]) -> list[tuple[int, float]]:
    """(step, train loss) for every `step:<n> train_loss:<x>` line, in log order; unparsable values skipped."""
    curve = []
    for line in lines:
        if match := TRAIN_LOSS_LINE.match(line):
            try:
                curve.append((int(match.group(1) or match.group(2)), float(match.group(3))))
            except ValueError:
                continue
    return curve


def parse_log(path: str | Path, final_keys: tuple[str, ...] = FINAL_METRIC_KEYS) -> SeedResult:
    """A challenge train log's final result: the last line of the highest-priority key in `final_keys`."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    found: dict[str, tuple[float, float]] = {}
    log_seed = None
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        first = line.split(maxsplit=1)[0] if line else ""
        if first in final_keys and "val_" in line:
            match = METRIC_LINE.match(line)
            if match is None:
                raise ResultFormatError(path, f"line {lineno}: malformed {first} line {line[:80]!r}",
                                        f"expected `{first} val_loss:<nats> val_bpb:<bpb>`; "
                                        "the log is truncated or edited: use the log the run wrote")
            found[first] = (_number(path, lineno, first, "val_loss", match["loss"]),
                            _number(path, lineno, first, "val_bpb", match["bpb"]))
        elif log_seed is None and (match := SEED_LINE.match(raw)):
            log_seed = int(match.group(1))
    key = next((k for k in final_keys if k in found), None)
    if key is None:
        raise ResultFormatError(path, "no final metric line", f"expected one of {', '.join(final_keys)} as "
                                "`<key> val_loss:<nats> val_bpb:<bpb>`; did the run stop before its final evaluation?")
    name_match = LOG_NAME_SEED.match(path.name)
    name_seed = int(name_match.group(1)) if name_match else None
    if name_seed is not None and log_seed is not None and name_seed != log_seed:
        raise ResultFormatError(path, f"file name says seed {name_seed} but the log's seed line says {log_seed}",
                                f"rename it to train_seed{log_seed}.log")
    seed = name_seed if name_seed is not None else log_seed
    if seed is None:
        raise ResultFormatError(path, "no seed: the name is not train_seed<N>.log and no `seed:<N>` line",
                                "rename the log to train_seed<N>.log after the seed it ran with")
    stats = training_stats(lines)
    val_loss, val_bpb = found[key]
    return SeedResult(seed, val_loss, val_bpb, key, path, stats.steps, stats.step_avg_ms, stats.bytes_total,
                      stats.bytes_code)


def parse_eval_json(path: str | Path) -> SeedResult:
    """The kit's eval.json: val_loss (nats), val_bpb and seed, optional tokens, bytes, bytes_total, steps."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResultFormatError(path, f"not valid JSON ({err})", "re-run `pgolf eval` to write it again") from err
    if not isinstance(data, dict):
        raise ResultFormatError(path, f"top level is {type(data).__name__}, not an object",
                                "re-run `pgolf eval` to write it again")

    def field(name: str, kind: type, required: bool = False, positive: bool = True):
        value = data.get(name)
        if value is None and not required:
            return None
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            sign = "positive" if positive else "non-negative"
            raise ResultFormatError(path, f"{name} is {value!r}", f"expected a {sign} {kind.__name__}; "
                                    "re-run `pgolf eval` to write it again")
        return kind(value)

    val_loss, val_bpb = field("val_loss", float, required=True), field("val_bpb", float, required=True)
    seed = field("seed", int, required=True, positive=False)
    tokens, n_bytes = field("tokens", int), field("bytes", int)
    if tokens and n_bytes:
        implied = val_loss / math.log(2) * tokens / n_bytes
        if abs(implied - val_bpb) > 1e-4 * val_bpb:
            raise ResultFormatError(path, f"val_bpb {val_bpb} but val_loss/ln2*tokens/bytes = {implied:.8f}",
                                    "val_loss must be nats per token and bytes the scored UTF-8 bytes; "
                                    "fix the evaluator that wrote it")
    return SeedResult(seed, val_loss, val_bpb, "eval.json", path, field("steps", int),
                      field("step_avg_ms", float), field("bytes_total", int), field("bytes_code", int),
                      tokens, n_bytes)


def read_submission(path: str | Path) -> dict:
    """A record's submission.json as a dict; errors name the file and the JSON problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResultFormatError(path, f"not valid JSON ({err})", "fix the syntax at that line") from err
    if not isinstance(data, dict):
        raise ResultFormatError(path, f"top level is {type(data).__name__}, not an object",
                                "submission.json holds one object with author, name, val_bpb, ...")
    return data


def record_logs(folder: str | Path) -> list[Path]:
    """The train logs of a record folder: every *.log directly inside it (the layout is one per seed)."""
    return sorted(Path(folder).glob("*.log"))


def check_consistent(results: list[SeedResult]) -> None:
    """Raise if two results share a seed or their final metric lines differ (a seed stopped early)."""
    seen: dict[int, Path] = {}
    for r in results:
        if r.seed in seen:
            raise ResultFormatError(r.source, f"seed {r.seed} again (also in {seen[r.seed]})",
                                    "seeds must be independent runs: pass each seed once")
        seen[r.seed] = r.source
    keys = {r.metric_key for r in results}
    if len(keys) > 1:
        counts = {k: sum(r.metric_key == k for r in results) for k in keys}
        odd = min(results, key=lambda r: counts[r.metric_key])
        common = max(counts, key=counts.get)
        raise ResultFormatError(odd.source, f"final metric is {odd.metric_key} but other seeds end with {common}",
                                "the run stopped before its last evaluation; re-run that seed")


def load_record(folder: str | Path) -> RecordResults:
    """All seeds of a record folder (one train log per seed) and its submission.json, if present."""
    folder = expect_path(folder, "folder", "record folder", "pass the folder holding the train logs")
    logs = record_logs(folder)
    if not logs:
        raise FileNotFoundError(f"record folder {folder}: no train logs (expected train_seed<N>.log per seed)")
    results = sorted((parse_log(p) for p in logs), key=lambda r: r.seed)
    check_consistent(results)
    submission_path = folder / "submission.json"
    submission = read_submission(submission_path) if submission_path.is_file() else None
    return RecordResults(folder, results, submission)


def run_dirs(path: str | Path) -> list[Path]:
    """Kit run directories at `path`: the folder itself when it holds an eval.json, else its subfolders that do
    (the output folder of `pgolf seeds`: one seed<N>/ per seed; seeds that failed have no eval.json)."""
    path = Path(path)
    if (path / "eval.json").is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "eval.json").is_file()) if path.is_dir() else []


def load_run(run_dir: str | Path) -> SeedResult:
    """A kit run directory: eval.json for the score, train.log for steps, step time and sizes it does not state."""
    run_dir = Path(run_dir)
    result = parse_eval_json(run_dir / "eval.json")
    train_log = run_dir / "train.log"
    if train_log.is_file():
        stats = training_stats(train_log.read_text(encoding="utf-8", errors="replace").splitlines())
        result = replace(result, steps=result.steps or stats.steps,
                         step_avg_ms=result.step_avg_ms or stats.step_avg_ms,
                         bytes_total=result.bytes_total or stats.bytes_total,
                         bytes_code=result.bytes_code or stats.bytes_code)
    return result


def load_results(path: str | Path) -> list[SeedResult]:
    """Results from a run directory (eval.json + train.log), a folder of run directories (`pgolf seeds` output),
    a record folder, a train log or an eval.json."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return [parse_eval_json(path)]
        if path.suffix == ".log":
            return [parse_log(path)]
        raise ValueError(f"{path}: not a results file (pass a train log *.log, an eval.json, or their folder)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (pass a run directory, a record folder or a results file)")
    if runs := run_dirs(path):
        return [load_run(run) for run in runs]
    if record_logs(path):
        return load_record(path).results
    raise FileNotFoundError(f"{path}: no eval.json, no run directories with one, and no train logs (did the "
                            "pipeline finish? run `pgolf eval` on the run, or pass a record folder)")
