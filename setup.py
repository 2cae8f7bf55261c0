"""Build of the optional native extension ``prefopt_kernels._C`` (CMake + Ninja over csrc/).

Metadata lives in pyproject.toml. The extension is optional: when it cannot be built (no
C++ compiler, no CMake) the build prints one warning and the package installs without it;
``prefopt_kernels`` then runs on its Triton and reference backends.

Environment:
  PREFOPT_NO_NATIVE=1   skip the native build entirely
  PREFOPT_NO_CUDA=1     build the CPU kernels only, even where a CUDA toolkit exists
  PREFOPT_CUDA_ARCHS    CUDA architectures for CMake (default "80-real;90")
  PREFOPT_BUILD_JOBS    parallel compile jobs (default: CPU count)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only places the result."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt with Ninja into the extension's output directory."""

    def build_extensions(self) -> None:
        failed = []
        for ext in self.extensions:
            try:
                self._cmake_build(ext)
            except Exception as exc:  # the package must still install without the extension
                text = str(exc).strip()
                message = text.splitlines()[-1] if text else type(exc).__name__
                print(
                    f"WARNING: prefopt_kernels: the native extension was not built ({message}); "
                    "the package works without it (Triton / reference backends). "
                    "Set PREFOPT_NO_NATIVE=1 to skip this build.",
                    file=sys.stderr,
                )
                failed.append(ext)
        # Later steps (copy into the source tree, wheel contents) then skip what is missing.
        for ext in failed:
            self.extensions.remove(ext)

    def _cmake_build(self, ext: Extension) -> None:
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPREFOPT_OUTPUT_DIR={out_dir}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        # Always passed: the CMake cache would otherwise keep an earlier PREFOPT_NO_CUDA=1.
        args.append("-DPREFOPT_CUDA=" + ("OFF" if os.environ.get("PREFOPT_NO_CUDA") == "1" else "AUTO"))
        if os.environ.get("PREFOPT_CUDA_ARCHS"):
            args.append(f"-DPREFOPT_CUDA_ARCHS={os.environ['PREFOPT_CUDA_ARCHS']}")
        jobs = os.environ.get("PREFOPT_BUILD_JOBS") or str(os.cpu_count() or 1)
        self._run(args)
        self._run([cmake, "--build", str(build_dir), "--parallel", jobs])

    @staticmethod
    def _run(cmd) -> None:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stderr.write(result.stdout)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed with exit code {result.returncode}")


native = os.environ.get("PREFOPT_NO_NATIVE") != "1"
setup(
    ext_modules=[CMakeExtension("prefopt_kernels._C")] if native else [],
    cmdclass={"build_ext": CMakeBuild} if native else {},
)
