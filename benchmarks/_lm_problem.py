"""The language-model benchmark problem: a small Hugging Face GPT-2 (byte vocabulary
of 256 tokens, built from a config, no download) trained briefly on deterministic
synthetic text.

Only numpy, torch and transformers are imported here, so that the kronfluence
worker (its own environment) rebuilds the same model from the same file. Data
and weights go to an ``.npz`` (no pickle); both sides load bit-identical
float64 weights.
"""

from __future__ import annotations

import json

import numpy as np
import torch

WORDS = (
    "the a one every some river stone garden library engine signal method value "
    "returns computes module function object string number list index error file "
    "green quiet early small large first last open closed north south light dark "
    "runs reads writes holds keeps sends finds makes takes gives opens closes "
    "under over near beside within before after because while and but or"
).split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy".split()
CITIES = "paris oslo lima cairo quito rome kyiv hanoi accra perth".split()


def corpus(n_chars: int, seed: int = 0) -> bytes:
    """Deterministic text: random sentences over a small vocabulary, with "facts"
    (``<name> lives in <city>.``) repeated throughout, so that the model has
    something to learn and the sequences are not i.i.d. noise."""
    rng = np.random.default_rng(seed)
    facts = [f"{n} lives in {CITIES[(i * 3) % len(CITIES)]}." for i, n in enumerate(NAMES)]
    out: list[str] = []
    size = 0
    while size < n_chars:
        if rng.random() < 0.2:
            s = facts[int(rng.integers(len(facts)))]
        else:
            words = rng.choice(WORDS, size=int(rng.integers(4, 12)))
            s = " ".join(words).capitalize() + "."
        out.append(s)
        size += len(s) + 1
    return " ".join(out).encode("ascii")[:n_chars]


def build_model(config: dict) -> torch.nn.Module:
    """``GPT2LMHeadModel`` from a config dict (float64, eval mode, eager attention)."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=256,
        n_positions=config["seq_len"],
        n_embd=config["n_embd"],
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(config.get("seed", 0))
    model = transformers.GPT2LMHeadModel(cfg)
    model.set_attn_implementation("eager")
    return model.to(torch.float64).eval()


def tracked_layers(config: dict) -> list[str]:
    """Every attention and MLP ``Conv1D`` of every block (module names of the HF model)."""
    return [
        f"transformer.h.{b}.{part}"
        for b in range(config["n_layer"])
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def make_problem(config: dict, path: str) -> dict:
    """Token sequences ``(N, T)`` for training and queries, a GPT-2 trained for
    ``train_steps`` Adam steps (float32, batches of 32, then cast to float64),
    saved to ``path``."""
    t, n_train, n_test = config["seq_len"], config["n_train"], config["n_test"]
    n_seq = n_train + n_test
    text = np.frombuffer(corpus(n_seq * t, seed=config.get("seed", 0)), dtype=np.uint8)
    tokens = text.astype(np.int64).reshape(n_seq, t)
    model = build_model(config).float().train()
    gen = torch.Generator().manual_seed(config.get("seed", 0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = torch.from_numpy(tokens[:n_train])
    losses = []
    for _ in range(config["train_steps"]):
        idx = torch.randint(0, n_train, (32,), generator=gen)
        out = model(input_ids=train[idx], labels=train[idx], use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))
    model = model.double().eval()
    arrays = {f"param:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(
        path,
        config=np.asarray(json.dumps(config)),
        train=tokens[:n_train],
        test=tokens[n_train:],
        **arrays,
    )
    n_params = sum(p.numel() for p in model.parameters())
    info = {"n_parameters": n_params, "final_train_loss": float(np.mean(losses[-10:]))}
    info["initial_train_loss"] = float(np.mean(losses[:5])) if losses else None
    return info


def load_problem(path: str) -> tuple[torch.nn.Module, dict, dict[str, torch.Tensor]]:
    """``(model, config, {"train", "test"} token tensors)`` from ``path``."""
    with np.load(path) as f:
        config = json.loads(str(f["config"]))
        state = {
            k.split(":", 1)[1]: torch.from_numpy(np.array(f[k]))
            for k in f.files
            if k.startswith("param:")
        }
        data = {k: torch.from_numpy(np.array(f[k])) for k in ("train", "test")}
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval(), config, data
