"""Which modules are layers for the structured methods: dense (``nn.Linear``,
Hugging Face ``Conv1D``), ``nn.Conv2d``; and the tracked layers a provider is
built with (``layers=[...]``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from . import conv as _conv
from . import linear as _linear
from .linear import param_layers

Params = dict[str, Tensor]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``transformers.pytorch_utils.Conv1D``
    (detected by class name and shape, without importing transformers): a dense
    layer ``y = x @ W + b`` with ``W`` ``(nx, nf)`` and ``b`` ``(nf,)``."""
    if type(module).__name__ != "Conv1D" or not isinstance(getattr(module, "nf", None), int):
        return False
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(weight, Tensor)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
        and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (module.nf,)))
    )


def hf_conv1d_param_layers(
    model: nn.Module, active: Params
) -> OrderedDict[str, tuple[nn.Module, str | None, str | None]]:
    """Hugging Face ``Conv1D`` layers holding parameters in ``active``, as
    :func:`~xinfluence.backends.torch.linear.linear_param_layers` gives ``nn.Linear``
    layers (tied layers left out)."""
    return param_layers(model, active, is_hf_conv1d)


def resolve_tracked_layers(
    model: nn.Module, layers: Sequence[str | type[nn.Module]], trainable: dict[str, Tensor]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(layer names, their trainable parameter names)`` of the tracked layers.

    ``layers`` holds module names (as ``model.named_modules()`` gives them,
    ``"root"`` for the model itself) and module types (every module of that type
    with a trainable parameter of its own). A tracked layer must be a dense
    layer (``nn.Linear``, Hugging Face ``Conv1D``) or a supported ``nn.Conv2d``
    (``groups=1``, zero padding) with a trainable weight that no other module
    shares.

    Raises:
        ValueError: an unknown name, a type that matches no layer, no layers, or
            tracked layers of an unsupported kind (named, with their types).
        TypeError: an entry that is neither a name nor an ``nn.Module`` type.
    """
    if isinstance(layers, (str, type)):
        layers = [layers]
    modules = {name or "root": m for name, m in model.named_modules()}
    chosen: list[str] = []
    for spec in layers:
        if isinstance(spec, str):
            if spec not in modules:
                raise ValueError(
                    f"tracked layer {spec!r} is not a module of the model; modules: "
                    f"{list(modules)[:20]}{' ...' if len(modules) > 20 else ''}"
                )
            found = [spec]
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            found = [
                k
                for k, m in modules.items()
                if isinstance(m, spec)
                and any(p is not None and p.requires_grad for p in m._parameters.values())
            ]
            if not found:
                raise ValueError(f"no module of type {spec.__name__} with trainable parameters")
        else:
            raise TypeError(f"layers holds module names (str) and nn.Module types, got {spec!r}")
        chosen.extend(k for k in found if k not in chosen)
    if not chosen:
        raise ValueError("layers names no layer to track")
    supported: dict[str, tuple[nn.Module, str | None, str | None]] = {
        **_linear.linear_param_layers(model, trainable),
        **hf_conv1d_param_layers(model, trainable),
        **_conv.conv_param_layers(model, trainable),
    }
    bad = [k for k in chosen if k not in supported or supported[k][1] is None]
    if bad:
        dense_or_conv = (nn.Linear, nn.Conv2d)

        def why(m: nn.Module) -> str:
            if isinstance(m, dense_or_conv) or is_hf_conv1d(m):
                return f"{type(m).__name__}: frozen, tied or unsupported options"
            return type(m).__name__

        kinds = ", ".join(f"{k!r} ({why(modules[k])})" for k in bad)
        raise ValueError(
            f"tracked layers must be dense layers (nn.Linear, Hugging Face Conv1D) or "
            f"nn.Conv2d layers (groups=1, zero padding) with a trainable weight that no "
            f"other module shares; unsupported: {kinds}"
        )
    keep = {n for k in chosen for n in supported[k][1:] if n is not None}
    return tuple(chosen), tuple(n for n in trainable if n in keep)
