"""Build sambaproxy.pyz: one executable zip (stdlib zipapp) holding the proxy and its pinned dependencies.

The archive holds every top-level module of the project, its static resources (status.html),
and the runtime dependencies pinned in requirements.txt, copied from an installed
site-packages (the .venv's, or a `pip install --target` directory) after checking that each
installed version is exactly the pinned one. No network is used. Every module ships as source
and as bytecode of the building Python beside it: zipimport loads the bytecode when the
running Python's magic number matches and compiles the source otherwise. The bytecode is
hash-based and unchecked (PEP 552), as nothing in a built archive can change: zipimport takes
it without looking at the source, and timestamps play no part (entries carry a fixed one).

    python deploy/build_pyz.py [--site-packages DIR] [--output dist/sambaproxy.pyz] [--bytecode-only]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTERPRETER = "/usr/bin/env python3"
# Static files served or read at run time, found beside the modules (resources.read_resource).
RESOURCE_PATTERNS = ("*.html", "*.ico", "*.svg", "*.png", "*.css", "*.js")
# Files of the pinned packages left out, and why.
LEFT_OUT = {
    # httpx's command-line client: needs click and rich, which are not ours to ship; httpx
    # imports it in a try block, so leaving it out also keeps a host's click/rich from loading.
    "httpx/_main.py",
}
FIXED_MTIME = 315619200  # 1980-01-02: zip's epoch is 1980 and stores local time; one day of slack
MAIN = "import sys\n\nfrom sambaproxy import main\n\nsys.exit(main())\n"


class BuildError(Exception):
    """The archive cannot be built as pinned; the message says what to fix."""


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form, so `typing_extensions` matches `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(requirements: Path) -> dict[str, str]:
    """`name[extras]==version` lines of requirements.txt, as {normalized name: version}."""
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if not match:
            raise BuildError(f"{requirements.name}: not an exact pin: {line!r}")
        pins[normalize(match[1])] = match[3]
    return pins


def pinned_distributions(site: Path, pins: dict[str, str]) -> list[importlib.metadata.Distribution]:
    """The installed distribution of every pin, each at exactly the pinned version."""
    found = {normalize(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site)])}
    problems = []
    for name, version in sorted(pins.items()):
        dist = found.get(name)
        if dist is None:
            problems.append(f"{name}=={version} is not installed in {site}")
        elif dist.version != version:
            problems.append(f"{name} is {dist.version} in {site}, requirements.txt pins {version}")
    if problems:
        raise BuildError("; ".join(problems))
    return [found[name] for name in sorted(pins)]


def distribution_files(dist: importlib.metadata.Distribution, site: Path) -> list[str]:
    """The files a distribution installed into `site` (its RECORD): packages, modules, licenses."""
    files = []
    for entry in dist.files or ():
        path = entry.as_posix()
        top = path.split("/", 1)[0]
        if path.startswith("..") or "__pycache__" in path or path.endswith(".pyc") or path in LEFT_OUT:
            continue
        if top.endswith(".dist-info"):
            if "LICEN" in path.upper():  # the licenses travel with the code they cover
                files.append(path)
            continue
        if (site / path).is_file() and (top.endswith(".py") or (site / top / "__init__.py").is_file()):
            files.append(path)
    if not any(f.endswith(".py") for f in files):
        raise BuildError(f"{dist.metadata['Name']}: no module found among its installed files")
    return files


def project_files(root: Path) -> list[str]:
    """Every top-level module of the project (tests and tools live in folders) and its resources."""
    names = {p.name for p in root.glob("*.py")}
    for pattern in RESOURCE_PATTERNS:
        names.update(p.name for p in root.glob(pattern))
    if "sambaproxy.py" not in names or "__main__.py" in names:
        raise BuildError(f"{root} does not look like the project (sambaproxy.py, no __main__.py)")
    return sorted(names)


def stage(target: Path, sources: list[tuple[Path, str]], archive_name: str, bytecode_only: bool) -> None:
    """Copy each (source file, archive path) into `target` and compile every module beside itself."""
    (target / "__main__.py").write_text(MAIN)
    for source, relative in sources:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    compile_beside(target, archive_name)
    if bytecode_only:  # zipapp wants to see __main__.py; its bytecode is what runs
        for path in target.rglob("*.py"):
            if path != target / "__main__.py":
                path.unlink()
    for path in target.rglob("*"):
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))


def compile_beside(target: Path, archive_name: str) -> None:
    """NAME.pyc beside every NAME.py (where zipimport looks), hash-based and unchecked.

    Compiled without the column tables of PEP 657 (-X no_debug_ranges): tracebacks keep their
    file and line, lose only the ^^^ markers, and the archive is ~13% smaller, its code in
    memory too. Tracebacks name the files ARCHIVE_NAME/path."""
    compiled = subprocess.run([sys.executable, "-X", "no_debug_ranges", "-m", "compileall", "-q", "-b",
                               "--invalidation-mode", "unchecked-hash", "-d", archive_name, "."], cwd=target)
    if compiled.returncode != 0:
        raise BuildError("some modules do not compile on this Python (compileall's report is above)")


def build(site: Path, output: Path, root: Path = ROOT, bytecode_only: bool = False) -> list[str]:
    """Build the archive at `output`; returns the pinned distributions it holds, as name==version."""
    dists = pinned_distributions(site, read_pins(root / "requirements.txt"))
    sources = [(root / name, name) for name in project_files(root)]
    taken = {name for _, name in sources}
    for dist in dists:
        for relative in distribution_files(dist, site):
            if relative in taken:
                raise BuildError(f"{relative} is both the project's and {dist.metadata['Name']}'s")
            taken.add(relative)
            sources.append((site / relative, relative))
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sambaproxy-pyz-") as work:
        stage(Path(work), sources, output.name, bytecode_only)
        partial = output.with_name(output.name + ".part")
        zipapp.create_archive(work, partial, interpreter=INTERPRETER, compressed=True)
        partial.chmod(0o755)
        os.replace(partial, output)
    return [f"{d.metadata['Name']}=={d.version}" for d in dists]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]),
                        help="where the pinned dependencies are installed (default: this Python's)")
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "sambaproxy.pyz")
    parser.add_argument("--bytecode-only", action="store_true",
                        help="leave the sources out: smaller, but the archive then runs only on this "
                        "Python's minor version, and tracebacks show no source lines")
    args = parser.parse_args(argv)
    try:
        held = build(args.site_packages, args.output, bytecode_only=args.bytecode_only)
    except BuildError as exc:
        sys.stderr.write(f"build_pyz: {exc}\n")
        return 1
    size = args.output.stat().st_size
    print(f"{args.output}: {size / 1e6:.2f} MB, Python {sys.version_info[0]}.{sys.version_info[1]} "
          f"bytecode, {', '.join(held)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
