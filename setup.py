"""Ship the shim sources with the package.

mtp_cdef.h, build_ffi.py and shim/ live at the repo root (the project's fixed
layout); a wheel copies them into llama_mtp/_native/ so an installed package
can build its shim on first use. Nothing is compiled at install time: the shim
must match the llama-cpp-python of the *runtime* environment, which build
isolation hides and a later reinstall could change (see README).
"""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent
NATIVE_FILES = ("mtp_cdef.h", "build_ffi.py", "shim/mtp_shim.cpp", "shim/mtp_chat.cpp", "shim/mtp_guard.h")


class BuildPyWithShimSources(build_py):
    def run(self) -> None:
        super().run()
        dest = pathlib.Path(self.build_lib) / "llama_mtp" / "_native"
        for rel in NATIVE_FILES:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)


setup(cmdclass={"build_py": BuildPyWithShimSources})
