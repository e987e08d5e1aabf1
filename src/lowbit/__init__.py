"""lowbit: make large language models small.

The Python API (`lowbit.api`): `lowbit.quantize`, `lowbit.load`, `lowbit.evaluate`, `lowbit.export`. They
are imported on first use, so `import lowbit` stays cheap for the command line.
"""

__version__ = "0.1.0"

_API = ("quantize", "load", "evaluate", "export", "Quantized")


def __getattr__(name: str):
    if name in _API:
        from lowbit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
