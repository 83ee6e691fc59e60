"""The Python baseline of scripts/bench_weights.sh: write, hash and read back a safetensors file of
a Llama's tensors (Hugging Face names and shapes, f32), timed phase by phase.

Usage: python scripts/bench_weights.py OUT_DIR [hidden layers heads intermediate vocab] [REPS]
Prints one line per rep: `py write S fsync S hash S read S copy S total S` (total: write +
fsync + hash + read; `read` is load_file, which maps the file, plus touching every page; `copy`
is cloning the loaded tensors into owned memory, not in the total). The hash is blake3 when the
`blake3` module is installed, else hashlib's blake2b (slower than blake3; the line says which).
Tensor creation is not timed.
"""

import hashlib
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

try:
    import blake3  # type: ignore

    HASH = "blake3"
except ImportError:  # `pip install blake3` (PyPI)
    blake3 = None
    HASH = "blake2b"


def llama_tensors(hidden, layers, heads, inter, vocab):
    g = torch.Generator().manual_seed(0)
    t = {}

    def rnd(*shape):
        return torch.empty(*shape).normal_(0, 0.02, generator=g)

    t["model.embed_tokens.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        for n in ("q", "k", "v", "o"):
            t[p + f"self_attn.{n}_proj.weight"] = rnd(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
        t[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
        t[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
    t["model.norm.weight"] = torch.ones(hidden)
    t["lm_head.weight"] = rnd(vocab, hidden)
    return t


def file_hash(path):
    h = blake3.blake3() if blake3 else hashlib.blake2b()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def main():
    out = sys.argv[1]
    dims = [int(x) for x in sys.argv[2:7]] if len(sys.argv) >= 7 else [768, 12, 12, 3072, 32000]
    reps = int(sys.argv[7]) if len(sys.argv) >= 8 else 3
    hidden, layers, heads, inter, vocab = dims
    tensors = llama_tensors(hidden, layers, heads, inter, vocab)
    n = sum(t.numel() for t in tensors.values())
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    print(f"py params {n} threads {torch.get_num_threads()} hash {HASH}", flush=True)
    for _ in range(reps):
        if os.path.exists(path):
            os.remove(path)
        t0 = time.perf_counter()
        save_file(tensors, path, metadata={"format": "pt"})
        t1 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t2 = time.perf_counter()
        file_hash(path)
        t3 = time.perf_counter()
        back = load_file(path)
        # load_file maps the file lazily: touch one value per 4 KiB page so every byte is read
        s = sum(float(v.reshape(-1)[::1024].sum()) for v in back.values())
        t4 = time.perf_counter()
        # what an owned, writable copy costs (sepo's loaded parameters are owned buffers)
        owned = {k: v.clone() for k, v in back.items()}
        t5 = time.perf_counter()
        del back, s, owned
        print(
            f"py write {t1 - t0:.3f} fsync {t2 - t1:.3f} hash {t3 - t2:.3f} "
            f"read {t4 - t3:.3f} copy {t5 - t4:.3f} total {t4 - t0:.3f}",
            flush=True,
        )
    os.remove(path)


if __name__ == "__main__":
    main()
