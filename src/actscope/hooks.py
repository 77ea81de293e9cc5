"""The one hook registry: every hook, forward swap and temporary switch actscope puts on a model
goes through :func:`hooks`, a context that undoes all of them, last first, on every exit path
(normal exit, exception, KeyboardInterrupt, nested contexts). Observing (the tracer), editing
(``edit``, ``replace_activation``, ``experts``), sparse execution and the measurements all
register here, so "every hook is removed" is proven once, for this class.

Hooks are PyTorch's handle-returning forward hooks and pre-hooks; nothing else about a module is
changed, with one exception: sparse execution's point is not to run the dense MLP, so it sets
``forward`` on the MLP's module instance (:meth:`Hooks.swap_forward`), restored exactly on exit
(an instance attribute someone else set, or nothing, the class's method). Such a forward carries
a mark (attribute :data:`SWAP_MARK`: which of the module's own hook points still see the dense
model's tensors, and what to tell the user). A hook below a swapped forward would never fire, or
see the wrong tensor, so registering one is refused here, for every caller at once.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch

from .errors import SiteError

SWAP_MARK = "actscope_swap"
_active_swaps = 0  # swapped forwards alive in this process: the reachability check runs only then


class Hooks:
    """What a :func:`hooks` context hands out: ways to attach to the model under ``root``."""

    def __init__(self, root: torch.nn.Module, stack: ExitStack) -> None:
        self.root = root
        self._stack = stack
        self._names: dict[int, str] | None = None

    def before(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False,
               name: str | None = None) -> None:
        """A forward pre-hook on ``module`` (it sees, and may replace, the module's input)."""
        self._check_reachable(module, "input", name)
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self._stack.callback(handle.remove)

    def after(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False,
              name: str | None = None) -> None:
        """A forward hook on ``module`` (it sees, and may replace, the module's output)."""
        self._check_reachable(module, "output", name)
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs, prepend=prepend)
        self._stack.callback(handle.remove)

    def swap_forward(self, module: torch.nn.Module, forward: Callable) -> None:
        """Set ``module.forward`` until the context exits, then restore exactly what was there."""
        global _active_swaps
        had, old = "forward" in module.__dict__, module.__dict__.get("forward")

        def restore() -> None:
            global _active_swaps
            if had:
                module.forward = old
            else:
                del module.forward
            _active_swaps -= 1

        module.forward = forward
        _active_swaps += 1
        self._stack.callback(restore)

    def enter(self, context: AbstractContextManager) -> Any:
        """Enter another context (a temporary switch such as eager attention) for as long as this one."""
        return self._stack.enter_context(context)

    def path(self, module: torch.nn.Module) -> str:
        """``module``'s path under the root (``""`` for the root itself)."""
        if self._names is None:
            self._names = {id(m): name for name, m in self.root.named_modules()}
        return self._names.get(id(module), type(module).__name__)

    def _check_reachable(self, module: torch.nn.Module, at: str, name: str | None) -> None:
        if not _active_swaps:
            return
        path = self.path(module)
        mark = hidden_by_swap(self.root, path, at)
        if mark is not None:
            raise SiteError(f"cannot {name or f'hook {path}@{at}'} {mark.explain}")


@contextmanager
def hooks(root: torch.nn.Module) -> Iterator[Hooks]:
    """A registry for hooks on ``root`` and its modules, all removed when the block exits."""
    with ExitStack() as stack:
        yield Hooks(root, stack)


def swap_mark(module: torch.nn.Module) -> Any:
    """The mark of the forward actscope swapped in on ``module`` itself, or None."""
    return getattr(module.__dict__.get("forward"), SWAP_MARK, None)


def hidden_by_swap(root: torch.nn.Module, path: str, at: str) -> Any:
    """The mark of a swapped forward that a hook at ``path``'s ``at`` would miss or misread: one
    on a module above ``path`` (it never calls ``path``), or on ``path`` itself when ``at`` is
    not among the points it keeps; None when the hook sees the model's own tensors."""
    chain = [root]
    for part in path.split(".") if path else []:
        chain.append(chain[-1].get_submodule(part))
    for depth, module in enumerate(chain):
        mark = swap_mark(module)
        if mark is not None and (depth < len(chain) - 1 or at not in mark.keeps):
            return mark
    return None

