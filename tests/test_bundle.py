"""Tests for tools/bundle.py: the packed single file behaves like the readable kit it was generated from."""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import lzma
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools.bundle import BundleError, _str_literal, add_commands, bundle, find_kit_root, unpack, pack, write_bundle

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
    # The default packed file is ASCII (valid UTF-8, as the rules count code) whose base85 literal decompresses to
    # exactly the readable source (Python's own parser reads the literal).
    result.packed.decode("ascii")
    (payload,) = [n.value for n in ast.walk(ast.parse(result.packed)) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and len(n.value) > 100]
    assert lzma.decompress(base64.b85decode(payload)).decode() == src == unpack(result.packed, "train_gpt.py")
    # The opt-in latin-1 packing holds the raw lzma bytes: smaller, same program.
    raw, _ = pack(src, "latin-1")
    assert raw.startswith(b"# coding: latin-1\n") and unpack(raw, "train_gpt.py") == src
    assert len(raw) < 0.85 * len(result.packed)
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
    assert "raise ValueError(f'boom {n}')" in proc.stderr and "ValueError: boom 7" in proc.stderr


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
    # Execute the packed file's definitions (not its main) with the kit packages made unimportable.
    check = tmp_path / "check.py"
    check.write_text(textwrap.dedent(f"""
        import sys, runpy, torch
        for name in ("submission", "eval", "tools"):
            sys.modules[name] = None
        g = runpy.run_path({str(tmp_path / "train_gpt.py")!r}, run_name="bundle_check")
        cfg = g["ModelConfig"](vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                               bigram_buckets=16, bigram_dim=8, value_embed_dim=8, rope_dims=8)
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
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bigram_buckets=16,
                      bigram_dim=8, value_embed_dim=8, rope_dims=8)
    torch.manual_seed(0)
    model = readable_model.GPT(cfg)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.load(tmp_path / "bundled.pt"), model.logits(idx).detach(), rtol=0, atol=0)
