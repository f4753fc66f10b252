"""The packed file: the program compressed (lzma or brotli), encoded as ASCII (base93, base85) or latin-1, behind a
stub that decodes and runs it; and reading such a file back."""
from __future__ import annotations

import ast
import base64
import itertools
import lzma
import re

import brotli

from tools.pack.bundle.errors import BundleError


# Filename the unpacked code is compiled under and registered with linecache, so tracebacks show source lines
# and inspect.getsource works (Triton's @jit needs it); plain exec() would give "<string>" with no source.
VIRTUAL_FILENAME = "<train_gpt>"
_LZMA_PRESET = 9 | lzma.PRESET_EXTREME


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
    literals = {t.id: n.value.value for n in tree.body
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                for t in n.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        match node:
            case ast.Call(func=ast.Attribute(attr="decompress"),
                          args=[ast.Call(func=ast.Attribute(value=ast.Constant(value=str(payload)), attr="encode"))]):
                return "latin-1", payload
            case ast.Call(func=ast.Attribute(attr="decompress"),
                          args=[ast.Call(func=ast.Attribute(attr="b85decode"),
                                         args=[ast.Constant(value=str(payload))])]):
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
