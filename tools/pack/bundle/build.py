"""bundle(): inline, prune, strip, shorten, minify and pack one entry with what it imports; write_bundle() writes the
result and its record of sizes and modules."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from tools.pack.bundle.codec import VIRTUAL_FILENAME, compressed_payload, pack
from tools.pack.bundle.errors import BundleError
from tools.pack.bundle.rewrite import KIT_PACKAGES, Bundler, assemble
from tools.pack.bundle.shorten import ShortNames, Shortener
from tools.pack.bundle.strip import minify, shorten_messages


@dataclass
class BundleSizes:
    """Decimal byte counts at each stage."""
    readable: int   # the kit source files that went in, as written (docstrings, comments, blank lines)
    long_names: int  # the minified program with every name as written (equals `minified` with short_names=False)
    minified: int   # readable_source: inlined, stripped, short names, one-space indents
    compressed: int  # the compressed program in the packed file (lzma or brotli); the rest is stub + encoding
    packed: int     # the file as shipped (its length in bytes), the number the challenge counts as code bytes


@dataclass
class BundleResult:
    """One bundled program: its readable text and packed file, what went into it, and its sizes."""
    readable_source: str      # the inlined, stripped, minified program (what the packed file executes)
    packed: bytes             # the shipped train_gpt.py: an ASCII stub that decodes and runs the lzma payload (pack)
    sha256: str               # over sorted (relative path, bytes) of every kit module inlined
    modules: list[str]        # kit-root-relative paths of the inlined modules, in emission order
    sizes: BundleSizes
    packing: str              # the lzma settings that gave the smallest file
    renamed: list[str]        # "path: old -> new" for private names renamed to resolve clashes
    short_names: ShortNames | None  # what renaming variables to short names did (None: bundled with long names)
    short_messages: int | None  # raise messages shortened to "path:line values" (None: bundled with full messages)
    pruned: list[str]         # "path: name" for library definitions dropped because nothing kept uses them
    warnings: list[str]       # constructs whose meaning differs once inlined (e.g. __file__ in a library module)


def source_sha256(files: list[tuple[str, bytes]]) -> str:
    """sha256 over (relative path, bytes) pairs sorted by path, each as path NUL bytes NUL."""
    h = hashlib.sha256()
    for rel, data in sorted(files):
        h.update(rel.encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def find_kit_root(entry: Path) -> Path:
    """The folder above the entry's top-level package (the first parent without an __init__.py)."""
    folder = entry.resolve().parent
    while (folder / "__init__.py").is_file():
        folder = folder.parent
    return folder


def message_label(rel: str, rels: list[str]) -> str:
    """How a shortened raise message names its file: the file name where it is the program's only file of that name
    (submission/model.py -> model.py), else the kit-relative path."""
    name = rel.rsplit("/", 1)[-1]
    return name if [r.rsplit("/", 1)[-1] for r in rels].count(name) == 1 else rel


def _register_optional(program: str, name: str, source: str) -> str:
    """`program` with, after its __future__ imports, statements that run `source` as module `name` in its own
    namespace and put it in sys.modules, where the program's importlib.import_module(name) finds it."""
    lines = program.split("\n")
    at = next((i for i, line in enumerate(lines) if not line.startswith("from __future__")), len(lines))
    register = (f"import sys as _s,types as _t\n_m=_t.ModuleType({name!r});exec(compile({source!r},"
                f"{VIRTUAL_FILENAME[:-1] + ' ' + name + '>'!r},'exec'),_m.__dict__);_s.modules[{name!r}]=_m\n"
                "del _s,_t,_m")
    return "\n".join(lines[:at] + [register] + lines[at:])


def bundle(entry: Path, kit_root: Path, kit_packages: tuple[str, ...] = KIT_PACKAGES,
           short_names: bool = True, short_messages: bool = True, encoding: str = "ascii",
           optional: tuple[str, ...] = ()) -> BundleResult:
    """Inline every kit module `entry` imports (transitively) into one program, drop the library definitions it never
    uses (prune), strip it, cut raise messages to "path:line values" (short_messages; see shorten_messages), rename
    its variables to short names where that provably keeps its meaning (short_names; see Shortener), minify and pack
    it (encoding: see pack).

    `optional`: dotted kit modules the program imports lazily (importlib.import_module) only when a setting needs
    them, e.g. submission.switches for the speedrun switches. Each is bundled on its own and registered in
    sys.modules before the program runs; without it in `optional` the packed program does not carry it. An optional
    module may import no kit module: in its own namespace their code would be a second copy."""
    entry, kit_root = Path(entry), Path(kit_root)
    if not entry.is_file():
        raise FileNotFoundError(f"bundle entry {entry}: no such file")
    if not kit_root.is_dir():
        raise FileNotFoundError(f"kit root {kit_root}: no such folder (the folder holding {', '.join(kit_packages)})")
    bundler = Bundler(entry, kit_root, kit_packages)
    modules = bundler.order()
    pruned = bundler.prune(modules)
    modules = [m for m in modules if not m.empty]
    messages = sum(shorten_messages(m.tree, message_label(m.rel, [n.rel for n in modules])) for m in modules) \
        if short_messages else None
    renamed = bundler.plan_names(modules)
    tree = assemble(bundler, modules)
    long_names = minify(tree)
    shortened = Shortener(tree).run() if short_names else None
    readable = minify(tree) if short_names else long_names
    extra = []
    for name in dict.fromkeys(optional):
        path = bundler.find(name)
        if path is None:
            raise BundleError(f"optional module {name!r}: not found under {kit_root} (e.g. submission.switches)")
        sub = bundle(path, kit_root, kit_packages, short_names, short_messages)
        if len(sub.modules) > 1:
            raise BundleError(f"{sub.modules[-1]}: an optional module may import no kit module, but it imports "
                              f"{', '.join(sub.modules[:-1])} (their code would run as a second copy); pass what it "
                              "needs as arguments")
        readable = _register_optional(readable, name, sub.readable_source)
        extra.append((sub.modules[0], path.read_bytes()))
    compile(readable, VIRTUAL_FILENAME, "exec")
    packed, packing = pack(readable, encoding)
    compile(packed, "train_gpt.py", "exec")
    return BundleResult(
        readable_source=readable, packed=packed,
        sha256=source_sha256([(m.rel, m.source) for m in modules] + extra),
        modules=[m.rel for m in modules] + [rel for rel, _ in extra],
        sizes=BundleSizes(readable=sum(len(m.source) for m in modules) + sum(len(data) for _, data in extra),
                          long_names=len(long_names.encode("utf-8")),
                          minified=len(readable.encode("utf-8")),
                          compressed=len(compressed_payload(packed, "the packed file")[1]),
                          packed=len(packed)),
        packing=packing, renamed=renamed, short_names=shortened, short_messages=messages, pruned=pruned,
        warnings=list(dict.fromkeys(bundler.warnings)))


def _write_atomic(path: Path, data: bytes) -> None:
    # open(..., "xb") creates the file with a normal file's mode (0o666 less the umask): mkstemp's 0o600 made the
    # shipped train_gpt.py unreadable to others
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bundle(result: BundleResult, out_dir: Path) -> Path:
    """Write OUT/train_gpt.py and OUT/train_gpt.py.sha256 (source hash, sizes, module list); return the script."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "train_gpt.py"
    lines = [f"source_sha256:{result.sha256}",
             f"packed_sha256:{hashlib.sha256(result.packed).hexdigest()}",
             f"readable_bytes:{result.sizes.readable}", f"long_names_bytes:{result.sizes.long_names}",
             f"minified_bytes:{result.sizes.minified}", f"compressed_bytes:{result.sizes.compressed}",
             f"packed_bytes:{result.sizes.packed}",
             f"packing:{result.packing}", f"short_messages:{count_or_off(result.short_messages)}",
             *(f"module:{m}" for m in result.modules),
             *(f"renamed:{r}" for r in result.renamed), *(f"short_name:{r}" for r in short_globals(result)),
             *(f"pruned:{p}" for p in result.pruned)]
    _write_atomic(script, result.packed)
    _write_atomic(out_dir / "train_gpt.py.sha256", ("\n".join(lines) + "\n").encode("utf-8"))
    return script


def count_or_off(count: int | None) -> str:
    """A step's count as written in the .sha256 file and by `pgolf bundle`: "off" when the step was skipped (None)."""
    return "off" if count is None else str(count)


def short_globals(result: BundleResult) -> list[str]:
    """The private module-level names renamed to short ones, as "old -> new" (none when bundled with long names)."""
    return result.short_names.private_globals if result.short_names else []
