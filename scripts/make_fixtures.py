#!/usr/bin/env python3
"""Generate the reference fixtures that sepo's Rust tests compare against.

The Rust tests never run Python: they read the files this script writes under
tests/fixtures/ (and models/stories260K/, which is a committed copy of
shared/data/models/stories260K). Re-run this script only to regenerate them.

Setup (what was used; Python 3.11, CPU only, PyPI reachable):

    python3 -m venv .venv
    .venv/bin/pip install --upgrade pip
    .venv/bin/pip install torch==2.9.0 transformers safetensors numpy

That plain install worked (about 4 minutes; the PyPI torch 2.9.0 wheel pulls the
nvidia-*-cu12 packages, ~7 GB venv in all). It resolved to torch 2.9.0+cu128,
transformers 5.24.0, safetensors 0.8.0, tokenizers 0.23.3, numpy 2.4.6. Nothing
here needs a GPU. transformers >= 5 is assumed (`dtype=` keyword, `rope_parameters`).

Usage (from the repository root):

    .venv/bin/python scripts/make_fixtures.py                      # writes tests/fixtures/
    .venv/bin/python scripts/make_fixtures.py --out /tmp/fx        # same, elsewhere
    .venv/bin/python scripts/make_fixtures.py check-export EXPORTED_DIR SOURCE_DIR

`check-export` loads both folders with AutoModelForCausalLM (float32, eager
attention) and checks that the logits on a fixed input agree (max abs diff <= 1e-5);
it prints the difference and exits 1 otherwise (2 if a folder cannot be loaded).

Everything is seeded; two runs give byte-identical files (checked with sha256).
See tests/fixtures/README.md for what each file holds.
optim.json (torch.optim.AdamW, clip_grad_norm_, transformers' cosine-with-warmup schedule) is
described in its own "_about" and in optim_fixtures()'s docstring.

Sources for the loss formulas (read from the PyPI wheels, `pip download trl==X --no-deps`):

* TRL 0.19.1 `trl/trainer/dpo_trainer.py`
  - L1034-1038 `loss_type == "sigmoid"`:
        losses = -F.logsigmoid(beta*logits)*(1-label_smoothing) - F.logsigmoid(-beta*logits)*label_smoothing
    with logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps) (L1012-1020)
  - L1059-1061 `loss_type == "ipo"`: losses = (logits - 1/(2*beta))**2, where L1556-1557 first divides the
    summed log-probs by the number of completion tokens (`all_logps / loss_mask.sum(-1)`), i.e. average log-probs
  - L1150-1151 rewards: chosen_rewards = beta*(chosen_logps - ref_chosen_logps), rejected likewise;
    metrics rewards/accuracies = mean(chosen_rewards > rejected_rewards), rewards/margins = mean(chosen - rejected)
* TRL 1.16.0 (latest at the time) `trl/trainer/dpo_trainer.py`
  - L1387-1388 `sigmoid`: per_sequence_loss = -F.logsigmoid(beta*delta_score): label smoothing is NO LONGER applied
    to "sigmoid" in 1.x; `label_smoothing` only feeds "robust", "exo_pair", "aot"/"aot_unpaired" (dpo_config.py L103).
    The cDPO form above (TRL <= 0.2x) is what these fixtures encode; with label_smoothing = 0 both agree.
  - L1393-1404 `ipo`: (chosen_logratios/n_chosen - rejected_logratios/n_rejected - 1/(2*beta))**2
    (token counts clamped to >= 1): the same value as the 0.19.1 form.
  - L1582-1597: the same reward metrics as 0.19.1.
* SimPO = CPOTrainer loss_type "simpo" (TRL 0.19.1 `trl/trainer/cpo_trainer.py` L669-674, moved to
  `trl/experimental/cpo/cpo_trainer.py` L715-722 in 1.16.0):
      logits = policy_chosen_logps - policy_rejected_logps          (average log-probs: L799 / L850
      logits = logits - simpo_gamma / beta                             average_log_prob = loss_type in ["ipo","simpo"])
      losses = -F.logsigmoid(beta*logits)*(1-ls) - F.logsigmoid(-beta*logits)*ls
  CPOTrainer adds cpo_alpha * NLL (L840 / L890; cpo_alpha defaults to 1.0 unless loss_type="simpo" is set
  through the AlphaPO sugar); SimPO proper uses cpo_alpha = 0, which is what is encoded here.
* SePO: /work/shared/SPEC.md (u(y,m) = gamma * sum_t m_t logp_t / sum_t m_t; L = -logsigmoid(u_w - u_l - margin)).
* SFT: token-weighted mean NLL over all chosen-response tokens of the batch, sum(-logp*mask)/sum(mask), which is
  what transformers' ForCausalLMLoss (cross_entropy, reduction mean over non -100 labels) gives for one batch.

Precision note: the "float64" forward passes are transformers' own code on a model loaded with
dtype=torch.float64. transformers 5.24 still computes RMSNorm's normalisation
(`hidden_states.to(torch.float32)`) and the RoPE angles (`position_ids.float() * inv_freq.float()`) in float32
inside a float64 model, so these reference values carry ~1e-7 relative float32 noise. That is far below the
1e-4 tolerance of SPEC.md. The script prints the float32-vs-float64 difference for scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO / "models" / "stories260K"

VOCAB = 512
BOS, EOS = 1, 2


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def _lazy_imports():
    global torch, F, transformers
    import torch  # noqa: F401
    import torch.nn.functional as F  # noqa: F401
    import transformers  # noqa: F401
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fl(x) -> float:
    """A Python float (JSON writes the shortest repr that round-trips)."""
    return float(x)


def flist(t) -> list:
    return [float(v) for v in t.reshape(-1).tolist()]


def _dumps(obj, indent=0) -> str:
    """JSON with one key per line, but every list of scalars on a single line."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {_dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{pad} {_dumps(v, indent + 1)}" for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(obj) + "\n"
    assert json.loads(text) == obj
    path.write_text(text)


# ----------------------------------------------------------------------------------------------------------------
# tiny random checkpoints
# ----------------------------------------------------------------------------------------------------------------

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=256,
    vocab_size=VOCAB,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=None,
)

# name -> (model_type, config kwargs, save dtype, config.json style, seed)
#   style "v5": config.json exactly as transformers 5.x save_pretrained writes it (`rope_parameters`, `dtype`)
#   style "v4": rewritten in the pre-5.0 layout that hub checkpoints have (`rope_theta`, `rope_scaling`,
#               `rotary_pct`, `rotary_emb_base`, `torch_dtype`); checked to load to identical logits.
def model_specs():
    return {
        "tiny-llama": (
            "llama",
            dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            "float32", "v4", 1001),
        "tiny-llama-tied-bf16": (
            "llama",
            dict(num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}),
            "bfloat16", "v5", 1002),
        "tiny-mistral": (
            "mistral",
            dict(num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            "float32", "v5", 1003),
        "tiny-qwen2": (
            "qwen2",
            dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
            "float16", "v4", 1004),
        "tiny-neox": (
            "gpt_neox",
            dict(num_attention_heads=4, layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
            "float32", "v4", 1005),
        "tiny-neox-seq": (
            "gpt_neox",
            dict(num_attention_heads=4, layer_norm_eps=1e-5, use_parallel_residual=False, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
            "float32", "v5", 1006),
    }


# Initialisation scale: transformers' default initializer_range 0.02 makes a 64-wide model's output
# almost uniform (all log-probs ~ -log 512), which would test little. 0.15 gives log-probs spread over
# several nats while staying well-conditioned.
INIT_STD = 0.15


def build_and_save(name, model_type, kwargs, dtype_name, style, seed, outdir: Path) -> Path:
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    }
    cfg_cls, model_cls = classes[model_type]
    cfg = cfg_cls(**COMMON, initializer_range=INIT_STD, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(cfg)  # transformers' own default init (normal(0, initializer_range), norms 1, biases 0)
    # ... then make norms and biases non-trivial, so that they are actually tested.
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() != 1:
                continue
            if pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                raise RuntimeError(f"unexpected 1-d parameter {pname}")
    dtype = getattr(torch, dtype_name)
    model = model.to(dtype)
    model.config.dtype = dtype
    d = outdir / "hf" / name
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d)
    gen_cfg = d / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()  # not part of the fixture contract (config.json, model.safetensors, tokenizer files)
    shutil.copyfile(STORIES / "tokenizer.json", d / "tokenizer.json")
    shutil.copyfile(STORIES / "tokenizer_config.json", d / "tokenizer_config.json")
    if style == "v4":
        native_logits = fixed_logits(d)
        to_v4_config(d / "config.json")
        v4_logits = fixed_logits(d)
        diff = (native_logits - v4_logits).abs().max().item()
        assert diff == 0.0, f"{name}: v4-style config.json changes the logits by {diff}"
        print(f"  {name}: v4-style config.json loads to identical logits (max diff {diff})")
    return d


def to_v4_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json in the pre-5.0 key layout hub checkpoints use."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    out = {}
    for k, v in cfg.items():
        if k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    if cfg["model_type"] == "gpt_neox":
        out["rotary_pct"] = rp.get("partial_rotary_factor", 1.0)
        out["rotary_emb_base"] = rp["rope_theta"]
    else:
        out["rope_theta"] = rp["rope_theta"]
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    path.write_text(json.dumps(dict(sorted(out.items())), indent=2) + "\n")


def load(d: Path, dtype):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


FIXED_INPUT_LEN = 24


def fixed_input(vocab):
    g = torch.Generator().manual_seed(12345)
    ids = torch.randint(3, vocab, (1, FIXED_INPUT_LEN), generator=g)
    ids[0, 0] = BOS
    return ids


def fixed_logits(d: Path, dtype=None):
    dtype = dtype or torch.float64
    m = load(d, dtype)
    with torch.no_grad():
        return m(fixed_input(m.config.vocab_size)).logits[0].double()


# ----------------------------------------------------------------------------------------------------------------
# log-prob fixtures
# ----------------------------------------------------------------------------------------------------------------

def response_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    p = len(prompt)
    lp = [logp[p - 1 + i, response[i]].item() for i in range(len(response))]
    return lp, logits


def padded_logprobs(model, cases, pad_id=0):
    """Right-padded batched forward with attention_mask: returns per-case response log-probs."""
    seqs = [c["prompt_ids"] + c["response_ids"] for c in cases]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
    out = []
    for i, c in enumerate(cases):
        p = len(c["prompt_ids"])
        out.append([logp[i, p - 1 + j, t].item() for j, t in enumerate(c["response_ids"])])
    return out


def greedy(model, prompt, n):
    ids = list(prompt)
    gaps = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            top2 = torch.topk(logits, 2).values
            gaps.append((top2[0] - top2[1]).item())
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):], min(gaps)


def random_cases(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [(7, 12), (1, 30), (20, 1), (13, 25)]  # (prompt, response); case 1 has a one-token prompt
    cases = []
    for pl, rl in lengths:
        prompt = [BOS] + torch.randint(3, VOCAB, (pl - 1,), generator=g).tolist()
        response = torch.randint(3, VOCAB, (rl - 1,), generator=g).tolist() + [EOS] if rl > 1 else [EOS]
        cases.append({"prompt_ids": prompt, "response_ids": response})
    return cases


def stories_cases():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(STORIES / "tokenizer.json"))
    texts = [
        ("Once upon a time", " there was a little girl"),
        ("", "Once upon a time, there was a little girl named Lily. She loved to play outside."),
        ("Lily was sad because she wanted to play", " with her ball."),
        ("One day, Tom saw a big dog.", "He was scared."),
    ]
    # Note: this tokenizer's normalizer prepends "▁" to every encoded string (Llama "legacy" behaviour), so a
    # response that starts with a space begins with a lone "▁" token (id 410): " there" -> ["▁", "▁there"].
    cases = []
    for prompt_text, response_text in texts:
        prompt = tok.encode(prompt_text, add_special_tokens=True).ids
        response = tok.encode(response_text, add_special_tokens=False).ids + [EOS]
        cases.append({"prompt_text": prompt_text, "response_text": response_text,
                      "prompt_ids": prompt, "response_ids": response})
    return cases, tok


def rotary_inv_freq(model):
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding"):
            return [float(v) for v in mod.inv_freq.float().tolist()]
    raise RuntimeError("no rotary embedding found")


def model_entry(name, d: Path, cases, greedy_prompt, greedy_n):
    m64 = load(d, torch.float64)
    m32 = load(d, torch.float32)
    out_cases = []
    worst_f32 = 0.0
    logits0_last = logits0_prompt = None
    for i, c in enumerate(cases):
        lp, logits = response_logprobs(m64, c["prompt_ids"], c["response_ids"])
        lp32, _ = response_logprobs(m32, c["prompt_ids"], c["response_ids"])
        worst_f32 = max(worst_f32, max(abs(a - b) for a, b in zip(lp, lp32)))
        e = dict(c)
        e["logprobs"] = lp
        out_cases.append(e)
        if i == 0:
            logits0_last = logits[-1]
            logits0_prompt = logits[len(c["prompt_ids"]) - 1]
    padded = padded_logprobs(m64, out_cases)
    worst_pad = max(abs(a - b) for c, pl in zip(out_cases, padded) for a, b in zip(c["logprobs"], pl))
    assert worst_pad <= 1e-6, f"{name}: padded batch differs from unpadded by {worst_pad}"
    g_ids, g_gap = greedy(m64, greedy_prompt, greedy_n)
    all_lp = [v for c in out_cases for v in c["logprobs"]]
    print(f"  {name}: {len(cases)} cases, logprobs in [{min(all_lp):.3f}, {max(all_lp):.3f}]; "
          f"right-padded batch vs unpadded max |diff| = {worst_pad:.2e}; float32 vs float64 = {worst_f32:.2e}; "
          f"greedy min top-2 gap = {g_gap:.3e}")
    return {
        "dir": str(d.relative_to(REPO)) if d.is_relative_to(REPO) else str(d),
        "model_type": m64.config.model_type,
        "cases": out_cases,
        "logits_first_case_last_pos": flist(logits0_last),
        "logits_first_case_last_prompt_pos": flist(logits0_prompt),
        "rotary_inv_freq": rotary_inv_freq(m64),
        "greedy": {"prompt_ids": list(greedy_prompt), "new_ids": g_ids, "min_top2_logit_gap": g_gap},
        "max_abs_diff_float32_vs_float64": worst_f32,
        "max_abs_diff_padded_vs_unpadded": worst_pad,
    }


# ----------------------------------------------------------------------------------------------------------------
# independent float64 numpy forward pass (a cross-check of the fixtures, and executable documentation of the
# weight layouts the Rust implementation has to follow)
# ----------------------------------------------------------------------------------------------------------------

def _rope_parameters(cfg: dict) -> dict:
    """Both config.json layouts: transformers 5 `rope_parameters`, or the older keys."""
    if cfg.get("rope_parameters"):
        rp = dict(cfg["rope_parameters"])
    else:
        rp = {"rope_theta": cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0))}
        if cfg.get("rope_scaling"):
            rp.update(cfg["rope_scaling"])
            if "type" in rp and "rope_type" not in rp:
                rp["rope_type"] = rp.pop("type")
        if "rotary_pct" in cfg:
            rp["partial_rotary_factor"] = cfg["rotary_pct"]
    rp.setdefault("rope_type", "default")
    return rp


def np_inv_freq(cfg: dict, head_dim: int):
    import numpy as np
    rp = _rope_parameters(cfg)
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2) / dim))
    if rp["rope_type"] == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / lo, old / hi
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled)
    elif rp["rope_type"] != "default":
        raise NotImplementedError(rp["rope_type"])
    return inv


def np_forward(d: Path, ids):
    """Logits [T, V] in float64 for one unpadded sequence."""
    import numpy as np
    from safetensors.torch import load_file
    cfg = json.loads((d / "config.json").read_text())
    w = {k: v.double().numpy() for k, v in load_file(str(d / "model.safetensors")).items()}
    T = len(ids)
    H = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    inv = np_inv_freq(cfg, hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [heads, T, hd]; HF rotate_half convention on the first 2*len(inv) dims of each head
        rd = 2 * len(inv)
        xr, xp = x[..., :rd], x[..., rd:]
        rot = np.concatenate([-xr[..., rd // 2:], xr[..., : rd // 2]], -1)
        return np.concatenate([xr * cos + rot * sin, xp], -1)

    def attend(q, k, v):  # [H, T, hd], k/v already expanded to H heads
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        return ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, H * hd)

    def layernorm(x, pre, eps):
        m = x.mean(-1, keepdims=True)
        var = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(var + eps) * w[pre + ".weight"] + w[pre + ".bias"]

    def rmsnorm(x, pre, eps):
        return w[pre + ".weight"] * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    def linear(x, pre):
        y = x @ w[pre + ".weight"].T
        return y + w[pre + ".bias"] if pre + ".bias" in w else y

    erf = np.vectorize(math.erf)
    if cfg["model_type"] == "gpt_neox":
        eps = cfg["layer_norm_eps"]
        x = w["gpt_neox.embed_in.weight"][ids]
        for layer in range(cfg["num_hidden_layers"]):
            p = f"gpt_neox.layers.{layer}."
            qkv = linear(layernorm(x, p + "input_layernorm", eps), p + "attention.query_key_value")
            qkv = qkv.reshape(T, H, 3 * hd).transpose(1, 0, 2)  # rows are grouped per head: [q_h | k_h | v_h]
            q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
            a = linear(attend(rope(q), rope(k), v), p + "attention.dense")

            def mlp(z):  # exact (erf) GELU: hidden_act "gelu"
                z = linear(z, p + "mlp.dense_h_to_4h")
                return linear(0.5 * z * (1 + erf(z / math.sqrt(2))), p + "mlp.dense_4h_to_h")
            if cfg["use_parallel_residual"]:
                x = x + a + mlp(layernorm(x, p + "post_attention_layernorm", eps))
            else:
                x = x + a
                x = x + mlp(layernorm(x, p + "post_attention_layernorm", eps))
        x = layernorm(x, "gpt_neox.final_layer_norm", eps)
        return x @ w["embed_out.weight"].T
    eps = cfg["rms_norm_eps"]
    KV = cfg["num_key_value_heads"]
    x = w["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rmsnorm(x, p + "input_layernorm", eps)
        q = linear(h, p + "self_attn.q_proj").reshape(T, H, hd).transpose(1, 0, 2)
        k = linear(h, p + "self_attn.k_proj").reshape(T, KV, hd).transpose(1, 0, 2)
        v = linear(h, p + "self_attn.v_proj").reshape(T, KV, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)  # query head i uses kv head i // (H/KV)
        x = x + linear(attend(rope(q), rope(k), v), p + "self_attn.o_proj")
        h = rmsnorm(x, p + "post_attention_layernorm", eps)
        g = linear(h, p + "mlp.gate_proj")
        x = x + linear(g / (1 + np.exp(-g)) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rmsnorm(x, "model.norm", eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T  # tied: no lm_head tensor stored


def independent_check(name, d: Path, entry) -> float:
    import numpy as np
    worst = 0.0
    for c in entry["cases"]:
        lg = np_forward(d, c["prompt_ids"] + c["response_ids"])
        lp = lg - lg.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        p = len(c["prompt_ids"])
        got = np.array([lp[p - 1 + i, t] for i, t in enumerate(c["response_ids"])])
        worst = max(worst, float(np.abs(got - np.array(c["logprobs"])).max()))
    print(f"  {name}: independent numpy float64 forward vs transformers: max |logprob diff| = {worst:.2e}")
    assert worst < 1e-5, name
    return worst


# ----------------------------------------------------------------------------------------------------------------
# loss fixtures
# ----------------------------------------------------------------------------------------------------------------

def loss_fixtures():
    B = 4
    g = torch.Generator().manual_seed(777)
    dt = torch.float64

    def per_token(n):
        return -(0.05 + 4.0 * torch.rand(n, generator=g, dtype=dt))

    def mask(n):
        m = torch.rand(n, generator=g, dtype=dt) < 0.4
        if not m.any():
            m[torch.randint(0, n, (1,), generator=g)] = True
        return m

    nc = torch.randint(3, 11, (B,), generator=g).tolist()
    nr = torch.randint(3, 11, (B,), generator=g).tolist()
    tok_pc = [per_token(n) for n in nc]
    tok_pr = [per_token(n) for n in nr]
    # reference = policy + per-token noise, so that the implicit rewards have both signs
    tok_rc = [t - 0.3 * torch.randn(t.shape, generator=g, dtype=dt) for t in tok_pc]
    tok_rr = [t - 0.3 * torch.randn(t.shape, generator=g, dtype=dt) for t in tok_pr]
    m_c = [mask(n) for n in nc]
    m_r = [mask(n) for n in nr]
    pc = torch.stack([t.sum() for t in tok_pc])
    pr = torch.stack([t.sum() for t in tok_pr])
    rc = torch.stack([t.sum() for t in tok_rc])
    rr = torch.stack([t.sum() for t in tok_rr])
    ncf = torch.tensor(nc, dtype=dt)
    nrf = torch.tensor(nr, dtype=dt)

    inputs = {
        "batch_size": B,
        "pc": flist(pc), "pr": flist(pr), "rc": flist(rc), "rr": flist(rr),
        "nc": nc, "nr": nr,
        "policy_chosen_token_logps": [flist(t) for t in tok_pc],
        "policy_rejected_token_logps": [flist(t) for t in tok_pr],
        "reference_chosen_token_logps": [flist(t) for t in tok_rc],
        "reference_rejected_token_logps": [flist(t) for t in tok_rr],
        "chosen_mask": [[bool(v) for v in m.tolist()] for m in m_c],
        "rejected_mask": [[bool(v) for v in m.tolist()] for m in m_r],
    }

    # --- DPO (sigmoid, cDPO label smoothing) ---
    def dpo(pc, pr, rc, rr, beta, ls):
        logits = (pc - pr) - (rc - rr)
        losses = -(1 - ls) * F.logsigmoid(beta * logits) - ls * F.logsigmoid(-beta * logits)
        return losses.mean(), losses, logits

    dpo_cases = []
    for beta, ls in [(0.1, 0.0), (0.5, 0.1)]:
        pcg = pc.clone().requires_grad_(True)
        prg = pr.clone().requires_grad_(True)
        loss, losses, logits = dpo(pcg, prg, rc, rr, beta, ls)
        loss.backward()
        cr = beta * (pc - rc)
        rj = beta * (pr - rr)
        dpo_cases.append({
            "beta": beta, "label_smoothing": ls,
            "logits": flist(logits.detach()),
            "losses": flist(losses.detach()),
            "loss": fl(loss.item()),
            "chosen_rewards": flist(cr), "rejected_rewards": flist(rj),
            "reward_chosen_mean": fl(cr.mean()), "reward_rejected_mean": fl(rj.mean()),
            "reward_margin_mean": fl((cr - rj).mean()),
            "reward_accuracy": fl((cr > rj).to(dt).mean()),
            "logps_chosen_mean": fl(pc.mean()), "logps_rejected_mean": fl(pr.mean()),
            "grad_pc": flist(pcg.grad), "grad_pr": flist(prg.grad),
        })

    # one gradient, three ways: autograd, central finite difference, closed form
    beta = 0.1
    h = 1e-6
    e0 = torch.zeros(B, dtype=dt)
    e0[0] = 1.0
    fd = (dpo(pc + h * e0, pr, rc, rr, beta, 0.0)[0] - dpo(pc - h * e0, pr, rc, rr, beta, 0.0)[0]).item() / (2 * h)
    logits0 = ((pc - pr) - (rc - rr))[0]
    closed = -(beta / B) * torch.sigmoid(-beta * logits0).item()
    autograd_val = dpo_cases[0]["grad_pc"][0]
    assert abs(fd - autograd_val) < 1e-8 and abs(closed - autograd_val) < 1e-15, (fd, closed, autograd_val)
    acc = dpo_cases[0]["reward_accuracy"]
    assert 0.0 < acc < 1.0, f"reward accuracy {acc}: pick inputs with mixed signs"
    grad_check = {
        "what": "d(loss_dpo)/d(pc[0]) with beta 0.1, label_smoothing 0 (loss = mean over the batch)",
        "autograd": autograd_val, "finite_difference": fd, "finite_difference_step": h,
        "closed_form": closed, "closed_form_formula": "-(beta/B) * sigmoid(-beta * logits[0])",
    }

    # --- IPO (TRL: average log-probs) ---
    ipo_cases = []
    for beta in [0.1]:
        logits = (pc / ncf - pr / nrf) - (rc / ncf - rr / nrf)
        losses = (logits - 1 / (2 * beta)) ** 2
        ipo_cases.append({"beta": beta, "logits": flist(logits), "losses": flist(losses), "loss": fl(losses.mean())})

    # --- SimPO (TRL CPOTrainer loss_type="simpo", cpo_alpha=0, label_smoothing=0) ---
    simpo_cases = []
    for beta, gamma in [(2.0, 0.5)]:
        pcg = pc.clone().requires_grad_(True)
        prg = pr.clone().requires_grad_(True)
        logits = pcg / ncf - prg / nrf - gamma / beta
        losses = -F.logsigmoid(beta * logits)
        loss = losses.mean()
        loss.backward()
        alt = -F.logsigmoid(beta * (pc / ncf - pr / nrf) - gamma)  # Rust naming: gamma -> margin
        assert torch.allclose(alt, losses.detach(), rtol=0, atol=1e-14)
        simpo_cases.append({
            "beta": beta, "gamma": gamma, "margin": gamma,
            "logits": flist(logits.detach()), "losses": flist(losses.detach()), "loss": fl(loss.item()),
            "losses_margin_form": flist(alt),
            "grad_pc": flist(pcg.grad), "grad_pr": flist(prg.grad),
        })

    # --- SePO (SPEC.md) ---
    sepo_cases = []
    for gamma, margin in [(1.0, 0.0), (2.0, 0.3)]:
        tw = [t.clone().requires_grad_(True) for t in tok_pc]
        tl = [t.clone().requires_grad_(True) for t in tok_pr]
        uw = torch.stack([gamma * (t * m).sum() / m.sum() for t, m in zip(tw, m_c)])
        ul = torch.stack([gamma * (t * m).sum() / m.sum() for t, m in zip(tl, m_r)])
        losses = -F.logsigmoid(uw - ul - margin)
        loss = losses.mean()
        loss.backward()
        sepo_cases.append({
            "gamma": gamma, "margin": margin,
            "u_chosen": flist(uw.detach()), "u_rejected": flist(ul.detach()),
            "losses": flist(losses.detach()), "loss": fl(loss.item()),
            "grad_policy_chosen_token_logps": [flist(t.grad) for t in tw],
            "grad_policy_rejected_token_logps": [flist(t.grad) for t in tl],
        })

    # --- SFT (chosen responses) ---
    tw = [t.clone().requires_grad_(True) for t in tok_pc]
    all_tok = torch.cat(tw)
    sft_loss = (-all_tok).sum() / all_tok.numel()
    sft_loss.backward()
    seq_mean = torch.stack([(-t).mean() for t in tok_pc]).mean()
    sft = {
        "convention": "token-weighted: sum over every chosen-response token in the batch of -logp, divided by the "
                      "number of those tokens (sum(-logp*mask)/sum(mask)); inputs are policy_chosen_token_logps",
        "loss": fl(sft_loss.item()),
        "grad_policy_chosen_token_logps": [flist(t.grad) for t in tw],
        "loss_sequence_mean_for_contrast": fl(seq_mean.item()),
    }

    return {
        "_about": "Expected preference/SFT losses (float64). Formulas and TRL source lines: scripts/make_fixtures.py "
                  "docstring and tests/fixtures/README.md. Losses are means over the batch of 4 pairs.",
        "formulas": {
            "dpo": "logits = (pc - pr) - (rc - rr); loss_i = -(1-ls)*logsigmoid(beta*logits) - ls*logsigmoid(-beta*logits)",
            "dpo_rewards": "chosen_reward = beta*(pc-rc); rejected_reward = beta*(pr-rr); margin = chosen-rejected; "
                           "accuracy = mean(chosen_reward > rejected_reward)",
            "ipo": "logits = (pc/nc - pr/nr) - (rc/nc - rr/nr); loss_i = (logits - 1/(2*beta))^2",
            "simpo": "logits = pc/nc - pr/nr - gamma/beta; loss_i = -logsigmoid(beta*logits) "
                     "== -logsigmoid(beta*(pc/nc - pr/nr) - margin) with margin = gamma",
            "sepo": "u(y,m) = gamma * sum_t m_t logp_t / sum_t m_t; loss_i = -logsigmoid(u_w - u_l - margin)",
            "sft": "sum(-logp * mask) / sum(mask) over all chosen-response tokens of the batch",
        },
        "inputs": inputs,
        "dpo": dpo_cases,
        "dpo_grad_check": grad_check,
        "ipo": ipo_cases,
        "simpo": simpo_cases,
        "sepo": sepo_cases,
        "sft": sft,
    }


# ----------------------------------------------------------------------------------------------------------------
# end-to-end batch: text pairs -> tokenize -> score -> select -> first-step losses
# ----------------------------------------------------------------------------------------------------------------

PIPELINE_PAIRS = [
    # (prompt, chosen, rejected): short TinyStories-like text that stories260K's 512-token vocab covers without
    # byte fallback. No leading spaces (see stories_cases for what a leading space does).
    ("Once upon a time, there was a little cat.", "The cat liked to play in the sun.",
     "The cat was sad and did not play."),
    ("Tom had a big red ball.", "He gave the ball to his friend Sam.", "He threw the ball at the dog."),
    ("Lily saw a bird in the tree.", "She smiled and said hello to the bird.", "She ran away."),
    ("The sun was hot.", "Ben and his mom went to the park to swim in the cool water.", "Ben was mad."),
    ("Mom baked a cake for Sue.", "Sue said thank you and gave Mom a big hug.", "Sue did not like the cake and cried."),
    ("One day, a little dog found a toy.", "The dog was happy. He shared the toy with his friends.",
     "The dog hid the toy."),
]


def select_mask(scores, ratio, highest):
    """SPEC.md selection: n = max(1, floor(ratio*N)); the n highest (chosen) or lowest (rejected) scores; ties
    broken by the earlier position. Plain Python on purpose (no torch.topk, whose tie order is unspecified)."""
    N = len(scores)
    n = max(1, math.floor(ratio * N))
    order = sorted(range(N), key=(lambda i: (-scores[i], i)) if highest else (lambda i: (scores[i], i)))
    keep = set(order[:n])
    return [i in keep for i in range(N)], n


def pipeline_batch_fixtures(outdir: Path):
    """tests/fixtures/pipeline_batch.json: 6 text pairs through tokenize (template none), score (oracle
    tiny-llama vs reference tiny-mistral), select (two ratio settings) and the first-step loss of one batch
    holding all 6 pairs, for every objective. float64 throughout (transformers' float64 models, eager attention)."""
    from tokenizers import Tokenizer
    dt = torch.float64
    tok_path = outdir / "hf" / "tiny-llama" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("</s>")
    assert eos == EOS

    # --- tokenize (template none, no truncation) ---
    pairs, tokens = [], []
    for prompt, chosen, rejected in PIPELINE_PAIRS:
        assert chosen != rejected
        p_ids = tok.encode(prompt, add_special_tokens=True).ids
        c_ids = tok.encode(chosen, add_special_tokens=False).ids + [eos]
        r_ids = tok.encode(rejected, add_special_tokens=False).ids + [eos]
        assert p_ids[0] == BOS and BOS not in p_ids[1:] + c_ids + r_ids
        assert all(i >= 259 or i == EOS for i in p_ids[1:] + c_ids + r_ids), "byte fallback / unk in a fixture pair"
        # prompt_ids + chosen_ids[:-1] is also what encoding "prompt chosen" in one go gives (no merge across the
        # seam for these texts); not something sepo relies on, just a sanity check of the texts
        assert tok.encode(prompt + " " + chosen, add_special_tokens=True).ids == p_ids + c_ids[:-1]
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        tokens.append({"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids, "truncated": False})

    # --- per-token log-probs, unpadded, plus a right-padded batched cross-check ---
    models = {"tiny-llama": "oracle and policy", "tiny-mistral": "reference"}
    logps, pad_dev = {}, {}
    for name in models:
        m = load(outdir / "hf" / name, dt)
        out = {"chosen": [], "rejected": []}
        cases = []
        for side in ("chosen", "rejected"):
            for t in tokens:
                lp, _ = response_logprobs(m, t["prompt_ids"], t[side + "_ids"])
                out[side].append(lp)
                cases.append({"prompt_ids": t["prompt_ids"], "response_ids": t[side + "_ids"], "logprobs": lp})
        padded = padded_logprobs(m, cases)  # one batch of 12 sequences, right-padded with id 0, attention_mask
        dev = max(abs(a - b) for c, pl in zip(cases, padded) for a, b in zip(c["logprobs"], pl))
        print(f"  pipeline_batch {name}: right-padded batch of {len(cases)} vs unpadded max |logprob diff| = {dev:.2e}")
        assert dev <= 1e-9, f"{name}: padded batch differs from unpadded by {dev}"
        logps[name], pad_dev[name] = out, dev

    # --- score ---
    pol, ref = logps["tiny-llama"], logps["tiny-mistral"]
    scores = {"chosen": [], "rejected": [], "chosen_reward": [], "rejected_reward": []}
    for side in ("chosen", "rejected"):
        for a, b in zip(pol[side], ref[side]):
            s = [x - y for x, y in zip(a, b)]
            scores[side].append(s)
            scores[side + "_reward"].append(fl(torch.tensor(s, dtype=dt).sum()))

    # --- select ---
    masks = []
    for cr, rr_ in ((0.3, 0.3), (0.5, 0.2)):
        cm = [select_mask(s, cr, True) for s in scores["chosen"]]
        rm = [select_mask(s, rr_, False) for s in scores["rejected"]]
        masks.append({"chosen_ratio": cr, "rejected_ratio": rr_,
                      "n_chosen": [n for _, n in cm], "n_rejected": [n for _, n in rm],
                      "chosen_mask": [mk for mk, _ in cm], "rejected_mask": [mk for mk, _ in rm]})

    # --- first-step losses of one batch holding all 6 pairs (mean over the batch) ---
    T = lambda xs: [torch.tensor(x, dtype=dt) for x in xs]  # noqa: E731
    tpc, tpr, trc, trr = T(pol["chosen"]), T(pol["rejected"]), T(ref["chosen"]), T(ref["rejected"])
    pc = torch.stack([t.sum() for t in tpc])
    pr = torch.stack([t.sum() for t in tpr])
    rc = torch.stack([t.sum() for t in trc])
    rr = torch.stack([t.sum() for t in trr])
    nc = torch.tensor([len(t) for t in tpc], dtype=dt)
    nr = torch.tensor([len(t) for t in tpr], dtype=dt)

    all_c = torch.cat(tpc)
    sft_loss = (-all_c).sum() / all_c.numel()
    sft = {"policy": "tiny-llama", "n_tokens": int(all_c.numel()), "loss": fl(sft_loss),
           "convention": "token-weighted: sum of -logp over every chosen-response token (EOS included) of the "
                         "batch / number of those tokens"}

    beta = 0.1
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits)
    crw, rjw = beta * (pc - rc), beta * (pr - rr)
    dpo = {"policy": "tiny-llama", "reference": "tiny-mistral", "beta": beta, "label_smoothing": 0.0,
           "logits": flist(logits), "losses": flist(losses), "loss": fl(losses.mean()),
           "reward_chosen": fl(crw.mean()), "reward_rejected": fl(rjw.mean()),
           "reward_margin": fl((crw - rjw).mean()), "reward_accuracy": fl((crw > rjw).to(dt).mean()),
           "logps_chosen": fl(pc.mean()), "logps_rejected": fl(pr.mean())}

    ipo_logits = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    ipo_losses = (ipo_logits - 1 / (2 * beta)) ** 2
    ipo = {"policy": "tiny-llama", "reference": "tiny-mistral", "beta": beta,
           "logits": flist(ipo_logits), "losses": flist(ipo_losses), "loss": fl(ipo_losses.mean())}

    s_beta, s_margin = 2.0, 0.5
    simpo_losses = -F.logsigmoid(s_beta * (pc / nc - pr / nr) - s_margin)
    simpo = {"policy": "tiny-llama", "beta": s_beta, "margin": s_margin,
             "losses": flist(simpo_losses), "loss": fl(simpo_losses.mean())}

    def sepo(mset, gamma, margin):
        mc = [torch.tensor(x, dtype=dt) for x in mset["chosen_mask"]]
        mr = [torch.tensor(x, dtype=dt) for x in mset["rejected_mask"]]
        uw = torch.stack([gamma * (t * m).sum() / m.sum() for t, m in zip(tpc, mc)])
        ul = torch.stack([gamma * (t * m).sum() / m.sum() for t, m in zip(tpr, mr)])
        ls = -F.logsigmoid(uw - ul - margin)
        return {"policy": "tiny-llama", "chosen_ratio": mset["chosen_ratio"],
                "rejected_ratio": mset["rejected_ratio"], "gamma": gamma, "margin": margin,
                "u_chosen": flist(uw), "u_rejected": flist(ul), "losses": flist(ls), "loss": fl(ls.mean())}

    first = {"batch_size": len(tokens),
             "sums": {"pc": flist(pc), "pr": flist(pr), "rc": flist(rc), "rr": flist(rr),
                      "nc": [int(v) for v in nc.tolist()], "nr": [int(v) for v in nr.tolist()]},
             "sft": sft, "dpo": dpo, "ipo": ipo, "simpo": simpo,
             "sepo": sepo(masks[0], 1.0, 0.0),
             "sepo_ratio_0.5_0.2": sepo(masks[1], 1.0, 0.0)}

    return {
        "_about": "6 text pairs through tokenize (template none, no truncation), score (oracle tiny-llama minus "
                  "reference tiny-mistral), select, and the loss of one batch holding all 6 pairs (mean over the "
                  "batch) before any update; float64 transformers, eager attention; see tests/fixtures/README.md",
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        "tokenizer": "tests/fixtures/hf/tiny-llama/tokenizer.json",
        "eos_id": eos,
        "models": {n: {"dir": f"tests/fixtures/hf/{n}", "role": r} for n, r in models.items()},
        "pairs": pairs,
        "tokens": tokens,
        "logps": logps,
        "max_abs_diff_padded_vs_unpadded": pad_dev,
        "scores": scores,
        "masks": masks,
        "first_step_losses": first,
    }


def optim_fixtures():
    """torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and transformers' cosine-with-warmup schedule.

    The model is a float32 nn.Linear(4, 3) with seeded weights; the loss is mean((x W^T + b - y)^2) on a fixed
    batch of 5. Each case runs 3 optimizer steps; "clip" calls clip_grad_norm_ before every step,
    "no_decay_bias" uses two param groups (weight decayed, bias not: the HF Trainer convention).
    """
    g = torch.Generator().manual_seed(4242)
    w0 = (torch.randn(3, 4, generator=g) * 0.5).float()
    b0 = (torch.randn(3, generator=g) * 0.5).float()
    x = torch.randn(5, 4, generator=g).float()
    y = torch.randn(5, 3, generator=g).float()
    lr, wd = 1e-2, 0.1
    cases = []
    for name, max_norm, split_groups in (("plain", None, False), ("clip", 0.5, False), ("no_decay_bias", None, True)):
        lin = torch.nn.Linear(4, 3)
        with torch.no_grad():
            lin.weight.copy_(w0)
            lin.bias.copy_(b0)
        if split_groups:
            groups = [{"params": [lin.weight], "weight_decay": wd}, {"params": [lin.bias], "weight_decay": 0.0}]
        else:
            groups = lin.parameters()
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)  # betas (0.9, 0.999), eps 1e-8
        steps = []
        for _ in range(3):
            opt.zero_grad()
            loss = ((lin(x) - y) ** 2).mean()
            loss.backward()
            entry = {"loss": fl(loss.detach()), "grad_weight": flist(lin.weight.grad), "grad_bias": flist(lin.bias.grad)}
            if max_norm is not None:
                entry["grad_norm"] = fl(torch.nn.utils.clip_grad_norm_(lin.parameters(), max_norm))
            opt.step()
            entry["weight"] = flist(lin.weight.detach())
            entry["bias"] = flist(lin.bias.detach())
            steps.append(entry)
        cases.append({"name": name, "max_grad_norm": max_norm, "decay_bias": not split_groups, "steps": steps})

    sched = []
    base_lr = 1e-3
    for total, ratio in ((10, 0.1), (30, 0.1), (7, 0.5), (12, 0.0), (1, 0.1), (5, 1.0), (100, 0.07)):
        warmup = math.ceil(total * ratio)
        p = torch.nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([p], lr=base_lr)
        s = transformers.get_cosine_schedule_with_warmup(o, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total + 1):
            lrs.append(fl(s.get_last_lr()[0]))
            o.step()
            s.step()
        sched.append({"total_steps": total, "warmup_ratio": ratio, "num_warmup_steps": warmup, "lr": lrs})

    return {
        "_about": "torch.optim.AdamW / clip_grad_norm_ (float32) and transformers.get_cosine_schedule_with_warmup "
                  "reference values; see tests/fixtures/README.md. Schedule case (100, 0.07): 100 * 0.07 is "
                  "7.000000000000001 in float64, so math.ceil gives 8 warm-up steps",
        "adamw": {
            "model": "nn.Linear(4, 3), float32; weight [out=3, in=4] row-major as torch stores it",
            "loss": "mean((x @ W.T + b - y)^2)",
            "lr": lr, "weight_decay": wd, "betas": [0.9, 0.999], "eps": 1e-8,
            "weight0": flist(w0), "bias0": flist(b0), "x": flist(x), "y": flist(y),
            "cases": cases,
        },
        "cosine_schedule": {
            "what": "lr[k] = base_lr * lambda(k) after k scheduler steps (k = 0..total_steps); the update number "
                    "k+1 uses lr[k]. num_warmup_steps = math.ceil(total_steps * warmup_ratio)",
            "base_lr": base_lr,
            "cases": sched,
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# main modes
# ----------------------------------------------------------------------------------------------------------------

def generate(outdir: Path) -> None:
    _lazy_imports()
    torch.use_deterministic_algorithms(True)
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; writing {outdir}")
    print("building tiny checkpoints:")
    entries = {}
    for i, (name, (mt, kw, dt, style, seed)) in enumerate(model_specs().items()):
        d = build_and_save(name, mt, kw, dt, style, seed, outdir)
        cases = random_cases(2000 + i)
        entries[name] = (d, cases, cases[0]["prompt_ids"], 20)
    s_cases, tok = stories_cases()
    entries["stories260K"] = (STORIES, s_cases, [BOS], 60)

    print("log-prob fixtures:")
    logprobs = {}
    for name, (d, cases, gprompt, gn) in entries.items():
        logprobs[name] = model_entry(name, d, cases, gprompt, gn)

    print("independent check:")
    for name, (d, *_rest) in entries.items():
        logprobs[name]["max_abs_diff_independent_numpy_float64"] = independent_check(name, d, logprobs[name])

    # stories260K greedy continuation must reproduce generation_check.txt
    text = tok.decode(logprobs["stories260K"]["greedy"]["new_ids"])
    expected = (STORIES / "generation_check.txt").read_text().split("\n", 2)[2]
    norm = lambda s: " ".join(s.split())  # noqa: E731
    ok = norm(expected).startswith(norm(text)) or norm(text).startswith(norm(expected))
    print(f"  stories260K greedy from <s>: {text!r}\n  matches generation_check.txt: {ok}")
    assert ok, "stories260K greedy continuation does not match generation_check.txt"
    logprobs["stories260K"]["greedy"]["text"] = text

    write_json(outdir / "logprobs.json", {
        "_about": "log p(response_ids[i] | prompt_ids + response_ids[:i]) from transformers in float64, plain "
                  "unpadded forward, eager attention; see tests/fixtures/README.md",
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        **logprobs,
    })
    print("loss fixtures:")
    losses = loss_fixtures()
    write_json(outdir / "losses.json", losses)
    print(f"  dpo loss (beta 0.1) = {losses['dpo'][0]['loss']:.12f}; d/dpc[0]: autograd "
          f"{losses['dpo_grad_check']['autograd']:.12e}, finite difference "
          f"{losses['dpo_grad_check']['finite_difference']:.12e}")

    print("optimizer / schedule fixtures:")
    write_json(outdir / "optim.json", optim_fixtures())

    print("pipeline batch fixtures:")
    pb = pipeline_batch_fixtures(outdir)
    write_json(outdir / "pipeline_batch.json", pb)
    fs = pb["first_step_losses"]
    print("  token lengths (prompt, chosen, rejected): "
          + ", ".join(f"({len(t['prompt_ids'])}, {len(t['chosen_ids'])}, {len(t['rejected_ids'])})" for t in pb["tokens"]))
    print("  first-step losses: " + ", ".join(f"{k} {fs[k]['loss']:.12f}" for k in
                                             ("sft", "dpo", "ipo", "simpo", "sepo", "sepo_ratio_0.5_0.2")))

    print("files:")
    total = 0
    for p in sorted(outdir.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.stat().st_size:>9}  {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}  {p.relative_to(outdir)}")
    print(f"  total {total} bytes")


def check_export(exported: str, source: str) -> int:
    _lazy_imports()
    for d in (exported, source):
        if not (Path(d) / "config.json").is_file():
            print(f"check-export: {d}: no config.json (not a model folder)", file=sys.stderr)
            return 2
    try:
        a = load(Path(exported), torch.float32)
        b = load(Path(source), torch.float32)
    except Exception as e:  # noqa: BLE001
        print(f"check-export: cannot load: {e}", file=sys.stderr)
        return 2
    if a.config.vocab_size != b.config.vocab_size:
        print(f"check-export: vocab_size differs: {a.config.vocab_size} vs {b.config.vocab_size}")
        return 1
    ids = fixed_input(a.config.vocab_size)
    with torch.no_grad():
        la = a(ids).logits
        lb = b(ids).logits
    diff = (la - lb).abs().max().item()
    ok = la.shape == lb.shape and math.isfinite(diff) and diff <= 1e-5
    print(f"check-export: model_type {a.config.model_type} vs {b.config.model_type}; logits {tuple(la.shape)}; "
          f"max abs diff {diff:.3e} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "check-export":
        ap = argparse.ArgumentParser(prog="make_fixtures.py check-export")
        ap.add_argument("exported")
        ap.add_argument("source")
        a = ap.parse_args(argv[1:])
        return check_export(a.exported, a.source)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures"), help="output folder (default tests/fixtures)")
    a = ap.parse_args(argv)
    generate(Path(a.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
