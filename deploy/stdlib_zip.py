"""Bytecode of the standard library modules the proxy loads at start, in the interpreter's own zip.

Distroless Python ships its standard library without bytecode (no Debian postinst runs there),
and the image's user cannot write any, so every start would compile the ~150 modules the
proxy imports (~0.2 s of CPU of a ~0.5 s start). Run by the image's own interpreter, this
starts the archive once in a child process (settings, listen, stop), then compiles what it
loaded into pythonXY.zip: the standard library entry that CPython puts on sys.path ahead of
the library's directory, and reads with zipimport. Taken: every plain top-level module, and
every package of which the start loaded every module (a package found in a zip looks for its
submodules in the zip only, so a partial one would break a later import). The sources stay
where they are, for tracebacks. Compressed, this is ~0.8 MB instead of ~4 MB of __pycache__.

    python3 -X no_debug_ranges stdlib_zip.py ARCHIVE OUT_ROOT   (writes OUT_ROOT/usr/lib/pythonXY.zip)
"""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

FIXED_DATE = (1980, 1, 2, 0, 0, 0)
# Run in a child, so that only what the proxy itself imports is counted: settings, App, listen, stop.
START_ONCE = """
import asyncio, json, sys
from importlib.machinery import SourceFileLoader
sys.path.insert(0, sys.argv[1])
import sambaproxy
config = sambaproxy.load_config(["--host", "127.0.0.1", "--port", "0"], {"TOKEN_CACHE_FILE": ""},
                                sambaproxy.__version__)
async def listen_and_stop():
    app = sambaproxy.App(config)
    await app.start()
    await app.aclose()
asyncio.run(listen_and_stop())
print(json.dumps({name: [m.__spec__.origin, m.__spec__.submodule_search_locations is not None]
                  for name, m in list(sys.modules.items())
                  if getattr(m, "__spec__", None) and isinstance(m.__spec__.loader, SourceFileLoader)}))
"""


def loaded_at_start(archive: str) -> dict[str, tuple[str, bool]]:
    """{module name: (source path, is a package)} of the modules a start of `archive` loads from files."""
    run = subprocess.run([sys.executable, "-c", START_ONCE, archive], capture_output=True, text=True,
                         timeout=120, check=True)
    return {name: (origin, is_package) for name, (origin, is_package) in json.loads(run.stdout).items()}


def zippable(loaded: dict[str, tuple[str, bool]], stdlib: str) -> dict[str, str]:
    """{module name: source path}: plain top-level modules of `stdlib`, and whole packages of it
    of which every module was loaded."""
    chosen = {}
    for name, (origin, is_package) in loaded.items():
        if "." in name:
            continue
        if not is_package and os.path.dirname(origin) == stdlib:
            chosen[name] = origin
        elif is_package and os.path.dirname(os.path.dirname(origin)) == stdlib:
            package = package_modules(name, os.path.dirname(origin))
            if all(module in loaded for module in package):
                chosen.update(package)
    return chosen


def package_modules(package: str, folder: str) -> dict[str, str]:
    """{module name: source path} of every module of a package folder, subpackages included."""
    modules = {}
    for directory, _, files in os.walk(folder):
        relative = os.path.relpath(directory, folder)
        prefix = package if relative == "." else ".".join([package, *relative.split(os.sep)])
        for file in files:
            if file.endswith(".py"):
                stem = file[:-3]
                modules[prefix if stem == "__init__" else f"{prefix}.{stem}"] = os.path.join(directory, file)
    return modules


def stdlib_zip_path() -> str:
    """pythonXY.zip, as this interpreter's sys.path names it."""
    name = f"python{sys.version_info[0]}{sys.version_info[1]}.zip"
    for entry in sys.path:
        if os.path.basename(entry) == name:
            return entry
    raise SystemExit(f"{name} is not on this interpreter's sys.path: {sys.path}")


def write_zip(modules: dict[str, str], stdlib: str, target: str) -> None:
    """Each module's bytecode at its path in the library, unchecked-hash: nothing in the image changes."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as work, \
            zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for name, source in sorted(modules.items()):
            compiled = os.path.join(work, name + ".pyc")
            py_compile.compile(source, cfile=compiled, dfile=source, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            entry = zipfile.ZipInfo(os.path.relpath(source, stdlib)[:-3] + ".pyc", FIXED_DATE)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with open(compiled, "rb") as f:
                out.writestr(entry, f.read())


def main(argv: list[str]) -> int:
    archive, out_root = argv
    stdlib = sysconfig.get_paths()["stdlib"]
    modules = zippable(loaded_at_start(archive), stdlib)
    target = out_root + stdlib_zip_path()
    write_zip(modules, stdlib, target)
    packages = sorted({name.split(".")[0] for name in modules if "." in name})
    print(f"{target}: {len(modules)} modules (whole packages: {', '.join(packages) or 'none'}), "
          f"{os.path.getsize(target) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
