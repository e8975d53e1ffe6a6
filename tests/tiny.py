"""Builders of tiny, real-format base models for tests (no network, a few seconds)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The movie was great and the actors were wonderful.",
    "The movie was terrible, boring and far too long.",
    "I love this film, it is a happy and joyful story.",
    "What an awful, sad and painful experience that was.",
    "The food was good, the service was friendly and fast.",
    "Nothing happened for an hour and then it ended.",
] * 4


def build_tiny_llama(folder: Path, *, vocab_size: int = 320, dim: int = 48) -> Path:
    """Save a tiny random Llama causal LM and a BPE tokenizer trained on CORPUS.

    The folder loads with ``fastdia.load_base_model(str(folder))`` like any real model.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else len(fast),
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
