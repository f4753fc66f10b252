"""What the bundler cuts from each module before inlining it (docstrings, `if TYPE_CHECKING:` blocks, function
annotations, a library's `if __name__ == "__main__":`, raise messages cut to "path:line values") and the minified
text it writes at the end."""
from __future__ import annotations

import ast

from tools.pack.bundle.errors import BundleError


def is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


class Strip(ast.NodeTransformer):
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


def ensure_bodies(tree: ast.AST) -> None:
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


def shorten_messages(tree: ast.Module, rel: str) -> int:
    """Replace the message of every `raise E("..." or f"...", ...)` by "<rel>:<line of the raise> <its values>".

    The kit's messages name the file, the value and the fix (README: Bad input); their prose was 3.1 KB of the
    pipeline's 29.3 KB of lzma. The packed program keeps the exception type and the values; the kit at rel:line has
    the text. rel may be the file's name alone where no other file of the program has that name (message_label):
    the kit's folders cost the pipeline 141 bytes of its packed file.
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


def minify(tree: ast.Module) -> str:
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
