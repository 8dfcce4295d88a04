"""Regenerate the Python stubs of proto/generation.proto into proto/ (or a given folder).

The .proto is compiled under the virtual path `shardline/proto/generation.proto`
(protoc's `-I<virtual>=<physical>`), so the generated gRPC module imports
`from shardline.proto import generation_pb2`, which is where the installed package puts it.

The committed stubs are generated with grpcio-tools 1.62.x (protobuf 4.25 gencode): that gencode
has no runtime version check and loads on every protobuf runtime from 4.25 up to 7.x, and its
gRPC module runs on any grpcio >= 1.60. Stubs from a newer grpcio-tools would demand a runtime at
least as new as the generator (1.85.1 -> protobuf >= 7.35.1 and grpcio >= 1.85.1), which the GPU
machines may not have. Regenerate with:

    python -m venv /tmp/protogen && /tmp/protogen/bin/pip install grpcio-tools==1.62.3
    /tmp/protogen/bin/python proto/generate.py

Usage: python proto/generate.py [OUT_DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
VIRTUAL_DIR = "shardline/proto"  # the package the stubs are imported from
PROTO_FILES = ("generation.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
PINNED_TOOLS = "1.62."  # the grpcio-tools series the committed stubs come from (see above)


def generated_names(proto_file: str) -> list[str]:
    """The file names protoc writes for one .proto file."""
    stem = Path(proto_file).stem
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def tools_version() -> str:
    """The installed grpcio-tools version."""
    from importlib.metadata import version

    return version("grpcio-tools")


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every .proto into out_dir (flat) and return the written files."""
    from grpc_tools import protoc  # a test/dev dependency, not needed at run time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{VIRTUAL_DIR}={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{VIRTUAL_DIR}/{name}" for name in PROTO_FILES),
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
        for name in PROTO_FILES:
            for generated in generated_names(name):
                target = out_dir / generated
                shutil.copyfile(Path(tmp) / VIRTUAL_DIR / generated, target)
                written.append(target)
    return written


def main(argv: list[str]) -> int:
    """Command line entry: regenerate into proto/ or the folder given."""
    out_dir = Path(argv[1]) if len(argv) > 1 else PROTO_DIR
    version = tools_version()
    if not version.startswith(PINNED_TOOLS):
        print(
            f"warning: grpcio-tools {version} is not {PINNED_TOOLS}x; the stubs it writes need a protobuf "
            f"runtime and grpcio at least as new as it (see this file's docstring)",
            file=sys.stderr,
        )
    for path in generate(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
