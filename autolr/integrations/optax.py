"""JAX / optax: the control file's scale as a hyperparameter of the optimizer state.

A jitted update cannot read a file, so the value goes in through the state: an
``optax.inject_hyperparams`` slot, set from the host before each step with a pure function
that returns a new state (same dtype and shape, so the jitted step is not retraced). Two ways:

* ``scaled(tx)``: your transformation, unchanged (its LR a float or any optax schedule),
  followed by an injected multiplier. The update is ``tx``'s update × scale, which is
  ``LR × scale`` for every optimizer whose LR is its last factor: all of optax's usual ones
  (``sgd`` with or without momentum, ``adam``, ``adamw`` with its decay, ``lion``, ``rmsprop``).
  Your schedule and autolr's scale compose by multiplication, as in the PyTorch integration::

      tx = autolr_optax.scaled(optax.adamw(optax.warmup_cosine_decay_schedule(0, 1e-3, 100, 10_000)))
      opt_state = tx.init(params)
      control = autolr.Control("runs/exp1")
      for step, batch in enumerate(batches):
          opt_state = autolr_optax.apply_control(opt_state, control, step)
          params, opt_state, loss = train_step(params, opt_state, batch)   # jitted, unchanged

* the LR hyperparameter itself, for ``optax.inject_hyperparams(opt)(learning_rate=<float>)``:
  ``apply_control(opt_state, control, step, base_lr=schedule_or_float)`` sets
  ``learning_rate = base_lr(step) × scale``. Exact for any optimizer. A *schedule* given to
  ``inject_hyperparams`` itself is re-evaluated inside every update and overwrites what is set
  from outside: pass your schedule as ``base_lr`` here instead, or use ``scaled``.

``step`` is your optimizer step (the clock of ``apply_at_step``): pass the count of updates
applied so far, which a resumed job restores with its checkpoint. Only the control file's
``scale`` is used; its absolute ``lr`` is not.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["SCALE", "scaled", "set_scale", "set_hyperparam", "set_lr", "apply_control", "get_hyperparam"]

#: The name of the injected multiplier added by ``scaled``.
SCALE = "autolr_scale"


def _multiplier(autolr_scale: float) -> optax.GradientTransformation:
    return optax.scale(autolr_scale)


def scaled(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` followed by a multiplier held in the state (1.0 until ``set_scale``)."""
    return optax.chain(tx, optax.inject_hyperparams(_multiplier)(autolr_scale=1.0))


def _has_hyperparams(node: Any) -> bool:
    return isinstance(getattr(node, "hyperparams", None), dict) and hasattr(node, "_replace")


def set_hyperparam(opt_state: Any, name: str, value: float) -> Any:
    """A new state with ``hyperparams[name] = value`` in every injected state that has ``name``.

    The value keeps the old one's dtype and shape, so a jitted step is not recompiled. Raises
    KeyError when no ``inject_hyperparams`` state in ``opt_state`` has ``name``.
    """
    found = False

    def replace(node: Any) -> Any:
        nonlocal found
        if not _has_hyperparams(node) or name not in node.hyperparams:
            return node
        found = True
        old = node.hyperparams[name]
        new = jnp.asarray(value, dtype=getattr(old, "dtype", None))
        return node._replace(hyperparams={**node.hyperparams, name: new})

    out = jax.tree_util.tree_map(replace, opt_state, is_leaf=_has_hyperparams)
    if not found:
        raise KeyError(f"no optax.inject_hyperparams state with a {name!r} hyperparameter in this "
                       f"optimizer state (use autolr.integrations.optax.scaled(tx), or "
                       f"optax.inject_hyperparams(opt)({name}=...))")
    return out


def get_hyperparam(opt_state: Any, name: str) -> float:
    """The value of the first injected hyperparameter ``name`` (a host float)."""
    nodes = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_has_hyperparams)
             if _has_hyperparams(n) and name in n.hyperparams]
    if not nodes:
        raise KeyError(f"no injected hyperparameter {name!r} in this optimizer state")
    return float(nodes[0].hyperparams[name])


def set_scale(opt_state: Any, scale: float) -> Any:
    """A new state whose ``scaled`` multiplier is ``scale``."""
    return set_hyperparam(opt_state, SCALE, scale)


def set_lr(opt_state: Any, lr: float, name: str = "learning_rate") -> Any:
    """A new state with the injected LR ``name`` set to ``lr`` (``inject_hyperparams`` states)."""
    return set_hyperparam(opt_state, name, lr)


def apply_control(opt_state: Any, control: Any, step: int, *,
                  base_lr: float | Callable[[int], Any] | None = None, name: str = "learning_rate") -> Any:
    """A new state carrying the control file's decision in force at optimizer ``step``.

    ``control``: an ``autolr.Control`` (anything with ``scale(step=)``), created once and kept.
    Without ``base_lr``: sets the multiplier of a ``scaled`` state to ``scale``. With it (a
    float or an optax schedule, evaluated at ``step``): sets the injected LR ``name`` to
    ``base_lr × scale``. Call it outside ``jit``, before the step.
    """
    scale = control.scale(step=int(step))
    if base_lr is None:
        return set_scale(opt_state, scale)
    base = base_lr(step) if callable(base_lr) else base_lr
    return set_lr(opt_state, float(base) * scale, name)
