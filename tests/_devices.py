"""An emulated accelerator for CPU-only tests: catch device mixing the way CUDA does, with real values.

On a GPU, TRL puts everything it builds on ``accelerator.device`` (rewards, ids, masks, the model's
outputs) while scikit-learn, numpy and ``torch.tensor(list)`` give CPU tensors; an op that mixes the two
raises ``Expected all tensors to be on the same device``. A CPU-only test never sees that. PyTorch's
``meta`` device raises the same way but holds no values, so value-dependent code (K-Means, ``.item()``)
cannot run on it. :class:`SecondDevice` keeps the values on the CPU and tracks placement instead:

* a tensor is "on the accelerator" when it is an :class:`OnAccelerator` (a CPU tensor tagged as being on
  ``ACCELERATOR``) or shares storage with a module handed to :meth:`SecondDevice.place` (the policy,
  the reference copy: on a GPU they live on the accelerator);
* its ``.device`` reports ``ACCELERATOR``; factory functions and ``.to()`` with that device give tagged
  tensors; ``.cpu()`` / ``.to("cpu")`` give plain (copied) ones; ``.numpy()`` raises, as on CUDA;
* an op that mixes an accelerator tensor with a plain CPU tensor of one or more dimensions raises
  CUDA's error. The exceptions are those CUDA makes: CPU scalars (0-d tensors), CPU index tensors for
  an accelerator tensor, cross-device ``copy_`` and slice assignment, ``new_tensor``.

``ACCELERATOR`` is labelled ``privateuseone:0``, PyTorch's name for an out-of-tree accelerator: no
library takes a special path for it (a ``cuda`` label would send TRL to its Triton kernels, and
``meta`` is rejected by the autocast queries TRL's chunked log-prob makes), and a tensor that escapes
the emulation onto it fails loudly instead of computing silently.

Usage (see tests/test_devices.py)::

    with SecondDevice() as device:
        device.place(trainer.model)
        device.use_for(trainer.accelerator)
        output = trainer._generate_and_score_completions(inputs)
    assert device.is_on_accelerator(output["advantages"])
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils._pytree import tree_map as _tree_map

ACCELERATOR = torch.device("privateuseone", 0)


class DeviceMixingError(RuntimeError):
    """What CUDA raises for an op over tensors on two devices."""


class OnAccelerator(torch.Tensor):
    """A CPU tensor that :class:`SecondDevice` treats as living on ``ACCELERATOR``."""


def tree_map(fn, tree):
    """``tree_map`` that leaves ``torch.Size`` alone (pytree would turn it into a plain tuple)."""
    return _tree_map(fn, tree, is_leaf=lambda value: isinstance(value, torch.Size))


def _plain(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, OnAccelerator) else value


def _is_accelerator(device) -> bool:
    return device is not None and torch.device(device).type == ACCELERATOR.type


_DEVICE_GETTER = torch.Tensor.device.__get__
_IS_CPU_GETTER = torch.Tensor.is_cpu.__get__
_TO_CPU = {torch.Tensor.cpu}
_TO_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
_CROSS_DEVICE_OK = {torch.Tensor.copy_, torch.Tensor.new_tensor}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


class SecondDevice(TorchFunctionMode):
    """A ``TorchFunctionMode`` emulating an accelerator beside the CPU (module docstring)."""

    def __init__(self):
        super().__init__()
        self._resident: set[int] = set()  # storage pointers of placed modules' parameters and buffers
        self._patched: list[tuple[object, type]] = []

    # ---- setting up ------------------------------------------------------------------------------------

    def place(self, *modules: torch.nn.Module) -> None:
        """Treat these modules' weights as living on the accelerator (``model.to(accelerator.device)``)."""
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                pointer = tensor.untyped_storage().data_ptr()
                if pointer:
                    self._resident.add(pointer)

    def use_for(self, accelerator) -> None:
        """Make ``accelerator.device`` report ``ACCELERATOR`` until the mode exits."""
        original = type(accelerator)
        accelerator.__class__ = type(f"{original.__name__}OnSecondDevice", (original,),
                                     {"device": property(lambda self: ACCELERATOR)})
        self._patched.append((accelerator, original))

    def __exit__(self, *exc):
        for accelerator, original in reversed(self._patched):
            accelerator.__class__ = original
        self._patched.clear()
        return super().__exit__(*exc)

    # ---- placement -------------------------------------------------------------------------------------

    def is_on_accelerator(self, tensor: torch.Tensor) -> bool:
        if isinstance(tensor, OnAccelerator):
            return True
        if not self._resident or tensor.is_sparse or tensor.device.type != "cpu":
            return False
        pointer = tensor.untyped_storage().data_ptr()
        return bool(pointer) and pointer in self._resident

    def _device_of(self, tensor: torch.Tensor) -> torch.device:
        return ACCELERATOR if self.is_on_accelerator(tensor) else tensor.device

    @staticmethod
    def _tag(result):
        def tag(value):
            if isinstance(value, torch.Tensor) and not isinstance(value, OnAccelerator):
                return value.as_subclass(OnAccelerator)
            return value

        return tree_map(tag, result)

    # ---- dispatch --------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GETTER:
            return self._device_of(args[0])
        if func == _IS_CPU_GETTER:
            return not self.is_on_accelerator(args[0]) and func(*args)
        if func in _TO_NUMPY and self.is_on_accelerator(args[0]):
            raise TypeError(f"can't convert {ACCELERATOR} device type tensor to numpy. Use Tensor.cpu() to copy "
                            "the tensor to host memory first.")
        if func in _TO_CPU:
            source = args[0]
            return _plain(source).clone() if self.is_on_accelerator(source) else func(*args, **kwargs)
        if func is torch.Tensor.to:
            return self._to(args[0], *args[1:], **kwargs)
        if "device" in kwargs:  # factories (torch.full, torch.tensor, zeros_like, ...): placed where asked
            if _is_accelerator(kwargs["device"]):
                kwargs = {**kwargs, "device": "cpu"}
                return self._tag(func(*tree_map(_plain, args), **tree_map(_plain, kwargs)))
            return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))

        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        on_accelerator = [self.is_on_accelerator(t) for t in tensors]
        if not any(on_accelerator):
            return func(*args, **kwargs)
        self._check_one_device(func, args, kwargs)
        result = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        if func.__name__.endswith("_") and not func.__name__.endswith("__") and args:
            return args[0]  # in-place: the very tensor it was called on
        return self._tag(result)

    def _to(self, source: torch.Tensor, *args, **kwargs):
        if args and isinstance(args[0], torch.Tensor):  # .to(other): other's device and dtype
            other = args[0]
            target, dtype = self._device_of(other), other.dtype
            args, kwargs = args[1:], {**kwargs, "dtype": dtype}
        else:
            target = kwargs.pop("device", None)
            if args and not isinstance(args[0], torch.dtype):
                target, args = args[0], args[1:]
        plain_source = _plain(source)
        if target is None:
            result = plain_source.to(*args, **kwargs)
            return self._tag(result) if self.is_on_accelerator(source) else result
        if _is_accelerator(target):
            if self.is_on_accelerator(source):
                result = plain_source.to(*args, **kwargs)
                return source if result is plain_source else self._tag(result)
            return self._tag(plain_source.to(*args, **kwargs).clone())  # a transfer copies
        if self.is_on_accelerator(source):
            return plain_source.to(*args, **kwargs).to(target).clone()
        return plain_source.to(target, *args, **kwargs)

    def _check_one_device(self, func, args, kwargs) -> None:
        if func in _CROSS_DEVICE_OK:
            return
        if func in _INDEXING:
            self_tensor, index = args[0], args[1]
            index_tensors = [v for v in tree_flatten(index)[0] if isinstance(v, torch.Tensor)]
            if not self.is_on_accelerator(self_tensor) and any(map(self.is_on_accelerator, index_tensors)):
                raise DeviceMixingError(
                    f"indices should be either on cpu or on the same device as the indexed tensor (cpu), got "
                    f"{ACCELERATOR}"
                )
            if func is torch.Tensor.__setitem__ and index_tensors:  # advanced indexing: index_put_
                value = args[2]
                if isinstance(value, torch.Tensor) and value.dim() > 0 and (
                    self.is_on_accelerator(value) != self.is_on_accelerator(self_tensor)
                ):
                    self._raise(func)
            return
        devices = set()
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and not (value.dim() == 0 and not self.is_on_accelerator(value)):
                devices.add(self._device_of(value).type)
        if len(devices) > 1:
            self._raise(func)

    @staticmethod
    def _raise(func):
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        raise DeviceMixingError(
            f"Expected all tensors to be on the same device, but found at least two devices, {ACCELERATOR} and cpu! "
            f"(in {name})"
        )
