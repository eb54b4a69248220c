"""Builds the optional CUDA extension `m3ae_engine._C` with CMake when a CUDA compiler is present.

- No nvcc (or M3AE_BUILD_CUDA=0): the extension is skipped with one clear line; everything else
  (torch and Triton backends) works.
- nvcc present: the build MUST succeed; a failure is an error, not a silent skip.
- M3AE_CUDA_ARCHS="80;90a" overrides the targets; M3AE_BUILD_JOBS limits parallel compile jobs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if os.environ.get("M3AE_BUILD_CUDA", "1") == "0":
            print("m3ae-engine: M3AE_BUILD_CUDA=0, skipping the CUDA extension m3ae_engine._C")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            print("m3ae-engine: no CUDA compiler (nvcc) found, skipping the CUDA extension m3ae_engine._C")
            return
        if shutil.which("cmake") is None:  # nvcc is here, so the extension is expected: fail, do not skip
            raise RuntimeError("m3ae-engine: nvcc found but cmake (>= 3.24) is missing; install cmake "
                               "(pip install cmake) or set M3AE_BUILD_CUDA=0 to build without the CUDA extension")
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={nvcc}",
               f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DM3AE_OUTPUT_DIR={out_dir}", f"-DM3AE_EXT_SUFFIX={Path(self.get_ext_filename('_C')).suffix}"]
        if os.environ.get("M3AE_CUDA_ARCHS"):
            cfg.append(f"-DM3AE_CUDA_ARCHS={os.environ['M3AE_CUDA_ARCHS']}")
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        subprocess.run(["cmake", str(ROOT)] + cfg, cwd=build_dir, check=True)
        jobs = os.environ.get("M3AE_BUILD_JOBS") or str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        # editable installs import from the source tree: put a copy next to the sources too
        built = next(out_dir.glob("_C*"), None)
        if self.inplace or os.environ.get("M3AE_COPY_INPLACE", "1") == "1":
            if built is not None:
                shutil.copy2(built, ROOT / "m3ae_engine" / built.name)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import find_nvcc from it
    setup(ext_modules=[CMakeExtension("m3ae_engine._C")], cmdclass={"build_ext": CMakeBuild})
