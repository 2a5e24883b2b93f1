"""neurox: foundation models of 4D brain fMRI ("large brain models")."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import neurox` stays cheap and a GPU node needs only torch for the models.
    if name in ("load_pretrained", "save_pretrained"):
        from neurox import hub

        return getattr(hub, name)
    if name == "SwiFT":
        from neurox.models import SwiFT

        return SwiFT
    if name in _COMMANDS:  # the commands, as functions: neurox.prepare(...), neurox.finetune(...)
        from neurox import api

        return getattr(api, name)
    raise AttributeError(f"module 'neurox' has no attribute {name!r}")


_COMMANDS = ("synth", "prepare", "finetune", "pretrain", "evaluate", "predict", "baseline", "connectivity",
             "explain", "embed", "probe", "demo", "convert_swift")

__all__ = ["__version__", "load_pretrained", "save_pretrained", "SwiFT", *_COMMANDS]
