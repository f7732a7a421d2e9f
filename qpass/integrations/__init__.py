"""Integrations with other libraries and offline model packages."""

import sys


def register_with_transformers_on_import() -> None:
    """Register qpass' quantizer and config with transformers (``integrations.transformers.register``) as
    soon as transformers' model loading (``transformers.modeling_utils``) has been imported, or now if it
    has: ``AutoModelForCausalLM.from_pretrained`` then reads qpass checkpoints after a plain ``import
    qpass``, in either import order, and ``import qpass`` does not import transformers itself.
    wrapt's post-import hooks do the watching; without wrapt (qpass installed without its ``hf`` extra)
    nothing is registered until a ``QPassConfig`` is handed to transformers."""
    try:
        import wrapt
    except ImportError:
        return

    def on_transformers_import(module) -> None:
        # Runs inside the user's import of transformers: a transformers qpass cannot work with must
        # still import, without qpass in it.
        try:
            from .transformers import register

            register()
        except Exception as err:  # noqa: BLE001
            import warnings

            version = getattr(sys.modules.get("transformers"), "__version__", "?")
            warnings.warn(f"qpass could not register with transformers {version} ({type(err).__name__}: {err}); "
                          "transformers works without qpass, and qpass.from_pretrained still loads qpass checkpoints",
                          stacklevel=2)

    wrapt.register_post_import_hook(on_transformers_import, "transformers.modeling_utils")
