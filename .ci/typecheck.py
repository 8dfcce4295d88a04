"""Type-check shardline with mypy under its installed module names (`make typecheck`, part of
`make test`).

Why not plain `mypy worker/ cluster/ ...`: the distribution maps the repository's folders onto one
namespace (pyproject's [tool.setuptools] package-dir: worker/ is `shardline.worker`, ...). Given
the folders, mypy would name their modules `worker.config` and so on, and every
`from shardline.worker...` import would be unresolved; the editable install does not help, because
setuptools installs it as an import hook that mypy cannot follow. So this script reads the same
package-dir table and hands mypy each file with its real module name (mypy's BuildSource), which
resolves every `shardline.*` import to the file in this checkout and reports errors at the real
paths (worker/config.py:12). The options come from pyproject's [tool.mypy]."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from mypy import build
from mypy.main import process_options
from mypy.modulefinder import BuildSource

REPO = Path(__file__).resolve().parent.parent


def shardline_sources(repo: Path) -> list[BuildSource]:
    """One BuildSource per module of the distribution, named as it is installed. A module with a
    stub beside it (proto/generation_pb2.pyi) is checked against the stub, as its importers see it."""
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]

    def folder_of(package: str) -> Path:
        """setuptools' rule: the package's own entry, else its parent's folder plus its last name."""
        if package in package_dir:
            return repo / package_dir[package]
        parent, _, name = package.rpartition(".")
        return folder_of(parent) / name

    sources = []
    for package in setuptools["packages"]:
        folder = folder_of(package)
        for path in sorted(folder.glob("*.py")):
            stub = path.with_suffix(".pyi")
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            sources.append(BuildSource(str((stub if stub.exists() else path).relative_to(repo)), name))
    return sources


def main() -> int:
    # process_options reads [tool.mypy] from pyproject.toml; the placeholder target is replaced.
    _, options = process_options(["--config-file", str(REPO / "pyproject.toml"), str(REPO / "shardline")])
    sources = shardline_sources(REPO)
    try:
        result = build.build(sources, options)
        messages = result.errors
    except Exception as e:  # mypy's CompileError carries its messages
        messages = getattr(e, "messages", None) or [str(e)]
    for line in messages:
        print(line)
    errors = sum(": error:" in line for line in messages)
    print(f"typecheck: {errors} error(s) in {len(sources)} modules" if errors else
          f"typecheck: no errors in {len(sources)} modules", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
