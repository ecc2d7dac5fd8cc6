"""Build of the compiled parts of rlm: the fused task-conflict kernels (``rlm.core.conflicts._kernels``) and the
fused merge kernels (``rlm.core.merge._kernels``).

Everything else is declared in pyproject.toml. The extensions are optional: without a C compiler the install
still succeeds and ``rlm conflicts`` / ``rlm merge`` run their torch engines instead. The merge kernels must
match torch's float32 arithmetic operation by operation: no contraction into fused multiply-adds.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rlm.core.conflicts._kernels",
            sources=["core/conflicts/_kernels.c"],
            depends=["core/_kernels_io.h"],
            extra_compile_args=["-O3", "-fopenmp-simd", "-fno-math-errno", "-std=c11"],
            optional=True,
        ),
        Extension(
            "rlm.core.merge._kernels",
            sources=["core/merge/_kernels.c"],
            depends=["core/_kernels_io.h"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11"],
            optional=True,
        ),
    ]
)
