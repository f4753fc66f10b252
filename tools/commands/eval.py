"""`pgolf eval`: score a run's model.pgz with the legal recipe, verify it (C1-C4, ablation), write eval.json."""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from eval.bpb import build_byte_luts
from eval.lora import LoraConfig, evaluate_lora
from eval.run import EVAL_LIMIT_S, EvalConfig
from eval.verify import evaluate_verified
from submission.config import ModelConfig, TrainConfig, from_dict, parse_overrides, resolve, to_dict
from submission.data import load_tokens
from submission.model import GPT
from submission.runtime import (Logger, check_tokenizer, configure_cuda, read_tokenizer, setup_distributed,
                                writable_check)
from tools.commands.train import settings_help
from tools.data import check_tune_split
from tools.pack.artifact import CODE_FILENAME, MODEL_FILENAME, read_artifact, to_state_dict
from tools.paths import expect_path

# A one-off pass's file name is made of its changed settings; past this length it is a hash of them instead.
ONE_OFF_NAME_CHARS = 80


def run_facts(root: Path) -> dict:
    """What the run directory says about the run: its train and model configs (config.json) and, from train.log,
    the seed and the `training_done` steps and step_avg_ms."""
    facts: dict = {"train": {}, "model": None}
    config = root / "config.json"
    if config.is_file():
        stored = json.loads(config.read_text())
        facts["train"], facts["model"] = stored.get("train", {}), stored.get("model")
        if "seed" in facts["train"]:
            facts["seed"] = int(facts["train"]["seed"])
    log = root / "train.log"
    if log.is_file():
        text = log.read_text(errors="replace")
        if "seed" not in facts and (m := re.search(r"^seed:(\d+)\s*$", text, re.M)):
            facts["seed"] = int(m.group(1))
        if m := re.search(r"^training_done .*?steps:(\d+).*?step_avg_ms:([\d.]+)", text, re.M):
            facts["steps"], facts["step_avg_ms"] = int(m.group(1)), float(m.group(2))
    return facts


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temp file and a rename: a crash never leaves a half-written eval.json."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_eval(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: existing eval.json is not valid JSON ({e}); move it away or pass --out") from None
    return data if isinstance(data, dict) else None


def merge_verification(packed: dict, verified: dict) -> dict:
    """The packed program's eval.json plus the kit's verification of the same artifact.

    The packed train_gpt.py does not run the compliance checks (their code would count against the cap), so its
    eval.json says `compliance_not_run`. Its score stays the run's score (train.log says the same); the kit's
    re-evaluation adds the C1-C4 report at the top level, where `pgolf record` reads it, and keeps its own score,
    stages and ablation rows under "verification" (TTT's GPU backward is not bit-deterministic, so the two scores
    differ by ~1e-5 BPB).
    """
    if verified.get("bytes_model") != packed.get("bytes_model"):
        raise ValueError(f"verification scored a {verified.get('bytes_model')}-byte model but the packed run's "
                         f"eval.json states {packed.get('bytes_model')}: not the same artifact")
    merged = dict(packed)
    if "compliance" in verified:  # COMPLIANCE=0 verifies nothing: the run stays marked unverified
        del merged["compliance_not_run"]
        merged["compliance"] = verified["compliance"]
    merged["verification"] = {k: v for k, v in verified.items()
                              if k not in ("compliance", "seed", "bytes_model", "bytes_code", "bytes_total")}
    return merged


def one_off_name(differences: list[str]) -> str:
    """eval_<changed settings>.json for a pass whose settings differ from the run's recorded ones, e.g.
    eval_ttt-0_hash_embed-0.json for --no-ttt; a long list becomes eval_oneoff-<hash>.json."""
    slug = re.sub(r"[^A-Za-z0-9.,_-]+", "", "_".join(differences))
    if len(slug) > ONE_OFF_NAME_CHARS:
        slug = "oneoff-" + hashlib.sha256(slug.encode()).hexdigest()[:12]
    return f"eval_{slug}.json"


def _setting(line: str) -> str:
    """'ttt: True -> False (cli)' (resolve's log line) -> 'ttt-0'."""
    name, rest = line.split(":", 1)
    new = rest.rsplit(" -> ", 1)[1].rsplit(" (", 1)[0]
    return f"{name}-{ {'True': '1', 'False': '0'}.get(new, new)}"


def model_config_differences(artifact_config: dict, run_config: dict | None) -> list[str]:
    """'key (artifact vs config.json)' for each ModelConfig field where the artifact's stored config and the run's
    config.json disagree (a model.pgz copied from another run); [] when config.json has no readable model config."""
    try:
        ours, theirs = to_dict(from_dict(ModelConfig, artifact_config)), to_dict(from_dict(ModelConfig, run_config))
    except (TypeError, ValueError):
        return []
    return [f"{key} ({ours[key]} vs {theirs[key]})" for key in ours if ours[key] != theirs[key]]


def run_eval(args: argparse.Namespace) -> int:
    """`pgolf eval`: load the artifact into a GPT built from its stored config, evaluate, write eval.json."""
    root = expect_path(args.run_dir, "folder", "run directory", f"pass the folder holding {MODEL_FILENAME}")
    artifact = root / MODEL_FILENAME
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact} not found: pass a run or artifact directory holding {MODEL_FILENAME} "
                                "(the quantize step writes it)")
    facts = run_facts(root)
    seed = args.seed if args.seed is not None else facts.get("seed")
    if seed is None:
        raise ValueError(f"{root}: no seed in config.json or train.log; pass --seed N (eval.json records it)")
    previous = _read_eval(root / "eval.json")
    cfg, changed, lora_cfg, lora_changed = eval_settings(args, root, previous)
    defaults = TrainConfig()
    tokenizer = args.tokenizer or facts["train"].get("tokenizer_path", defaults.tokenizer_path)
    run_data_dir = facts["train"].get("data_dir", defaults.data_dir)
    data_dir = args.data_dir or run_data_dir
    tensors, model_config, quant_config = read_artifact(artifact)
    sp, used = read_tokenizer(tokenizer)
    rank, world_size, device = setup_distributed()
    log = Logger(None, rank)
    recorded = quant_config.get("tokenizer")
    check_tokenizer(recorded, used, artifact, log, args.allow_other_tokenizer)
    # A pass that differs from the run's recorded settings (eval settings, data, an allowed other tokenizer) is a
    # one-off: it is written beside eval.json, which keeps the run's score and the settings later passes start from.
    # Without an eval.json nothing is recorded yet: the first pass is the run's own (unless the tokenizer differs).
    one_off = [_setting(line) for line in changed] if previous is not None else []
    if args.lora_ttt:  # another evaluation than the run's: always beside its eval.json
        one_off = ["lora-ttt", *one_off, *(_setting(line) for line in lora_changed)]
    if previous is not None and Path(data_dir).resolve() != Path(run_data_dir).resolve():
        one_off.append(f"data-{Path(data_dir).name}")
    if recorded and recorded["sha256"] != used["sha256"]:
        one_off.append(f"tokenizer-{used['sha256'][:8]}")
    out_path = Path(args.out) if args.out else root / (one_off_name(one_off) if one_off else "eval.json")
    if args.tune:
        out_path = Path(args.out) if args.out else root / ("tune_lora.json" if args.lora_ttt else "tune.json")
        one_off = []
    if out_path.is_dir():
        raise ValueError(f"--out {out_path} is a folder: pass a file path, e.g. --out {out_path / 'eval.json'}")
    if rank == 0:
        writable_check(out_path, "--out")
    for line in changed + lora_changed:
        log("override", setting=line.replace(" ", ""))
    if one_off and not args.out:
        log("eval_one_off", differs=",".join(one_off), path=str(out_path),
            kept=f"{root / 'eval.json'}(the run's score and settings; --out it to replace them)")
    model = load_model(artifact, tensors, model_config, facts, sp, tokenizer, device, rank)
    luts = build_byte_luts(sp, model.cfg.vocab_size)
    if args.tune:  # before val is read: nothing here looks at it
        return run_tune(args, model, luts, cfg, lora_cfg, data_dir, out_path, rank, world_size, log, artifact)
    val_tokens = load_tokens(f"{data_dir}/fineweb_val_*.bin", model.cfg.vocab_size)
    log("eval_artifact", artifact=str(artifact), model_bytes=artifact.stat().st_size, val_tokens=len(val_tokens),
        tokenizer=tokenizer, tokenizer_sha256=used["sha256"][:16])

    if args.lora_ttt:
        body = evaluate_lora(model, val_tokens, luts, lora_cfg, rank, world_size, progress=True, log=log,
                             ngram=cfg.ngram_config)
    else:
        body = evaluate_verified(model, val_tokens, luts, cfg, rank, world_size, progress=True, log=log)
    out = {"seed": seed, **body, "tokenizer": used, "bytes_model": artifact.stat().st_size}
    for key in ("steps", "step_avg_ms"):
        if key in facts:
            out[key] = facts[key]
    code = root / CODE_FILENAME
    if code.is_file():
        out["bytes_code"] = code.stat().st_size
        out["bytes_total"] = out["bytes_code"] + out["bytes_model"]
    if rank == 0:
        if previous is not None and "compliance_not_run" in previous and out_path == root / "eval.json" and \
                not one_off:
            out = merge_verification(previous, out)
            log("eval_merged", path=str(out_path), kept="the packed program's score", added="compliance,verification")
        write_json_atomic(out_path, out)
        log("eval_written", path=str(out_path))
    failed = {k: v["detail"] for k, v in body.get("compliance", {}).items() if not v["passed"]}
    if rank == 0:
        if body.get("projection", {}).get("over_limit"):
            print(over_limit_advice(body["projection"], lora_cfg if args.lora_ttt else None, cfg), file=sys.stderr)
        for check, detail in failed.items():
            print(f"pgolf eval: compliance {check} FAILED: {detail}", file=sys.stderr)
    return 1 if failed else 0


def over_limit_advice(projection: dict, lora: LoraConfig | None, cfg: EvalConfig) -> str:
    """What to say when a pass's 8-GPU projection is over the evaluation's limit: the figure, and the settings that
    shorten that pass. The score is still written: a projection is an estimate, and the choice is the user's."""
    stages = ", ".join(f"{k} {v} s" for k, v in projection.get("stages", {}).items())
    head = (f"pgolf eval: warning: the 8-GPU projection of this pass is {projection['seconds']} s"
            f"{f' ({stages})' if stages else ''}, over the evaluation's {EVAL_LIMIT_S:.0f} s limit")
    if lora is not None:
        if lora.last_n == 0:
            depth = "adapters on the last blocks only (LORA_LAST_N, now 0: every block) or "
        elif lora.last_n > 1:
            depth = f"fewer adapted blocks (LORA_LAST_N, now {lora.last_n}) or "
        else:  # one block: none fewer to adapt
            depth = ""
        fix = (f"the LoRA pass is bound by its op dispatch, so its time moves with the host: {depth}bigger chunks "
               f"once a document fills the context (LORA_LATE_CHUNK, now {lora.late_chunk}) shorten it")
    else:
        fix = (f"fewer TTT epochs (TTT_EPOCHS, now {cfg.ttt_epochs}) or a longer stride (STRIDE, now {cfg.stride}) "
               f"shorten it")
    return f"{head}: {fix}. Choose by the projection, never by the val score (docs/RULES.md)."


def eval_settings(args: argparse.Namespace, root: Path, previous: dict | None):
    """The pass's settings: (EvalConfig, its override lines, LoraConfig, its override lines). They start from those
    the run was scored with (eval.json's "config"), so a verification checks what the run did; then the tuning
    split's choices (--settings), then KEY=VALUE and the flags."""
    cli = parse_overrides(args.overrides)
    if (args.grid or args.tune_tokens or args.tune_seconds or args.resume) and not args.tune:
        raise ValueError("--grid, --tune-tokens, --tune-seconds and --resume shape a --tune search: add --tune (or "
                         "drop them)")
    if args.settings:  # chosen on the tuning split (tune.json); KEY=VALUE on the command line wins
        cli = {**read_settings(args.settings), **cli}
    lora_cfg = LoraConfig()
    lora_changed = resolve(lora_cfg, env={}, cli={k: cli.pop(k) for k in list(cli) if k.lower().startswith("lora_")})
    if lora_changed and not args.lora_ttt:
        raise ValueError(f"LORA_ settings ({', '.join(line.split(':')[0] for line in lora_changed)}) without "
                         "--lora-ttt: add --lora-ttt to run the per-document LoRA pass")
    if args.no_ttt:
        cli.update(ttt="0", hash_embed="0")
    if args.ablation:
        cli["ablation"] = "1"
    stored = previous.get("config") if previous is not None else None
    try:
        cfg = EvalConfig(**stored) if isinstance(stored, dict) else EvalConfig()
    except TypeError as e:
        raise ValueError(f"{root / 'eval.json'}: its config does not fit this kit's EvalConfig ({e}): written by "
                         "another kit version? Move it away to evaluate with this kit's defaults") from None
    return cfg, resolve(cfg, env={}, cli=cli), lora_cfg, lora_changed


def load_model(artifact: Path, tensors: dict, model_config: dict, facts: dict, sp, tokenizer: str, device,
               rank: int) -> GPT:
    """A GPT built from the artifact's own config holding its weights, on `device`; a warning when the run's
    config.json says otherwise, an error when the tokenizer has more pieces than the model has ids."""
    differences = model_config_differences(model_config, facts["model"])
    if differences and rank == 0:
        print(f"pgolf eval: warning: {artifact}'s model config differs from {artifact.parent / 'config.json'} in "
              f"{', '.join(differences)}: scoring the artifact's own config (is model.pgz from another run?)",
              file=sys.stderr)
    if device.type == "cuda":
        configure_cuda()
    model = GPT(from_dict(ModelConfig, model_config)).to(device)
    model.load_state_dict(to_state_dict(tensors, model.state_dict(), str(artifact)))
    if sp.get_piece_size() > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {sp.get_piece_size()} pieces but the artifact's model has "
                         f"vocab_size {model.cfg.vocab_size} (wrong tokenizer? pass --tokenizer)")
    return model


def read_settings(path: str) -> dict[str, str]:
    """The settings a tune.json chose (its "settings": every searched setting at its best value)."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        settings = data["settings"]
        if not isinstance(settings, dict):
            raise TypeError("not an object")
    except FileNotFoundError:
        raise FileNotFoundError(f"--settings {file}: not found (pgolf eval RUN_DIR --tune writes RUN_DIR/tune.json)")\
            from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"--settings {file}: not a tune.json with a \"settings\" object ({e!r}); pass the file "
                         "pgolf eval RUN_DIR --tune wrote") from None
    if data.get("complete") is False:  # stopped by --tune-seconds, or killed mid-search
        print(f"pgolf eval: warning: {file} is an unfinished search ({len(data.get('trials', []))} trials): its "
              "settings are the best of the trials it ran", file=sys.stderr)
    return {str(k).upper(): str(v) for k, v in settings.items()}


def read_tune(path: str) -> dict:
    """An earlier search's tune.json, for --resume."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("trials"), list):
            raise TypeError("no \"trials\" list")
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume {file}: not found (pass the tune.json of the search to go on with)") \
            from None
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {file}: not a tune.json ({e}); pass the file pgolf eval RUN_DIR --tune wrote") \
            from None
    return data


def run_tune(args, model, luts, cfg, lora_cfg, data_dir: str, out_path: Path, rank: int, world_size: int,
             log, artifact: Path) -> int:
    """`pgolf eval RUN_DIR --tune`: the coordinate search on the tuning split (tools/tune.py), its table on stdout and
    its result in tune.json (tune_lora.json with --lora-ttt)."""
    from tools import tune

    previous = read_tune(args.resume) if args.resume else None

    pattern = f"{data_dir}/fineweb_tune_*.bin"
    if not glob.glob(pattern):
        raise FileNotFoundError(f"no tuning split {pattern}: hold documents out of train first, e.g. pgolf data split "
                                f"{data_dir} --tune-docs 500 (settings are chosen there, never on val)")
    tokens = load_tokens(pattern, model.cfg.vocab_size)
    unchecked = check_tune_split(args.run_dir, data_dir, tune.fingerprint(tokens))  # refuses a split it trained on
    if unchecked and rank == 0:
        print(f"pgolf eval: warning: {unchecked}", file=sys.stderr)
    if args.tune_tokens:
        tokens = tokens[:args.tune_tokens + 1]
    grid = tune.parse_grid(args.grid, cfg, lora_cfg, tune.LORA_GRID if args.lora_ttt else tune.STREAM_GRID)
    log("tune_start", split=pattern, tokens=len(tokens), settings=",".join(grid),
        trials_at_most=1 + sum(map(len, grid.values())))
    # written after every trial (marked incomplete until the end): a search stopped early still leaves its choice
    write = (lambda body: write_json_atomic(out_path, body)) if rank == 0 else None
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    try:
        result = tune.tune(model, tokens, luts, cfg, lora_cfg if args.lora_ttt else None, grid, rank, world_size,
                           log, seconds=args.tune_seconds, on_result=write, artifact=sha, previous=previous)
    except tune.NotResumable as e:
        raise ValueError(f"--resume {args.resume}: {e}") from None
    if rank == 0:
        print(tune.table(result))
        log("tune_written", path=str(out_path), apply=f"pgolf eval RUN_DIR --settings {out_path}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score model.pgz with the legal eval recipe (sliding, TTT, hash embed, n-gram) -> eval.json",
        description="Evaluate a run's artifact. Multi-GPU: torchrun --nproc_per_node=N -m tools.commands.cli eval "
                    "RUN_DIR. "
                    "Eval settings: KEY=VALUE for any EvalConfig field (STRIDE=128, CHUNK_TOKENS=8192, ...) or "
                    "n-gram field as NGRAM_<FIELD> (NGRAM_ORDER=8). Exit status 1 if a compliance check fails; "
                    "a warning on stderr if the 8-GPU projection is over 600 s.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=settings_help(EvalConfig, LoraConfig))
    p.add_argument("run_dir", help=f"run or artifact directory holding {MODEL_FILENAME} (and optionally "
                                   f"config.json, train.log, {CODE_FILENAME})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="eval config overrides, right after RUN_DIR (argparse takes no positionals after options)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the run's config.json, else the recipe's)")
    p.add_argument("--data-dir", help="directory of fineweb_val_*.bin shards (default: as for --tokenizer)")
    p.add_argument("--allow-other-tokenizer", action="store_true",
                   help="score with a tokenizer other than the one the artifact records (refused otherwise: a wrong "
                        "tokenizer gives a wrong BPB); written as a one-off, beside eval.json")
    p.add_argument("--no-ttt", action="store_true", help="no test-time training (and so no hash embedding)")
    p.add_argument("--ablation", action="store_true", help="also score flat, sliding, +ttt, ... (3 extra passes)")
    p.add_argument("--lora-ttt", action="store_true",
                   help="score with per-document LoRA TTT instead (eval/lora.py; settings LORA_<FIELD>: "
                        f"{', '.join(f.upper() for f in vars(LoraConfig()))}; RANK 0: no adapter, document-masked "
                        "scoring alone; NGRAM: the n-gram blend on top, with the NGRAM_ settings), checked C1-C4; "
                        "written to RUN_DIR/eval_lora-ttt*.json beside eval.json")
    p.add_argument("--tune", action="store_true",
                   help="choose the eval settings on the tuning split (DATA_DIR/fineweb_tune_*.bin), never on val: a "
                        "coordinate search over --grid, one pass per trial; prints the table and writes "
                        "RUN_DIR/tune.json (tune_lora.json with --lora-ttt: LoRA's settings)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="with --tune: search this setting over these values (repeatable; given, only the --grid "
                        "settings are searched; default: tools/tune.py's grid for the stream or for --lora-ttt)")
    p.add_argument("--tune-tokens", type=int, default=0, metavar="N",
                   help="with --tune: score only the first N tuning tokens per trial (0: all)")
    p.add_argument("--tune-seconds", type=float, default=0, metavar="S",
                   help="with --tune: start no trial that would end past S seconds (judged by the slowest warm trial "
                        "so far: the first one a process scores also pays its compiles); "
                        "the choice is the best of the trials run, and tune.json says complete: false (0: no bound)")
    p.add_argument("--resume", metavar="TUNE_JSON",
                   help="with --tune: go on with an earlier search of the same artifact, split and fixed settings "
                        "(a copy of its tune.json): its trials and reference scores are taken, not scored again")
    p.add_argument("--settings", metavar="TUNE_JSON",
                   help="apply the settings a --tune run chose (KEY=VALUE arguments still win)")
    p.add_argument("--seed", type=int, help="seed to record when the directory has no config.json/train.log")
    p.add_argument("--out", help="output path (default: RUN_DIR/eval.json; when that holds a packed run's unverified "
                                 "result, the score is kept and the compliance report added). A one-off pass (settings,"
                                 " data or tokenizer other than the run's recorded ones, e.g. --no-ttt) goes to "
                                 "RUN_DIR/eval_<changed settings>.json instead, so the run's score and settings stay")
    p.set_defaults(func=run_eval)
