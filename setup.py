"""Build hook: the gRPC stubs are generated from the packaged .proto files whenever the
package is built (wheel, sdist -> wheel, editable install), so they are never committed
and always match the protos they ship with."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_ROOT = Path("shard", "protos")  # a link to protos/ in a checkout, real files in an sdist


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        # An editable install imports from the source tree, so its stubs go there (as `make proto`).
        out = "." if self.editable_mode else self.build_lib
        protos = sorted(str(path) for path in PROTO_ROOT.glob("shard/v1/*.proto"))
        if not protos:
            raise RuntimeError(f"no .proto files under {PROTO_ROOT}/shard/v1")
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}",
                        f"--grpc_python_out={out}", f"--pyi_out={out}", *protos], check=True)


setup(cmdclass={"build_py": BuildPyWithStubs})
