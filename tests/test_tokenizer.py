"""Tokenizers: deterministic sentencepiece training, round trips, single-token step delimiter and EOS,
local HF tokenizers, and dispatch by what a path holds."""
import random

import pytest

from rlm_jax import tokenizer as tk

CHARS = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 +-*/=()<>[]{},.:;!?'\"_%^&|~\t\néüßπ∑√≤≥→日本語😀"


def _corpus(seed, n=300):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice("+-*/")
        lines.append(f"compute {a} {op} {b}\nstep: {a} {op} {b} = x\nanswer: x ≤ {a + b} √π")
    return lines


def _random_texts(seed, n=50):
    rng = random.Random(seed)
    return [''.join(rng.choice(CHARS) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    return tk.SentencePieceTokenizer.train(_corpus(0), vocab_size=320, out=tmp_path_factory.mktemp("sp"))


def test_sentencepiece_training_is_deterministic(tmp_path):
    a = tk.SentencePieceTokenizer.train(_corpus(1), 320, out=tmp_path / "a" / "tok.model")
    b = tk.SentencePieceTokenizer.train(_corpus(1), 320, out=tmp_path / "b")
    assert (tmp_path / "a" / "tok.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a.model_proto == b.model_proto
    c = tk.SentencePieceTokenizer.train(_corpus(2), 320)  # a different corpus gives a different model
    assert c.model_proto != a.model_proto


def test_sentencepiece_round_trip_and_specials(sp_tok):
    assert isinstance(sp_tok, tk.Tokenizer)
    for text in _random_texts(3) + ["  two leading spaces", "trailing\n\n", "", "12345 + 678 = 7023"]:
        assert sp_tok.decode(sp_tok.encode(text)) == text, repr(text)
    assert sp_tok.encode("\n") == [sp_tok.step_id]
    assert sp_tok.encode("a\nb").count(sp_tok.step_id) == 1  # never merged with its neighbours
    assert len({sp_tok.eos_id, sp_tok.pad_id, sp_tok.bos_id, sp_tok.step_id}) == 4
    assert sp_tok.id_to_piece(sp_tok.eos_id) == "</s>" and sp_tok.vocab_size == 320
    assert sp_tok.eos_id not in sp_tok.encode("</s>")  # EOS text is not the EOS token: no injection
    assert sp_tok.encode("2024") == [sp_tok.encode(d)[0] for d in "2024"]  # split_digits


def test_steps(sp_tok):
    steps = ["3 + 4 = 7", "7 * 2 = 14", "answer: 14"]
    ids = sp_tok.encode_steps(steps, prompt="Q: (3+4)*2?\n")
    assert sp_tok.decode(ids) == "Q: (3+4)*2?\n" + "".join(s + "\n" for s in steps)
    split = sp_tok.split_steps(ids)
    assert all(s[-1] == sp_tok.step_id for s in split) and len(split) == 4  # the prompt's line, 3 steps
    assert sp_tok.decode_steps(ids)[1:] == steps
    assert sp_tok.split_steps(ids + sp_tok.encode("partial"))[-1] == sp_tok.encode("partial")
    with pytest.raises(ValueError, match="contains the step delimiter"):
        sp_tok.encode_steps(["two\nlines"])


def test_sentencepiece_save_load(sp_tok, tmp_path):
    folder = sp_tok.save(tmp_path / "t")
    for loaded in (tk.SentencePieceTokenizer.load(folder), tk.load_tokenizer(folder),
                   tk.load_tokenizer(folder / "tokenizer.model")):
        assert isinstance(loaded, tk.SentencePieceTokenizer)
        assert loaded.model_proto == sp_tok.model_proto and loaded.step_id == sp_tok.step_id
    with pytest.raises(ValueError, match="not a single token"):
        tk.SentencePieceTokenizer.load(folder, step_delimiter="<step>")


def test_custom_step_delimiter(tmp_path):
    tok = tk.SentencePieceTokenizer.train(_corpus(4), 320, out=tmp_path, step_delimiter="<step>")
    assert tok.encode("<step>") == [tok.step_id]
    assert tk.load_tokenizer(tmp_path).step_delimiter == "<step>"  # remembered by the sidecar


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size=100 must exceed 256 byte pieces"):
        tk.SentencePieceTokenizer.train(_corpus(0, n=20), 100)


def _hf_folder(path):
    """A byte-level BPE trained offline with `tokenizers`, saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(_corpus(5), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return path


def test_hf_tokenizer_from_local_folder(tmp_path):
    folder = _hf_folder(tmp_path / "hf")
    tok = tk.HFTokenizer.from_folder(folder)
    assert isinstance(tok, tk.Tokenizer) and isinstance(tk.load_tokenizer(folder), tk.HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 400
    assert tok.encode("\n") == [tok.step_id]
    for text in _random_texts(6):
        assert tok.decode(tok.encode(text)) == text, repr(text)
    ids = tok.encode_steps(["1 + 2 = 3", "answer: 3"])
    assert tok.decode_steps(ids) == ["1 + 2 = 3", "answer: 3"]
    saved = tok.save(tmp_path / "copy")
    assert tk.load_tokenizer(saved).encode("12 + 3") == tok.encode("12 + 3")
    with pytest.raises(ValueError, match="'<step>' is not a single token"):
        tk.HFTokenizer.from_folder(folder, step_delimiter="<step>")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        tk.load_tokenizer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected tokenizer.model"):
        tk.load_tokenizer(tmp_path / "empty")


def test_export_hf_with_tokenizer(sp_tok, tmp_path):
    """A tokenizer exported with the model: its ids land in config.json and it loads back."""
    import json

    import jax

    from rlm_jax.models import hf, transformer
    from rlm_jax.models.config import ModelConfig

    cfg = ModelConfig(vocab_size=sp_tok.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      mlp_dim=32)
    folder = hf.export_hf(cfg, transformer.init_params(cfg, jax.random.key(0)), tmp_path / "m", tokenizer=sp_tok)
    d = json.loads((folder / "config.json").read_text())
    assert (d["eos_token_id"], d["pad_token_id"], d["bos_token_id"]) == (sp_tok.eos_id, sp_tok.pad_id, sp_tok.bos_id)
    assert tk.load_tokenizer(folder).model_proto == sp_tok.model_proto
    with pytest.raises(hf.HFCheckpointError, match="tokenizer has 320 tokens but the model's vocab_size is 64"):
        hf.export_hf(cfg.replace(vocab_size=64), {}, tmp_path / "small", tokenizer=sp_tok)  # checked first
