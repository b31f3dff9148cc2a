"""A restricted unpickler for the REFER refs files (METHOD §1).

`refs(<splitBy>).p` files are pickles, mostly written by Python 2's cPickle at protocols 0-2. A
plain `pickle.load` runs whatever callable the file names, so a tampered download could execute
code. This unpickler admits only builtin containers and scalars (dict, list, tuple, set,
frozenset, str, bytes, bytearray, int, float, complex, bool, None) and the few globals that old
pickles of those need:

- `__builtin__.set` / `frozenset` (and their Python 3 `builtins` names): how protocols 0-2 pickle sets;
- `__builtin__.unicode` / `long` (Python 2 names of str / int);
- `_codecs.encode(text, "latin1")`: how Python 3 pickles bytes at protocols 0-2 (only that codec);
- `copy_reg._reconstructor(cls, base, state)`: how protocols 0-1 pickle instances of a class. Admitted
  only where cls and base are the same admitted builtin type (a plain dict, list, ...), which makes
  it `cls(state)`; anything else is rejected.

Every other global (os.system, subprocess.Popen, builtins.eval, getattr, user classes, numpy ...) is
rejected before it is looked up, so nothing from the file is ever called.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool)
}
_TYPES["unicode"] = str  # Python 2 names
_TYPES["long"] = int


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list (or misuses an admitted one)."""


def _codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"_codecs.encode is only admitted as encode(str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1", errors="strict")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if cls is not base or cls not in _TYPES.values():
        raise UnsafePickleError(
            f"copy_reg._reconstructor is only admitted for builtin containers, got {cls!r} / {base!r}"
        )
    return cls() if state is None else cls(state)


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class admits only the allow-list above."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<bytes>") -> None:
        # Python 2 `str` objects are bytes; REFER's text is UTF-8 (undecodable bytes are replaced
        # rather than making a whole dataset unreadable).
        super().__init__(file, encoding="utf-8", errors="replace")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 (pickle's API)
        if module in ("builtins", "__builtin__") and name in _TYPES:
            return _TYPES[name]
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            return _reconstructor
        raise UnsafePickleError(
            f"{self.source}: refusing to unpickle global '{module}.{name}': only builtin containers and "
            "scalars are allowed in a refs file (is it tampered with, or not a REFER refs pickle?)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed (got {pid!r})")


def loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle bytes with the allow-list; `source` names the origin in error messages."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError as e:
        msg = str(e)
        raise UnsafePickleError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def load(path: str | Path) -> Any:
    """Unpickle a file with the allow-list. Raises UnsafePickleError naming the file and the global."""
    path = Path(path)
    return loads(path.read_bytes(), source=str(path))
