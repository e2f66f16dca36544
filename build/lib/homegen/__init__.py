"""homegen: a decoder-only transformer in JAX that writes whole Home pages.

From Python: `homegen.load(checkpoint)` returns a `PageModel` that generates and scores pages (see
homegen/api.py). The package's modules live in the repository's top-level folders, installed as
subpackages: `homegen.configs`, `homegen.data` (formats, vocabulary, pipeline; `homegen.data.simulator`,
the synthetic world), `homegen.model`, `homegen.training`, `homegen.serving` and `homegen.evaluation`.
"""

from __future__ import annotations

__all__ = ["PageModel", "load"]


def __getattr__(name: str):
    """`load` and `PageModel` on first use, so that importing a light subpackage does not load JAX."""
    if name in __all__:
        from homegen import api

        return getattr(api, name)
    raise AttributeError(f"module 'homegen' has no attribute {name!r}")
