"""Code bundler: inline the kit modules an entry script imports into one minified, lzma-packed self-extracting file."""
from __future__ import annotations

import argparse
import ast
import base64
import builtins
import hashlib
import itertools
import keyword
import lzma
import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import brotli

KIT_PACKAGES = ("submission", "eval", "tools")
# Globals every module has on its own; in the bundle they all belong to the packed script.
_IMPLICIT_GLOBALS = frozenset({"__name__", "__file__", "__doc__", "__package__", "__spec__", "__loader__",
                               "__builtins__", "__path__", "__cached__", "__annotations__"})
# Of those, the ones whose value changes meaning when a library module is inlined into the script.
_LOCATION_GLOBALS = frozenset({"__name__", "__file__", "__package__", "__spec__", "__loader__", "__path__",
                               "__cached__"})
# Filename the unpacked code is compiled under and registered with linecache, so tracebacks show source lines
# and inspect.getsource works (Triton's @jit needs it); plain exec() would give "<string>" with no source.
VIRTUAL_FILENAME = "<train_gpt>"
_LZMA_PRESET = 9 | lzma.PRESET_EXTREME


class BundleError(ValueError):
    """The kit sources cannot be inlined into one namespace; the message names the file, the name and the fix."""


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


@dataclass
class _KitImport:
    """One alias of an import statement that names a kit module."""
    kind: str              # "module": binds a module object (refs are `alias.attr`); "name": binds module.name
    module: str            # dotted kit module
    name: str | None       # the imported name, for kind == "name"
    bound: str             # the name the statement binds
    scope: _Scope


class _Scope:
    """One Python scope: the names bound in it and its global/nonlocal declarations."""

    def __init__(self, kind: str, parent: _Scope | None, node: ast.AST | None = None):
        self.kind = kind  # module, function, class or comprehension
        self.parent = parent
        self.node = node  # the def, lambda, class or comprehension that makes the scope (None for the module)
        self.bound: dict[str, int] = {}  # name -> number of binding sites
        self.params: set[str] = set()    # a function's or lambda's parameters (also counted in bound)
        self.global_decl: set[str] = set()
        self.nonlocal_decl: set[str] = set()


@dataclass
class _Site:
    """A place a name occurs: a Name node, a parameter, a def/class name, an import alias, an except name, a match
    capture, a `global` or `nonlocal` entry."""
    node: ast.AST
    name: str
    scope: _Scope
    binding: bool
    index: int = 0  # position in Global.names or Nonlocal.names


class _Analysis:
    """Python's scoping rules for one module: every name site with the scope it is evaluated in."""

    def __init__(self, tree: ast.Module):
        self.module = _Scope("module", None)
        self.scopes: list[_Scope] = [self.module]  # in source order, each before the scopes nested in it
        self.sites: list[_Site] = []
        # (statement, scope, runs at import time) for every import statement
        self.imports: list[tuple[ast.Import | ast.ImportFrom, _Scope, bool]] = []
        for stmt in tree.body:
            self._visit(stmt, self.module, True)

    def resolve(self, scope: _Scope, name: str) -> _Scope:
        """The scope a name used in `scope` refers to; class bodies are invisible to the functions inside them."""
        s, first = scope, True
        while s.kind != "module":
            if first or s.kind != "class":
                if name in s.global_decl:
                    return self.module
                if name in s.bound and name not in s.nonlocal_decl:
                    return s
            s, first = s.parent, False
        return s

    def _scope(self, kind: str, parent: _Scope, node: ast.AST) -> _Scope:
        self.scopes.append(_Scope(kind, parent, node))
        return self.scopes[-1]

    def _site(self, node: ast.AST, name: str, scope: _Scope, binding: bool) -> None:
        if binding:
            scope.bound[name] = scope.bound.get(name, 0) + 1
        self.sites.append(_Site(node, name, scope, binding))

    def _visit(self, node: ast.AST, scope: _Scope, hard: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            all_args = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, [args.vararg, args.kwarg])]
            outer = [*getattr(node, "decorator_list", []), *args.defaults, *filter(None, args.kw_defaults),
                     *(a.annotation for a in all_args if a.annotation), *filter(None, [getattr(node, "returns", None)])]
            for child in outer:
                self._visit(child, scope, hard)
            inner = self._scope("function", scope, node)
            for a in all_args:
                inner.bound[a.arg] = inner.bound.get(a.arg, 0) + 1
                inner.params.add(a.arg)
                self.sites.append(_Site(a, a.arg, inner, True))
            if isinstance(node, ast.Lambda):
                self._visit(node.body, inner, False)
            else:
                self._site(node, node.name, scope, True)
                for stmt in node.body:
                    self._visit(stmt, inner, False)
        elif isinstance(node, ast.ClassDef):
            for child in [*node.decorator_list, *node.bases, *node.keywords]:
                self._visit(child, scope, hard)
            self._site(node, node.name, scope, True)
            inner = self._scope("class", scope, node)
            for stmt in node.body:
                self._visit(stmt, inner, hard)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            # The first iterable is evaluated in the enclosing scope, everything else in the comprehension's own.
            self._visit(node.generators[0].iter, scope, hard)
            inner = self._scope("comprehension", scope, node)
            for i, gen in enumerate(node.generators):
                if i:
                    self._visit(gen.iter, inner, hard)
                self._visit(gen.target, inner, hard)
                for cond in gen.ifs:
                    self._visit(cond, inner, hard)
            for part in ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]):
                self._visit(part, inner, hard)
        elif isinstance(node, ast.Name):
            self._site(node, node.id, scope, not isinstance(node.ctx, ast.Load))
        elif isinstance(node, ast.NamedExpr):
            target_scope = scope  # a walrus in a comprehension binds in the enclosing function or module
            while target_scope.kind == "comprehension":
                target_scope = target_scope.parent
            self._site(node.target, node.target.id, target_scope, True)
            self._visit(node.value, scope, hard)
        elif isinstance(node, ast.Global):
            scope.global_decl.update(node.names)
            self.sites.extend(_Site(node, name, scope, False, i) for i, name in enumerate(node.names))
        elif isinstance(node, ast.Nonlocal):
            scope.nonlocal_decl.update(node.names)
            self.sites.extend(_Site(node, name, scope, False, i) for i, name in enumerate(node.names))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            self.imports.append((node, scope, hard))
            for alias in node.names:
                if alias.name != "*":
                    self._site(alias, alias.asname or alias.name.split(".")[0], scope, True)
        else:
            name = getattr(node, "rest" if isinstance(node, ast.MatchMapping) else "name", None)
            if isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar, ast.MatchMapping)) and name:
                self._site(node, name, scope, True)
            for child in ast.iter_child_nodes(node):
                self._visit(child, scope, hard)


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


class _Strip(ast.NodeTransformer):
    """Drop docstrings and other bare string statements, `if TYPE_CHECKING:` blocks and function annotations."""

    def visit_Expr(self, node: ast.Expr):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return self.generic_visit(node)

    def visit_If(self, node: ast.If):
        self.generic_visit(node)
        # TYPE_CHECKING is False at run time; its imports are for type checkers and often form import cycles.
        return (node.orelse or None) if _is_type_checking(node.test) else node

    def _function(self, node):
        # Function annotations are never evaluated under `from __future__ import annotations` (the kit's style);
        # class-level annotations stay: dataclasses and typing.get_type_hints read them. So do a decorated
        # function's: a decorator may read the signature (Triton's jit: tl.constexpr; torch.library.custom_op: the
        # op's schema).
        if node.decorator_list:
            return self.generic_visit(node)
        node.returns = None
        args = node.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, [args.vararg, args.kwarg])]:
            a.annotation = None
        return self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = _function


def _ensure_bodies(tree: ast.AST) -> None:
    """Put `pass` into statement lists that stripping emptied (a body may not be empty)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module) and isinstance(getattr(node, "body", None), list) and not node.body:
            node.body = [ast.Pass()]
        if isinstance(node, ast.Try) and not node.handlers and not node.finalbody:
            node.finalbody = [ast.Pass()]


def _short_message(message: ast.expr, where: str) -> ast.expr | None:
    """`where` and the values a raise's str or f-string message formats, space-separated; None for other messages.

    Format specs are dropped (`{n:,}` prints 17182085): the numbers stay exact and `where` leads to the full text.
    Conversions stay (`{name!r}` keeps its quotes, so an empty string still shows)."""
    if isinstance(message, ast.Constant) and isinstance(message.value, str):
        return ast.Constant(where)
    if not isinstance(message, ast.JoinedStr):
        return None
    parts: list[ast.expr] = [ast.Constant(where)]
    for value in message.values:
        if isinstance(value, ast.FormattedValue):
            parts += [ast.Constant(" "), ast.FormattedValue(value.value, value.conversion, None)]
    if len(parts) == 1:
        return ast.Constant(where)
    merged: list[ast.expr] = []  # unparse wants one constant between two values, as the parser makes them
    for part in parts:
        if merged and isinstance(part, ast.Constant) and isinstance(merged[-1], ast.Constant):
            merged[-1] = ast.Constant(merged[-1].value + part.value)
        else:
            merged.append(part)
    return ast.JoinedStr(merged)


def _shorten_messages(tree: ast.Module, rel: str) -> int:
    """Replace the message of every `raise E("..." or f"...", ...)` by "<rel>:<line of the raise> <its values>".

    The kit's messages name the file, the value and the fix (README: Bad input); their prose was 3.1 KB of the
    pipeline's 29.3 KB of lzma. The packed program keeps the exception type and the values; the kit at rel:line has
    the text.
    Run before anything moves a node, so the line is the kit file's. Assert messages, prints and logs stay as written.
    Returns how many messages were shortened."""
    count = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            short = _short_message(node.exc.args[0], f"{rel}:{node.lineno}")
            if short is not None:
                node.exc.args[0] = ast.copy_location(short, node.exc.args[0])
                count += 1
    return count


@dataclass
class _Module:
    name: str                 # dotted (the entry outside the kit packages: its file stem)
    rel: str                  # path relative to kit_root
    source: bytes
    tree: ast.Module
    is_entry: bool
    analysis: _Analysis
    future: list[str]
    kit_imports: dict[int, _KitImport]        # id(alias node) -> kit import
    ext_imports: dict[int, str]               # id(alias node) -> dotted name of the third-party object bound
    hard_deps: list[str]                      # kit modules imported at import time (ordering constraints)
    soft_deps: list[str]                      # imported inside functions, or package __init__s run implicitly
    module_aliases: dict[tuple[int, str], str]  # (id(scope), bound name) -> kit module it names
    alias_refs: dict[int, tuple[str, _Scope]]   # id(Name node) -> (kit module, scope) for refs to module aliases
    global_sites: dict[str, list[_Site]]      # module-level binding sites per name
    builtin_refs: dict[str, ast.AST]          # names read as globals that this module never binds -> first use
    package: str                              # the package relative imports resolve against

    @property
    def empty(self) -> bool:
        return not self.tree.body

    def where(self, node: ast.AST) -> str:
        return f"{self.rel}:{getattr(node, 'lineno', '?')}"


class _Bundler:
    def __init__(self, entry: Path, kit_root: Path, kit_packages: tuple[str, ...]):
        self.entry = entry.resolve()
        self.kit_root = kit_root.resolve()
        self.kit_packages = tuple(kit_packages)
        self.modules: dict[str, _Module] = {}
        self.warnings: list[str] = []
        self.renames: dict[tuple[str, tuple], str] = {}
        self._meanings: dict[tuple[str, str], tuple] = {}

    # ---- discovery -------------------------------------------------------------------------------------------

    def find(self, dotted: str) -> Path | None:
        parts = dotted.split(".")
        if parts[0] not in self.kit_packages:
            return None
        base = self.kit_root.joinpath(*parts)
        for path in (Path(f"{base}.py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def entry_name(self) -> str:
        rel = self.entry.relative_to(self.kit_root) if self.entry.is_relative_to(self.kit_root) else None
        if rel is None or rel.parts[0] not in self.kit_packages:
            return self.entry.stem
        parts = list(rel.with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def load(self, name: str) -> _Module:
        if name in self.modules:
            return self.modules[name]
        is_entry = name == self.entry_name()
        path = self.entry if is_entry else self.find(name)
        rel = path.relative_to(self.kit_root).as_posix() if path.is_relative_to(self.kit_root) else str(path)
        source = path.read_bytes()
        try:
            tree = ast.parse(source, filename=str(path))
        except SyntaxError as err:
            raise BundleError(f"{rel}:{err.lineno}: cannot parse: {err.msg}") from None
        if not is_entry:
            # A library module's `if __name__ == "__main__":` never runs on import; keep only its else branch.
            body = []
            for stmt in tree.body:
                body += stmt.orelse if isinstance(stmt, ast.If) and _is_main_guard(stmt.test) else [stmt]
            tree.body = body
        future = [a.name for s in tree.body if isinstance(s, ast.ImportFrom) and s.module == "__future__"
                  for a in s.names]
        tree.body = [s for s in tree.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
        tree = _Strip().visit(tree)
        _ensure_bodies(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        mod = _Module(name, rel, source, tree, is_entry, _Analysis(ast.Module([], [])), future, {}, {}, [], [], {}, {},
                      {}, {}, package)
        self.modules[name] = mod
        self._analyze(mod)
        return mod

    def _analyze(self, mod: _Module) -> None:
        """Scopes, imports and module-level names of mod.tree (again after pruning changed the tree)."""
        mod.analysis = _Analysis(mod.tree)
        mod.kit_imports, mod.ext_imports, mod.module_aliases, mod.alias_refs = {}, {}, {}, {}
        mod.hard_deps, mod.soft_deps, mod.global_sites, mod.builtin_refs = [], [], {}, {}
        for stmt, scope, hard in mod.analysis.imports:
            self._classify_import(mod, stmt, scope, hard, mod.package)
        self._collect_names(mod)

    def _classify_import(self, mod: _Module, stmt, scope: _Scope, hard: bool, package: str) -> None:
        def depend(target: str) -> None:
            (mod.hard_deps if hard else mod.soft_deps).append(target)
            parts = target.split(".")  # Python runs the parent packages' __init__ first
            mod.soft_deps.extend(".".join(parts[:i]) for i in range(1, len(parts)))

        def require(dotted: str) -> str:
            if self.find(dotted) is None:
                raise BundleError(f"{mod.where(stmt)}: kit module {dotted!r} not found under {self.kit_root} "
                                  f"(typo, or a file outside the kit packages {self.kit_packages}?)")
            return dotted

        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                bound = alias.asname or alias.name.split(".")[0]
                if alias.name.split(".")[0] not in self.kit_packages:
                    mod.ext_imports[id(alias)] = alias.name if alias.asname else bound
                    continue
                depend(require(alias.name))
                target = alias.name if alias.asname else bound
                mod.kit_imports[id(alias)] = _KitImport("module", target, None, bound, scope)
                mod.module_aliases[(id(scope), bound)] = target
            return
        base = stmt.module or ""
        if stmt.level:
            if not package:
                raise BundleError(f"{mod.where(stmt)}: relative import outside a kit package")
            pkg = package.split(".")
            if stmt.level - 1 >= len(pkg):
                raise BundleError(f"{mod.where(stmt)}: relative import goes above the top-level package {pkg[0]!r}")
            base = ".".join(pkg[:len(pkg) - stmt.level + 1] + ([base] if base else []))
        if base.split(".")[0] not in self.kit_packages:
            for alias in stmt.names:
                if alias.name == "*":
                    self.warnings.append(f"{mod.where(stmt)}: `from {base} import *` binds names the bundler cannot "
                                         "see, so clashes with them go undetected")
                else:
                    mod.ext_imports[id(alias)] = f"{base}.{alias.name}"
            return
        require(base)
        for alias in stmt.names:
            if alias.name == "*":
                raise BundleError(f"{mod.where(stmt)}: `from {base} import *` of a kit module is not supported by "
                                  "the bundler; import the names explicitly")
            bound = alias.asname or alias.name
            sub = f"{base}.{alias.name}"
            if self.find(sub) is not None:
                depend(sub)
                mod.kit_imports[id(alias)] = _KitImport("module", sub, None, bound, scope)
                mod.module_aliases[(id(scope), bound)] = sub
            else:
                depend(base)
                mod.kit_imports[id(alias)] = _KitImport("name", base, alias.name, bound, scope)

    def _collect_names(self, mod: _Module) -> None:
        an = mod.analysis
        for site in an.sites:
            owner = an.resolve(site.scope, site.name)
            if site.binding and owner is an.module:
                mod.global_sites.setdefault(site.name, []).append(site)
            key = (id(owner), site.name)
            if key in mod.module_aliases and isinstance(site.node, ast.Name) and not site.binding:
                mod.alias_refs[id(site.node)] = (mod.module_aliases[key], site.scope)
        for imp in mod.kit_imports.values():
            if imp.kind != "module":
                continue
            same = [i for i in mod.kit_imports.values() if i.scope is imp.scope and i.bound == imp.bound]
            if imp.scope.bound[imp.bound] > len(same) or any(i.kind != "module" or i.module != imp.module
                                                             for i in same):
                raise BundleError(f"{mod.rel}: {imp.bound!r} names kit module {imp.module} and is also bound another "
                                  "way; the bundler replaces `module.attr` by the attribute, so use distinct names")
        for site in an.sites:
            if site.binding or an.resolve(site.scope, site.name) is not an.module or site.name in mod.global_sites:
                continue
            if site.name in _IMPLICIT_GLOBALS:
                if site.name in _LOCATION_GLOBALS and not mod.is_entry:
                    self.warnings.append(f"{mod.where(site.node)}: {site.name} in a library module is the packed "
                                         "script's own once inlined")
                continue
            if site.name in ("globals", "vars") and not mod.is_entry:
                self.warnings.append(f"{mod.where(site.node)}: {site.name}() in a library module sees the whole "
                                     "bundle's namespace once inlined")
            mod.builtin_refs.setdefault(site.name, site.node)

    def order(self) -> list[_Module]:
        """Dependencies before dependents (module-level imports), the entry last; cycles are errors."""
        done: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = (path[path.index(name):] if name in path else path) + [name]
                raise BundleError("import cycle: " + " -> ".join(self.load(n).rel for n in cycle)
                                  + " (module-level imports; move the shared code into a module both import, or "
                                  "import inside the function that needs it)")
            state[name] = "visiting"
            for dep in self.load(name).hard_deps:
                visit(dep, path + [name])
            state[name] = "done"
            if name != entry:
                done.append(name)

        entry = self.entry_name()
        state[entry] = "visiting"
        for dep in self.load(entry).hard_deps:
            visit(dep, [entry])
        # Function-level imports only need their module present by call time: include them, in any order.
        queue = [entry, *done]
        while queue:
            for dep in self.load(queue.pop(0)).soft_deps:
                if dep != entry and state.get(dep) != "done" and self.find(dep) is not None:
                    visit(dep, [])
                    queue.append(dep)
        return [self.modules[n] for n in [*done, entry] if not self.modules[n].empty]

    # ---- pruning -------------------------------------------------------------------------------------------------

    def _references(self, mod: _Module, stmt: ast.stmt) -> set[tuple]:
        """Meanings of the module-level names a statement uses: globals, `alias.attr` of kit modules, kit imports."""
        an, out = mod.analysis, set()
        sites = {id(site.node): site for site in an.sites if not isinstance(site.node, ast.Global)}

        def visit(node: ast.AST) -> None:
            if isinstance(node, ast.Attribute):
                chain, base = [], node
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and id(base) in mod.alias_refs:
                    module = mod.alias_refs[id(base)][0]
                    for attr in reversed(chain):
                        if self.find(f"{module}.{attr}") is None:
                            out.add(self.meaning(module, attr, mod.where(node)))
                            break
                        module = f"{module}.{attr}"
                    return
            names = node.names if isinstance(node, ast.Global) else []
            if isinstance(node, ast.Name) and id(node) in sites:
                site = sites[id(node)]
                if an.resolve(site.scope, site.name) is an.module:
                    names = [node.id]
            out.update(self.meaning(mod.name, n, mod.where(node)) for n in names if n in mod.global_sites)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    imp = mod.kit_imports.get(id(alias))
                    if imp is not None and imp.kind == "name":
                        out.add(self.meaning(imp.module, imp.name, mod.where(node)))
            for child in ast.iter_child_nodes(node):
                visit(child)
        visit(stmt)
        return out

    def prune(self, modules: list[_Module]) -> list[str]:
        """Drop the library modules' top-level definitions that nothing kept uses; return "path: name" for each.

        The bundler inlines whole modules, so CLI helpers and test utilities would ship as code bytes (and two
        modules' unused `main`s would clash). Prunable: def, class, and assignments to plain names whose value calls
        nothing (no side effect is lost). Roots: the entry, and every other top-level statement.
        """
        binders: dict[tuple, list[tuple[_Module, ast.stmt]]] = {}
        prunable: dict[int, list[str]] = {}
        roots: list[tuple[_Module, ast.stmt]] = []
        for mod in modules:
            for stmt in mod.tree.body:
                names = None if mod.is_entry else _definition_names(stmt)
                if names is None:
                    roots.append((mod, stmt))
                    continue
                prunable[id(stmt)] = names
                for name in names:
                    binders.setdefault(self.meaning(mod.name, name, mod.where(stmt)), []).append((mod, stmt))
        kept: set[int] = set()
        queue = list(roots)
        while queue:
            mod, stmt = queue.pop()
            for meaning in self._references(mod, stmt):
                for owner, definition in binders.get(meaning, []):
                    if id(definition) not in kept:
                        kept.add(id(definition))
                        queue.append((owner, definition))
        dropped = []
        for mod in modules:
            body = [stmt for stmt in mod.tree.body if id(stmt) not in prunable or id(stmt) in kept]
            if len(body) < len(mod.tree.body):
                dropped += [f"{mod.rel}: {name}" for stmt in mod.tree.body if id(stmt) not in kept
                            for name in prunable.get(id(stmt), [])]
                mod.tree.body = body
                self._analyze(mod)
        self._meanings.clear()
        return dropped

    # ---- one namespace -----------------------------------------------------------------------------------------

    def meaning(self, module: str, name: str, where: str) -> tuple:
        """What a module-level name of `module` is: ("def", module, name), ("ext", dotted) or ("module", dotted)."""
        key = (module, name)
        if key in self._meanings:
            return self._meanings[key]
        mod = self.modules[module]
        sites = mod.global_sites.get(name)
        if not sites:
            raise BundleError(f"{where}: kit module {mod.rel} has no module-level name {name!r} (misspelt, or set "
                              "in a way the bundler cannot see, e.g. via globals())")
        kinds = set()
        for site in sites:
            kit, ext = mod.kit_imports.get(id(site.node)), mod.ext_imports.get(id(site.node))
            if kit and kit.kind == "name":
                kinds.add(self.meaning(kit.module, kit.name, mod.where(site.node)))
            elif kit:
                kinds.add(("module", kit.module))
            elif ext:
                kinds.add(("ext", ext))
            else:
                kinds.add(("def", module, name))
        result = kinds.pop() if len(kinds) == 1 else ("def", module, name)
        self._meanings[key] = result
        return result

    def emitted(self, module: str, name: str, where: str) -> str:
        """The global name a module-level name of `module` has in the bundle."""
        return self.renames.get((name, self.meaning(module, name, where)), name)

    def plan_names(self, modules: list[_Module]) -> list[str]:
        """Group every global name by what it means; rename private clashes, raise on public ones."""
        groups: dict[str, dict[tuple, list[tuple[_Module, ast.AST]]]] = {}
        for mod in modules:
            for name, sites in mod.global_sites.items():
                meaning = self.meaning(mod.name, name, mod.where(sites[0].node))
                if meaning[0] != "module":
                    groups.setdefault(name, {}).setdefault(meaning, []).append((mod, sites[0].node))
            for name, node in mod.builtin_refs.items():
                groups.setdefault(name, {}).setdefault(("builtin", name), []).append((mod, node))
        taken = {name for mod in modules for name in _identifiers(mod.tree)}
        renamed, clashes = [], []
        for name, by_meaning in groups.items():
            if len(by_meaning) < 2:
                continue
            meanings = list(by_meaning)
            keeper = ("builtin", name) if ("builtin", name) in by_meaning else meanings[0]
            losers = [m for m in meanings if m != keeper]
            if not name.startswith("_"):
                where = "; ".join(f"{_describe(m)} at {', '.join(mod.where(node) for mod, node in by_meaning[m])}"
                                  for m in meanings)
                clashes.append(f"{name!r}: {where}")
                continue
            for meaning in losers:
                mod = by_meaning[meaning][0][0]
                stem, new, i = mod.name.rpartition(".")[2], f"{name}_{mod.name.rpartition('.')[2]}", 1
                while new in taken:
                    i += 1
                    new = f"{name}_{stem}{i}"
                taken.add(new)
                self.renames[(name, meaning)] = new
                renamed.append(f"{', '.join(sorted({m.rel for m, _ in by_meaning[meaning]}))}: {name} -> {new}")
        if clashes:
            raise BundleError("name clash in the bundle's single namespace (every kit module's globals share one "
                              "file): " + " | ".join(clashes) + ". Rename one of them (clashing names that start "
                              "with '_' are renamed automatically).")
        return renamed

    # ---- emission ------------------------------------------------------------------------------------------------

    def rename_sites(self, mod: _Module) -> None:
        an = mod.analysis
        for site in an.sites:
            if id(site.node) in mod.kit_imports or id(site.node) in mod.alias_refs:
                continue
            if an.resolve(site.scope, site.name) is not an.module or site.name not in mod.global_sites:
                continue
            new = self.emitted(mod.name, site.name, mod.where(site.node))
            if new == site.name:
                continue
            node = site.node
            if isinstance(node, ast.Name):
                node.id = new
            elif isinstance(node, ast.Global):
                node.names[site.index] = new
            elif isinstance(node, ast.alias):
                if node.asname is None and "." in node.name:
                    raise BundleError(f"{mod.where(node)}: cannot rename {site.name!r} bound by `import {node.name}`"
                                      f" (it clashes with another module's {site.name!r}); use `import ... as`")
                node.asname = new
            elif isinstance(node, ast.MatchMapping):
                node.rest = new
            else:
                node.name = new  # def, class, except handler, match capture

    def check_not_captured(self, mod: _Module, scope: _Scope, name: str, node: ast.AST, what: str) -> None:
        if mod.analysis.resolve(scope, name) is not mod.analysis.module:
            raise BundleError(f"{mod.where(node)}: {what} becomes the global {name!r} once inlined, but a local "
                              f"{name!r} hides it there; rename the local")

    def kit_import_statements(self, mod: _Module, stmt) -> list[ast.stmt]:
        """Assignments that replace the kit aliases of an import statement (most need none)."""
        out = []
        for alias in stmt.names:
            imp = mod.kit_imports.get(id(alias))
            if imp is None or imp.kind == "module":
                continue
            where = mod.where(stmt)
            source = self.emitted(imp.module, imp.name, where)
            if imp.scope.kind == "module":
                target = self.emitted(mod.name, imp.bound, where)
            else:
                target = imp.bound
                if imp.scope.kind == "function" and target == source:
                    if imp.scope.bound[target] > 1:
                        raise BundleError(f"{where}: {target!r} is imported inside a function that also assigns "
                                          "it; the bundler drops the import, so give the local another name")
                    continue  # the name now resolves to the global of the same name: the imported object
            if target != source or imp.scope.kind == "class":
                # `x = x` in a class body reads the global x: the class's own x is not bound yet.
                if not (target == source and imp.scope.bound[target] == 1):
                    self.check_not_captured(mod, imp.scope, source, stmt, f"`from {imp.module} import {imp.name}`")
                out.append(ast.copy_location(ast.Assign([ast.Name(target, ast.Store())], ast.Name(source, ast.Load())),
                                             stmt))
        return out


def _definition_names(stmt: ast.stmt) -> list[str] | None:
    """Names a prunable top-level statement binds, or None when it must stay (it may act on being run)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) \
        else None
    if not targets or not all(isinstance(t, ast.Name) for t in targets):
        return None
    if stmt.value is not None and any(isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr))
                                      for n in ast.walk(stmt.value)):
        return None
    return [t.id for t in targets]


def _describe(meaning: tuple) -> str:
    if meaning[0] == "def":
        return f"defined in {meaning[1]}"
    if meaning[0] == "ext":
        return f"third-party {meaning[1]}"
    return "the builtin"


def _identifiers(tree: ast.AST) -> set[str]:
    """Every identifier the program spells: names, parameters, attributes, keyword arguments, import parts, ..."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler, ast.MatchAs,
                               ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.update(node.name.split("."))
            names.update(filter(None, [node.asname]))
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(node.module.split("."))
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        elif isinstance(node, ast.MatchClass):
            names.update(node.kwd_attrs)
    return names


class _Rewrite(ast.NodeTransformer):
    """Inside one module: `alias.attr` of kit modules -> the global, nested kit imports -> assignments."""

    def __init__(self, bundler: _Bundler, mod: _Module):
        self.bundler, self.mod = bundler, mod

    def visit_Import(self, node):
        ext = [a for a in node.names if id(a) not in self.mod.kit_imports]
        kept = [type(node)(**{**{f: getattr(node, f) for f in node._fields}, "names": ext})] if ext else []
        return [ast.copy_location(s, node) for s in kept] + self.bundler.kit_import_statements(self.mod, node)

    visit_ImportFrom = visit_Import

    def visit_Name(self, node: ast.Name):
        if id(node) in self.mod.alias_refs:
            raise BundleError(f"{self.mod.where(node)}: kit module alias {node.id!r} is used as a value; the bundler "
                              f"only supports `{node.id}.name` (import the names you need instead)")
        return node

    def visit_Attribute(self, node: ast.Attribute):
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base)
            base = base.value
        if not (isinstance(base, ast.Name) and id(base) in self.mod.alias_refs):
            return self.generic_visit(node)
        chain.reverse()  # innermost first: chain[0].value is the alias
        module, scope = self.mod.alias_refs[id(base)]
        for k, attr in enumerate(chain):
            sub = f"{module}.{attr.attr}"
            if self.bundler.find(sub) is not None:
                if sub not in self.bundler.modules:
                    raise BundleError(f"{self.mod.where(attr)}: {sub} is used through {base.id!r} but never imported; "
                                      f"add `import {sub}`")
                module = sub
                continue
            if not isinstance(attr.ctx, ast.Load):
                raise BundleError(f"{self.mod.where(attr)}: assigning {module}.{attr.attr} from another module is not "
                                  "supported by the bundler; set it through a function in that module")
            name = self.bundler.emitted(module, attr.attr, self.mod.where(attr))
            self.bundler.check_not_captured(self.mod, scope, name, attr, f"{module}.{attr.attr}")
            replacement = ast.copy_location(ast.Name(name, ast.Load()), attr)
            if k == len(chain) - 1:
                return replacement
            chain[k + 1].value = replacement
            return node
        raise BundleError(f"{self.mod.where(node)}: kit module {module} is used as a value; the bundler only supports "
                          "`module.name`")


def _import_key(stmt, alias: ast.alias) -> tuple:
    if isinstance(stmt, ast.Import):
        return ("import", alias.name, alias.asname)
    return ("from", stmt.module, alias.name, alias.asname)


def _render_imports(keys: list[tuple]) -> list[ast.stmt]:
    plain = [ast.alias(k[1], k[2]) for k in keys if k[0] == "import"]
    out: list[ast.stmt] = [ast.Import(plain)] if plain else []
    by_module: dict[str, list[ast.alias]] = {}
    for k in keys:
        if k[0] == "from":
            by_module.setdefault(k[1], []).append(ast.alias(k[2], k[3]))
    out += [ast.ImportFrom(module, aliases, 0) for module, aliases in by_module.items()]
    return out


def _assemble(bundler: _Bundler, modules: list[_Module]) -> ast.Module:
    """One module: __future__ imports, hoisted third-party imports, then each kit module's body in order."""
    futures = []
    for mod in modules:
        futures += [f for f in mod.future if f not in futures]
    # Only annotations left after stripping (class and variable ones) can change meaning under the future import.
    lacking = [m.rel for m in modules if set(futures) - set(m.future)
               and any(isinstance(n, ast.AnnAssign) for n in ast.walk(m.tree))]
    if lacking:
        bundler.warnings.append(f"`from __future__ import {', '.join(futures)}` now applies to modules written "
                                f"without it: {', '.join(lacking)}")
    hoisted: list[tuple] = []
    seen: set[tuple] = set()
    bodies: list[ast.stmt] = []
    for mod in modules:
        bundler.rename_sites(mod)
        rewrite = _Rewrite(bundler, mod)
        leading = True  # a module's opening import block is hoisted; later imports stay where they run
        for stmt in mod.tree.body:
            if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                leading = False
                result = rewrite.visit(stmt)
                bodies += result if isinstance(result, list) else [result]
                continue
            fresh = []
            for alias in stmt.names:
                if id(alias) in mod.kit_imports:
                    continue
                key = _import_key(stmt, alias)
                if key in seen:
                    continue
                seen.add(key)
                (hoisted if leading else fresh).append(key)
            bodies += [ast.copy_location(s, stmt) for s in _render_imports(fresh)]
            bodies += bundler.kit_import_statements(mod, stmt)
    head = [ast.ImportFrom("__future__", [ast.alias(f) for f in futures], 0)] if futures else []
    tree = ast.Module(head + _render_imports(hoisted) + bodies, [])
    _ensure_bodies(tree)
    return ast.fix_missing_locations(tree)


# ---- short names ----------------------------------------------------------------------------------------------

# Builtins whose call reads or runs code against a scope's variables by name: zero-argument locals()/vars()/dir()
# list the caller's locals (free variables included), eval/exec/breakpoint run code there, globals() hands out the
# module's names. A variable visible where one is called keeps its name, and private globals all keep theirs.
_SCOPE_READERS = frozenset({"locals", "vars", "dir", "eval", "exec", "globals", "breakpoint"})
# Attributes that reach another frame's variables by name (sys._getframe(1).f_locals, inspect.currentframe().f_back):
# a program using any of them keeps every local name.
_FRAME_ATTRS = frozenset({"_getframe", "currentframe", "f_locals", "f_globals", "f_back", "tb_frame", "gi_frame",
                          "cr_frame", "ag_frame", "getouterframes", "getinnerframes"})
# Never handed out: a short name that is a keyword, a soft keyword or a builtin would confuse readers of tracebacks.
_RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))


@dataclass
class ShortNames:
    """What renaming variables to short names did to one bundled program."""
    private_globals: list[str]  # "old -> new" per private module-level function or variable (tracebacks show new)
    locals: int                 # function-local and comprehension variables renamed
    parameters: int             # parameters renamed: `self`/`cls`, and those of functions only ever called directly
    kept: dict[str, int]        # variables and parameters left as written, per reason


class _Symbol:
    """One variable: a name bound in one scope (a builtin: the module), and every site that refers to it."""

    def __init__(self, owner: _Scope, name: str, order: int):
        self.owner, self.name, self.order = owner, name, order
        self.sites: list[_Site] = []
        self.span: set[int] = set()  # id() of every scope a reference to it is looked up through, the owner included
        self.new: str | None = None  # its name in the output (the old one where it is kept)


def _short_names(taken: set[str]) -> Iterator[str]:
    """a..z, A..Z, then a letter and a letter or digit, and so on, skipping `taken`."""
    letters, digits = string.ascii_lowercase + string.ascii_uppercase, string.digits
    for length in itertools.count(1):
        for chars in itertools.product(letters, *[letters + digits] * (length - 1)):
            if "".join(chars) not in taken:
                yield "".join(chars)


def _set_site_name(site: _Site, new: str) -> None:
    node = site.node
    if isinstance(node, ast.Name):
        node.id = new
    elif isinstance(node, ast.arg):
        node.arg = new
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
        node.names[site.index] = new
    elif isinstance(node, ast.MatchMapping):
        node.rest = new
    else:
        node.name = new  # def, except handler, match capture


def _resolved_sites(an: _Analysis) -> list[tuple[int, str]]:
    """(index of the scope it resolves to, name) for each site of `an`; -1 for a builtin."""
    index = {id(scope): i for i, scope in enumerate(an.scopes)}
    out = []
    for site in an.sites:
        owner = an.resolve(site.scope, site.name)
        builtin = owner is an.module and site.name not in owner.bound
        out.append((-1 if builtin else index[id(owner)], site.name))
    return out


class _Shortener:
    """Gives the variables of one program whose names provably do not matter the shortest names free for them.

    Renamed: function-local variables (assignment, for, with, except and match targets, walrus, del, nonlocal ones
    used by nested functions, class bodies and lambdas), comprehension variables, private (`_x`) module-level functions
    and variables, a method's `self`/`cls`, and the parameters of functions that are only ever called directly with
    no keyword naming them (`f(x)`, never `f(p=x)`, `f(**kw)`, or `f` passed as a value, decorated, or spelt in a
    string or as an attribute). The program is a script that only it calls into (tests/test_bundle.py reads its
    classes and public names, which keep their names).
    Kept: other parameters (a caller may pass them by keyword: methods are called through attributes and by
    libraries, lambdas go anywhere), class-body names (attributes: dataclass fields, methods), imports, nested def
    and class names (their __name__ shows in tracebacks and reprs), dunder and mangled names, names in annotations
    (typing.get_type_hints evaluates them), module-level names also spelt as an attribute, a keyword argument or a word
    in a string (getattr, fields), every local when the program reads frames, and the variables visible where
    locals()/eval/exec and the like run.
    Names are handed out in source order, each variable taking the first of a, b, ... that no variable bound where
    it is looked up (or looked up where it is bound) has, so every function's first variable is `a`: lzma encodes
    the repeats cheaply. Module-level names also avoid every identifier and string word of the program (they are
    attributes of the module), parameters every keyword-argument name.
    """

    def __init__(self, tree: ast.Module):
        self.tree = tree
        self.an = _Analysis(tree)
        self.before = _resolved_sites(self.an)
        self.attributes: set[str] = set()  # attribute, keyword-argument and imported names: other namespaces' keys
        self.keywords: set[str] = set()    # keyword-argument names of every call
        self.words: set[str] = set()       # identifier-like words in string and bytes constants
        self.annotation_ids: set[int] = set()         # id() of every node inside an annotation
        self.annotated_target_ids: set[int] = set()   # id() of every AnnAssign target
        self.calls: dict[int, ast.Call] = {}          # id(call.func) -> call
        self.frames = False
        self.dynamic_globals = False
        for node in ast.walk(tree):
            self._note(node)
        self.opaque: set[int] = set()  # id() of scopes where a _SCOPE_READERS builtin is used
        self.symbols: dict[tuple[int, str], _Symbol] = {}
        for site, (owner_index, _) in zip(self.an.sites, self.before):
            if owner_index < 0 and site.name in _SCOPE_READERS:
                self.opaque.add(id(site.scope))
                self.dynamic_globals = True
            owner = self.an.scopes[max(owner_index, 0)]  # a builtin is looked up through the module
            key = (id(owner), site.name)
            if key not in self.symbols:
                self.symbols[key] = _Symbol(owner, site.name, len(self.symbols))
            symbol = self.symbols[key]
            symbol.sites.append(site)
            scope = site.scope
            symbol.span.add(id(scope))
            while scope is not owner:  # also through the class bodies and `global` scopes a lookup skips
                scope = scope.parent
                symbol.span.add(id(scope))

    def _note(self, node: ast.AST) -> None:
        if isinstance(node, ast.Attribute):
            self.attributes.add(node.attr)
            self.frames |= node.attr in _FRAME_ATTRS or (node.attr in ("stack", "trace") and isinstance(
                node.value, ast.Name) and node.value.id == "inspect")
        elif isinstance(node, ast.keyword) and node.arg:
            self.attributes.add(node.arg)
            self.keywords.add(node.arg)
        elif isinstance(node, ast.MatchClass):
            self.attributes.update(node.kwd_attrs)
        elif isinstance(node, ast.alias):
            self.attributes.add(node.name)  # `from m import _x` reads m's attribute _x
        elif isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            self.dynamic_globals = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            self.words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
        elif isinstance(node, ast.Call):
            self.calls[id(node.func)] = node
        annotations = [getattr(node, "annotation", None), getattr(node, "returns", None)]
        for annotation in filter(None, annotations):
            self.annotation_ids.update(id(n) for n in ast.walk(annotation))
        if isinstance(node, ast.AnnAssign):
            self.annotated_target_ids.add(id(node.target))  # in a module or class: a key of __annotations__

    def kept_because(self, symbol: _Symbol) -> str | None:
        """Why `symbol` keeps its name, or None when renaming it everywhere it occurs keeps the program's meaning."""
        nodes = [site.node for site in symbol.sites]
        module = self.an.module
        if symbol.owner is module and symbol.name not in module.bound:
            return "builtin"
        if symbol.name.startswith("__"):
            return "dunder or mangled name"
        if symbol.owner.kind == "class":
            return "class attribute"
        if any(isinstance(n, ast.alias) for n in nodes):
            return "import"
        if any(isinstance(n, ast.ClassDef) for n in nodes):
            return "class"
        if any(id(n) in self.annotation_ids for n in nodes):
            return "used in an annotation"
        if symbol.owner is module:
            if not symbol.name.startswith("_"):
                return "public module-level name"
            if self.dynamic_globals:
                return "module-level name with globals()/eval/exec/a star import in the program"
            if symbol.name in self.attributes or symbol.name in self.words:
                return "module-level name also spelt as an attribute, keyword argument or in a string"
            if any(id(n) in self.annotated_target_ids for n in nodes):
                return "module-level annotated name"
            if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.decorator_list for n in nodes):
                return "decorated module-level function"  # a decorator may register it by __name__
            return None
        if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in nodes):
            return "nested function"
        if symbol.name in symbol.owner.params:
            reason = self._parameter_kept_because(symbol)
            if reason:
                return reason
        if self.frames:
            return "local with frame access in the program"
        if symbol.span & self.opaque:
            return "local visible where locals()/eval/exec/... runs"
        return None

    def _parameter_kept_because(self, symbol: _Symbol) -> str | None:
        fn, name = symbol.owner.node, symbol.name
        if isinstance(fn, ast.Lambda):
            return "lambda parameter"
        if symbol.owner.parent.kind == "class":
            positional = [*fn.args.posonlyargs, *fn.args.args]
            static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
            if (name in ("self", "cls") and positional and positional[0].arg == name and not static
                    and name not in self.keywords and name not in self.words):
                return None  # Python passes the instance (class) positionally
            return "method parameter"
        if fn.decorator_list:
            return "parameter of a decorated function"
        if fn.name in self.attributes or fn.name in self.words:
            return "parameter of a function spelt as an attribute or in a string"
        function = self.symbols[(id(self.an.resolve(symbol.owner.parent, fn.name)), fn.name)]
        if [site.node for site in function.sites if site.binding] != [fn]:
            return "parameter of a function name bound more than once"
        for site in function.sites:
            if site.node is fn or isinstance(site.node, (ast.Global, ast.Nonlocal)):
                continue
            call = self.calls.get(id(site.node))
            if call is None:
                return "parameter of a function used as a value"
            if any(k.arg is None or k.arg == name for k in call.keywords):
                return "parameter passed by keyword"
        return None

    def run(self) -> ShortNames:
        kept: dict[str, int] = {}
        renamed: list[_Symbol] = []
        owned: dict[int, list[_Symbol]] = {}    # scope id -> symbols bound there
        through: dict[int, list[_Symbol]] = {}  # scope id -> symbols looked up through it
        for symbol in self.symbols.values():
            reason = self.kept_because(symbol)
            if reason is None:
                renamed.append(symbol)
            else:
                symbol.new = symbol.name
                if reason != "builtin":
                    kept[reason] = kept.get(reason, 0) + 1
            owned.setdefault(id(symbol.owner), []).append(symbol)
            for scope_id in symbol.span:
                through.setdefault(scope_id, []).append(symbol)
        order = {id(scope): i for i, scope in enumerate(self.an.scopes)}
        renamed.sort(key=lambda symbol: (order[id(symbol.owner)], symbol.order))
        pool = _short_names(_RESERVED)
        names: list[str] = []
        module_taken = _identifiers(self.tree) | self.words
        for symbol in renamed:
            # Two variables may share a name unless one is bound in a scope the other is looked up through. Kept
            # names take part too, so a local may reuse a name the program has elsewhere but not where it is used.
            taken = {other.new for scope_id in symbol.span for other in owned.get(scope_id, ())}
            taken |= {other.new for other in through.get(id(symbol.owner), ())}
            if symbol.owner is self.an.module:
                taken |= module_taken  # getattr(sys.modules[__name__], "a") must not find a renamed function
            if symbol.name in symbol.owner.params:
                taken |= self.keywords  # a call's f(a=...) must not start binding a renamed parameter
            i = 0
            while True:
                if i == len(names):
                    names.append(next(pool))
                if names[i] not in taken:
                    break
                i += 1
            symbol.new = names[i]
            for site in symbol.sites:
                _set_site_name(site, symbol.new)
        self._check()
        module = self.an.module
        return ShortNames(
            private_globals=[f"{s.name} -> {s.new}" for s in renamed if s.owner is module],
            locals=sum(s.owner is not module and s.name not in s.owner.params for s in renamed),
            parameters=sum(s.name in s.owner.params for s in renamed), kept=dict(sorted(kept.items())))

    def _check(self) -> None:
        """Independent of how names were chosen: re-analysed, every site must resolve to the scope it did before,
        and the old (scope, name) pairs must map one to one onto the new ones."""
        after = _resolved_sites(_Analysis(self.tree))
        mapping: dict[tuple[int, str], tuple[int, str]] = {}
        for old, new in zip(self.before, after, strict=True):
            if old[0] != new[0] or mapping.setdefault(old, new) != new:
                raise BundleError(f"renaming {old[1]!r} to {new[1]!r} changed what it refers to; report this source "
                                  "(bundle(..., short_names=False) or `pgolf bundle --long-names` skips renaming)")
        if len(set(mapping.values())) != len(mapping):
            raise BundleError("renaming gave two variables of one scope the same name; report this source "
                              "(bundle(..., short_names=False) or `pgolf bundle --long-names` skips renaming)")


def _minify(tree: ast.Module) -> str:
    """ast.unparse with one-space indents and no blank lines, checked to parse back to the same tree."""
    text = ast.unparse(tree)
    lines = []
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if stripped:
            lines.append(" " * ((len(line) - len(stripped)) // 4) + stripped)
    out = "\n".join(lines) + "\n"
    # A multi-line string literal would be re-indented too; the round trip proves none was.
    if ast.dump(ast.parse(out)) != ast.dump(ast.parse(text)):
        raise BundleError("minifying changed the program (a multi-line string literal?); report this source")
    return out


def _str_literal(data: bytes) -> bytes:
    """A triple-quoted str literal that Python, reading the file as latin-1, decodes to one char per byte of `data`.

    Every byte but four is written as itself: Python accepts all of 0x01-0xff raw inside a latin-1 string literal
    (tests/test_bundle.py checks every pair of byte values), and a triple-quoted one holds raw newlines too. Escaped:
    the backslash; \\r, which the reader's newline translation would turn into \\n; NUL, which no source may contain
    (as \\000 before an octal digit, which \\0 would swallow); and a quote that would end the literal early (one
    followed by another quote, or the last byte). Of ' and ", the one needing fewer escapes is used.
    """
    def escape(match: re.Match) -> bytes:
        text = match.group()
        if text[0] == 0:
            return b"\\000" + text[1:] if len(text) == 2 else b"\\0"
        return b"\\r" if text == b"\r" else b"\\" + text

    literals = []
    for quote in (b'"', b"'"):
        pattern = re.compile(rb"[\\\r]|\x00[0-7]?|" + quote + rb"(?=" + quote + rb"|\Z)")
        literals.append(quote * 3 + pattern.sub(escape, data) + quote * 3)
    return min(literals, key=len)


# base93: the payload as a bytes literal of the 93 printable ASCII chars that need no escape in a '-quoted literal
# (0x20-0x7e but ' and \), digit d written as chr(32 + d), past ' and \. Blocks of 115 chars hold 94 bytes: 93**115 >=
# 256**94 (1.22340 chars per byte, the bound 8/log2(93) being 1.22339). One big integer would be as dense but decodes
# in quadratic time (0.65-0.95 s for 28 KB on this kit's CPU); 115-char blocks decode in milliseconds. A short last
# block of k chars holds k*94//115 bytes, which is floor(k*log2(93)/8) for every k <= 115 (94/115 is the closest
# fraction to log2(93)/8 with a denominator that small), so it is always the fewest chars that fit its bytes.
_B93_ALPHABET = bytes(c for c in range(0x20, 0x7F) if c not in b"'\\")
_B93_CHARS, _B93_BYTES = 115, 94


def base93_encode(data: bytes) -> bytes:
    """`data` as base93 digits (see _B93_ALPHABET), block by block; the stub's loop (base93_decode) reverses it."""
    out = bytearray()
    for i in range(0, len(data), _B93_BYTES):
        block = data[i:i + _B93_BYTES]
        chars = -(-len(block) * _B93_CHARS // _B93_BYTES)  # the fewest k with k*94//115 >= len(block)
        n, digits = int.from_bytes(block, "big"), bytearray()
        for _ in range(chars):
            n, d = divmod(n, 93)
            digits.append(_B93_ALPHABET[d])
        out += digits[::-1]
    return bytes(out)


def base93_decode(text: bytes) -> bytes:
    """The bytes base93_encode wrote; the same arithmetic as the stub's loop."""
    out = bytearray()
    for i in range(0, len(text), _B93_CHARS):
        block, n = text[i:i + _B93_CHARS], 0
        for c in block:
            n = n * 93 + c - 32 - (c > 39) - (c > 92)
        out += n.to_bytes(len(block) * _B93_BYTES // _B93_CHARS, "big")
    return bytes(out)


def _stub_tail() -> bytes:
    # The interpreter's own uncaught-exception printer reads source lines from disk, not linecache; the traceback
    # module's printer reads linecache, so it is installed as the hook (about 50 bytes for readable crash logs).
    return (b'f="' + VIRTUAL_FILENAME.encode() + b'"\n'
            b"L.cache[f]=len(s),None,s.splitlines(1),f;sys.excepthook=T.print_exception;exec(compile(s,f,'exec'))\n")


def _stub_base93(blob: bytes, codec: str = "lzma") -> bytes:
    """Pure ASCII, so the file is valid UTF-8 as the challenge counts code ("UTF-8 bytes of the submitted
    train_gpt.py") and as the challenge's own scripts measure it. 22.3% over the raw lzma bytes against base85's 25%,
    for ~90 more stub bytes (the loop; int.to_bytes is big-endian by default since Python 3.11): smaller than base85
    from ~3.4 KB of lzma up; on the kit's pipeline (26,490 lzma bytes) 596 bytes smaller."""
    return (b"import " + codec.encode() + b",linecache as L,sys,traceback as T\n"
            b"s=b'" + base93_encode(blob) + b"';b=b''\n"
            b"for i in range(0,len(s),%d):\n t=s[i:i+%d];n=0\n for c in t:n=n*93+c-32-(c>39)-(c>92)\n"
            b" b+=n.to_bytes(len(t)*%d//%d)\n" % (_B93_CHARS, _B93_CHARS, _B93_BYTES, _B93_CHARS)
            + b"s=" + codec.encode() + b".decompress(b).decode();" + _stub_tail())


def _stub_base85(blob: bytes, codec: str = "lzma") -> bytes:
    """Pure ASCII too, 25% over the raw lzma bytes with a shorter stub: smaller for small programs."""
    return (b"import " + codec.encode() + b",base64,linecache as L,sys,traceback as T\n"
            b"s=" + codec.encode() + b'.decompress(base64.b85decode("' + base64.b85encode(blob) + b'")).decode();'
            + _stub_tail())


def _stub(literal: bytes) -> bytes:
    # The coding declaration comes first: without it Python reads the file as UTF-8, which the raw lzma bytes are not.
    # The literal's chars are its bytes again through latin-1.
    return (b"# coding: latin-1\nimport lzma,linecache as L,sys,traceback as T\n"
            b"s=lzma.decompress(" + literal + b".encode('latin-1')).decode();" + _stub_tail())


def _payload(tree: ast.Module) -> tuple[str, bytes | str] | None:
    """(packing, payload literal) of a file `pack` wrote, parsed; None for a plain program."""
    literals = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                for t in n.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        match node:
            case ast.Call(func=ast.Attribute(attr="decompress"),
                          args=[ast.Call(func=ast.Attribute(value=ast.Constant(value=str(payload)), attr="encode"))]):
                return "latin-1", payload
            case ast.Call(func=ast.Attribute(attr="decompress"),
                          args=[ast.Call(func=ast.Attribute(attr="b85decode"), args=[ast.Constant(value=str(payload))])]):
                return "base85", payload
            case ast.For(iter=ast.Call(func=ast.Name(id="range"), args=[
                    ast.Constant(value=0), ast.Call(func=ast.Name(id="len"), args=[ast.Name(id=var)]),
                    ast.Constant(value=_B93_CHARS)])) if isinstance(literals.get(var), bytes):
                return "base93", literals[var]
    return None


def _codec(tree: ast.Module) -> str:
    """The module whose decompress() the stub calls: lzma (all files before brotli packing existed) or brotli."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "decompress" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in CODECS:
            return node.func.value.id
    return "lzma"


def compressed_payload(packed: bytes, name: str) -> tuple[str, bytes] | None:
    """(packing, compressed bytes) of a file written by `pack` (base93, base85 or latin-1), read back through
    Python's own parser; None when `packed` holds no packed payload (a plain program). `name` is the file, for
    errors. The packing names the codec when it is not lzma ("brotli base93")."""
    try:
        tree = ast.parse(packed)
    except (SyntaxError, ValueError) as err:
        raise BundleError(f"{name}: not Python source ({err}); re-run `pgolf pack`") from None
    found = _payload(tree)
    if found is None:
        return None
    packing, payload = found
    codec = _codec(tree)
    try:
        return (packing if codec == "lzma" else f"{codec} {packing}"), {
            "base93": base93_decode, "base85": base64.b85decode,
            "latin-1": lambda text: text.encode("latin-1")}[packing](payload)
    except (UnicodeError, ValueError, OverflowError) as err:
        raise BundleError(f"{name}: the {packing} payload does not decode ({err}); re-run `pgolf pack`") from None


def unpack(packed: bytes, name: str) -> str | None:
    """The program a file written by `pack` runs (see compressed_payload); None for a plain program."""
    found = compressed_payload(packed, name)
    if found is None:
        return None
    codec = found[0].split()[0] if " " in found[0] else "lzma"
    try:
        return CODECS[codec](found[1]).decode("utf-8")
    except (UnicodeError, lzma.LZMAError, brotli.error) as err:
        raise BundleError(f"{name}: the {found[0]} payload does not decompress ({err}); re-run `pgolf pack`") \
            from None


PACKINGS = ("ascii", "base93", "base85", "latin-1")
# Decompressors a packed file may call. brotli is a dependency of every submission already (the model artifact):
# brotli-11 of the kit's pipeline program is 27,649 bytes against lzma's best 28,724 (its built-in dictionary holds
# common English and code words).
CODECS = {"lzma": lzma.decompress, "brotli": brotli.decompress}


def pack(source: str, encoding: str = "ascii") -> tuple[bytes, str]:
    """Self-extracting file bytes for `source` and a description of the settings that made it smallest.

    encoding "base93" and "base85": ASCII, valid UTF-8 as the rules count code; "ascii" (default): the smaller of the
    two (base93 from ~3.4 KB of lzma up). "latin-1": the raw lzma bytes in a str literal of a latin-1 source file,
    23% smaller than base85, but not UTF-8 text: only for counters that take the file's size.
    """
    if encoding not in PACKINGS:
        raise BundleError(f"unknown packing {encoding!r}: use one of {', '.join(PACKINGS)}")
    data = source.encode("utf-8")
    # The legacy .lzma ("alone") container, which lzma.decompress auto-detects: on the kit's 116 KB program it made a
    # 39 bytes smaller file than FORMAT_RAW (13 header bytes saved, ~55 of filter spec added to the stub) and 51 than
    # .xz. pb=0 (byte-aligned text) beat lzma's default pb=2 there by 70+ bytes. For latin-1 the settings change which
    # bytes need escaping, so the smallest whole file is measured; base93 and base85 grow with the lzma size alone.
    candidates = []
    for lc, mf, nice_len in itertools.product((2, 3, 4), (lzma.MF_BT3, lzma.MF_BT4), (128, 273)):
        filters = [{"id": lzma.FILTER_LZMA1, "preset": _LZMA_PRESET, "lc": lc, "lp": 0, "pb": 0, "mf": mf,
                    "nice_len": nice_len}]
        blob = lzma.compress(data, format=lzma.FORMAT_ALONE, filters=filters)
        name = f"lzma-alone lc={lc} pb=0 mf=bt{3 if mf == lzma.MF_BT3 else 4} nice_len={nice_len} preset=9e"
        size = len(_stub(_str_literal(blob))) if encoding == "latin-1" else len(blob)
        candidates.append((size, blob, name))
    _, blob, name = min(candidates, key=lambda c: c[0])
    stubs = {"base93": _stub_base93, "base85": _stub_base85}
    if encoding == "latin-1":
        packed = _stub(_str_literal(blob))
    else:
        # brotli for the ASCII packings only: the latin-1 stub's size depends on escapes, and it is an opt-in
        choices = ["base93", "base85"] if encoding == "ascii" else [encoding]
        compressed = [(blob, "lzma", name)] + [(brotli.compress(data, quality=11, lgwin=24, mode=mode), "brotli",
                                                f"brotli-11 mode={label}") for mode, label in
                                               ((brotli.MODE_TEXT, "text"), (brotli.MODE_GENERIC, "generic"))]
        packed, encoding, name = min(((stubs[e](b, codec), e, n) for e in choices for b, codec, n in compressed),
                                     key=lambda c: len(c[0]))
    if unpack(packed, "the packed file") != source:
        raise BundleError(f"packing with {name} {encoding} did not round-trip; report this source")
    return packed, f"{name} {encoding}"


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
    uses (prune), strip it, cut raise messages to "path:line values" (short_messages; see _shorten_messages), rename
    its variables to short names where that provably keeps its meaning (short_names; see _Shortener), minify and pack
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
    bundler = _Bundler(entry, kit_root, kit_packages)
    modules = bundler.order()
    pruned = bundler.prune(modules)
    modules = [m for m in modules if not m.empty]
    messages = sum(_shorten_messages(m.tree, m.rel) for m in modules) if short_messages else None
    renamed = bundler.plan_names(modules)
    tree = _assemble(bundler, modules)
    long_names = _minify(tree)
    shortened = _Shortener(tree).run() if short_names else None
    readable = _minify(tree) if short_names else long_names
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
                          minified=len(readable.encode("utf-8")), compressed=len(compressed_payload(packed, "the packed file")[1]),
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
             f"packing:{result.packing}", f"short_messages:{_off(result.short_messages)}",
             *(f"module:{m}" for m in result.modules),
             *(f"renamed:{r}" for r in result.renamed), *(f"short_name:{r}" for r in _short_globals(result)),
             *(f"pruned:{p}" for p in result.pruned)]
    _write_atomic(script, result.packed)
    _write_atomic(out_dir / "train_gpt.py.sha256", ("\n".join(lines) + "\n").encode("utf-8"))
    return script


def _off(count: int | None) -> str:
    return "off" if count is None else str(count)


def _short_globals(result: BundleResult) -> list[str]:
    return result.short_names.private_globals if result.short_names else []


def _cmd_bundle(args: argparse.Namespace) -> int:
    kit_root = args.kit_root or find_kit_root(args.entry)
    result = bundle(args.entry, kit_root, short_names=not args.long_names, short_messages=not args.full_messages,
                    encoding="base85" if args.base85 else "ascii", optional=tuple(args.optional))
    script = write_bundle(result, args.out)
    for module in result.modules:
        print(f"module:{module}")
    for line in result.renamed:
        print(f"renamed:{line}")
    for line in _short_globals(result):
        print(f"short_name:{line}")
    for line in result.pruned:
        print(f"pruned:{line}")
    for line in result.warnings:
        print(f"warning:{line}")
    short = result.short_names
    renames = (f"short_names:{len(short.private_globals) + short.locals + short.parameters} short_globals:"
               f"{len(short.private_globals)} short_locals:{short.locals} short_params:{short.parameters} "
               if short else "short_names:off ")
    messages = f"short_messages:{_off(result.short_messages)} "
    print(f"bundle:{script} source_sha256:{result.sha256[:16]} readable_bytes:{result.sizes.readable} "
          f"long_names_bytes:{result.sizes.long_names} minified_bytes:{result.sizes.minified} {renames}{messages}"
          f"compressed_bytes:{result.sizes.compressed} packed_bytes:{result.sizes.packed} packing:{result.packing!r}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("bundle", help="inline the kit modules ENTRY imports into one packed train_gpt.py "
                                             "(for inspection; `pgolf pack` ships it with the model)")
    p.add_argument("entry", type=Path, help="entry script, e.g. submission/train_gpt.py")
    p.add_argument("--out", type=Path, required=True, help="folder for train_gpt.py and train_gpt.py.sha256")
    p.add_argument("--kit-root", type=Path, default=None,
                   help="folder holding the kit packages (default: the folder above ENTRY's top-level package)")
    p.add_argument("--long-names", action="store_true",
                   help="keep every name as written (default: variables whose names provably do not matter get short "
                        "ones; the short_name: lines map the renamed private functions back)")
    p.add_argument("--full-messages", action="store_true",
                   help="keep raise messages as written (default: each becomes 'kit/path.py:LINE values', the kit file "
                        "and line holding the full text; about 3 KB smaller packed)")
    p.add_argument("--base85", action="store_true",
                   help="encode the compressed payload (brotli or lzma) as base85 (default: the smaller of base85 and "
                        "base93, 1.2234 ASCII chars per byte against 1.25 but a longer stub; base93 is ~600 bytes "
                        "smaller on the pipeline)")
    p.add_argument("--optional", action="append", default=[], metavar="MODULE",
                   help="also pack this lazily imported kit module (repeatable): submission.switches when a speedrun "
                        "switch (KEY_OFFSET_LAST_N, LAYER_BIGRAM_BUCKETS, EMBED2) will be on; `pgolf pack` decides "
                        "from the run's config")
    p.set_defaults(func=_cmd_bundle)
