"""The layout's rules (README, "Layout"): which packages may import which, and no file pointing outside the project."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# submission/ modules the others build on; they import nothing outside them.
CORE = {"config", "runtime", "data", "model", "kernels", "optim", "switches", "ema"}


def imported_modules(path: Path) -> set[str]:
    """Every kit module a file imports, anywhere in it (functions too), and every importlib.import_module("...")."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from submission import kernels` imports submission.kernels
            out.update(f"{node.module}.{a.name}" for a in node.names) if "." not in node.module else \
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args and \
                isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
    return {m for m in out if m.split(".")[0] in ("submission", "eval", "tools")}


def allowed(module: str, imported: str) -> bool:
    package = module.split(".")[0]
    target_package = imported.split(".")[0]
    core = target_package == "submission" and imported.split(".")[1] in CORE if "." in imported else False
    if module == "submission.train_gpt" or package == "tools":  # the composition root, and the kit's tools/**
        return True
    if module == "submission.train":  # the trainer validates with eval/'s flat scorer and byte tables
        return core or target_package == "eval"
    if package == "submission":
        return core
    return core or target_package == "eval"  # eval/


def kit_modules(folder: str) -> list[tuple[str, Path]]:
    """(dotted name, path) of every module under a kit folder, its subpackages included (a package's __init__.py is
    the package)."""
    out = []
    for path in sorted((REPO / folder).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def test_imports_go_one_way():
    """tools/ (all its subpackages) and the composition root (submission/train_gpt.py) import anything; the trainer
    imports eval/ and the core; eval/ imports itself and the core; the core (submission/'s other modules) imports only
    itself. So eval/ never reaches a command, and nothing below the root imports tools/ by name."""
    wrong = []
    for folder in ("submission", "eval", "tools"):
        for module, path in kit_modules(folder):
            wrong += [f"{module} imports {m}" for m in sorted(imported_modules(path)) if not allowed(module, m)]
    assert wrong == []


def test_the_rules_see_every_subpackage():
    """The folders the README's Layout names are all walked (a glob of the top folder alone would miss them)."""
    modules = {module for folder in ("submission", "eval", "tools") for module, _ in kit_modules(folder)}
    assert {"tools.quant.gptq", "tools.pack.artifact", "tools.pack.bundle.codec", "tools.records.stats",
            "tools.commands.cli"} <= modules


def test_the_packages_above_the_packed_modules_hold_no_code():
    """Importing tools.quant.gptq runs tools/__init__.py and tools/quant/__init__.py first, so the bundler inlines
    every package __init__ above a module the packed train_gpt.py carries: they stay empty, or their code (and what
    it imports) would count against the cap."""
    for package in ("submission", "eval", "tools", "tools/quant", "tools/pack"):
        assert (REPO / package / "__init__.py").read_text() == "", package


def test_no_file_points_outside_the_project():
    """Users have the project, not the files its authors had beside it: no path out of the repository, no document
    it does not ship."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|CHALLENGE\.md|STYLE\.md|ARCHITECTURE\.md|BENCHMARK\.md")
    hits = []
    for name in files:
        path = REPO / name
        if path.suffix in (".py", ".md", ".sh", ".toml", ".txt", ".json", "") and path.is_file():
            text = path.read_text(errors="replace")
            hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert hits == []


def test_the_readme_is_a_user_guide_in_size():
    """README at most 12,000 bytes and no line over 120 characters (measurement history lives in docs/); its first
    screen has the result, the budget line and the commands."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12_000, f"README.md is {len(text.encode()):,} bytes: move detail to docs/"
    long = [n for n, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"
    first_screen = "\n".join(text.splitlines()[:40])
    for needed in ("16,000,000", "Where the default recipe stands", "pgolf data", "tools.pipeline", "pgolf pack",
                   "cli eval", "pgolf seeds", "pgolf stats", "pgolf record", "pgolf check"):
        assert needed in first_screen, f"README.md's first 40 lines lack {needed!r}"
