"""homegen: a decoder-only transformer in JAX that writes whole Home pages.

From Python: `homegen.load(checkpoint)` returns a `PageModel` that generates and scores pages;
`homegen.config(name or run)` and `homegen.train(config, workdir, init_from=...)` train and fine-tune (see
homegen/api.py). The package's modules live in the repository's top-level folders, installed as
subpackages: `homegen.configs`, `homegen.data` (formats, vocabulary, pipeline; `homegen.data.simulator`,
the synthetic world), `homegen.model`, `homegen.training`, `homegen.serving` and `homegen.evaluation`.
"""

from __future__ import annotations

__all__ = ["PageModel", "config", "load", "train"]


def __getattr__(name: str):
    """`load`, `config`, `train` and `PageModel` on first use, so that importing a light subpackage does not load JAX."""
    if name in __all__:
        from homegen import api

        return getattr(api, name)
    raise AttributeError(f"module 'homegen' has no attribute {name!r}")
