"""Write a Llama-architecture GGUF with random weights and a real tokenizer, then
quantize it with llama.cpp's own quantizer (llama_model_quantize).

Weights above 64 MiB cannot travel to the device machine, so the GPU benchmark
builds its 8B-class model there: the shapes of Llama-3-8B (32 layers, 4096
wide, 14336 FFN, 32 heads, 8 KV heads, 128256 vocabulary) with random F16
weights, quantized to Q4_0 exactly as a real checkpoint would be. Speed is what
is measured with it, not answers.

The tokenizer (SmolLM2's GPT-2-style BPE vocabulary, merges and ChatML chat
template) comes from a small JSON file extracted from a real GGUF; the
vocabulary is padded with plain tokens (`<padN>`, never produced by the
tokenizer) up to --vocab so the embedding and output matrices have the real
model's size.

    python bench/gpu_make_gguf.py --tokenizer tok.json.xz --gguf-py DIR/gguf-py --out model.Q4_0.gguf
    python bench/gpu_make_gguf.py ... --tiny       # 2 layers, 256 wide: a quick pipeline check

Extract the tokenizer JSON from any GGUF with --extract-tokenizer SRC.gguf.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import time

import numpy as np

LLAMA3_8B = dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, vocab=128256)
TINY = dict(n_layer=2, n_embd=256, n_ff=768, n_head=4, n_head_kv=2, vocab=49152)


def extract_tokenizer(src: str, out: str) -> None:
    from gguf import GGUFReader
    reader = GGUFReader(src)
    data = {name: {"types": [int(t) for t in f.types], "value": f.contents()}
            for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    with lzma.open(out, "wt") as fh:
        json.dump(data, fh)


def load_tokenizer(path: str) -> dict:
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as fh:
        return {k: v["value"] for k, v in json.load(fh).items()}


def write_f16(path: str, shape: dict, tok: dict, seed: int = 0) -> None:
    import gguf

    n_layer, n_embd, n_ff = shape["n_layer"], shape["n_embd"], shape["n_ff"]
    n_head, n_head_kv = shape["n_head"], shape["n_head_kv"]
    head_dim = n_embd // n_head
    tokens = list(tok["tokenizer.ggml.tokens"])
    types = list(tok["tokenizer.ggml.token_type"])
    n_real = len(tokens)
    n_vocab = max(shape["vocab"], n_real)
    tokens += [f"<pad{i}>" for i in range(n_vocab - n_real)]
    types += [int(gguf.TokenType.NORMAL)] * (n_vocab - n_real)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("random-llama-%dL-%d" % (n_layer, n_embd))
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tok:
        w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(tok["tokenizer.ggml.merges"]))
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in tok:
            fn(int(tok[f"tokenizer.ggml.{key}"]))
    if "tokenizer.ggml.add_bos_token" in tok:
        w.add_add_bos_token(bool(tok["tokenizer.ggml.add_bos_token"]))
    if "tokenizer.ggml.add_space_prefix" in tok:
        w.add_add_space_prefix(bool(tok["tokenizer.ggml.add_space_prefix"]))
    if "tokenizer.chat_template" in tok:
        w.add_chat_template(tok["tokenizer.chat_template"])

    # One pool of N(0, 0.02) values; every tensor is a view at a random offset
    # (no copies, so an 8B model costs one ~1.3 GB pool, not 16 GB of RAM).
    biggest = max(n_vocab * n_embd, n_ff * n_embd)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    pool = (rng.standard_normal(biggest + (1 << 24), dtype=np.float32) * 0.02).astype(np.float16)
    print(f"random pool of {pool.size / 1e6:.0f} M values in {time.time() - t0:.1f} s", flush=True)

    def rand(*dims):
        n = int(np.prod(dims))
        off = int(rng.integers(0, pool.size - n + 1))
        return pool[off:off + n].reshape(dims)

    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", rand(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", rand(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", rand(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", rand(n_embd, n_ff))
    t0 = time.time()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB, vocab {n_vocab} = {n_real} real + "
          f"{n_vocab - n_real} padding) in {time.time() - t0:.1f} s", flush=True)


def quantize(src: str, dst: str, qtype: str, nthread: int = 0) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = nthread or (os.cpu_count() or 1)
    t0 = time.time()
    rc = llama_cpp.llama_model_quantize(src.encode(), (dst + ".part").encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")
    os.replace(dst + ".part", dst)
    print(f"quantized to {qtype}: {dst} ({os.path.getsize(dst) / 2**30:.2f} GiB) in {time.time() - t0:.1f} s",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf-py", help="llama.cpp's gguf-py folder (if gguf is not importable)")
    p.add_argument("--extract-tokenizer", metavar="SRC_GGUF", help="write the tokenizer JSON of SRC_GGUF to --out")
    p.add_argument("--tokenizer", help="tokenizer JSON (.json or .json.xz)")
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="2 layers, 256 wide (pipeline check)")
    p.add_argument("--quant", default="Q4_0", help="llama.cpp quant type, or F16 to skip quantization")
    p.add_argument("--keep-f16", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.gguf_py:
        sys.path.insert(0, a.gguf_py)
    if a.extract_tokenizer:
        extract_tokenizer(a.extract_tokenizer, a.out)
        return 0
    shape = TINY if a.tiny else LLAMA3_8B
    tok = load_tokenizer(a.tokenizer)
    f16 = a.out if a.quant.upper() == "F16" else a.out + ".f16.gguf"
    write_f16(f16, shape, tok, a.seed)
    if f16 != a.out:
        quantize(f16, a.out, a.quant.upper())
        if not a.keep_f16:
            os.remove(f16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
