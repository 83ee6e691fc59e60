#!/usr/bin/env python3
"""Generate the reward-model fixtures that sepo's Rust tests compare against (tests/reward_model.rs).

A sibling of make_fixtures.py (same set-up, same helpers; see its docstring for the venv). The
Rust tests never run Python: they read what this script writes.

    .venv/bin/python scripts/make_reward_fixtures.py                 # writes tests/fixtures/
    .venv/bin/python scripts/make_reward_fixtures.py --out /tmp/fx   # same, elsewhere

It writes, under the output folder:

* hf/tiny-llama-rm/, hf/tiny-neox-rm/, hf/tiny-qwen2-rm/: tiny LlamaForSequenceClassification,
  GPTNeoXForSequenceClassification and Qwen2ForSequenceClassification (num_labels 1), built and
  saved by transformers (its own init, then norms and biases redrawn as make_fixtures.py does).
  Their pad ids cover transformers' three cases of `last_non_pad_token`: pad == EOS (llama: a
  trailing EOS is skipped), pad 0 != EOS (gpt_neox), and no pad id (qwen2: the last token; a
  batch of more than one sequence is an error in transformers, so each is scored alone).
* hf/sepo-rm/: a reward model written by sepo itself (`cargo run --example reward_fixture`:
  `RewardModel::from_causal_lm` on hf/tiny-llama with a seed, then `save`), loaded here with
  AutoModelForSequenceClassification, which must find every weight and no other.
* reward.json: the token sequences, and for each folder the position transformers reads each
  score at and the scores (float64, eager attention), from one right-padded batch with
  attention_mask when the config has a pad id (checked against one-sequence forwards).

The script needs cargo for hf/sepo-rm/ (CARGO_TARGET_DIR is honoured). Everything is seeded; two
runs give identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (the shared helpers: write_json, tokenizer copies, ...)

REPO = mf.REPO
BOS, EOS, VOCAB = mf.BOS, mf.EOS, mf.VOCAB

# Smaller than make_fixtures.py's models (hidden 64): these folders only test the score head
# and where it is read, and they are committed.
COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    max_position_embeddings=256,
    vocab_size=VOCAB,
    bos_token_id=BOS,
    eos_token_id=EOS,
    num_labels=1,
)

# name -> (model_type, config kwargs, seed)
SPECS = {
    "tiny-llama-rm": (
        "llama",
        dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
             pad_token_id=EOS, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        3001),
    "tiny-neox-rm": (
        "gpt_neox",
        dict(num_attention_heads=4, layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False,
             pad_token_id=0,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        3002),
    "tiny-qwen2-rm": (
        "qwen2",
        dict(num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
             pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        3003),
}

# The sepo-written folder: hf/tiny-llama (untied, so its lm_head must be dropped) with this seed.
SEPO_FROM = "tests/fixtures/hf/tiny-llama"
SEPO_SEED = 7


def build_and_save(name, model_type, kwargs, seed, outdir: Path) -> Path:
    import torch
    from transformers import (GPTNeoXConfig, GPTNeoXForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification)
    classes = {
        "llama": (LlamaConfig, LlamaForSequenceClassification),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForSequenceClassification),
        "qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
    }
    cfg_cls, model_cls = classes[model_type]
    cfg = cfg_cls(**COMMON, initializer_range=mf.INIT_STD, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(cfg)  # transformers' own init: normal(0, initializer_range), score included
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
    d = outdir / "hf" / name
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d)
    gen_cfg = d / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    copy_tokenizer(d)
    return d


def copy_tokenizer(d: Path) -> None:
    shutil.copyfile(mf.STORIES / "tokenizer.json", d / "tokenizer.json")
    shutil.copyfile(mf.STORIES / "tokenizer_config.json", d / "tokenizer_config.json")


def sepo_written(outdir: Path) -> Path:
    """hf/sepo-rm/, written by sepo's RewardModel::from_causal_lm + save."""
    d = outdir / "hf" / "sepo-rm"
    if d.exists():
        shutil.rmtree(d)
    cmd = ["cargo", "run", "--quiet", "--example", "reward_fixture", "--",
           str(REPO / SEPO_FROM), str(SEPO_SEED), str(d)]
    print("  " + " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)
    return d


def cases():
    """Token sequences covering where the score is read: a trailing EOS, several trailing EOS,
    an interior 0, trailing 0s, one token, and a sequence of EOS only (all pad when pad == EOS:
    transformers' argmax then gives position 0)."""
    import torch
    g = torch.Generator().manual_seed(4242)

    def rand(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [
        [BOS] + rand(10) + [EOS],
        [BOS] + rand(25),
        [BOS] + rand(5) + [EOS, EOS, EOS],
        [BOS] + rand(3) + [0] + rand(4) + [EOS],
        [BOS],
        [BOS] + rand(15) + [0, 0],
        [EOS, EOS],
        [BOS] + rand(40) + [EOS],
    ]


def load(d: Path, dtype):
    from transformers import AutoModelForSequenceClassification
    m, info = AutoModelForSequenceClassification.from_pretrained(
        str(d), dtype=dtype, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d}: transformers loading info {bad}"
    m.eval()
    return m


def score_one(model, seq):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0, 0].item()


def score_padded(model, seqs, pad):
    """One right-padded batch (pad id after each sequence, attention_mask 0 there)."""
    import torch
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()


def position(seq, pad):
    """transformers' last_non_pad_token for one sequence: argmax(arange(T) * (ids != pad))."""
    if pad is None:
        return len(seq) - 1
    weighted = [i if t != pad else 0 for i, t in enumerate(seq)]
    return max(range(len(seq)), key=lambda i: (weighted[i], -i))


def entry(name, d: Path, seqs):
    import torch
    m64 = load(d, torch.float64)
    m32 = load(d, torch.float32)
    pad = m64.config.pad_token_id
    one = [score_one(m64, s) for s in seqs]
    if pad is None:
        scores, padded_diff = one, None
    else:
        scores = score_padded(m64, seqs, pad)
        padded_diff = max(abs(a - b) for a, b in zip(scores, one))
        # Not 1e-14: eager attention takes its softmax in float32 even in a float64 model, and a
        # longer (padded) row may sum in another order (make_fixtures.py's "Precision" note).
        assert padded_diff <= 1e-6, f"{name}: padded vs unpadded {padded_diff}"
    f32 = [score_one(m32, s) for s in seqs]
    cfg = json.loads((d / "config.json").read_text())
    out = {
        "dir": f"tests/fixtures/hf/{d.name}",
        "model_type": cfg["model_type"],
        "class": cfg["architectures"][0],
        "pad_token_id": pad,
        "positions": [position(s, pad) for s in seqs],
        "scores": scores,
        "max_abs_diff_padded_vs_unpadded": padded_diff,
        "max_abs_diff_float32_vs_float64": max(abs(a - b) for a, b in zip(f32, one)),
    }
    print(f"  {name}: {out['class']}, pad {pad}, positions {out['positions']}, "
          f"padded diff {padded_diff}, f32 diff {out['max_abs_diff_float32_vs_float64']:.2e}")
    return out


def generate(outdir: Path) -> None:
    import torch
    import transformers
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; writing {outdir}")
    seqs = cases()
    models = {}
    for name, (mt, kw, seed) in SPECS.items():
        d = build_and_save(name, mt, kw, seed, outdir)
        models[name] = entry(name, d, seqs)
    print("sepo-written reward model:")
    d = sepo_written(outdir)
    models["sepo-rm"] = {**entry("sepo-rm", d, seqs), "from": SEPO_FROM, "seed": SEPO_SEED}
    mf.write_json(outdir / "reward.json", {
        "_about": "reward-model scores (logits[:, 0] of AutoModelForSequenceClassification, float64, eager "
                  "attention) of each sequence, read at `positions` (transformers' last_non_pad_token); see "
                  "tests/fixtures/README.md",
        "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
        "sequences": seqs,
        "models": models,
    })


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures"), help="output folder (default tests/fixtures)")
    a = ap.parse_args(argv)
    os.chdir(REPO)
    generate(Path(a.out).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
