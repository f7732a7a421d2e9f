"""qpass kernels: the ``torch.ops.qpass`` op definitions and their reference implementations.

Importing this package registers the ops (``torch.ops.qpass.linear_4bit``, ``linear_int8``, ...).
It is the package ``qpass.kernels``; imported under any other name it registers nothing (below).
"""

import os
import sys
from importlib.machinery import ModuleSpec, PathFinder
from importlib.util import module_from_spec


def _spec_beyond_this_checkout(name: str) -> ModuleSpec | None:
    """Where ``import name`` would lead with this checkout's root taken off ``sys.path`` (None: nowhere)."""
    checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    return PathFinder.find_spec(name, path)


if __name__ == "qpass.kernels":
    from . import codebooks, compile_cache, ops  # noqa: F401  (importing ops registers torch.ops.qpass.*)

    compile_cache.tag_compile_caches()  # torch.compile's caches keyed by these op bodies (compile_cache)
    __all__ = ["codebooks", "compile_cache", "ops"]
elif __name__ == "kernels" and (_installed := _spec_beyond_this_checkout(__name__)) is not None:
    # This folder is also a top-level package named "kernels" wherever the repository root is on sys.path
    # (`python -m pytest` or a REPL in a checkout). That name is the Hugging Face package's, which
    # transformers >= 5.25 requires and imports (`from kernels import CUDAProperties, ...`): so this
    # module stands aside for the "kernels" installed further along sys.path. The import system returns
    # what sys.modules holds once this body has run, so `import kernels` gives that package.
    sys.modules[__name__] = module_from_spec(_installed)
    _installed.loader.exec_module(sys.modules[__name__])
else:
    # No other "kernels" is installed (or this folder was reached under another name): an empty package.
    # Importing ops from here would register every qpass op again, from a second copy of the module:
    # the op bodies would then read that copy's globals, so patching or configuring qpass.kernels.ops
    # (the tests do) would no longer reach them.
    __all__ = []
