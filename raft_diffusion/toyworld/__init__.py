"""Former home of the toy image world, now :mod:`raft_diffusion.diffusion.toyworld`.

Kept so that configs written before the move still work: reward paths such as
``raft_diffusion.toyworld.rewards:gold_aesthetic`` import the moved modules (the very same module
objects), and ``raft_diffusion/toyworld/assets/...`` is a link to the moved assets.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from ..diffusion.toyworld import *  # noqa: F401,F403
from ..diffusion.toyworld import __all__  # noqa: F401

_OLD, _NEW = __name__ + ".", "raft_diffusion.diffusion.toyworld."


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``raft_diffusion.toyworld.X`` -> the module ``raft_diffusion.diffusion.toyworld.X`` itself."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name.startswith(_OLD) else None

    def create_module(self, spec):
        return importlib.import_module(_NEW + spec.name[len(_OLD) :])

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.insert(0, _Alias())
