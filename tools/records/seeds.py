"""The pipeline once per seed (one after another, or one per GPU group), resumable, streamed; `pgolf seeds`
(tools/commands/seeds.py) runs it."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import BinaryIO

from tqdm import tqdm

from eval.progress import progress_bar
from submission.config import parse_overrides
from tools.paths import expect_output
from tools.records.results import ResultFormatError, SeedResult, load_run, parse_eval_json

# One seed = one process of the packed pipeline's entry (train -> quantize -> reload -> evaluate -> eval.json).
PIPELINE = "{python} -m tools.pipeline SEED={seed} RUN_DIR={run_dir}"
# torchrun --standalone rendezvouses on a free local port of its own, so several groups run side by side.
PIPELINE_TORCHRUN = ("{python} -m torch.distributed.run --standalone --nproc_per_node={nproc} "
                     "-m tools.pipeline SEED={seed} RUN_DIR={run_dir}")
TEMPLATE_FIELDS = ("python", "seed", "run_dir", "nproc")
# Progress bars in a child redraw with carriage returns every 0.1 s; one redraw per 10 s per seed keeps the
# interleaved output of several seeds readable while still showing that each is moving.
PROGRESS_EVERY_S = 10.0
CONSOLE_LOG = "console.log"       # the child's stdout + stderr (tracebacks land here, not in train.log)
RESERVED_KEYS = ("SEED", "RUN_DIR")
# OUT/settings.json: what defines every seed's run (settings, command, processes per seed), so that a resume with
# other settings is refused instead of reporting seeds that ran with the old ones as finished.
SETTINGS_FILE = "settings.json"  # not seed*: `pgolf record OUT/seed*` takes the run directories
SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclass
class SeedsConfig:
    """What `pgolf seeds` runs: which seeds, where, with which overrides, on which devices."""
    seeds: list[int]
    out: Path                                  # run directories go to OUT/seed<N>
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE appended to every seed's command
    gpus_per_seed: int = 0                     # 0: a plain process per seed, one after another (CPU or one GPU)
    gpus: list[str] | None = None              # device ids split into groups; None: CUDA_VISIBLE_DEVICES or all
    command: str | None = None                 # template with {python} {seed} {run_dir} {nproc}; None: the pipeline
    progress_every_s: float = PROGRESS_EVERY_S


@dataclass
class SeedOutcome:
    """How one seed ended: done (this call), finished (an earlier call; not redone) or failed."""
    seed: int
    run_dir: Path
    status: str
    result: SeedResult | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    problem: str = ""


def validate(cfg: SeedsConfig) -> None:
    if not cfg.seeds:
        raise ValueError("no seeds given (e.g. --seeds 1337 42 2025)")
    duplicates = sorted({s for s in cfg.seeds if cfg.seeds.count(s) > 1})
    if duplicates:
        raise ValueError(f"--seeds lists {', '.join(map(str, duplicates))} more than once (each seed runs once)")
    for key, value in parse_overrides(cfg.overrides).items():
        if key.upper() in RESERVED_KEYS:
            raise ValueError(f"override {key}={value}: SEED and RUN_DIR are set per seed by `pgolf seeds` (use --seeds "
                             "and --out)")
    if cfg.gpus_per_seed < 0:
        raise ValueError(f"--gpus-per-seed {cfg.gpus_per_seed} is negative (0 runs plain processes)")
    if cfg.command is not None:
        try:
            cfg.command.format(**{name: "" for name in TEMPLATE_FIELDS})
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"--command {cfg.command!r}: bad template ({err!r}); it may use "
                             f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}") from None


def seed_command(cfg: SeedsConfig, seed: int, run_dir: Path) -> list[str]:
    """The argv of one seed: the template filled in and split like a shell would, then the overrides."""
    template = cfg.command or (PIPELINE_TORCHRUN if cfg.gpus_per_seed else PIPELINE)
    text = template.format(python=shlex.quote(sys.executable), seed=seed, run_dir=shlex.quote(str(run_dir)),
                           nproc=max(1, cfg.gpus_per_seed))
    return shlex.split(text) + list(cfg.overrides)


def setting_names() -> set[str]:
    """The environment variables the pipeline reads as settings: its configs' field names in upper case (n-gram
    fields as NGRAM_<FIELD>), less SEED and RUN_DIR, which `pgolf seeds` sets per seed."""
    # imported here: the configs pull in torch, which nothing else in this module needs at import time
    from eval.ngram import NgramConfig
    from eval.run import EvalConfig
    from submission.config import ModelConfig, TrainConfig
    from tools.quant.calibrate import CalibConfig
    from tools.quant.gptq import QuantConfig

    kinds = (ModelConfig, TrainConfig, QuantConfig, CalibConfig, EvalConfig)
    names = {f.name for kind in kinds for f in dataclasses.fields(kind)}
    names |= {f"ngram_{f.name}" for f in dataclasses.fields(NgramConfig)}
    return {name.upper() for name in names} - set(RESERVED_KEYS)


def run_settings(cfg: SeedsConfig, env: dict[str, str] | None = None) -> dict:
    """What defines each seed's run besides its seed, as stored in OUT/settings.json: the settings (environment
    variables named after a config field, then the KEY=VALUE overrides, keys upper-cased as the configs read them),
    the command template and the processes per seed."""
    env = dict(os.environ) if env is None else env
    names = setting_names()
    settings = {key: value for key, value in env.items() if key in names}
    for key, value in parse_overrides(cfg.overrides).items():
        settings[key.upper()] = value  # a later override of the same key wins, as in the pipeline
    return {"settings": dict(sorted(settings.items())),
            "command": cfg.command or (PIPELINE_TORCHRUN if cfg.gpus_per_seed else PIPELINE),
            "processes_per_seed": max(1, cfg.gpus_per_seed)}


def finished_seeds(out: Path) -> list[int]:
    """Seeds with an eval.json under OUT (any seed<N> folder, listed in this call or not: `pgolf stats OUT` takes
    them all)."""
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for d in out.iterdir() if (m := SEED_DIR.match(d.name))
                  and (d / "eval.json").is_file())


def settings_differences(stored: dict, current: dict) -> list[str]:
    """'KEY old -> new' for every setting, and the command or processes per seed, that differ."""
    def shown(value) -> str:
        return "(unset)" if value is None else repr(value) if isinstance(value, str) and " " in value else str(value)

    old, new = stored.get("settings", {}), current["settings"]
    lines = [f"{key} {shown(old.get(key))} -> {shown(new.get(key))}" for key in sorted(set(old) | set(new))
             if old.get(key) != new.get(key)]
    for key, flag in (("command", "--command"), ("processes_per_seed", "--gpus-per-seed")):
        if stored.get(key) != current[key]:
            lines.append(f"{flag} {shown(stored.get(key))} -> {shown(current[key])}")
    return lines


def check_resume(out: Path, current: dict) -> None:
    """Refuse to add seeds to an experiment whose finished seeds ran with other settings (ValueError naming the
    differences and the fix). Reads only; store_settings writes."""
    finished = finished_seeds(out)
    path = out / SETTINGS_FILE
    if not finished or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        differences = settings_differences(stored, current)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err}); it holds the settings seeds "
                         f"{','.join(map(str, finished))} ran with: restore it, or pass a new --out folder") from None
    if differences:
        raise ValueError(f"{out}: seeds {','.join(map(str, finished))} finished with other settings than this call's "
                         f"({'; '.join(differences)}; stored in {path}): pass the same settings and environment to "
                         "resume, or a new --out folder for a new experiment")


def store_settings(out: Path, current: dict) -> None:
    """Write OUT/settings.json (atomically) unless it already holds these settings. An experiment made before the file
    existed is taken to have run with this call's settings, and the output says so."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            if json.loads(path.read_text(encoding="utf-8")) == current:
                return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # only reached when no seed finished (check_resume): nothing depends on the old file
    elif finished := finished_seeds(out):
        tqdm.write(f"settings_unverified:{path} seeds:{','.join(map(str, finished))} (they finished before "
                   "`pgolf seeds` stored its settings: taken to be this call's)")
    tmp = path.with_name(f".{SETTINGS_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def visible_gpus() -> list[str]:
    """Device ids the children may use: CUDA_VISIBLE_DEVICES when set (ids or UUIDs), else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch  # only here: counting devices needs the CUDA runtime, nothing else in this module does

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_groups(cfg: SeedsConfig) -> list[list[str] | None]:
    """One entry per seed that may run at once: a list of device ids, or None (inherit the environment)."""
    if not cfg.gpus_per_seed:
        return [None]
    gpus = cfg.gpus if cfg.gpus is not None else visible_gpus()
    if len(gpus) < cfg.gpus_per_seed:
        raise ValueError(f"--gpus-per-seed {cfg.gpus_per_seed} but {len(gpus)} GPU(s) visible ({','.join(gpus)}): "
                         "pass fewer per seed, or drop --gpus-per-seed to run plain processes on the CPU")
    count = len(gpus) // cfg.gpus_per_seed
    return [gpus[i * cfg.gpus_per_seed:(i + 1) * cfg.gpus_per_seed] for i in range(count)]


def finished_result(run_dir: Path, seed: int) -> SeedResult | None:
    """The seed's result when its eval.json exists and parses (a finished seed); None otherwise."""
    eval_json = run_dir / "eval.json"
    if not eval_json.is_file():
        return None
    try:
        result = parse_eval_json(eval_json)
    except ResultFormatError as err:
        tqdm.write(f"seed:{seed} unreadable_eval_json:{eval_json} problem:{err.problem!r} action:rerun")
        return None
    if result.seed != seed:
        raise ValueError(f"{eval_json}: seed {result.seed}, but the folder is seed {seed}'s (move it away, or "
                         f"pass a fresh --out)")
    return load_run(run_dir)


def set_aside(run_dir: Path) -> Path:
    """Move an unfinished run directory out of the way (kept: its logs say why it stopped), to a name that does not
    start with `seed`, so that `pgolf record OUT/seed*` takes only the run directories."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    target = run_dir.with_name(f"incomplete-{run_dir.name}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"incomplete-{run_dir.name}-{stamp}-{n}")
    os.replace(run_dir, target)
    return target


def pump(stream: BinaryIO, emit: Callable[[str], None], progress_every_s: float) -> None:
    """Copy a child's output to `emit` line by line. Segments ended by a lone carriage return are progress-bar
    redraws: the first and then at most one per `progress_every_s` are passed on; the bar's final state ends in a
    newline and always is."""
    buffer = b""
    last_progress = -float("inf")
    while chunk := stream.read1(65536):
        buffer += chunk
        # a trailing \r may be the first half of \r\n: keep it until the next chunk says which
        hold = 1 if buffer.endswith(b"\r") else 0
        parts = re.split(rb"(\r\n|\n|\r)", buffer[:len(buffer) - hold])
        buffer = parts.pop() + buffer[len(buffer) - hold:]
        for text, sep in zip(parts[::2], parts[1::2]):
            line = text.decode("utf-8", errors="replace")
            if sep != b"\r":
                emit(line)
            elif line.strip() and time.monotonic() - last_progress >= progress_every_s:
                last_progress = time.monotonic()
                emit(line)
    if buffer.strip(b"\r\n"):
        emit(buffer.rstrip(b"\r\n").decode("utf-8", errors="replace"))


class SeedRunner:
    """Runs seeds on a pool of device groups, streaming each child's output with a `[seed N]` prefix."""

    def __init__(self, cfg: SeedsConfig):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()

    def emit(self, seed: int, console, line: str) -> None:
        with self.lock:
            tqdm.write(f"[seed {seed}] {line}")
            console.write(line + "\n")
            console.flush()

    def run_one(self, seed: int, run_dir: Path, group: list[str] | None) -> SeedOutcome:
        argv = seed_command(self.cfg, seed, run_dir)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if group is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        run_dir.mkdir(parents=True, exist_ok=True)
        console_path = run_dir / CONSOLE_LOG
        devices = f" CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if group is not None else ""
        start = time.monotonic()
        with open(console_path, "w", encoding="utf-8") as console:
            self.emit(seed, console, f"${devices} {shlex.join(argv)}")
            try:
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
            except OSError as err:
                return SeedOutcome(seed, run_dir, "failed", problem=f"could not start {argv[0]!r}: {err}")
            with self.lock:
                self.running.add(proc)
            try:
                pump(proc.stdout, lambda line: self.emit(seed, console, line), self.cfg.progress_every_s)
                code = proc.wait()
            finally:
                with self.lock:
                    self.running.discard(proc)
        seconds = time.monotonic() - start
        logs = f"see {console_path}" + (f" and {run_dir / 'train.log'}" if (run_dir / "train.log").is_file() else "")
        if code != 0:
            return SeedOutcome(seed, run_dir, "failed", exit_code=code, seconds=seconds,
                               problem=f"exit code {code}; {logs}")
        try:
            result = finished_result(run_dir, seed)
        except ValueError as err:
            return SeedOutcome(seed, run_dir, "failed", exit_code=code, seconds=seconds, problem=str(err))
        if result is None:
            return SeedOutcome(seed, run_dir, "failed", exit_code=code, seconds=seconds,
                               problem=f"exited 0 but {run_dir / 'eval.json'} is missing or unreadable; {logs}")
        return SeedOutcome(seed, run_dir, "done", result, code, seconds)

    def stop_all(self) -> None:
        with self.lock:
            for proc in self.running:
                proc.terminate()

    def run(self) -> list[SeedOutcome]:
        """Every seed of the config; finished ones are reported, not redone. Order of the result: cfg.seeds."""
        validate(self.cfg)
        out = self.cfg.out.resolve()
        expect_output(out, "folder", "--out")
        groups = gpu_groups(self.cfg)
        settings = run_settings(self.cfg)
        check_resume(out, settings)  # before anything is written or moved aside
        out.mkdir(parents=True, exist_ok=True)
        store_settings(out, settings)
        outcomes: dict[int, SeedOutcome] = {}
        todo = []
        for seed in self.cfg.seeds:
            run_dir = out / f"seed{seed}"
            result = finished_result(run_dir, seed)
            if result is not None:
                outcomes[seed] = SeedOutcome(seed, run_dir, "finished", result)
                tqdm.write(f"seed:{seed} status:finished run_dir:{run_dir} (eval.json present: not redone)")
                continue
            if run_dir.exists():
                tqdm.write(f"seed:{seed} unfinished_run_dir_moved_to:{set_aside(run_dir)}")
            todo.append((seed, run_dir))
        if not todo:
            return [outcomes[s] for s in self.cfg.seeds]
        free: Queue = Queue()
        for group in groups:
            free.put(group)

        def task(seed: int, run_dir: Path) -> SeedOutcome:
            group = free.get()
            try:
                return self.run_one(seed, run_dir, group)
            finally:
                free.put(group)

        parallel = min(len(groups), len(todo))
        tqdm.write(f"seeds_to_run:{','.join(str(s) for s, _ in todo)} parallel:{parallel} "
                   f"gpu_groups:{';'.join(','.join(g) for g in groups) if groups != [None] else 'inherited'}")
        # a bar on a terminal (tqdm.write prints above it); in a log, a `progress:seeds done:<n>/<total>` line per seed
        with progress_bar(total=len(todo), desc="seeds", unit="seed") as bar, \
                ThreadPoolExecutor(parallel) as pool:
            futures = [pool.submit(task, seed, run_dir) for seed, run_dir in todo]
            try:
                for future in as_completed(futures):
                    outcome = future.result()
                    outcomes[outcome.seed] = outcome
                    tqdm.write(outcome_line(outcome))
                    bar.update(1)
            except KeyboardInterrupt:
                for future in futures:
                    future.cancel()
                self.stop_all()
                raise
        return [outcomes[s] for s in self.cfg.seeds]


def outcome_line(o: SeedOutcome) -> str:
    if o.status == "failed":
        code = f" exit_code:{o.exit_code}" if o.exit_code is not None else ""
        return f"seed:{o.seed} status:failed{code} seconds:{o.seconds:.1f} problem:{o.problem}"
    r = o.result
    return (f"seed:{o.seed} status:{o.status} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} "
            f"seconds:{o.seconds:.1f} run_dir:{o.run_dir}")
