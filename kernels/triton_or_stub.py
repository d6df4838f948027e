"""Triton, or stand-ins where it is missing or broken.

Every kernel file keeps its torch reference beside the kernel, and the references are used on any machine (the CPU
paths, the tests), so a kernel file must import where Triton cannot: its `@triton.jit` definitions then evaluate
against these stand-ins and are never launched (HAVE_TRITON is False and the launchers take the reference).

colour.py keeps its own copy of these lines: bench/bench_colour.py loads that one file by path where the package is
not installed, so it cannot import from here."""
try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent or broken
    HAVE_TRITON = False

    class triton:  # noqa: N801
        @staticmethod
        def jit(fn):
            return fn

    class tl:  # noqa: N801
        constexpr = object

__all__ = ["HAVE_TRITON", "triton", "tl"]
