"""Hugging Face ``Trainer`` adapter for actscope's training callbacks.

``trainer_callback(cb, ...)`` returns a ``transformers.TrainerCallback`` that attaches the
callbacks when training begins, calls ``cb.step()`` after every optimizer step and detaches them
when training ends (the model then has no actscope hook left). The Trainer computes the loss
itself, so a callback's penalty is *injected* as the extra gradient it would give
(:mod:`actscope.train.callbacks`), divided by ``gradient_accumulation_steps`` as the Trainer
divides its loss. fp16 training (a gradient scaler the injected gradient would bypass) is refused.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[actscope.train.hf.trainer_callback(actscope.train.prosparse(model))])

The Trainer does not call ``on_train_end`` when training raises; to have the hooks removed on
every exit path, also enter the callback yourself (``with ps: trainer.train()``): a callback
already attached is left to its ``with`` block. Evaluation passes (eval mode) are not counted
in the per-step activation ratios.
"""
from __future__ import annotations

from typing import Any

from ..errors import InputError
from .callbacks import Callback, iter_callbacks


def trainer_callback(*callbacks: Callback) -> Any:
    """A ``transformers.TrainerCallback`` driving ``callbacks`` (see the module docstring)."""
    from transformers import TrainerCallback

    chosen = list(iter_callbacks(callbacks))
    if not chosen:
        raise InputError("trainer_callback() needs at least one actscope.train callback, e.g. trainer_callback(prosparse(model))")

    class ActscopeCallbacks(TrainerCallback):
        """Attaches actscope training callbacks for the length of ``Trainer.train()``."""

        def __init__(self) -> None:
            self.callbacks = chosen
            self._started: list[Callback] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if getattr(args, "fp16", False):
                raise InputError("actscope training callbacks inject gradients that fp16's gradient scaler would not scale; "
                                 "train with bf16=True or in float32")
            for cb in self.callbacks:
                cb._inject, cb._inject_scale = True, 1.0 / max(int(args.gradient_accumulation_steps), 1)
                if not cb.active:
                    cb.start()
                    self._started.append(cb)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for cb in self.callbacks:
                cb.step()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:  # the Trainer's running training loss, when it logs
                self.callbacks[0].log.record(max(int(state.global_step) - 1, 0), "loss", float(logs["loss"]))

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            while self._started:
                self._started.pop().close()
            for cb in self.callbacks:
                cb._inject, cb._inject_scale = False, 1.0

    return ActscopeCallbacks()
