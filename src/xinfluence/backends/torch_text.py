"""Language models with the torch provider: sequence losses, queries, Hugging Face.

A causal language model maps token ids ``(N, T)`` to logits ``(N, T, V)``; the
logits at position ``s`` predict the token at ``s + 1``. Labels are aligned with
the inputs, as in Hugging Face ``transformers``: ``labels[i, s]`` is the token
that position ``s - 1`` must predict, and ``-100`` masks a position out of the
loss (padding, or the prompt of a query). The first position is never predicted.

* :class:`CausalLMLoss` is the per-sample loss ``loss(logits, labels)`` for
  :class:`~xinfluence.backends.torch.TorchGradientProvider`: the token
  cross-entropy of one sequence, summed (``reduction="sum"``) or averaged
  (``"mean"``) over its counted positions; on a batch, the mean over sequences.
* :func:`prompt_completion` builds a query ``(input_ids, labels)`` whose loss
  counts the completion's tokens only; :func:`causal_lm_labels` the labels of
  training sequences (every real token counted, padding masked).
* :class:`CausalLMLogits` wraps a Hugging Face causal LM
  (``GPT2LMHeadModel``, ...) into a module returning the logits tensor.

How ``I / n`` reads for sequences: a training *sample* is one sequence. With
``n`` training sequences, ``H`` is the Hessian of the mean over sequences of
the per-sequence loss, and removing training sequence ``j`` changes the query's
loss by about ``I[t, j] / n``, where the query's loss is the sum of its counted
token losses (``reduction="sum"``: the negative log-likelihood of the whole
completion) or their average (``"mean"``: nats per completion token). The
reduction of the training loss sets ``H`` and ``g_j`` (the sequence's summed
or averaged token losses); use the reduction the model was trained with for
the training side, and either for the query.

Importing :mod:`xinfluence` does not import this module; importing it imports
torch, not ``transformers`` (install the ``text`` extra for Hugging Face models).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "CausalLMLogits",
    "CausalLMLoss",
    "causal_lm_labels",
    "causal_lm_logits",
    "encode_bytes",
    "prompt_completion",
]

IGNORE_INDEX = -100
"""The label of positions left out of the loss (Hugging Face's convention)."""

_REDUCTIONS = ("mean", "sum")


class CausalLMLoss:
    """Next-token cross-entropy of a causal LM, per sequence, as a provider's loss.

    ``loss(logits, labels)`` with ``logits`` ``(N, T, V)`` and integer ``labels``
    ``(N, T)`` (aligned with the inputs; ``ignore_index`` masks a position).
    With ``c_is = 1[labels[i, s] != ignore_index]`` for ``s >= 1`` and the token
    losses ``e_is = -log softmax(logits[i, s - 1])[labels[i, s]]``, the loss of
    sequence ``i`` is

    * ``"sum"``:  ``l_i = sum_s c_is e_is`` (the negative log-likelihood of its
      counted tokens);
    * ``"mean"``: ``l_i = sum_s c_is e_is / max(1, sum_s c_is)`` (per token).

    The call returns ``mean_i l_i`` (mean reduction over sequences, as the
    provider expects: on one sequence it is that sequence's loss). A sequence
    with no counted token has loss 0. Note that ``"mean"`` weighs every
    sequence equally, unlike Hugging Face's training loss, which averages over
    all the counted tokens of a batch.

    Instances are picklable (dask ships them). The computation has no
    data-dependent control flow, so ``torch.func.vmap`` and higher derivatives
    apply.
    """

    def __init__(self, reduction: str = "mean", *, ignore_index: int = IGNORE_INDEX):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return f"CausalLMLoss(reduction={self.reduction!r}, ignore_index={self.ignore_index})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CausalLMLoss)
            and other.reduction == self.reduction
            and other.ignore_index == self.ignore_index
        )

    def __hash__(self) -> int:
        return hash((CausalLMLoss, self.reduction, self.ignore_index))

    def per_sequence(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The losses ``l_i`` ``(N,)``."""
        if not isinstance(logits, Tensor) or logits.ndim != 3:
            raise ValueError(
                "CausalLMLoss expects logits of shape (N, T, V), got "
                f"{_shape(logits)}; for a Hugging Face model wrap it in CausalLMLogits "
                "or pass output_fn=causal_lm_logits to the provider"
            )
        if not isinstance(labels, Tensor) or labels.ndim != 2:
            raise ValueError(f"CausalLMLoss expects labels of shape (N, T), got {_shape(labels)}")
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}: "
                "expected labels of shape (N, T) for logits (N, T, V)"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integer token ids, got {labels.dtype}")
        target = labels[:, 1:]
        counted = target != self.ignore_index
        safe = torch.where(counted, target, torch.zeros_like(target))
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -torch.gather(logp, -1, safe.unsqueeze(-1)).squeeze(-1)  # (N, T - 1)
        weights = counted.to(nll.dtype)
        total = (nll * weights).sum(dim=-1)
        if self.reduction == "sum":
            return total
        return total / weights.sum(dim=-1).clamp(min=1.0)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.per_sequence(logits, labels).mean()


def _shape(a: Any) -> str:
    return str(tuple(a.shape)) if hasattr(a, "shape") else type(a).__name__


# -- token sequences ------------------------------------------------------------
Tokens: TypeAlias = str | bytes | Sequence[int] | Tensor


def encode_bytes(text: str | bytes) -> list[int]:
    """Byte-level tokens (vocabulary 256): the UTF-8 bytes of ``text``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return list(data)


def _tokens(t: Tokens, what: str) -> list[int]:
    if isinstance(t, (str, bytes)):
        return encode_bytes(t)
    if isinstance(t, Tensor):
        if t.ndim != 1 or t.is_floating_point():
            raise ValueError(f"{what} must be a 1-D integer tensor, got {t.dtype} {_shape(t)}")
        return [int(v) for v in t.tolist()]
    out = [int(v) for v in t]
    return out


def prompt_completion(
    prompts: Sequence[Tokens] | Tokens,
    completions: Sequence[Tokens] | Tokens,
    *,
    length: int | None = None,
    pad_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Queries whose loss counts the completion's tokens only.

    Each query is ``prompt + completion``, right-padded with ``pad_id`` to
    ``length`` (default: the longest query). Strings and bytes are byte-level
    tokens (:func:`encode_bytes`); otherwise give token ids (a list of ints, or
    a 1-D tensor, is one query).

    Returns ``(input_ids, labels)``, int64 ``(Q, length)``: ``labels`` equals
    ``input_ids`` on the completion's positions and is ``ignore_index`` on the
    prompt and the padding. With :class:`CausalLMLoss` the query's loss is the
    completion's negative log-likelihood given the prompt (``"sum"``) or its
    average per completion token (``"mean"``). A single prompt and completion
    give ``Q = 1``. Right padding changes nothing before it in a causal model.
    """
    single = (
        isinstance(prompts, (str, bytes))
        or (isinstance(prompts, Tensor) and prompts.ndim == 1)
        or (isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int))
    )
    p_list: list[Any] = [prompts] if single else list(prompts)  # type: ignore[arg-type]
    c_list: list[Any] = [completions] if single else list(completions)  # type: ignore[arg-type]
    ps = [_tokens(p, "a prompt") for p in p_list]
    cs = [_tokens(c, "a completion") for c in c_list]
    if len(ps) != len(cs):
        raise ValueError(f"got {len(ps)} prompts and {len(cs)} completions; expected as many")
    for i, (p, c) in enumerate(zip(ps, cs)):
        if not p:
            raise ValueError(
                f"query {i} has an empty prompt: a causal LM never predicts the first "
                "token, so the prompt needs at least one token"
            )
        if not c:
            raise ValueError(f"query {i} has an empty completion: nothing to score")
    longest = max((len(p) + len(c) for p, c in zip(ps, cs)), default=0)
    size = longest if length is None else int(length)
    if size < longest:
        raise ValueError(f"length={size} is shorter than the longest query ({longest} tokens)")
    ids = torch.full((len(ps), size), int(pad_id), dtype=torch.int64)
    labels = torch.full((len(ps), size), int(ignore_index), dtype=torch.int64)
    for i, (p, c) in enumerate(zip(ps, cs)):
        seq = torch.tensor(p + c, dtype=torch.int64)
        ids[i, : seq.numel()] = seq
        labels[i, len(p) : seq.numel()] = seq[len(p) :]
    return ids, labels


def causal_lm_labels(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Labels of training sequences ``(N, T)``: every token counted, except where
    ``attention_mask`` is 0 (padding), which becomes ``ignore_index``."""
    if input_ids.ndim != 2:
        raise ValueError(f"expected input_ids of shape (N, T), got {_shape(input_ids)}")
    labels = input_ids.clone().to(torch.int64)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask {_shape(attention_mask)} does not match input_ids "
                f"{_shape(input_ids)}"
            )
        labels[attention_mask == 0] = ignore_index
    return labels


# -- Hugging Face ---------------------------------------------------------------
def causal_lm_logits(output: Any) -> Tensor:
    """``output_fn`` for Hugging Face models: the ``logits`` of a model output (or
    the first element of a tuple). Picklable, unlike a lambda."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"expected a model output with logits, got {type(output).__name__}")
    return logits


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as a module mapping token ids ``(N, T)`` to logits
    ``(N, T, V)``, ready for :class:`~xinfluence.backends.torch.TorchGradientProvider`.

    The wrapped model is put in eval mode (dropout off), runs without its
    key-value cache, and uses the ``attention`` implementation (default
    ``"eager"``: plain matrix products, which every ``torch.func`` transform
    differentiates; the provider also runs scaled-dot-product attention on
    torch's math kernel). Parameter names gain the prefix ``"model."``
    (``model.transformer.h.0.mlp.c_fc.weight``); to keep the model's own names,
    give the provider the model itself with ``output_fn=causal_lm_logits``.

    Build the provider with ``cast_inputs=False`` (token ids stay integers)::

        lm = CausalLMLogits(GPT2LMHeadModel(config))
        gp = TorchGradientProvider(lm, CausalLMLoss("sum"), cast_inputs=False)
    """

    def __init__(self, model: nn.Module, *, attention: str | None = "eager"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if attention is not None:
            setter = getattr(model, "set_attn_implementation", None)
            if callable(setter):
                setter(attention)
            elif hasattr(model, "config"):
                config: Any = model.config
                config._attn_implementation = attention
        self.model = model
        self.eval()

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, use_cache=False, return_dict=True)
        return causal_lm_logits(out)
