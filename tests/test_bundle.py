"""Tests for the bundler (tools/pack/bundle/, `pgolf bundle`): the packed single file behaves like the readable kit
it was generated from."""
from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import hashlib
import io
import itertools
import lzma
import os
import random
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from tools.commands.bundle import add_commands
from tools.pack.bundle import (CODECS, BundleError, base93_decode, base93_encode, bundle, compressed_payload,
                               find_kit_root, pack, unpack, write_bundle)
from tools.pack.bundle.codec import _str_literal, _stub_base85, _stub_base93
from tools.pack.bundle.shorten import Shortener

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# A fake kit using every import style the bundler supports; the entry prints one JSON line of results.
FAKE_KIT = {
    "fk_core/__init__.py": '"""DOCSTRING_MARKER package."""\n',
    "fk_core/config.py": '''
        """DOCSTRING_MARKER config module."""
        from __future__ import annotations

        import dataclasses
        import typing
        from dataclasses import dataclass, field
        from typing import ClassVar

        SCALE = 3  # COMMENT_MARKER module-level constant


        @dataclass
        class Cfg:
            """DOCSTRING_MARKER class doc."""
            width: int = 4
            names: tuple[str, ...] = ("a", "b")
            extra: list[int] = field(default_factory=lambda: [1, 2])
            kind: ClassVar[str] = "cfg"

            def area(self) -> int:
                """DOCSTRING_MARKER method doc."""
                return self.width * SCALE


        def hints() -> dict[str, str]:
            return {k: str(v) for k, v in typing.get_type_hints(Cfg).items()}


        def as_dict(cfg: Cfg) -> dict:
            return dataclasses.asdict(cfg)


        def _fmt(v) -> str:
            return f"cfg<{v}>"


        def fmt_cfg(v):
            return _fmt(v)


        _count = 100


        def bump_cfg() -> int:
            global _count
            _count += 1
            return _count


        def only_docstring():
            """DOCSTRING_MARKER: this body becomes `pass`."""
        ''',
    "fk_core/model.py": '''
        """DOCSTRING_MARKER model."""
        from __future__ import annotations

        import math

        import fk_core.config as C
        from . import config
        from .config import SCALE, Cfg as Config


        def build(cfg: Config) -> list[float]:
            # COMMENT_MARKER inside a function
            return [math.sqrt(cfg.width)] * C.SCALE + [config.SCALE * SCALE]


        class Net:
            base = C.SCALE + 1

            def __init__(self, cfg: Config):
                self.cfg = cfg

            def forward(self, x: float) -> list[float]:
                return [v * x for v in build(self.cfg)]
        ''',
    "fk_eval/__init__.py": "",
    "fk_eval/metrics.py": '''
        """DOCSTRING_MARKER metrics."""
        from __future__ import annotations

        import fk_core.model
        from fk_core.config import SCALE
        from fk_eval.table import TABLE

        TOTAL = SCALE * 10


        def score(cfg) -> float:
            return sum(fk_core.model.build(cfg)) + TOTAL + sum(f(1) for f in TABLE)


        def _fmt(v) -> str:  # the same private name as in config.py: renamed, not shadowed
            return f"metric<{v}>"


        def fmt_metric(v):
            return _fmt(v)


        def late_scale() -> int:
            from fk_core.config import SCALE as S
            return S * 2


        _count = 0


        def counter() -> int:
            global _count
            _count += 1
            return _count


        if __name__ == "__main__":
            print("METRICS_MAIN_MUST_NOT_RUN")
        ''',
    # Repetitive code, like a real model file, so the packed size can be compared with the readable one.
    "fk_eval/table.py": '"""DOCSTRING_MARKER generated table of small operations."""\n' + "".join(
        f'\n\ndef op_{i}(x: int) -> int:\n    """Operation {i}: multiply and offset (DOCSTRING_MARKER)."""\n'
        f"    return x * {i} + {i % 7}  # COMMENT_MARKER\n" for i in range(40))
        + "\n\nTABLE = [" + ", ".join(f"op_{i}" for i in range(40)) + "]\n",
    "fk_core/entry.py": '''
        """DOCSTRING_MARKER entry."""
        from __future__ import annotations

        import json
        import sys

        import fk_eval.metrics as M
        from fk_core import model
        from fk_core.config import Cfg, as_dict, bump_cfg, fmt_cfg, hints, only_docstring
        from fk_eval import metrics
        from fk_eval.metrics import score as metric_score


        def main() -> None:
            cfg = Cfg(width=9)
            result = {
                "area": cfg.area(), "build": model.build(cfg), "net": model.Net(cfg).forward(2),
                "base": model.Net.base, "score": metric_score(cfg), "hints": hints(), "asdict": as_dict(cfg),
                "fmt": [fmt_cfg(1), metrics.fmt_metric(2)],
                "counts": [bump_cfg(), M.counter(), M.counter(), bump_cfg()],
                "late": metrics.late_scale(), "none": only_docstring(), "kind": Cfg.kind,
                "module": Cfg.__module__ in sys.modules, "argv": sys.argv[1:],
            }
            print(json.dumps(result, sort_keys=True))


        if __name__ == "__main__":
            main()
        ''',
}


def write_kit(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_packed(packed: bytes, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the packed file from a folder holding nothing else, with no kit on the path."""
    folder.mkdir()
    (folder / "train_gpt.py").write_bytes(packed)
    return subprocess.run([PY, "train_gpt.py", *args], cwd=folder, env=clean_env(), capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def fake_kit(tmp_path) -> Path:
    return write_kit(tmp_path / "kit", FAKE_KIT)


def test_packed_file_prints_what_the_readable_entry_prints(fake_kit, tmp_path):
    reference = subprocess.run([PY, "-m", "fk_core.entry", "x", "y"], cwd=fake_kit, env=clean_env(),
                               capture_output=True, text=True, timeout=60)
    assert reference.returncode == 0, reference.stderr
    result = bundle(fake_kit / "fk_core/entry.py", fake_kit, ("fk_core", "fk_eval"))
    packed = run_packed(result.packed, tmp_path / "empty", "x", "y")
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout == reference.stdout
    assert '"counts": [101, 1, 2, 102]' in packed.stdout  # both private _count globals survived, separately
    assert "METRICS_MAIN_MUST_NOT_RUN" not in packed.stdout
    assert result.modules == ["fk_core/config.py", "fk_core/model.py", "fk_eval/table.py", "fk_eval/metrics.py",
                              "fk_core/entry.py"]
    assert any("_fmt" in r for r in result.renamed) and any("_count" in r for r in result.renamed)


def test_stripped_minified_and_packed(fake_kit):
    result = bundle(fake_kit / "fk_core/entry.py", fake_kit, ("fk_core", "fk_eval"))
    src = result.readable_source
    assert "DOCSTRING_MARKER" not in src and "COMMENT_MARKER" not in src
    assert "METRICS_MAIN_MUST_NOT_RUN" not in src
    assert src.startswith("from __future__ import annotations\n") and src.count("__future__") == 1
    assert not re.search(r"^(import fk_|from fk_|from \.)", src, re.M)  # no kit import survived
    assert src.count("if __name__ == '__main__':") == 1  # the entry's guard only
    lines = src.splitlines()
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    assert all(line.strip() for line in lines)  # no blank lines
    assert all(b <= a + 1 for a, b in zip(indents, indents[1:])) and max(indents) >= 2  # one space per level
    assert "width: int = 4" in src  # dataclass field annotations are kept
    assert "-> int" not in src and "x: int" not in src  # function annotations are dropped
    # The default packed file is printable ASCII (valid UTF-8, as the rules count code): the smaller of base93 and
    # base85, whose literal decompresses to exactly the readable source (Python's own parser reads the literal).
    assert set(result.packed) <= set(range(0x20, 0x7F)) | {ord("\n")}
    assert unpack(result.packed, "train_gpt.py") == src
    b93, b85 = pack(src, "base93")[0], pack(src, "base85")[0]
    assert len(result.packed) == min(len(b93), len(b85)) and unpack(b85, "train_gpt.py") == src
    (payload,) = [n.value for n in ast.walk(ast.parse(b93)) if isinstance(n, ast.Constant)
                  and isinstance(n.value, bytes) and len(n.value) > 100]
    codec = b93.split(b",")[0].removeprefix(b"import ").decode()  # the stub's decompressor: lzma or brotli
    assert CODECS[codec](base93_decode(payload)).decode() == src == unpack(b93, "train_gpt.py")
    assert result.sizes.compressed == len(base93_decode(payload))
    # The opt-in latin-1 packing holds the raw lzma bytes: smaller (no text encoding), same program.
    raw, _ = pack(src, "latin-1")
    assert raw.startswith(b"# coding: latin-1\n") and unpack(raw, "train_gpt.py") == src
    assert len(raw) < len(result.packed)
    files = [fake_kit / m for m in result.modules]
    assert result.sizes.readable == sum(f.stat().st_size for f in files)
    assert result.sizes.minified == len(src.encode()) and result.sizes.packed == len(result.packed)
    assert result.sizes.packed < result.sizes.readable / 2


def expected_escapes(data: bytes, quote: int) -> int:
    """Extra bytes the literal needs, counted byte by byte: one per backslash, CR and NUL (three more for a NUL before
    an octal digit, written \\000) and one per quote followed by another or ending the data."""
    extra = 0
    for i, b in enumerate(data):
        after = data[i + 1] if i + 1 < len(data) else None
        if b == 0:
            extra += 3 if after is not None and ord("0") <= after <= ord("7") else 1
        elif b in b"\\\r" or (b == quote and after in (quote, None)):
            extra += 1
    return extra


def test_latin1_literal_round_trips_every_byte_pair(tmp_path):
    pairs = bytes(byte for a in range(256) for b in range(256) for byte in (a, b))  # every ordered pair of values
    cases = [pairs, b"", b'"' * 7, b"'" * 7, b'x""', b"x''", b"\\", b'\\"""', b"\0" + b"0123456789\0", b"\r\n\r",
             b"\\N{DASH}\\u2028\\x85", b"\\\n", b"\x85\x0b\x0c\x1a\xa0\xff", b'"\'"\'"""\'\'\'',
             b"''''x\"", b'""""x\'']
    literals = [_str_literal(data) for data in cases]
    for data, literal in zip(cases, literals):
        assert len(literal) == len(data) + 6 + min(expected_escapes(data, q) for q in b"\"'"), data[:20]
    assert literals[2].startswith(b"'''") and literals[3].startswith(b'"""')  # the quote needing fewer escapes
    # Independent reference: the Python interpreter reading a latin-1 source, through compile() and as a script file.
    source = b"# coding: latin-1\npayloads = [" + b",\n".join(literals) + b"]\n"
    namespace = {}
    exec(compile(source, "literals.py", "exec"), namespace)
    assert [s.encode("latin-1") for s in namespace["payloads"]] == cases
    (tmp_path / "literals.py").write_bytes(source + b"print([s.encode('latin-1') for s in payloads])\n")
    proc = subprocess.run([PY, "literals.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ast.literal_eval(proc.stdout) == cases


def test_tracebacks_and_getsource_see_the_unpacked_source(tmp_path):
    kit = write_kit(tmp_path / "kit", {
        "fk_core/__init__.py": "",
        "fk_core/util.py": '''
            def explode(n):
                raise ValueError(f"boom {n}")
            ''',
        "fk_core/entry.py": '''
            import inspect
            from fk_core.util import explode

            if __name__ == "__main__":
                print(inspect.getsource(explode).splitlines()[0])
                explode(7)
            ''',
    })
    result = bundle(kit / "fk_core/entry.py", kit, ("fk_core",))
    proc = run_packed(result.packed, tmp_path / "empty")
    assert proc.stdout == "def explode(n):\n"
    # The message is shortened to the kit file and line plus its values (test_raise_messages_... covers the rules).
    assert "raise ValueError(f'util.py:2 {n}')" in proc.stderr
    assert "ValueError: util.py:2 7" in proc.stderr


def test_write_bundle_hash_follows_the_sources_not_the_comments(fake_kit, tmp_path):
    entry = fake_kit / "fk_core/entry.py"
    first = bundle(entry, fake_kit, ("fk_core", "fk_eval"))
    script = write_bundle(first, tmp_path / "out")
    assert script.read_bytes() == first.packed
    lines = (tmp_path / "out/train_gpt.py.sha256").read_text().splitlines()
    assert f"source_sha256:{first.sha256}" in lines
    assert f"packed_sha256:{hashlib.sha256(script.read_bytes()).hexdigest()}" in lines
    assert f"packed_bytes:{script.stat().st_size}" in lines
    assert [line.split(":", 1)[1] for line in lines if line.startswith("module:")] == first.modules
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train_gpt.py", "train_gpt.py.sha256"]
    config = fake_kit / "fk_core/config.py"
    config.write_text(config.read_text() + "# a new comment\n")
    second = bundle(entry, fake_kit, ("fk_core", "fk_eval"))
    assert second.sha256 != first.sha256 and second.readable_source == first.readable_source
    (fake_kit / "unrelated.py").write_text("x = 1\n")
    assert bundle(entry, fake_kit, ("fk_core", "fk_eval")).sha256 == second.sha256


def test_write_bundle_writes_files_with_a_normal_mode(fake_kit, tmp_path):
    """The packed train_gpt.py is shipped: it gets open()'s mode (0o666 less the umask), not mkstemp's 0o600."""
    result = bundle(fake_kit / "fk_core/entry.py", fake_kit, ("fk_core", "fk_eval"))
    umask = os.umask(0o022)
    try:
        write_bundle(result, tmp_path / "out")
    finally:
        os.umask(umask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {
        "train_gpt.py": "0o644", "train_gpt.py.sha256": "0o644"}


def kit_with(tmp_path, one: str, two: str, entry: str) -> Path:
    return write_kit(tmp_path / "kit", {"fk_a/__init__.py": "", "fk_a/one.py": one, "fk_a/two.py": two,
                                        "fk_a/entry.py": entry})


def test_public_name_clash_is_an_error(tmp_path):
    kit = kit_with(tmp_path, "def helper():\n    return 1\n", "def helper():\n    return 2\n",
                   "from fk_a import one, two\nprint(one.helper(), two.helper())\n")
    with pytest.raises(BundleError, match=r"'helper'.*fk_a/one\.py:1.*fk_a/two\.py:1"):
        bundle(kit / "fk_a/entry.py", kit, ("fk_a",))


def test_shadowing_a_builtin_another_module_uses_is_an_error(tmp_path):
    kit = kit_with(tmp_path, "def max(*values):\n    return 0\n", "def biggest(a, b):\n    return max(a, b)\n",
                   "from fk_a.one import max\nfrom fk_a.two import biggest\nprint(biggest(1, 2), max(3))\n")
    with pytest.raises(BundleError, match=r"'max'.*the builtin at fk_a/two\.py:2"):
        bundle(kit / "fk_a/entry.py", kit, ("fk_a",))


def test_module_level_import_cycle_is_an_error(tmp_path):
    kit = kit_with(tmp_path, "from fk_a.two import b\na = 1\n", "from fk_a.one import a\nb = 2\n",
                   "from fk_a.one import a\nprint(a)\n")
    with pytest.raises(BundleError, match=r"import cycle: fk_a/one\.py -> fk_a/two\.py -> fk_a/one\.py"):
        bundle(kit / "fk_a/entry.py", kit, ("fk_a",))


def test_function_level_import_may_close_a_cycle(tmp_path):
    kit = kit_with(tmp_path, "from fk_a.two import b\na = 1\n",
                   "def b():\n    from fk_a.one import a\n    return a + 1\n",
                   "from fk_a.one import a\nfrom fk_a.two import b\nprint(a, b())\n")
    result = bundle(kit / "fk_a/entry.py", kit, ("fk_a",))
    assert run_packed(result.packed, tmp_path / "empty").stdout == "1 2\n"


def test_local_name_hiding_an_inlined_global_is_an_error(tmp_path):
    kit = kit_with(tmp_path, "def helper():\n    return 1\n", "x = 0\n",
                   "import fk_a.one as one\ndef f(helper):\n    return one.helper() + helper\nprint(f(1))\n")
    with pytest.raises(BundleError, match=r"fk_a/entry\.py:3: fk_a\.one\.helper .* local 'helper' hides it"):
        bundle(kit / "fk_a/entry.py", kit, ("fk_a",))


def test_module_alias_used_as_a_value_is_an_error(tmp_path):
    kit = kit_with(tmp_path, "x = 1\n", "y = 2\n", "from fk_a import one\nprint(getattr(one, 'x'))\n")
    with pytest.raises(BundleError, match=r"fk_a/entry\.py:2: kit module alias 'one' is used as a value"):
        bundle(kit / "fk_a/entry.py", kit, ("fk_a",))


def test_unused_library_definitions_are_pruned(tmp_path):
    kit = write_kit(tmp_path / "kit", {
        "fk_a/__init__.py": "",
        "fk_a/lib.py": '''
            import struct

            TABLE = {"a": 1}                     # used through a kept function
            UNUSED_TABLE = {"b": 2}              # pruned: nothing reads it
            LAYOUT = struct.Struct("<I")         # kept although unused: its value calls something
            _count = 0


            def helper(x):
                return x + TABLE["a"]


            def used(x):
                global _count
                _count += 1
                return helper(x) * 10 + _count


            def only_for_dead(x):                # pruned: only a pruned function calls it
                return x


            def dead(x):
                return only_for_dead(x) + UNUSED_TABLE["b"]


            class Unused:
                pass


            def main():                          # both library modules have a main: no clash once pruned
                return "lib"
            ''',
        "fk_a/other.py": '''
            import fk_a.lib as L


            def through_alias():
                return L.used(1)


            def main():
                return "other"
            ''',
        "fk_a/entry.py": '''
            from fk_a.lib import used
            from fk_a.other import through_alias


            def main():
                print(used(2), through_alias(), used(3))


            if __name__ == "__main__":
                main()
            ''',
    })
    result = bundle(kit / "fk_a/entry.py", kit, ("fk_a",))
    assert sorted(result.pruned) == ["fk_a/lib.py: UNUSED_TABLE", "fk_a/lib.py: Unused", "fk_a/lib.py: dead",
                                     "fk_a/lib.py: main", "fk_a/lib.py: only_for_dead", "fk_a/other.py: main"]
    assert "LAYOUT" in result.readable_source and "UNUSED_TABLE" not in result.readable_source
    reference = subprocess.run([PY, "-m", "fk_a.entry"], cwd=kit, env=clean_env(), capture_output=True, text=True,
                               timeout=60)
    packed = run_packed(result.packed, tmp_path / "empty")
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout == reference.stdout == "31 22 43\n"


def test_cli_bundle_writes_the_files(fake_kit, tmp_path, capsys):
    assert find_kit_root(fake_kit / "fk_core/entry.py") == fake_kit.resolve()
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bundle", str(REPO / "eval/bpb.py"), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0  # the CLI bundles the real kit's packages, found above the entry
    assert "module:eval/bpb.py" in capsys.readouterr().out.splitlines()
    assert (tmp_path / "out/train_gpt.py").is_file()


def test_real_kit_entry_bundles_and_runs_without_the_kit(tmp_path):
    entry = REPO / "submission/train_gpt.py"
    if not entry.is_file():
        pytest.skip(f"{entry} does not exist yet")
    result = bundle(entry, REPO)
    compile(result.packed, "train_gpt.py", "exec")
    kit_imports = [n for n in ast.walk(ast.parse(result.readable_source)) if isinstance(n, ast.ImportFrom)
                   and (n.module or "").split(".")[0] in ("submission", "eval", "tools")]
    assert not kit_imports
    assert result.sizes.packed < result.sizes.readable / 3
    # Execute the packed file's definitions (not its main) with the kit packages made unimportable. A tiny model with
    # every feature of both recipes on.
    tiny = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bigram_buckets=16, bigram_dim=8,
                value_embed_last_n=2, value_embed_dim=8, embed2=True, rope_dims=8, num_loops=1, loop_layers=(1, 1),
                parallel_last_n=1)
    check = tmp_path / "check.py"
    check.write_text(textwrap.dedent(f"""
        import sys, runpy, torch
        for name in ("submission", "eval", "tools"):
            sys.modules[name] = None
        g = runpy.run_path({str(tmp_path / "train_gpt.py")!r}, run_name="bundle_check")
        cfg = g["ModelConfig"](**{tiny!r})
        torch.manual_seed(0)
        model = g["GPT"](cfg)
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.save(model.logits(idx).detach(), {str(tmp_path / "bundled.pt")!r})
        print(" ".join(sorted(k for k in g if not k.startswith("__"))))
    """))
    (tmp_path / "train_gpt.py").write_bytes(result.packed)
    proc = subprocess.run([PY, str(check)], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    bundled_names = set(proc.stdout.split())
    # Independent reference: the readable kit itself. Every public module-level name it defines is in the bundle.
    import torch
    from submission import model as readable_model
    from submission.config import ModelConfig
    pruned = set(result.pruned)
    for rel in result.modules:
        module = __import__(rel[:-3].replace("/", "."), fromlist=["_"])
        public = {k for k, v in vars(module).items() if not k.startswith("_") and getattr(v, "__module__", None)
                  == module.__name__ and f"{rel}: {k}" not in pruned}
        assert public <= bundled_names, (rel, public - bundled_names)
    assert "submission/train.py: main" in pruned  # the trainer's own entry; train_gpt.py's main replaces it
    cfg = ModelConfig(**tiny)
    torch.manual_seed(0)
    model = readable_model.GPT(cfg)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.load(tmp_path / "bundled.pt"), model.logits(idx).detach(), rtol=0, atol=0)


# ---- short names: each program runs the same before and after renaming; the listed names are gone or kept ----------

SHORT_NAME_CASES = {
    "closure_and_nonlocal": ('''
        def counter(start_value):
            running_total = start_value
            def bump(step_size):
                nonlocal running_total
                running_total += step_size
                return running_total
            return bump


        def outer_fn(seed_value):
            base_total = seed_value + 1
            def inner_fn(offset_value):
                inner_sum = base_total + offset_value  # must not take base_total's short name
                return inner_sum
            other_local = inner_fn(2)
            return other_local, [inner_fn(k) for k in range(2)], (lambda lam_arg: lam_arg + base_total)(1)


        def level_one():
            top_value = 1
            def level_two():
                middle_value = 2  # must not take the short name of top_value, which level_three reads through here
                def level_three():
                    return top_value * 10
                return middle_value + level_three()
            return level_two()


        bumper = counter(10)
        print(bumper(2), bumper(3), outer_fn(5), level_one())
        ''', ["start_value", "running_total", "seed_value", "base_total", "offset_value", "inner_sum", "other_local",
              "top_value", "middle_value"],
        ["bump", "step_size", "inner_fn", "lam_arg"]),  # bump is returned (a value); lambdas go anywhere
    "comprehensions_and_walrus": ('''
        def stats(values):
            squares = [(last_square := value * value) for value in values if value]
            table = {key_name: len(key_name) for key_name in ("a", "bb")}
            nested = [[inner * outer for inner in range(outer)] for outer in range(3)]
            return squares, last_square, table, nested, sum(item for item in values), {el % 2 for el in values}


        print(stats([1, 2, 3]), [value for value in range(3)], sorted({pair_key for pair_key in "ba"}))
        ''', ["values", "squares", "last_square", "value", "key_name", "nested", "inner", "outer", "item", "pair_key"],
        []),
    "global_and_private_names": ('''
        _hits = 0
        _LIMIT = 5


        def _add(amount):
            global _hits
            _hits += amount
            return min(_hits, _LIMIT)


        def helper_named_in_string():
            return "kept"


        def _spelt():
            return "kept: named in a string"


        import sys
        print(_add(1), _add(2), _hits, getattr(sys.modules[__name__], "_spelt")())
        ''', ["_hits", "_LIMIT", "_add", "amount"], ["_spelt", "helper_named_in_string"]),
    "keyword_calls": ('''
        def scale(value_in, factor=2, *, offset=0):
            return value_in * factor + offset


        def collect(first_value, *more_values, **rest_values):  # renamed first_value must avoid keyword names a, b
            return first_value, more_values, rest_values


        def pair(left_side, right_side):
            return left_side - right_side


        def as_value(never_keyword):
            return never_keyword


        handler = as_value  # a value: any caller may pass never_keyword by keyword
        print(scale(3), scale(3, factor=5), scale(3, offset=1), collect(1, 2, a=2, b=3), pair(**{"left_side": 5,
              "right_side": 2}), handler(never_keyword=4))
        ''', ["value_in", "first_value", "more_values", "rest_values"],
        ["factor", "offset", "left_side", "right_side", "never_keyword"]),
    "class_bodies_and_dataclasses": ('''
        from __future__ import annotations

        import typing
        from dataclasses import dataclass, field, fields

        _Number = int  # named in an annotation: typing.get_type_hints evaluates it


        @dataclass
        class Cfg:
            width: _Number = 4
            depth: int = 2
            tags: list = field(default_factory=list)

            def total(self, extra_amount):
                product_value = self.width * self.depth
                return product_value + extra_amount

            @staticmethod
            def twice(static_arg):
                return 2 * static_arg


        def make(width_arg):
            shared_total = width_arg * 2
            class Box:
                size = shared_total  # a class body reads the enclosing function's variable
                doubled = [size_item * 2 for size_item in range(3)]
                def area(self):
                    return self.size * shared_total
            return Box


        box_class = make(3)
        print([f.name for f in fields(Cfg)], Cfg(depth=3).total(extra_amount=1), Cfg(), Cfg.twice(4),
              typing.get_type_hints(Cfg)["width"], box_class.size, box_class.doubled, box_class().area(),
              sorted(k for k in box_class.__dict__ if not k.startswith("__")))
        ''', ["width_arg", "shared_total", "size_item", "product_value", "self"],
        ["_Number", "width", "depth", "tags", "total", "extra_amount", "static_arg", "size", "doubled", "area"]),
    "fstrings_del_and_except": ('''
        def show(amount_value):
            label_text = "n"
            return f"{label_text}={amount_value!r:>5} {amount_value=} {label_text.upper()!s}"


        def risky(raw_text):
            try:
                parsed_value = int(raw_text)
            except ValueError as parse_error:
                message_text = str(parse_error)
                return message_text
            temp_holder = parsed_value
            del parsed_value
            try:
                return parsed_value
            except UnboundLocalError as unbound_error:
                return f"{temp_holder} then {type(unbound_error).__name__}"


        print(show(7), risky("x"), risky("5"))
        ''', ["label_text", "parsed_value", "parse_error", "message_text", "temp_holder", "unbound_error"],
        ["amount_value="]),  # the self-documenting f-string prints the name as written
    "match_statement": ('''
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y


        def classify(shape_value):
            match shape_value:
                case {"kind": "circle", **rest_items}:
                    return ("circle", rest_items)
                case [first_item, *other_items]:
                    return (first_item, other_items)
                case int(number_value) | float(number_value) if number_value > 0:
                    return ("positive", number_value)
                case Point(x=coord_x, y=0):
                    return ("on axis", coord_x)
                case {"kind": _} as whole_map:
                    return ("some kind", whole_map)
                case captured_value:
                    return ("other", captured_value)


        print([classify(v) for v in [{"kind": "circle", "r": 1}, [1, 2, 3], 2.5, Point(4, 0), {"kind": 1}, -1]])
        ''', ["rest_items", "first_item", "other_items", "number_value", "coord_x", "whole_map", "captured_value"],
        ["Point", "x", "y"]),
    "locals_and_eval_keep_names": ('''
        _private_global = 2


        def uses_locals(alpha_value):
            beta_value = alpha_value + 1
            def nested_reader():
                return beta_value
            return sorted(locals()), nested_reader()


        def uses_eval():
            gamma_value = 3
            return eval("gamma_value * _private_global")


        def plain():
            delta_value = 1
            return delta_value


        print(uses_locals(1), uses_eval(), plain())
        ''', ["delta_value"], ["alpha_value", "beta_value", "gamma_value", "_private_global"]),
}


def short_names_source(source: str) -> tuple[str, object]:
    tree = ast.parse(source)
    names = Shortener(tree).run()
    return ast.unparse(tree), names


def exec_printing(source: str) -> str:
    """What `source` prints when run as its own module (registered in sys.modules, as a script's is)."""
    module = types.ModuleType("fk_short_names_case")
    sys.modules[module.__name__] = module
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, "<short-names-case>", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return out.getvalue()


@pytest.mark.parametrize("case", sorted(SHORT_NAME_CASES))
def test_short_names_keep_behaviour(case):
    source, renamed, kept = SHORT_NAME_CASES[case]
    source = textwrap.dedent(source).lstrip("\n")
    reference = exec_printing(source)
    assert reference.strip()
    short, _ = short_names_source(source)
    assert exec_printing(short) == reference, short
    for name in renamed:
        assert not re.search(rf"\b{name}\b", short), (name, short)
    for name in kept:
        assert re.search(rf"\b{re.escape(name)}", short), (name, short)


def test_short_names_reuse_the_same_letters_in_every_function():
    short, names = short_names_source(textwrap.dedent('''
        def first(one_arg):
            first_local = one_arg + 1
            return first_local


        def second(other_arg):
            second_local = [other_arg]
            return second_local
        print(first(1), second(2))
        '''))
    assert "def first(a):\n    b = a + 1" in short and "def second(a):\n    b = [a]" in short
    assert (names.locals, names.parameters, names.private_globals) == (2, 2, [])


def test_frame_access_keeps_every_local_name():
    source = textwrap.dedent('''
        import sys


        def peek():
            return sorted(sys._getframe(1).f_locals)


        def caller():
            watched_value = 1
            return peek(), watched_value
        print(caller())
        ''')
    short, names = short_names_source(source)
    assert "watched_value" in short and names.locals == 0
    assert exec_printing(short) == exec_printing(source) == "(['watched_value'], 1)\n"


def test_renaming_that_changes_a_reference_is_refused(monkeypatch):
    """The re-resolution check, not the choice of names, is what guarantees the meaning: give the chooser a wrong
    picture (no variable is looked up outside its own scope) and the check must refuse the result."""
    tree = ast.parse("def outer():\n    x_outer = 1\n    def inner():\n        y_inner = 2\n        return x_outer + "
                     "y_inner\n    return inner()\n")
    shortener = Shortener(tree)
    for symbol in shortener.symbols.values():
        symbol.span = {id(symbol.owner)}
    with pytest.raises(BundleError, match=r"renaming 'x_outer' to 'a' changed what it refers to"):
        shortener.run()


def test_bundle_reports_short_names_and_can_keep_long_ones(fake_kit, tmp_path):
    entry = fake_kit / "fk_core/entry.py"
    short = bundle(entry, fake_kit, ("fk_core", "fk_eval"))
    long = bundle(entry, fake_kit, ("fk_core", "fk_eval"), short_names=False)
    assert long.short_names is None and long.sizes.minified == long.sizes.long_names == short.sizes.long_names
    assert short.sizes.minified < short.sizes.long_names and short.sizes.packed < long.sizes.packed
    assert short.short_names.locals > 0 and short.short_names.parameters > 0
    assert any(line.startswith("_fmt -> ") for line in short.short_names.private_globals)
    # cfg is a parameter of as_dict (called directly): renamed; Cfg's fields and methods keep their names.
    assert "def as_dict(cfg)" in long.readable_source and "def as_dict(a)" in short.readable_source
    assert "width: int = 4" in short.readable_source and "def area(a):" in short.readable_source
    outputs = [run_packed(r.packed, tmp_path / name, "x").stdout for r, name in [(short, "short"), (long, "long")]]
    assert outputs[0] == outputs[1] and '"area": 27' in outputs[0]



def cli_bundle(entry: str, out: Path, flags: list[str], capsys) -> tuple[str, dict[str, str], list[str]]:
    """`pgolf bundle REPO/entry --out OUT FLAGS`: its summary line, that line's key:value fields, the sidecar lines."""
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bundle", str(REPO / entry), "--out", str(out), *flags])
    assert args.func(args) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    fields = dict(item.split(":", 1) for item in last.split() if ":" in item)
    return last, fields, (out / "train_gpt.py.sha256").read_text().splitlines()


def test_cli_bundle_long_names_flag(tmp_path, capsys):
    sizes = {}
    for flags in ([], ["--long-names"]):
        last, fields, sidecar = cli_bundle("eval/bpb.py", tmp_path / "out", flags, capsys)
        sizes[bool(flags)] = (int(fields["long_names_bytes"]), int(fields["minified_bytes"]))
        assert (fields["short_names"] == "off") == bool(flags), last
        assert f"minified_bytes:{sizes[bool(flags)][1]}" in sidecar
    assert sizes[True][0] == sizes[True][1] == sizes[False][0] > sizes[False][1]


# ---- short raise messages --------------------------------------------------------------------------------------------

MESSAGE_KIT = {
    "fk_m/__init__.py": "",
    "fk_m/lib.py": '''
        class ShardError(ValueError):
            """A kit-defined exception type."""


        def too_big(code_bytes, model_bytes, cap):
            raise ValueError(
                f"fit: code {code_bytes:,} + model {model_bytes:,} = {code_bytes + model_bytes:,} bytes exceeds "
                f"the cap {cap:,}; re-fit with --code-bytes {code_bytes}")


        def bad_magic(name, magic):
            raise ShardError(f"shard {name!r}: header magic {magic:#x} != 20240520 (not a challenge shard?)")


        def constant():
            raise RuntimeError("MESSAGE_PROSE no values here, " "only prose that names the fix")


        def chained(text):
            try:
                return int(text)
            except ValueError as err:
                raise KeyError(f"setting {text}: not an integer ({err.__class__.__name__})") from err


        def untouched(path):
            message = f"kept as built {path}"
            try:
                raise FileNotFoundError(message)
            except FileNotFoundError as err:
                print("variable:", err)
            try:
                raise OSError(2, "KEPT_SECOND_ARGUMENT")
            except OSError as err:
                print("oserror:", err.args)
            try:
                assert path == "x", f"KEPT_ASSERT {path}"
            except AssertionError as err:
                print("assert:", err)
            print(f"final_eval_exact path:{path} val_bpb:{1.25:.4f}")
        ''',
    "fk_m/entry.py": '''
        from fk_m.lib import bad_magic, chained, constant, too_big, untouched

        if __name__ == "__main__":
            for call in (lambda: too_big(41437, 17182085, 16000000), lambda: bad_magic("val_0.bin", 255),
                         constant, lambda: chained("x7")):
                try:
                    call()
                except Exception as err:
                    print(f"{type(err).__name__}|{err}|{type(err.__cause__).__name__}")
            untouched("y")
        ''',
}


def raise_line(kit: Path, rel: str, marker: str) -> int:
    """Line of the `raise` statement at or above the first line holding `marker`, read as plain text."""
    lines = (kit / rel).read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if marker in line)
    while not lines[i].lstrip().startswith("raise "):
        i -= 1
    return i + 1


def test_raise_messages_become_path_line_and_values(tmp_path):
    kit = write_kit(tmp_path / "kit", MESSAGE_KIT)
    reference = subprocess.run([PY, "-m", "fk_m.entry"], cwd=kit, env=clean_env(), capture_output=True, text=True,
                               timeout=60)
    assert reference.returncode == 0, reference.stderr
    short = bundle(kit / "fk_m/entry.py", kit, ("fk_m",))
    full = bundle(kit / "fk_m/entry.py", kit, ("fk_m",), short_messages=False)
    assert (short.short_messages, full.short_messages) == (4, None)
    assert short.sizes.minified < full.sizes.minified
    # Full messages: the packed program prints exactly what the readable kit prints.
    assert run_packed(full.packed, tmp_path / "full").stdout == reference.stdout
    lib = "fk_m/lib.py"  # named lib.py in the messages: no other file of the program has that name
    at = {marker: f"lib.py:{raise_line(kit, lib, marker)}" for marker in ("fit: code", "shard {name", "MESSAGE_PROSE",
                                                                         "setting {text}")}
    assert [int(v.rpartition(":")[2]) for v in at.values()] == [6, 12, 16, 23]
    proc = run_packed(short.packed, tmp_path / "short")
    assert proc.returncode == 0, proc.stderr
    # Same exception types and causes, the values without their format specs, the rest of the output unchanged.
    expected = [f"ValueError|{at['fit: code']} 41437 17182085 17223522 16000000 41437|NoneType",
                f"ShardError|{at['shard {name']} 'val_0.bin' 255|NoneType",
                f"RuntimeError|{at['MESSAGE_PROSE']}|NoneType",
                f"KeyError|'{at['setting {text}']} x7 ValueError'|ValueError"]
    assert proc.stdout.splitlines() == expected + reference.stdout.splitlines()[4:]
    assert reference.stdout.splitlines()[4:] == ["variable: kept as built y", "oserror: (2, 'KEPT_SECOND_ARGUMENT')",
                                                 "assert: KEPT_ASSERT y", "final_eval_exact path:y val_bpb:1.2500"]
    assert "MESSAGE_PROSE" not in short.readable_source and "re-fit" not in short.readable_source
    assert "MESSAGE_PROSE" in full.readable_source


def test_a_message_names_its_file_alone_unless_another_file_of_the_program_shares_the_name():
    from tools.pack.bundle.build import message_label
    rels = ["submission/model.py", "eval/run.py", "tools/quant/run.py", "train_gpt.py"]
    assert [message_label(rel, rels) for rel in rels] == ["model.py", "eval/run.py", "tools/quant/run.py",
                                                          "train_gpt.py"]


def test_cli_bundle_full_messages_flag(tmp_path, capsys):
    minified = {}
    for flags in ([], ["--full-messages"]):
        last, fields, sidecar = cli_bundle("eval/ngram.py", tmp_path / "out", flags, capsys)
        assert (fields["short_messages"] == "off") == bool(flags) and fields["short_messages"] != "0", last
        minified[bool(flags)] = int(fields["minified_bytes"])
        assert f"short_messages:{fields['short_messages']}" in sidecar
    assert minified[True] > minified[False]


# ---- base93 packing --------------------------------------------------------------------------------------------------

def test_base93_round_trips_bytes_of_every_length_and_is_dense():
    rng = random.Random(0)
    cases = [b"", b"\0", b"\1", b"\0" * 95, b"\0\0\1", b"\xff" * 94, b"\xff" * 95, b"\0" * 93 + b"\xff"]
    cases += [bytes(rng.randrange(256) for _ in range(n)) for n in range(0, 400)]
    cases += [b"\0" * z + bytes(rng.randrange(256) for _ in range(n)) for z in (1, 2, 94) for n in (0, 1, 93, 94, 200)]
    alphabet = set(range(0x20, 0x7F)) - set(b"'\\")
    for data in cases:
        text = base93_encode(data)
        assert base93_decode(text) == data, data[:10]
        assert set(text) <= alphabet
        # Independent reference for the density: each block uses the fewest chars k with 93**k >= 256**bytes.
        blocks = [data[i:i + 94] for i in range(0, len(data), 94)]
        assert len(text) == sum(next(k for k in itertools.count() if 93 ** k >= 256 ** len(b)) for b in blocks)
    # Python's parser reads an encoded payload back as the same bytes in a '-quoted bytes literal.
    text = base93_encode(bytes(range(256)) * 4)
    assert ast.literal_eval((b"b'" + text + b"'").decode("ascii")) == text


def test_base93_packed_file_runs_and_old_base85_files_still_unpack(tmp_path):
    # Hex digits of random bytes compress to about half: ~5 KB of lzma, where base93's longer stub pays off.
    rng = random.Random(1)
    program = "import sys\nprint('packed ok', sys.argv[1:])\n" + "".join(f"v{i} = 0x{rng.getrandbits(128):032x}\n"
                                                                        for i in range(300))
    packed, packing = pack(program)
    assert packing.endswith(" base93") and unpack(packed, "train_gpt.py") == program
    assert len(packed) < len(pack(program, "base85")[0])
    proc = run_packed(packed, tmp_path / "run", "a")
    assert proc.returncode == 0 and proc.stdout == "packed ok ['a']\n", proc.stderr
    # A file as `pgolf pack` wrote it before base93 (the stub spelt out here, not taken from the bundler).
    blob = lzma.compress(program.encode(), format=lzma.FORMAT_ALONE)
    old = (b"import lzma,base64,linecache as L,sys,traceback as T\n"
           b's=lzma.decompress(base64.b85decode("' + base64.b85encode(blob) + b'")).decode();f="<train_gpt>"\n'
           b"L.cache[f]=len(s),None,s.splitlines(1),f;sys.excepthook=T.print_exception;exec(compile(s,f,'exec'))\n")
    assert unpack(old, "old/train_gpt.py") == program
    assert unpack(b"print('plain')\n", "plain.py") is None
    broken = packed.replace(b"s=b'", b"s=b'~~", 1)
    with pytest.raises(BundleError, match="broken/train_gpt.py: the base93 payload does not"):
        unpack(broken, "broken/train_gpt.py")


def test_cli_bundle_base85_flag(tmp_path, capsys):
    fields = {}
    for flags in ([], ["--base85"]):
        last, fields[bool(flags)], _ = cli_bundle("eval/ngram.py", tmp_path / "out", flags, capsys)
        assert last.endswith(" base85'") or not flags, last
        assert unpack((tmp_path / "out/train_gpt.py").read_bytes(), "train_gpt.py") is not None
    assert fields[True]["compressed_bytes"] == fields[False]["compressed_bytes"]
    assert int(fields[True]["packed_bytes"]) >= int(fields[False]["packed_bytes"])


def test_brotli_packs_text_heavy_programs_and_the_file_runs(tmp_path):
    """brotli-11 (a dependency of every submission for the model) beats lzma on source text; the stub then imports
    brotli, the file runs, and unpack reads it. Random hex is lzma's: the smaller one is always taken."""
    words = "model train loss token window score chunk update quantize artifact budget evaluate".split()
    rng = random.Random(3)
    program = "import sys\nprint('brotli ok', sys.argv[1:])\n" + "".join(
        f"def {rng.choice(words)}_{i}(x):\n    return '{' '.join(rng.choice(words) for _ in range(8))}'\n"
        for i in range(200))
    packed, packing = pack(program)
    lzma_blob = compressed_payload(pack(program, "latin-1")[0], "raw")[1]
    assert packing.startswith("brotli-11") and packed.startswith(b"import brotli,")
    assert len(packed) < min(len(_stub_base93(lzma_blob)), len(_stub_base85(lzma_blob)))
    assert unpack(packed, "train_gpt.py") == program
    assert compressed_payload(packed, "train_gpt.py")[0] == "brotli " + packing.split()[-1]
    proc = run_packed(packed, tmp_path / "run", "b")
    assert proc.returncode == 0 and proc.stdout == "brotli ok ['b']\n", proc.stderr


OPTIONAL_KIT = {
    "fk_o/__init__.py": "",
    "fk_o/extra.py": '''
        """DOCSTRING_MARKER optional module."""
        import math


        def boost(value):
            if value < 0:
                raise ValueError(f"boost: negative value {value}, pass a value >= 0")
            return math.sqrt(value) + 1
        ''',
    "fk_o/entry.py": '''
        import importlib
        import sys

        if sys.argv[1:] == ["on"]:
            print(importlib.import_module("fk_o.extra").boost(16.0), __name__)
        else:
            print("off", "fk_o.extra" in sys.modules)
        ''',
}


def test_an_optional_module_is_packed_only_when_asked_and_runs_as_its_own_module(tmp_path):
    kit = write_kit(tmp_path / "kit", OPTIONAL_KIT)
    without = bundle(kit / "fk_o/entry.py", kit, ("fk_o",))
    with_it = bundle(kit / "fk_o/entry.py", kit, ("fk_o",), optional=("fk_o.extra",))
    assert without.modules == ["fk_o/entry.py"] and with_it.modules == ["fk_o/entry.py", "fk_o/extra.py"]
    assert "sqrt" not in without.readable_source and "sqrt" in with_it.readable_source
    assert "DOCSTRING_MARKER" not in with_it.readable_source
    assert with_it.sizes.packed > without.sizes.packed and with_it.sha256 != without.sha256
    assert run_packed(with_it.packed, tmp_path / "a", "on").stdout == "5.0 __main__\n"
    assert run_packed(with_it.packed, tmp_path / "b").stdout == "off True\n"  # registered before the program runs
    missing = run_packed(without.packed, tmp_path / "c", "on")
    assert missing.returncode != 0 and "No module named 'fk_o'" in missing.stderr
    assert run_packed(without.packed, tmp_path / "d").stdout == "off False\n"


def test_an_optional_module_may_not_import_the_kit_and_must_exist(tmp_path):
    kit = write_kit(tmp_path / "kit", {**OPTIONAL_KIT, "fk_o/helper.py": "K = 2\n",
                                       "fk_o/extra.py": "from fk_o.helper import K\n\n\ndef boost(v):\n    return K\n"})
    with pytest.raises(BundleError, match=r"fk_o/extra\.py: an optional module may import no kit module, but it "
                                          r"imports fk_o/helper\.py"):
        bundle(kit / "fk_o/entry.py", kit, ("fk_o",), optional=("fk_o.extra",))
    with pytest.raises(BundleError, match=r"optional module 'fk_o.nothing': not found"):
        bundle(kit / "fk_o/entry.py", kit, ("fk_o",), optional=("fk_o.nothing",))
