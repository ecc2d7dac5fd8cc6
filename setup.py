"""Build of the one compiled part of rlm: the fused task-conflict kernels (``rlm.core.conflicts._kernels``).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the install
still succeeds and ``rlm conflicts`` runs its eager torch engine instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rlm.core.conflicts._kernels",
            sources=["core/conflicts/_kernels.c"],
            extra_compile_args=["-O3", "-fopenmp-simd", "-fno-math-errno", "-std=c11"],
            optional=True,
        )
    ]
)
