"""qpass kernels: the ``torch.ops.qpass`` op definitions and their reference implementations.

Importing this package registers the ops (``torch.ops.qpass.linear_4bit``, ``linear_int8``, ...).
It is the package ``qpass.kernels``; imported under any other name it registers nothing (below).
"""

if __name__ == "qpass.kernels":
    from . import codebooks, compile_cache, ops  # noqa: F401  (importing ops registers torch.ops.qpass.*)

    compile_cache.tag_compile_caches()  # torch.compile's caches keyed by these op bodies (compile_cache)
    __all__ = ["codebooks", "compile_cache", "ops"]
else:
    # This folder is also a top-level package named "kernels" wherever the repository root is on
    # sys.path (`python -m pytest` there, a REPL in a checkout), and transformers imports "kernels" while
    # probing for the Hugging Face package of that name. Importing ops from here would register every
    # qpass op again, from a second copy of the module: the op bodies would then read that copy's globals,
    # so patching or configuring qpass.kernels.ops (the tests do) would no longer reach them.
    __all__ = []
