"""Inlining: find the kit modules an entry imports and order them, prune the library definitions nothing kept uses,
put every module's globals into one namespace (renaming private clashes) and assemble the single program."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tools.pack.bundle.analysis import Analysis, Scope, Site, identifiers
from tools.pack.bundle.errors import BundleError
from tools.pack.bundle.strip import Strip, ensure_bodies, is_main_guard


KIT_PACKAGES = ("submission", "eval", "tools")
# Globals every module has on its own; in the bundle they all belong to the packed script.
_IMPLICIT_GLOBALS = frozenset({"__name__", "__file__", "__doc__", "__package__", "__spec__", "__loader__",
                               "__builtins__", "__path__", "__cached__", "__annotations__"})
# Of those, the ones whose value changes meaning when a library module is inlined into the script.
_LOCATION_GLOBALS = frozenset({"__name__", "__file__", "__package__", "__spec__", "__loader__", "__path__",
                               "__cached__"})


@dataclass
class _KitImport:
    """One alias of an import statement that names a kit module."""
    kind: str              # "module": binds a module object (refs are `alias.attr`); "name": binds module.name
    module: str            # dotted kit module
    name: str | None       # the imported name, for kind == "name"
    bound: str             # the name the statement binds
    scope: Scope


@dataclass
class _Module:
    name: str                 # dotted (the entry outside the kit packages: its file stem)
    rel: str                  # path relative to kit_root
    source: bytes
    tree: ast.Module
    is_entry: bool
    analysis: Analysis
    future: list[str]
    kit_imports: dict[int, _KitImport]        # id(alias node) -> kit import
    ext_imports: dict[int, str]               # id(alias node) -> dotted name of the third-party object bound
    hard_deps: list[str]                      # kit modules imported at import time (ordering constraints)
    soft_deps: list[str]                      # imported inside functions, or package __init__s run implicitly
    module_aliases: dict[tuple[int, str], str]  # (id(scope), bound name) -> kit module it names
    alias_refs: dict[int, tuple[str, Scope]]   # id(Name node) -> (kit module, scope) for refs to module aliases
    global_sites: dict[str, list[Site]]      # module-level binding sites per name
    builtin_refs: dict[str, ast.AST]          # names read as globals that this module never binds -> first use
    package: str                              # the package relative imports resolve against

    @property
    def empty(self) -> bool:
        return not self.tree.body

    def where(self, node: ast.AST) -> str:
        return f"{self.rel}:{getattr(node, 'lineno', '?')}"


class Bundler:
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
                body += stmt.orelse if isinstance(stmt, ast.If) and is_main_guard(stmt.test) else [stmt]
            tree.body = body
        future = [a.name for s in tree.body if isinstance(s, ast.ImportFrom) and s.module == "__future__"
                  for a in s.names]
        tree.body = [s for s in tree.body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
        tree = Strip().visit(tree)
        ensure_bodies(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        mod = _Module(name, rel, source, tree, is_entry, Analysis(ast.Module([], [])), future, {}, {}, [], [], {}, {},
                      {}, {}, package)
        self.modules[name] = mod
        self._analyze(mod)
        return mod

    def _analyze(self, mod: _Module) -> None:
        """Scopes, imports and module-level names of mod.tree (again after pruning changed the tree)."""
        mod.analysis = Analysis(mod.tree)
        mod.kit_imports, mod.ext_imports, mod.module_aliases, mod.alias_refs = {}, {}, {}, {}
        mod.hard_deps, mod.soft_deps, mod.global_sites, mod.builtin_refs = [], [], {}, {}
        for stmt, scope, hard in mod.analysis.imports:
            self._classify_import(mod, stmt, scope, hard, mod.package)
        self._collect_names(mod)

    def _classify_import(self, mod: _Module, stmt, scope: Scope, hard: bool, package: str) -> None:
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
        taken = {name for mod in modules for name in identifiers(mod.tree)}
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

    def check_not_captured(self, mod: _Module, scope: Scope, name: str, node: ast.AST, what: str) -> None:
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


class _Rewrite(ast.NodeTransformer):
    """Inside one module: `alias.attr` of kit modules -> the global, nested kit imports -> assignments."""

    def __init__(self, bundler: Bundler, mod: _Module):
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


def assemble(bundler: Bundler, modules: list[_Module]) -> ast.Module:
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
    ensure_bodies(tree)
    return ast.fix_missing_locations(tree)
