"""Read a torch checkpoint that pickles a whole model, without the model's code and without running any.

`torch.load(path, pickle_module=restricted_pickle_module(path))` unpickles with an unpickler that
resolves only the globals a pickled `nn.Module` tree of tensors needs:

- classes of the model's own modules (`imagebind.*`, `torch.nn.modules.*`, `timm.*`, and
  `functools.partial`) become `PickledObject` stand-ins that keep their state and run nothing: no
  imagebind package is imported and no `__setstate__` of theirs is called;
- torch's tensor and parameter rebuilders, `torch.Size`, dtypes and devices, `collections.OrderedDict`,
  `set`/`frozenset`, numpy scalars and dtypes (never of object type) and the latin-1 byte decoding of
  protocol-2 pickles are resolved to the real objects, which build data only.

Any other global is refused with `UnsafePickleError` naming it, before anything of it runs. This is
Python's documented "restricting globals" defence, the same idea as torch's own `weights_only` loader,
which refuses a whole model outright.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
import types
from typing import Any

import numpy as np
import torch

STAND_IN_MODULES = ("imagebind.", "torch.nn.modules.", "timm.")
STAND_IN_GLOBALS = {("functools", "partial")}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allowed set."""


class PickledObject:
    """A stand-in for an instance of a class the pickle names: its class name and its state, nothing run."""

    source = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, {}

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.source}>"


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What `_codecs.encode` does in a protocol-2 pickle of bytes (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, encoding)


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"a numpy dtype of objects ({dtype})")
    return dtype


def _numpy_scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    if dtype.hasobject:
        raise UnsafePickleError(f"a numpy scalar of objects ({dtype})")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch import _utils

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_bytes,
        ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    }
    for name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[("torch._utils", name)] = getattr(_utils, name)
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "dtype")] = _plain_dtype
        allowed[(module, "scalar")] = _numpy_scalar
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals listed in this module's docstring."""

    source = "the pickle"
    _allowed = None
    _stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if module.startswith(STAND_IN_MODULES) or key in STAND_IN_GLOBALS:
            if key not in self._stand_ins:
                self._stand_ins[key] = type(name, (PickledObject,), {"source": f"{module}.{name}"})
            return self._stand_ins[key]
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafePickleError(f"{self.source} names the global {module}.{name}, which a pickled text tower does "
                                "not need; refusing to load it (only the model's module classes, tensors and plain "
                                "containers are read)")


def restricted_pickle_module(source: str) -> types.ModuleType:
    """A module torch.load accepts as `pickle_module`, whose unpickler names `source` in its refusals."""
    module = types.ModuleType("restricted_pickle")
    module.Unpickler = type("Unpickler", (RestrictedUnpickler,), {"source": source})
    module.load = lambda file, **kwargs: module.Unpickler(file, **kwargs).load()
    module.UnpicklingError = pickle.UnpicklingError
    return module


def module_tree(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, PickledObject]]:
    """(tensors by state-dict name, stand-ins by module path) of a pickled nn.Module tree or a state dict."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, PickledObject] = {}

    def visit(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
        elif isinstance(node, PickledObject):
            modules[path] = node
            state = node.state if isinstance(node.state, dict) else {}
            for group in ("_parameters", "_buffers"):
                for name, tensor in (state.get(group) or {}).items():
                    if tensor is not None:
                        tensors[f"{path}.{name}" if path else name] = tensor
            for name, child in (state.get("_modules") or {}).items():
                if child is not None:
                    visit(child, f"{path}.{name}" if path else name)
        elif isinstance(node, dict):
            for name, child in node.items():
                visit(child, f"{path}.{name}" if path else str(name))

    visit(obj, prefix)
    return tensors, modules
