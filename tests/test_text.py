"""Language models through the torch provider: the sequence loss, queries with a
masked prompt, and a Hugging Face GPT-2 (built from a config, no download) against
a dense reference built here with plain autograd.

torch-specific: these run whatever ``XINFLUENCE_BACKEND`` is; the GPT-2 tests skip
where ``transformers`` (the ``text`` extra) is not installed.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import xinfluence as xi  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.backends.torch_text import (  # noqa: E402
    CausalLMLogits,
    CausalLMLoss,
    causal_lm_labels,
    causal_lm_logits,
    prompt_completion,
)

F = torch.nn.functional


# -- the loss --------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_causal_lm_loss_against_a_loop_of_cross_entropy(reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, 1:] = -100  # nothing counted: loss 0
    got = CausalLMLoss(reduction).per_sequence(logits, labels)
    for i in range(3):
        counted = [s for s in range(1, 7) if labels[i, s] >= 0]
        terms = [F.cross_entropy(logits[i, s - 1], labels[i, s]) for s in counted]
        total = torch.stack(terms).sum() if terms else torch.tensor(0.0, dtype=torch.float64)
        want = total / max(1, len(terms)) if reduction == "mean" else total
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(CausalLMLoss(reduction)(logits, labels), got.mean())


def test_causal_lm_loss_errors_and_pickle():
    loss = CausalLMLoss("sum")
    assert pickle.loads(pickle.dumps(loss)) == loss
    with pytest.raises(ValueError, match="reduction"):
        CausalLMLoss("none")
    with pytest.raises(ValueError, match=r"\(N, T, V\)"):
        loss(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not match"):
        loss(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        loss(torch.zeros(2, 5, 3), torch.zeros(2, 5))


def test_prompt_completion_masks_the_prompt_and_the_padding():
    ids, labels = prompt_completion(["ab", "x"], ["cd", "yz!"], length=6, pad_id=7)
    assert ids.tolist() == [[97, 98, 99, 100, 7, 7], [120, 121, 122, 33, 7, 7]]
    assert labels.tolist() == [[-100, -100, 99, 100, -100, -100], [-100, 121, 122, 33, -100, -100]]
    one_ids, one_labels = prompt_completion([1, 2], [3])
    assert one_ids.tolist() == [[1, 2, 3]] and one_labels.tolist() == [[-100, -100, 3]]
    with pytest.raises(ValueError, match="empty prompt"):
        prompt_completion([""], ["a"])
    with pytest.raises(ValueError, match="shorter"):
        prompt_completion(["abc"], ["d"], length=3)
    mask = torch.tensor([[1, 1, 0]])
    assert causal_lm_labels(torch.tensor([[5, 6, 0]]), mask).tolist() == [[5, 6, -100]]


# -- Hugging Face GPT-2 -------------------------------------------------------------
def _gpt2(dtype, n_embd=8, seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=256,
        n_embd=n_embd,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).to(dtype)


MLP = [
    f"model.transformer.h.{b}.mlp.{layer}.{kind}"
    for b in (0, 1)
    for layer in ("c_fc", "c_proj")
    for kind in ("weight", "bias")
]


def _sequences():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (5, 10), generator=g)
    y = causal_lm_labels(x, (torch.arange(10) < torch.tensor([[10], [10], [7], [10], [4]])))
    qx, qy = prompt_completion(["The ca", "ab", "xyz"], ["pit", "cdefg", "w"], length=10)
    return x, y, qx, qy


@pytest.mark.parametrize("structure", ["layer", "full"])
def test_gpt2_direct_influence_matches_a_dense_autograd_reference(structure):
    """DirectInfluence over the MLP weights of a 2-layer GPT-2 (float64), against
    per-sample gradients by a loop of autograd.grad, the Hessian of the mean loss
    by autograd.functional.hessian and a dense solve."""
    model = CausalLMLogits(_gpt2(torch.float64))
    loss = CausalLMLoss("mean")
    x, y, qx, qy = _sequences()
    gp = TorchGradientProvider(model, loss, cast_inputs=False).restrict(MLP)
    reg = 20.0  # the Hessian at a random init is indefinite (smallest eigenvalue ~ -13)
    infl = xi.DirectInfluence(gp, regularization=reg, block_structure=structure).fit((x, y))
    got = infl.influences(qx, qy, x, y)

    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in MLP]
    sizes = [params[n].numel() for n in MLP]

    def loss_at(flat, xs, ys):
        parts = dict(zip(MLP, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        out = torch.func.functional_call(model, parts, (xs,))
        return loss(out, ys)

    theta = torch.cat([params[n].detach().reshape(-1) for n in MLP])

    def grads(xs, ys):
        rows = []
        for i in range(len(xs)):
            t = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_at(t, xs[i : i + 1], ys[i : i + 1]), t)
            rows.append(g)
        return torch.stack(rows)

    hess = torch.autograd.functional.hessian(lambda t: loss_at(t, x, y), theta, vectorize=True)
    if structure == "layer":  # blocks: the modules c_fc, c_proj of each block
        mask = torch.zeros_like(hess, dtype=torch.bool)
        start = 0
        for size in (sizes[0] + sizes[1], sizes[2] + sizes[3]) * 2:
            mask[start : start + size, start : start + size] = True
            start += size
        hess = torch.where(mask, hess, torch.zeros_like(hess))
    a = hess + reg * torch.eye(len(theta), dtype=torch.float64)
    assert torch.linalg.eigvalsh(a).min() > 0.1  # the reference's solve is well posed
    want = grads(qx, qy) @ torch.linalg.solve(a, grads(x, y).T)
    assert got.shape == (3, 5)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-10, rel
    # the prompt is out of the query's loss: a query differing only in its prompt's
    # labels (all masked) scores the same, one counting the prompt does not
    counted = causal_lm_labels(qx)
    assert not torch.allclose(infl.influences(qx, counted, x, y), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpt2_cg_and_identity_run_through_the_provider(dtype):
    """The raw Hugging Face model with output_fn, CG on the empirical Fisher, against
    Direct on the same curvature; float32 to float32 accuracy."""
    hf = _gpt2(dtype).eval()
    hf.set_attn_implementation("eager")
    x, y, qx, qy = _sequences()
    gp = TorchGradientProvider(
        hf, CausalLMLoss("mean"), cast_inputs=False, output_fn=causal_lm_logits
    ).restrict([n.removeprefix("model.") for n in MLP])
    opts = dict(regularization=1e-2, second_order="empirical_fisher")
    direct = xi.DirectInfluence(gp, **opts).fit((x, y)).influences(qx, qy, x, y)
    rtol = 1e-10 if dtype == torch.float64 else None  # None: the dtype's floor
    cg = xi.CgInfluence(gp, rtol=rtol, **opts).fit((x, y)).influences(qx, qy, x, y)
    assert direct.dtype == dtype and direct.shape == (3, 5)
    tol = 1e-8 if dtype == torch.float64 else 2e-2
    assert ((cg - direct).norm() / direct.norm()).item() < tol
    g_q, g_x = gp.flat_grads(xi.Batch(qx, qy)), gp.flat_grads(xi.Batch(x, y))
    ident = xi.IdentityInfluence(gp).fit((x, y)).influences(qx, qy, x, y)
    np.testing.assert_allclose(ident.double(), (g_q @ g_x.T).double(), rtol=1e-4)
