"""Installs the `megatron` package and compiles the C++ dataset index helper with pybind11."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

helpers_extension = Pybind11Extension(
    "megatron.core.datasets.helpers_cpp",
    ["megatron/core/datasets/helpers.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    packages=find_packages(include=["megatron", "megatron.*"]),
    ext_modules=[helpers_extension],
    cmdclass={"build_ext": build_ext},
)
