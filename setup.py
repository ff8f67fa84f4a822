"""Build hook: the gRPC code is generated from the .proto whenever the package is built.

`pip install .`, `pip install -e .` (what `make` runs) and `pip wheel .` all run build_py, which
writes src/vla_inference/api/v1/vla_inference_pb2{,_grpc}.py(i) from vla_inference.proto with
grpcio-tools, a build requirement only (pyproject.toml [build-system]): the .proto stays the one
definition and nothing generated is committed. Metadata and dependencies are in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO = Path("src/vla_inference/api/v1/vla_inference.proto")
GENERATED = [
    PROTO.with_name("vla_inference_pb2.py"),
    PROTO.with_name("vla_inference_pb2.pyi"),
    PROTO.with_name("vla_inference_pb2_grpc.py"),
]


def generate_grpc_code(root: Path = Path()) -> None:
    """protoc with grpcio-tools' own well-known types; writes next to the .proto."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    src = root / "src"
    args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={src}", f"--pyi_out={src}"]
    args += [f"--grpc_python_out={src}", str(root / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {root / PROTO}")


class BuildWithGrpcCode(build_py):
    def run(self) -> None:
        generate_grpc_code()
        super().run()


setup(cmdclass={"build_py": BuildWithGrpcCode})
