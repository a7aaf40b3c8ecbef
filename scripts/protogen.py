"""Generates the Python code and .pyi stubs for every proto under protos/, or checks them for drift."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs"
DEPS = ROOT / ".build" / "protodeps"
GOOGLE_API_FILES = ("annotations.proto", "http.proto", "field_behavior.proto")
# Our protos as a FileDescriptorSet with their comments (the *_pb2 modules carry none): the edge's OpenAPI
# document takes its descriptions from it.
SOURCE_INFO = Path("agentvault/common/protos.binpb")


def copy_google_api() -> None:
    """Copies google/api/*.proto from the googleapis-common-protos wheel, for protoc and buf."""
    src = Path(next(iter(google.api.__path__)))
    dst = DEPS / "google" / "api"
    dst.mkdir(parents=True, exist_ok=True)
    for name in GOOGLE_API_FILES:
        shutil.copyfile(src / name, dst / name)


def generated_files(root: Path) -> set[Path]:
    found = {
        p.relative_to(root)
        for p in root.glob("agentvault/*/v1/*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    }
    return found | ({SOURCE_INFO} if (root / SOURCE_INFO).exists() else set())


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SOURCE_INFO).parent.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{DEPS}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "--mypy_opt=quiet",
        "--mypy_grpc_opt=quiet",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"--descriptor_set_out={out / SOURCE_INFO}",
        "--include_source_info",
        *protos,
    ]
    bindir = Path(sys.executable).parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    subprocess.run(cmd, check=True, cwd=PROTOS, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs")
    args = parser.parse_args()
    copy_google_api()
    if not args.check:
        for rel in generated_files(OUT):
            (OUT / rel).unlink()
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = generated_files(Path(tmp)), generated_files(OUT)
        drift = sorted(str(p) for p in fresh ^ committed)
        drift += sorted(str(p) for p in fresh & committed if not filecmp.cmp(Path(tmp) / p, OUT / p, False))
    if drift:
        print("generated code is out of date with protos/ (run `make proto`):", *drift, sep="\n  ")
        return 1
    print("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
