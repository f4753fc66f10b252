"""Per-seed results from challenge logs, record folders and eval.json (tools/records/results.py)."""
import json
import math
from pathlib import Path

import pytest

from tools.records.results import (FINAL_METRIC_KEYS, ResultFormatError, load_record, load_results, parse_eval_json,
                                   parse_log, run_dirs, train_loss_curve)

RECORDS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "records"
REC_0323 = RECORDS / "2026-03-23_LeakyReLU_LegalTTT_ParallelMuon"
REC_0325 = RECORDS / "2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072"
REC_0405 = RECORDS / "2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2"
needs_records = pytest.mark.skipif(not RECORDS.is_dir(), reason=f"fixture records not found at {RECORDS}")


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_records
@pytest.mark.parametrize("folder, key, seeds, mean_bpb", [
    (REC_0323, "legal_ttt_exact", [42, 1337, 2025], 1.1194),
    (REC_0325, "final_int6_sliding_window_exact", [42, 314, 999], 1.1147),
    (REC_0405, "quantized_sliding_window", [1, 42, 1234, 1337, 2025], 1.0856),
])
def test_fixture_records_final_keys_and_means(folder, key, seeds, mean_bpb):
    record = load_record(folder)
    assert [r.seed for r in record.results] == seeds
    assert {r.metric_key for r in record.results} == {key}
    mean = sum(r.val_bpb for r in record.results) / len(seeds)
    assert round(mean, 4) == mean_bpb  # the fixtures README's 3-seed (5-seed) means
    assert record.submission["val_bpb"] == pytest.approx(mean, abs=1e-4)


@needs_records
@pytest.mark.parametrize("folder", [REC_0325, REC_0405])
def test_per_seed_values_match_the_authors_seed_results(folder):
    seed_results = json.loads((folder / "submission.json").read_text())["seed_results"]
    record = load_record(folder)
    assert sorted(int(s) for s in seed_results) == [r.seed for r in record.results]
    for r in record.results:
        stated = seed_results[str(r.seed)]
        assert r.val_loss == pytest.approx(stated["val_loss"], abs=1e-5)
        assert r.val_bpb == pytest.approx(stated["val_bpb"], abs=1e-5)
        assert r.bytes_total == stated["artifact_bytes"]
        assert r.steps == stated["steps"]
        if "step_avg_ms" in stated:  # rounded to 0.1 ms by the authors
            assert r.step_avg_ms == pytest.approx(stated["step_avg_ms"], abs=0.051)


@needs_records
def test_ttt_line_wins_over_sliding_window_and_step_avg_is_derived_when_not_printed():
    r = parse_log(REC_0323 / "train_seed42.log")
    # the log's last line, read by hand: legal_ttt_exact val_loss:1.89110239 val_bpb:1.12002032
    assert (r.metric_key, r.val_loss, r.val_bpb, r.seed) == ("legal_ttt_exact", 1.89110239, 1.12002032, 42)
    assert (r.steps, r.step_avg_ms, r.bytes_total, r.bytes_code) == (7182, 83.56, 15876510, 89458)
    r = parse_log(REC_0405 / "train_seed42.log")
    # this log has no step_avg; its timer line says train_time: 588136ms step: 4986/20000
    assert r.steps == 4986 and r.step_avg_ms == pytest.approx(588136 / 4986, abs=0.01)


def test_priority_then_last_occurrence(tmp_path):
    log = write_log(tmp_path / "train_seed5.log", [
        "legal_ttt_exact val_loss:2.00000000 val_bpb:1.20000000",
        "final_int6_sliding_window_exact val_loss:1.95000000 val_bpb:1.15000000",
        "step:9/9 val_loss:1.0 val_bpb:0.5 train_time:10ms step_avg:1.11ms",
        "legal_ttt_exact val_loss:1.90000000 val_bpb:1.10000000",
        "final_int8_zlib_roundtrip_exact val_loss:1.95000000 val_bpb:1.15000000",
    ])
    r = parse_log(log)
    assert (r.metric_key, r.val_loss, r.val_bpb, r.seed, r.steps, r.step_avg_ms) == \
        ("legal_ttt_exact", 1.9, 1.1, 5, 9, 1.11)
    # without the TTT lines, the next key in the documented order is used
    r = parse_log(write_log(tmp_path / "train_seed6.log", [
        "final_int8_zlib_roundtrip_exact val_loss:1.96 val_bpb:1.16",
        "final_int6_sliding_window_exact val_loss:1.95 val_bpb:1.15"]))
    assert r.metric_key == "final_int6_sliding_window_exact"
    assert FINAL_METRIC_KEYS.index("final_int6_sliding_window_exact") < \
        FINAL_METRIC_KEYS.index("final_int8_zlib_roundtrip_exact")


def test_seed_from_log_line_and_name_mismatch(tmp_path):
    r = parse_log(write_log(tmp_path / "train.log", ["  seed: 7", "quantized val_loss:2.9 val_bpb:1.1"]))
    assert r.seed == 7
    with pytest.raises(ResultFormatError, match=r"train_seed8\.log: file name says seed 8 but .* says 7"):
        parse_log(write_log(tmp_path / "train_seed8.log", ["seed:7", "quantized val_loss:2.9 val_bpb:1.1"]))
    with pytest.raises(ResultFormatError, match=r"run1\.log: no seed"):
        parse_log(write_log(tmp_path / "run1.log", ["quantized val_loss:2.9 val_bpb:1.1"]))


def test_malformed_logs_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(ResultFormatError, match=r"train_seed1\.log: no final metric line .*legal_ttt_exact"):
        parse_log(write_log(tmp_path / "train_seed1.log", ["step:1/9 val_loss:6.9 val_bpb:4.1"]))
    with pytest.raises(ResultFormatError, match=r"train_seed2\.log: line 2: legal_ttt_exact val_bpb '1\.12x' "):
        parse_log(write_log(tmp_path / "train_seed2.log", [
            "final_int6_sliding_window_exact val_loss:1.9 val_bpb:1.12",
            "legal_ttt_exact val_loss:1.89 val_bpb:1.12x"]))
    # a line cut short must not silently fall back to a lower-priority key
    with pytest.raises(ResultFormatError, match=r"train_seed3\.log: line 2: malformed legal_ttt_exact line"):
        parse_log(write_log(tmp_path / "train_seed3.log", [
            "final_int6_sliding_window_exact val_loss:1.9 val_bpb:1.12", "legal_ttt_exact val_loss:1.89"]))


@needs_records
def test_record_with_a_seed_that_stopped_early_is_rejected(tmp_path):
    folder = tmp_path / REC_0323.name
    folder.mkdir()
    for src in REC_0323.iterdir():
        (folder / src.name).write_bytes(src.read_bytes())
    log = folder / "train_seed1337.log"
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True) if "legal_ttt" not in line))
    with pytest.raises(ResultFormatError, match=r"train_seed1337\.log: final metric is "
                                                r"final_int6_sliding_window_exact but other seeds end with "
                                                r"legal_ttt_exact"):
        load_record(folder)


def test_eval_json_and_run_directory(tmp_path):
    tokens, n_bytes, val_loss = 1000, 2436, 1.9
    val_bpb = val_loss / math.log(2) * tokens / n_bytes
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(dict(val_loss=val_loss, val_bpb=val_bpb, seed=0, tokens=tokens,
                                                   bytes=n_bytes)))
    write_log(run / "train.log", ["training_done steps:120 train_time_s:10.5 step_avg_ms:87.5 data_reads_after_cap:0",
                                  "final_prequant val_loss:1.8 val_bpb:1.1"])
    (r,) = load_results(run)
    assert (r.seed, r.val_loss, r.metric_key, r.steps, r.step_avg_ms) == (0, 1.9, "eval.json", 120, 87.5)
    assert r.tokens_per_byte == tokens / n_bytes
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps(dict(val_loss=val_loss, val_bpb=val_loss / math.log(2), seed=1, tokens=tokens,
                                   bytes=n_bytes)))
    with pytest.raises(ResultFormatError, match=r"eval\.json: val_bpb .* but val_loss/ln2\*tokens/bytes"):
        parse_eval_json(bad)
    bad.write_text(json.dumps(dict(val_loss=val_loss, val_bpb=val_bpb)))
    with pytest.raises(ResultFormatError, match=r"eval\.json: seed is None"):
        parse_eval_json(bad)
    bad.write_text("{\"val_loss\": 1.9,")
    with pytest.raises(ResultFormatError, match=r"eval\.json: not valid JSON"):
        parse_eval_json(bad)


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no eval.json, no run directories with one, and no train logs"):
        load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no train logs"):
        load_record(tmp_path)


def kit_log(seed: int, loss: float, bpb: float) -> list[str]:
    """Lines as submission/runtime.py's Logger and the pipeline write them."""
    return [f"seed:{seed}", "run run_dir:runs/x world_size:1 device:cpu torch:2.13.0",
            "step:1 train_loss:6.93", "step:2 train_loss:6.41", "step:2 train_time_s:1.2 step_avg_ms:600.0",
            "training_done steps:2 train_time_s:1.2 step_avg_ms:600.0 data_reads_after_cap:0",
            f"final_prequant val_loss:{loss - 0.1:.6f} val_bpb:{bpb - 0.05:.6f} steps:2",
            f"quantized_roundtrip_exact val_loss:{loss + 0.02:.8f} val_bpb:{bpb + 0.01:.8f}",
            "Code size: 29000 bytes", "Total submission size: 1529000 bytes",
            f"eval_sliding_exact val_loss:{loss + 0.01:.8f} val_bpb:{bpb + 0.005:.8f}",
            f"final_eval_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}"]


def test_kit_log_is_scored_by_final_eval_exact_then_the_round_trip(tmp_path):
    r = parse_log(write_log(tmp_path / "train_seed3.log", kit_log(3, 2.4, 1.39)))
    assert (r.metric_key, r.val_loss, r.val_bpb, r.seed) == ("final_eval_exact", 2.4, 1.39, 3)
    assert (r.steps, r.step_avg_ms, r.bytes_code, r.bytes_total) == (2, 600.0, 29000, 1529000)
    assert FINAL_METRIC_KEYS[0] == "final_eval_exact"
    # a run that stopped after quantizing: its exact round-trip line, not the pre-quantization one
    lines = [line for line in kit_log(3, 2.4, 1.39) if not line.startswith(("final_eval", "eval_"))]
    r = parse_log(write_log(tmp_path / "train_seed4.log", ["seed:4", *lines[1:]]))
    assert (r.metric_key, r.val_loss, r.val_bpb) == ("quantized_roundtrip_exact", 2.42, 1.4)
    # a TTT line of a challenge script does not outrank the kit's final line
    r = parse_log(write_log(tmp_path / "train_seed5.log",
                            ["legal_ttt_exact val_loss:1.0 val_bpb:0.6", *kit_log(5, 2.4, 1.39)]))
    assert r.metric_key == "final_eval_exact"


def test_a_folder_of_run_directories(tmp_path):
    for seed in (7, 8):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        write_log(run / "train.log", kit_log(seed, 2.4, 1.39))
        (run / "eval.json").write_text(json.dumps(dict(seed=seed, val_loss=round(2.4 + seed / 100, 2),
                                                       val_bpb=1.39 + seed / 100)))
    (tmp_path / "seed9").mkdir()  # a seed that failed: no eval.json
    write_log(tmp_path / "seed9" / "train.log", kit_log(9, 2.4, 1.39)[:3])
    assert [p.name for p in run_dirs(tmp_path)] == ["seed7", "seed8"]
    assert run_dirs(tmp_path / "seed7") == [tmp_path / "seed7"] and run_dirs(tmp_path / "nothing") == []
    results = load_results(tmp_path)
    assert [(r.seed, r.val_loss, r.steps, r.step_avg_ms, r.bytes_total) for r in results] == [
        (7, 2.47, 2, 600.0, 1529000), (8, 2.48, 2, 600.0, 1529000)]


@needs_records
@pytest.mark.parametrize("log, first, count", [
    (REC_0323 / "train_seed42.log", (1, 6.9308), 24),
    (REC_0405 / "train_seed42.log", (1, 9.0111), 14),
])
def test_train_loss_curve_of_the_records(log, first, count):
    curve = train_loss_curve(log.read_text().splitlines())
    # counted by hand: grep -c train_loss
    assert curve[0] == first and len(curve) == count
    assert [s for s, _ in curve] == sorted(s for s, _ in curve)


def test_train_loss_curve_of_kit_lines():
    assert train_loss_curve(kit_log(1, 2.4, 1.39)) == [(1, 6.93), (2, 6.41)]
