"""The code bundler: inline the kit modules an entry script imports into one minified, compressed, self-extracting
train_gpt.py.

analysis.py  Python's scoping rules: every name site and the scope it resolves to
strip.py     what each module loses on the way in (docstrings, annotations, raise messages) and the minified text
rewrite.py   finding, ordering and pruning the modules, one namespace for their globals, the assembled program
shorten.py   short names for the variables whose names provably do not matter
codec.py     the packed file: compression, ASCII encoding and the stub that runs it; reading one back
build.py     bundle() and write_bundle(): the steps in order, the result and its files
The command, `pgolf bundle`, is tools/commands/bundle.py."""
from __future__ import annotations

from tools.pack.bundle.build import (BundleResult, BundleSizes, bundle, count_or_off, find_kit_root, short_globals,
                                     source_sha256, write_bundle)
from tools.pack.bundle.codec import (CODECS, PACKINGS, VIRTUAL_FILENAME, base93_decode, base93_encode,
                                     compressed_payload, pack, unpack)
from tools.pack.bundle.errors import BundleError
from tools.pack.bundle.rewrite import KIT_PACKAGES
from tools.pack.bundle.shorten import ShortNames

__all__ = ["CODECS", "KIT_PACKAGES", "PACKINGS", "VIRTUAL_FILENAME", "BundleError", "BundleResult", "BundleSizes",
           "ShortNames", "base93_decode", "base93_encode", "bundle", "compressed_payload", "count_or_off",
           "find_kit_root", "pack", "short_globals", "source_sha256", "unpack", "write_bundle"]
