"""Shape-annotated signatures at the model's public face, checked where asked.

The model's call, the losses and generation's decode loop carry jaxtyping annotations
in the dimension alphabet (`Int[Array, "B T"]`). `checked` makes them run-time checks
(beartype through jaxtyping, one B, T, ... per call) when LLAMA_JAX_TYPECHECK=1, as the
tests set it; otherwise it returns the function untouched, so a jitted step pays
nothing (the checks would run at trace time only anyway).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jaxtyping import Float, Int, Shaped, jaxtyped

# Token ids and masks may come as host arrays outside jit.
Ids = jax.Array | np.ndarray

__all__ = ["Float", "Ids", "Int", "Shaped", "checked"]


def checked(fn):
    """`fn` with its annotations checked when LLAMA_JAX_TYPECHECK=1, else `fn`."""
    if os.environ.get("LLAMA_JAX_TYPECHECK", "") in ("", "0"):
        return fn
    from beartype import BeartypeConf, beartype

    # PEP 484's numeric tower: an int is a float where a float is asked for.
    return jaxtyped(typechecker=beartype(conf=BeartypeConf(is_pep484_tower=True)))(fn)
