#!/usr/bin/env python3
"""Finds the libclang that bindgen would load, and proves it usable.

bindgen (through clang-sys 1.9, `runtime` feature, as kryoptic's build uses
it) looks for libclang in this order: only $LIBCLANG_PATH if it is set;
otherwise `llvm-config --prefix`/{bin,lib,lib64}, $LD_LIBRARY_PATH,
$LIBRARY_PATH, then /usr/local/llvm*/lib*, /usr/local/lib*[/*[/*]] and
/usr/lib*[/*[/*]]. In each directory it accepts `libclang.so`,
`libclang-*.so`, `libclang.so.*` and `libclang-*.so.*`, but never a name
containing `-cpp.` (`libclang-cpp.so.14` is the C++ interface library, which
Debian installs with llvm-*-dev and which bindgen cannot use), keeps the 64-bit
ELF files, and loads the one with the highest version in its file name.

This script makes the same choice, then loads that library and parses a small
C file that includes <stddef.h> and <stdint.h> (clang's own headers, which a
libclang without its resource directory cannot find). It prints the library's
path and exits 0 if that works, and says why and exits 1 if not.
"""

import ctypes
import fnmatch
import glob
import os
import subprocess
import sys

PATTERNS = ["libclang.so", "libclang-*.so", "libclang.so.*", "libclang-*.so.*"]
LINUX_DIRS = [
    "/usr/local/llvm*/lib*",
    "/usr/local/lib*/*/*",
    "/usr/local/lib*/*",
    "/usr/local/lib*",
    "/usr/lib*/*/*",
    "/usr/lib*/*",
    "/usr/lib*",
]


def in_directory(directory):
    """(directory, file name) of each acceptable library in one directory."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [
        (directory, name)
        for name in names
        if any(fnmatch.fnmatchcase(name, p) for p in PATTERNS) and "-cpp." not in name
    ]


def candidates():
    """Every library clang-sys would consider, in its order of preference."""
    explicit = os.environ.get("LIBCLANG_PATH")
    if explicit:
        if os.path.isfile(explicit):
            directory, name = os.path.split(explicit)
            if (directory, name) in in_directory(directory):
                return [(directory, name)]
        return in_directory(explicit)

    found = []
    llvm_config = os.environ.get("LLVM_CONFIG_PATH", "llvm-config")
    try:
        prefix = subprocess.run(
            [llvm_config, "--prefix"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        for sub in ("bin", "lib", "lib64"):
            found += in_directory(os.path.join(prefix, sub))
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    for variable in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        for directory in filter(None, os.environ.get(variable, "").split(os.pathsep)):
            found += in_directory(directory)
    for pattern in LINUX_DIRS:
        for directory in sorted(glob.glob(pattern)):
            if os.path.isdir(directory):
                found += in_directory(directory)
    return found


def is_elf64(path):
    try:
        with open(path, "rb") as f:
            header = f.read(5)
    except OSError:
        return False
    return header[:4] == b"\x7fELF" and header[4] == 2


def version(name):
    """The version clang-sys reads from a file name (libclang-14.so.1 -> 14.so.1)."""
    if name.startswith("libclang.so."):
        text = name[len("libclang.so.") :]
    elif name.startswith("libclang-"):
        text = name[len("libclang-") : -3]
    else:
        return []
    return [int(part) if part.isdigit() else 0 for part in text.split(".")]


def chosen():
    valid = [(d, n) for d, n in candidates() if is_elf64(os.path.join(d, n))]
    if not valid:
        return None
    # The highest version; among equals, the first found (clang-sys's tiebreak).
    best = max(version(n) for _, n in valid)
    directory, name = next((d, n) for d, n in valid if version(n) == best)
    return os.path.join(directory, name)


class CXUnsavedFile(ctypes.Structure):
    _fields_ = [
        ("Filename", ctypes.c_char_p),
        ("Contents", ctypes.c_char_p),
        ("Length", ctypes.c_ulong),
    ]


class CXString(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("private_flags", ctypes.c_uint)]


def parse_errors(path):
    """Parses a small C file with the library; the diagnostics, if any."""
    lib = ctypes.CDLL(path)
    lib.clang_createIndex.restype = ctypes.c_void_p
    lib.clang_createIndex.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.clang_parseTranslationUnit.restype = ctypes.c_void_p
    lib.clang_parseTranslationUnit.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_int,
        ctypes.POINTER(CXUnsavedFile),
        ctypes.c_uint,
        ctypes.c_uint,
    ]
    lib.clang_getNumDiagnostics.argtypes = [ctypes.c_void_p]
    lib.clang_getDiagnostic.restype = ctypes.c_void_p
    lib.clang_getDiagnostic.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.clang_formatDiagnostic.restype = CXString
    lib.clang_formatDiagnostic.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.clang_getCString.restype = ctypes.c_char_p
    lib.clang_getCString.argtypes = [CXString]

    source = b"#include <stddef.h>\n#include <stdint.h>\nsize_t a;\nuint64_t b;\n"
    unsaved = CXUnsavedFile(b"probe.c", source, len(source))
    index = lib.clang_createIndex(0, 0)
    unit = lib.clang_parseTranslationUnit(
        index, b"probe.c", None, 0, ctypes.byref(unsaved), 1, 0
    )
    if not unit:
        return ["libclang could not parse a C file"]
    return [
        lib.clang_getCString(
            lib.clang_formatDiagnostic(lib.clang_getDiagnostic(unit, i), 0)
        ).decode(errors="replace")
        for i in range(lib.clang_getNumDiagnostics(unit))
    ]


def main():
    path = chosen()
    if path is None:
        print(
            "no libclang that bindgen accepts (libclang.so, libclang-N.so, "
            "libclang.so.N; not libclang-cpp): install libclang-dev",
            file=sys.stderr,
        )
        return 1
    try:
        errors = parse_errors(path)
    except OSError as e:
        print(f"{path}: cannot be loaded: {e}", file=sys.stderr)
        return 1
    if errors:
        print(f"{path}: cannot parse a C file: {'; '.join(errors)}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
