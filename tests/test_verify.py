"""Tests for eval/verify.py: compliance and ablation are added to evaluate()'s body without changing its score, and
none of it is in the packed program."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.bpb import build_byte_luts
from eval.flat import evaluate_flat
from eval.run import EvalConfig, evaluate
from eval.verify import evaluate_verified
from submission.config import ModelConfig
from submission.model import GPT
from tests.tiny import EVERY_FEATURE_2_LAYERS

REPO = Path(__file__).resolve().parents[1]
# Every feature of both recipes on, at a size that scores in seconds on a CPU.
TINY = dict(EVERY_FEATURE_2_LAYERS, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=2,
            vocab_size=1024, bigram_buckets=64, bigram_dim=16, value_embed_dim=16)
SMALL = dict(context_len=32, stride=8, batch_windows=16, chunk_tokens=128, ttt_batch_seqs=8, hash_buckets=256,
             compliance_chunk_tokens=64)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    for p in model.parameters():  # move off the zero init so every path contributes
        p.data += 0.05 * torch.randn_like(p)
    return model


@pytest.fixture(scope="module")
def tokens(sample_ids) -> np.ndarray:
    return np.asarray(sample_ids(500), dtype=np.uint16)


def logged(lines: list[str]):
    return lambda *fields, **kv: lines.append(" ".join([*fields, *(f"{k}:{v}" for k, v in kv.items())]))


def test_verification_adds_ablation_and_compliance_and_leaves_the_score_alone(tokens, sp):
    model, luts = tiny_model(), build_byte_luts(sp, 1024)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = evaluate(model, tokens, luts, EvalConfig(**SMALL), progress=False)
    lines = []
    body = evaluate_verified(model, tokens, luts, EvalConfig(**SMALL, ablation=True), progress=False,
                             log=logged(lines))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # every pass's TTT is undone
    assert (body["val_loss"], body["val_bpb"], body["tokens"]) == (plain["val_loss"], plain["val_bpb"], 499)
    assert list(body) == ["val_loss", "val_bpb", "tokens", "bytes", "stages", "ablation", "compliance",
                          "projection", "config"]
    assert [a["name"] for a in body["ablation"]] == ["flat", "sliding", "+ttt", "+hash_embed", "+ngram", "tilt"]
    by_name = {a["name"]: a for a in body["ablation"]}
    assert body["val_loss"] == by_name["+ngram"]["val_loss"]  # the recipe's score is the blended view
    flat = evaluate_flat(model, tokens, luts, seq_len=32)
    assert math.isclose(by_name["flat"]["val_loss"], flat.val_loss, rel_tol=1e-6)
    assert by_name["sliding"]["val_loss"] != by_name["+ttt"]["val_loss"] != by_name["+hash_embed"]["val_loss"]
    stages = {"score", "views", "ngram", "ttt", "ablation_flat", "ablation_sliding", "ablation_ttt", "compliance"}
    assert set(body["stages"]) == stages
    assert all(check["passed"] for check in body["compliance"].values()), body["compliance"]
    assert "views model, blend, tilt" in body["compliance"]["C1"]["detail"]  # ablation asks for the tilt view
    assert lines[-1] == f"final_eval_exact val_loss:{body['val_loss']:.8f} val_bpb:{body['val_bpb']:.8f}"
    assert "eval_compliance C1:pass C2:pass C3:pass C4:pass" in lines
    assert f"eval_flat_exact val_loss:{by_name['flat']['val_loss']:.8f} " \
           f"val_bpb:{by_name['flat']['val_bpb']:.8f}" in lines
    json.dumps(body)


def test_compliance_alone_checks_the_views_the_score_uses(tokens, sp):
    cfg = EvalConfig(**SMALL, ttt=False, hash_embed=False)
    body = evaluate_verified(tiny_model(), tokens, build_byte_luts(sp, 1024), cfg, progress=False)
    assert "ablation" not in body and all(check["passed"] for check in body["compliance"].values())
    assert "views model, blend;" in body["compliance"]["C1"]["detail"]  # no tilt view without ablation
    off = evaluate_verified(tiny_model(), tokens, build_byte_luts(sp, 1024),
                            EvalConfig(**SMALL, ttt=False, hash_embed=False, compliance=False), progress=False)
    assert "compliance" not in off and "compliance" not in off["stages"] and off["val_loss"] == body["val_loss"]


def test_the_packed_program_has_no_verification_code():
    """Nor the tilt view (eval/tilt.py), which only the kit's ablation, tuning and `pgolf eval` use."""
    from tools.pack.ship import bundle_entry
    result = bundle_entry()
    assert not {"eval/verify.py", "eval/compliance.py", "eval/tilt.py"} & set(result.modules)
    tree = ast.parse(result.readable_source)
    packed = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for module in ("eval/verify.py", "eval/compliance.py", "eval/tilt.py"):
        defined = {node.name for node in ast.parse((REPO / module).read_text()).body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert defined and not defined & packed, f"{module} definitions packed: {sorted(defined & packed)}"
    # nothing in it names the verification: the kit passes it in (tools/pipeline.py)
    assert "eval.verify" not in result.readable_source


def test_the_entry_refuses_to_count_its_own_source_in_the_kit():
    """Unpacked, submission/train_gpt.py alone would count its source file as the code bytes: it refuses and names
    the kit's way to run it, before any work."""
    from submission import train_gpt
    with pytest.raises(SystemExit, match="python -m tools.pipeline"):
        train_gpt.main(["MAX_STEPS=1"])


def test_merging_a_verification_keeps_the_packed_score_and_refuses_another_artifact():
    from tools.commands.eval import merge_verification
    packed = {"seed": 1, "val_bpb": 1.351, "bytes_model": 100, "compliance_not_run": "verify with pgolf eval"}
    checks = {"C1": {"passed": True, "detail": "x"}}
    verified = {"seed": 1, "val_bpb": 1.352, "bytes_model": 100, "compliance": checks, "stages": {"score": 2.0}}
    merged = merge_verification(packed, verified)
    assert merged == {"seed": 1, "val_bpb": 1.351, "bytes_model": 100, "compliance": checks,
                      "verification": {"val_bpb": 1.352, "stages": {"score": 2.0}}}
    unchecked = merge_verification(packed, {k: v for k, v in verified.items() if k != "compliance"})
    assert unchecked["compliance_not_run"] and "compliance" not in unchecked  # COMPLIANCE=0 verified nothing
    with pytest.raises(ValueError, match="101-byte model.*states 100"):
        merge_verification(packed, {**verified, "bytes_model": 101})


def test_under_torch_distributed_the_checks_sum_coverage_and_report_a_failing_ranks_verdict():
    """With a process group the ranks split every chunk: C4 counts the coverage summed over them (one stream), and
    a rank's failing C1 or C3 verdict becomes everyone's, naming the rank (a group of one here; tests/
    test_distributed.py runs two processes)."""
    import torch.distributed as dist

    from eval.stream import StreamResult
    from eval.verify import _compliance
    norm = {"model": torch.tensor([1e-7, 1e-3, 0.0], dtype=torch.float64)}
    result = StreamResult(1, 5, {"model": torch.zeros(4)}, torch.tensor([1, 1, 1, 1], dtype=torch.int32), norm,
                          [("score", "", 1, 5)])
    failed = {"passed": False, "detail": "the score at position 3 changed"}
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        checks = _compliance(result, failed, 4)
    finally:
        dist.destroy_process_group()
    assert checks["C1"] == {"passed": False, "detail": "rank 0: the score at position 3 changed"}
    assert checks["C3"]["passed"] and checks["C2"]["passed"]
    assert checks["C4"] == {"passed": True, "detail": "each of the 4 targets scored exactly once"}
