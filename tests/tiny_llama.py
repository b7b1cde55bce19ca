"""Build a tiny random-weight Llama checkpoint in Hugging Face layout, offline."""

from __future__ import annotations

import io
import random
from pathlib import Path

WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang in the tree near "
         "old house where people live happy lives with tea bread water sun moon star river").split()


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model_proto, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model_proto.getvalue())
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
        ' "add_bos_token": true, "add_eos_token": false}')
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    import sys

    print(make_tiny_llama(Path(sys.argv[1])))
