"""Short names: rename the variables of the assembled program whose names provably do not matter."""
from __future__ import annotations

import ast
import builtins
import itertools
import keyword
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass

from tools.pack.bundle.analysis import Analysis, Scope, Site, identifiers, resolved_sites
from tools.pack.bundle.errors import BundleError


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

    def __init__(self, owner: Scope, name: str, order: int):
        self.owner, self.name, self.order = owner, name, order
        self.sites: list[Site] = []
        self.span: set[int] = set()  # id() of every scope a reference to it is looked up through, the owner included
        self.new: str | None = None  # its name in the output (the old one where it is kept)


def _short_names(taken: set[str]) -> Iterator[str]:
    """a..z, A..Z, then a letter and a letter or digit, and so on, skipping `taken`."""
    letters, digits = string.ascii_lowercase + string.ascii_uppercase, string.digits
    for length in itertools.count(1):
        for chars in itertools.product(letters, *[letters + digits] * (length - 1)):
            if "".join(chars) not in taken:
                yield "".join(chars)


def _set_site_name(site: Site, new: str) -> None:
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


class Shortener:
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
        self.an = Analysis(tree)
        self.before = resolved_sites(self.an)
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
        module_taken = identifiers(self.tree) | self.words
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
        after = resolved_sites(Analysis(self.tree))
        mapping: dict[tuple[int, str], tuple[int, str]] = {}
        for old, new in zip(self.before, after, strict=True):
            if old[0] != new[0] or mapping.setdefault(old, new) != new:
                raise BundleError(f"renaming {old[1]!r} to {new[1]!r} changed what it refers to; report this source "
                                  "(bundle(..., short_names=False) or `pgolf bundle --long-names` skips renaming)")
        if len(set(mapping.values())) != len(mapping):
            raise BundleError("renaming gave two variables of one scope the same name; report this source "
                              "(bundle(..., short_names=False) or `pgolf bundle --long-names` skips renaming)")
