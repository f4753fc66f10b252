"""Python's scoping rules for one module: every name site with the scope it is evaluated in, as the bundler's
rewriting and short names need them."""
from __future__ import annotations

import ast
from dataclasses import dataclass


class Scope:
    """One Python scope: the names bound in it and its global/nonlocal declarations."""

    def __init__(self, kind: str, parent: Scope | None, node: ast.AST | None = None):
        self.kind = kind  # module, function, class or comprehension
        self.parent = parent
        self.node = node  # the def, lambda, class or comprehension that makes the scope (None for the module)
        self.bound: dict[str, int] = {}  # name -> number of binding sites
        self.params: set[str] = set()    # a function's or lambda's parameters (also counted in bound)
        self.global_decl: set[str] = set()
        self.nonlocal_decl: set[str] = set()


@dataclass
class Site:
    """A place a name occurs: a Name node, a parameter, a def/class name, an import alias, an except name, a match
    capture, a `global` or `nonlocal` entry."""
    node: ast.AST
    name: str
    scope: Scope
    binding: bool
    index: int = 0  # position in Global.names or Nonlocal.names


class Analysis:
    """Python's scoping rules for one module: every name site with the scope it is evaluated in."""

    def __init__(self, tree: ast.Module):
        self.module = Scope("module", None)
        self.scopes: list[Scope] = [self.module]  # in source order, each before the scopes nested in it
        self.sites: list[Site] = []
        # (statement, scope, runs at import time) for every import statement
        self.imports: list[tuple[ast.Import | ast.ImportFrom, Scope, bool]] = []
        for stmt in tree.body:
            self._visit(stmt, self.module, True)

    def resolve(self, scope: Scope, name: str) -> Scope:
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

    def _scope(self, kind: str, parent: Scope, node: ast.AST) -> Scope:
        self.scopes.append(Scope(kind, parent, node))
        return self.scopes[-1]

    def _site(self, node: ast.AST, name: str, scope: Scope, binding: bool) -> None:
        if binding:
            scope.bound[name] = scope.bound.get(name, 0) + 1
        self.sites.append(Site(node, name, scope, binding))

    def _visit(self, node: ast.AST, scope: Scope, hard: bool) -> None:
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
                self.sites.append(Site(a, a.arg, inner, True))
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
            self.sites.extend(Site(node, name, scope, False, i) for i, name in enumerate(node.names))
        elif isinstance(node, ast.Nonlocal):
            scope.nonlocal_decl.update(node.names)
            self.sites.extend(Site(node, name, scope, False, i) for i, name in enumerate(node.names))
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


def resolved_sites(an: Analysis) -> list[tuple[int, str]]:
    """(index of the scope it resolves to, name) for each site of `an`; -1 for a builtin."""
    index = {id(scope): i for i, scope in enumerate(an.scopes)}
    out = []
    for site in an.sites:
        owner = an.resolve(site.scope, site.name)
        builtin = owner is an.module and site.name not in owner.bound
        out.append((-1 if builtin else index[id(owner)], site.name))
    return out


def identifiers(tree: ast.AST) -> set[str]:
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
