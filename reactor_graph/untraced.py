"""`not_traced`: torch.compiler.disable for a method, applied when the first compile is set up.

Importing Dynamo (which `torch.compiler.disable` does at once) costs seconds of start-up; eager runs and the
CUDA graphs of a tiered start's first tier never need it. So the methods are only registered at class creation
and wrapped by `apply()`, which `compile.compile_function` (the one place torch.compile is applied) calls
before anything is traced.
"""
from __future__ import annotations

from typing import Callable


class not_traced:
    registered: list[tuple[type, str, Callable]] = []

    def __init__(self, fn: Callable):
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        setattr(owner, name, self.fn)  # the plain method until a compile is set up
        not_traced.registered.append((owner, name, self.fn))

    @classmethod
    def apply(cls) -> None:
        if not cls.registered:
            return
        import torch

        for owner, name, fn in cls.registered:
            setattr(owner, name, torch.compiler.disable(fn))
        cls.registered.clear()
