"""`pgolf seeds` (tools/records/seeds.py) with a fake pipeline: resumable, failures reported, GPU groups in parallel."""
import argparse
import io
import json
import math
import sys
from pathlib import Path

import pytest

from tools.commands.seeds import add_commands
from tools.records import seeds

# The fake pipeline: appends "seed CUDA_VISIBLE_DEVICES args" to $FAKE_CALLS, prints a line and a progress bar
# drawn with carriage returns, fails with a traceback for seed 13, else writes train.log and eval.json. With
# $FAKE_BARRIER it waits until $FAKE_PARALLEL seeds have started (exit 4 after 30 s): seeds run one after another
# would never all be started at once.
FAKE = r'''
import json, math, os, sys, time
from pathlib import Path
seed, run_dir = int(sys.argv[1]), Path(sys.argv[2])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(f"{seed} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {' '.join(sys.argv[3:])}\n")
print(f"training seed {seed}", flush=True)
sys.stderr.write("\r" + "\r".join(f"eval {i}/50" for i in range(51)) + "\n")
sys.stderr.flush()
if "FAKE_BARRIER" in os.environ:
    barrier = Path(os.environ["FAKE_BARRIER"])
    (barrier / str(seed)).touch()
    deadline = time.time() + 30
    while len(list(barrier.iterdir())) < int(os.environ["FAKE_PARALLEL"]):
        if time.time() > deadline:
            sys.exit(4)
        time.sleep(0.05)
if seed == 13:
    raise RuntimeError("boom: out of memory")
run_dir.mkdir(parents=True, exist_ok=True)
loss = 2.0 + seed / 1000
(run_dir / "train.log").write_text(f"seed:{seed}\ntraining_done steps:{100 + seed} step_avg_ms:12.5\n"
                                   f"final_eval_exact val_loss:{loss:.8f} val_bpb:{loss / math.log(2) * 0.4:.8f}\n")
(run_dir / "eval.json").write_text(json.dumps({"seed": seed, "val_loss": loss, "val_bpb": loss / math.log(2) * 0.4,
                                              "tokens": 4000, "bytes": 10000}))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch) -> str:
    script = tmp_path / "fake_pipeline.py"
    script.write_text(FAKE)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.txt"))
    return f"{{python}} {script} {{seed}} {{run_dir}}"


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.txt"
    return [line.split(" ") for line in path.read_text().splitlines()] if path.exists() else []


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_failed_seed_is_reported_others_go_on_and_a_rerun_redoes_only_it(tmp_path, fake, capsys):
    out = tmp_path / "runs"
    code = run_cli(["seeds", "--seeds", "1,13,2", "--out", str(out), "--command", fake, "MAX_STEPS=7"])
    text = capsys.readouterr().out
    assert code == 1
    assert "[seed 1] training seed 1" in text and "[seed 2] training seed 2" in text
    assert "[seed 13] RuntimeError: boom: out of memory" in text
    # 51 redraws of the bar: the first is shown, then none for 10 s, and its final state (ended by a newline)
    assert text.count("[seed 1] eval ") == 2 and "[seed 1] eval 50/50" in text
    failed = next(line for line in text.splitlines() if line.startswith("seed:13 status:failed"))
    assert "exit_code:1" in failed and str(out / "seed13" / "console.log") in failed
    assert "boom: out of memory" in (out / "seed13" / "console.log").read_text()
    assert "seeds_done:2 seeds_finished_before:0 seeds_failed:1" in text
    # the stats table of the finished seeds, from their eval.json and train.log
    assert "eval.json" in text and "seeds:2" in text
    assert [c[0] for c in calls(tmp_path)] == ["1", "13", "2"]
    assert all(c[2:] == ["MAX_STEPS=7"] for c in calls(tmp_path))

    code = run_cli(["seeds", "--seeds", "1,13,2", "--out", str(out), "--command", fake, "MAX_STEPS=7"])
    text = capsys.readouterr().out
    assert code == 1
    assert [c[0] for c in calls(tmp_path)] == ["1", "13", "2", "13"]  # 1 and 2 were not redone
    assert "seed:1 status:finished" in text and "seeds_done:0 seeds_finished_before:2 seeds_failed:1" in text
    # the failed attempt's folder was moved aside, not appended to
    (aside,) = out.glob("incomplete-seed13-*")
    assert (aside / "console.log").is_file()
    # `pgolf record OUT/seed*` (the README's command) gets the run directories and nothing else
    assert sorted(p.name for p in out.glob("seed*")) == ["seed1", "seed13", "seed2"]


def test_outcomes_carry_results_from_eval_json_and_train_log(tmp_path, fake):
    cfg = seeds.SeedsConfig(seeds=[3, 4], out=tmp_path / "runs", command=fake)
    outcomes = seeds.SeedRunner(cfg).run()
    assert [(o.seed, o.status) for o in outcomes] == [(3, "done"), (4, "done")]
    r = outcomes[1].result
    assert (r.seed, r.val_loss, r.steps, r.step_avg_ms) == (4, 2.004, 104, 12.5)
    assert r.val_bpb == pytest.approx(2.004 / math.log(2) * 0.4)


def test_gpu_groups_run_in_parallel_each_on_its_own_devices(tmp_path, fake, monkeypatch):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("FAKE_BARRIER", str(barrier))
    monkeypatch.setenv("FAKE_PARALLEL", "2")
    cfg = seeds.SeedsConfig(seeds=[5, 6], out=tmp_path / "runs", gpus_per_seed=2, gpus=["0", "1", "2", "3"],
                            command=fake + " NPROC={nproc}")
    outcomes = seeds.SeedRunner(cfg).run()
    assert [o.status for o in outcomes] == ["done", "done"], [o.problem for o in outcomes]
    devices = {c[0]: c[1] for c in calls(tmp_path)}
    assert sorted(devices.values()) == ["0,1", "2,3"]
    assert all(c[2] == "NPROC=2" for c in calls(tmp_path))


def test_a_missing_eval_json_after_exit_0_is_a_failure(tmp_path):
    cfg = seeds.SeedsConfig(seeds=[8], out=tmp_path / "runs", command="{python} -c pass")
    (outcome,) = seeds.SeedRunner(cfg).run()
    assert outcome.status == "failed" and outcome.exit_code == 0 and "eval.json is missing" in outcome.problem


def test_default_commands_are_the_pipeline():
    run_dir = Path("/runs/x/seed42")
    cfg = seeds.SeedsConfig(seeds=[42], out=Path("/runs/x"), overrides=["MAX_STEPS=5"])
    assert seeds.seed_command(cfg, 42, run_dir) == [
        sys.executable, "-m", "tools.pipeline", "SEED=42", f"RUN_DIR={run_dir}", "MAX_STEPS=5"]
    cfg.gpus_per_seed = 4
    assert seeds.seed_command(cfg, 42, run_dir) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m",
        "tools.pipeline", "SEED=42", f"RUN_DIR={run_dir}", "MAX_STEPS=5"]
    # a path with a space stays one argument
    assert seeds.seed_command(cfg, 1, Path("/my runs/seed1"))[8] == "RUN_DIR=/my runs/seed1"


def test_gpu_groups_split_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")
    assert seeds.gpu_groups(seeds.SeedsConfig([1], Path("o"), gpus_per_seed=2)) == [["4", "5"], ["6", "7"]]
    assert seeds.gpu_groups(seeds.SeedsConfig([1], Path("o"))) == [None]
    with pytest.raises(ValueError, match=r"--gpus-per-seed 8 but 5 GPU\(s\) visible"):
        seeds.gpu_groups(seeds.SeedsConfig([1], Path("o"), gpus_per_seed=8))


@pytest.mark.parametrize("kwargs, message", [
    (dict(overrides=["SEED=3"]), "SEED and RUN_DIR are set per seed"),
    (dict(overrides=["max_steps"]), r"expected KEY=VALUE settings, got \[.max_steps.\]"),
    (dict(command="{python} x.py {sed}"), "bad template"),
    (dict(seeds=[1, 2, 1]), "lists 1 more than once"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, kwargs, message):
    cfg = seeds.SeedsConfig(**{"seeds": [1], "out": tmp_path / "runs", **kwargs})
    with pytest.raises(ValueError, match=message):
        seeds.SeedRunner(cfg).run()
    assert not (tmp_path / "runs").exists()


def test_an_eval_json_of_another_seed_is_not_taken_as_finished(tmp_path):
    run_dir = tmp_path / "runs" / "seed7"
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({"seed": 8, "val_loss": 2.0, "val_bpb": 1.2}))
    with pytest.raises(ValueError, match=r"seed7/eval\.json: seed 8, but the folder is seed 7's"):
        seeds.SeedRunner(seeds.SeedsConfig([7], tmp_path / "runs", command="{python} -c pass")).run()


class Chunks(io.RawIOBase):
    """A pipe delivering fixed chunks, to cut lines (and \\r\\n pairs) at chosen places."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    def read1(self, size: int = -1) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_pump_splits_lines_and_throttles_carriage_return_redraws():
    lines = []
    seeds.pump(Chunks([b"a\r", b"\nb\n\rbar 1", b"\rbar 2\rbar 3\r", b"\n", b"tail"]), lines.append, 10.0)
    # "a\r\n" across two chunks is one line; of the three redraws only the first shows; "bar 3\r\n" ends a line
    assert lines == ["a", "b", "bar 1", "bar 3", "tail"]
    lines.clear()
    seeds.pump(Chunks([b"\rx 1\rx 2\rx 3\n"]), lines.append, 0.0)
    assert lines == ["x 1", "x 2", "x 3"]


def without_settings_in_the_environment(monkeypatch) -> None:
    for name in seeds.setting_names():
        monkeypatch.delenv(name, raising=False)


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, fake, monkeypatch):
    out = tmp_path / "runs"
    without_settings_in_the_environment(monkeypatch)
    monkeypatch.setenv("NUM_LAYERS", "4")  # an environment setting defines the run as much as a KEY=VALUE one
    assert run_cli(["seeds", "--seeds", "1,2", "--out", str(out), "--command", fake, "MAX_STEPS=7"]) == 0
    stored = json.loads((out / "settings.json").read_text())
    assert stored["settings"] == {"MAX_STEPS": "7", "NUM_LAYERS": "4"} and stored["command"] == fake
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for argv, env, differences in [
        (["MAX_STEPS=8"], "4", "MAX_STEPS 7 -> 8"),
        (["MAX_STEPS=7", "SEQ_LEN=64"], "4", "SEQ_LEN (unset) -> 64"),
        (["MAX_STEPS=7"], "6", "NUM_LAYERS 4 -> 6"),
    ]:
        monkeypatch.setenv("NUM_LAYERS", env)
        with pytest.raises(ValueError) as err:  # seed 3 is new, but 1 and 2 would be reported as finished
            run_cli(["seeds", "--seeds", "1,2,3", "--out", str(out), "--command", fake, *argv])
        message = str(err.value)
        assert f"seeds 1,2 finished with other settings than this call's ({differences};" in message
        assert "pass the same settings and environment to resume, or a new --out folder" in message
        assert "\n" not in message
    with pytest.raises(ValueError, match=r"--gpus-per-seed 1 -> 2"):
        run_cli(["seeds", "--seeds", "1", "--out", str(out), "--command", fake, "--gpus-per-seed", "2", "--gpus",
                 "0,1", "MAX_STEPS=7"])
    # nothing ran, moved or was rewritten; the same settings (any order, any key case) resume
    assert len(calls(tmp_path)) == 2 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    monkeypatch.setenv("NUM_LAYERS", "4")
    assert run_cli(["seeds", "--seeds", "1,2,3", "--out", str(out), "--command", fake, "max_steps=7"]) == 0
    assert [c[0] for c in calls(tmp_path)] == ["1", "2", "3"]


def test_settings_may_change_while_no_seed_has_finished(tmp_path, fake):
    out = tmp_path / "runs"
    assert run_cli(["seeds", "--seeds", "13", "--out", str(out), "--command", fake, "MAX_STEPS=7"]) == 1
    assert run_cli(["seeds", "--seeds", "13,1", "--out", str(out), "--command", fake, "MAX_STEPS=9"]) == 1
    assert json.loads((out / "settings.json").read_text())["settings"]["MAX_STEPS"] == "9"


def test_an_experiment_from_before_settings_json_is_taken_with_a_warning(tmp_path, fake, capsys, monkeypatch):
    out = tmp_path / "runs"
    without_settings_in_the_environment(monkeypatch)
    assert run_cli(["seeds", "--seeds", "1", "--out", str(out), "--command", fake]) == 0
    (out / "settings.json").unlink()
    assert run_cli(["seeds", "--seeds", "1,2", "--out", str(out), "--command", fake, "MAX_STEPS=3"]) == 0
    assert f"settings_unverified:{out / 'settings.json'} seeds:1 " in capsys.readouterr().out
    assert json.loads((out / "settings.json").read_text())["settings"] == {"MAX_STEPS": "3"}
    (out / "settings.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"settings\.json: unreadable .*restore it, or pass a new --out folder"):
        run_cli(["seeds", "--seeds", "1,2", "--out", str(out), "--command", fake, "MAX_STEPS=3"])


def test_out_that_is_a_file_is_refused_before_anything_runs(tmp_path, fake):
    out = tmp_path / "runs"
    out.write_text("notes")
    with pytest.raises(NotADirectoryError, match=r"--out .*runs is a file, expected a folder"):
        run_cli(["seeds", "--seeds", "1", "--out", str(out), "--command", fake])
    assert out.read_text() == "notes" and not calls(tmp_path)
