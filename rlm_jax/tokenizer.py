"""One `Tokenizer` protocol for the policy: sentencepiece models trained here, and local HF tokenizers.

A reasoning trace is a sequence of steps; one step is the text up to the step delimiter (a newline by
default). The delimiter is always one explicit token, `step_id`, so decoding can stop at it and the
PRM/value heads can score at it. `encode_steps` encodes each step separately and appends `step_id`, so
the delimiter stays a clean token even for tokenizers that would merge "\\n" with its neighbours
(byte-level BPEs often have tokens like ".\\n" or "\\n\\n").

    tok = SentencePieceTokenizer.train(texts, vocab_size=512, out="tok/tokenizer.model")
    tok = HFTokenizer.from_folder("path/to/local/model")
    tok = load_tokenizer(path)               # either, by what the path holds
    ids = tok.encode_steps(["2 + 3 = 5", "answer: 5"])   # [..., step_id, ..., step_id]

Nothing is downloaded: HF tokenizers load with `local_files_only=True`.
"""
from __future__ import annotations

import io
import functools
import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

STEP_DELIMITER = "\n"
_SIDECAR = "rlm_tokenizer.json"  # records the tokenizer kind and step delimiter next to the files
_SP_FILE = "tokenizer.model"


def step_stops(tok) -> frozenset[int]:
    """Every id that ends a step: step_id and the tokenizer's step_end_ids (merged delimiters), if any."""
    return frozenset((tok.step_id, *getattr(tok, "step_end_ids", ())))


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of rlm_jax needs from a tokenizer.

    encode(text) gives the text's ids without BOS/EOS; decode(ids) inverts it (special tokens kept).
    `step_id` is the single token of `step_delimiter`; `bos_id` is None when the tokenizer has no BOS.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    step_id: int
    step_delimiter: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_steps(self, steps: Sequence[str], prompt: str | None = None) -> list[int]: ...

    def split_steps(self, ids: Sequence[int]) -> list[list[int]]: ...

    def save(self, folder) -> Path: ...


class _StepMixin:
    """Step helpers shared by the implementations (they need encode, step_id, step_delimiter)."""

    step_end_ids: tuple[int, ...] = ()  # more ids that end a step: see HFTokenizer.step_end_ids

    def encode_steps(self, steps: Sequence[str], prompt: str | None = None) -> list[int]:
        """[prompt ids] + for each step: its ids + [step_id]. Step texts must not contain the delimiter."""
        ids = list(self.encode(prompt)) if prompt else []
        for s in steps:
            if self.step_delimiter in s:
                raise ValueError(f"step {s!r} contains the step delimiter {self.step_delimiter!r}; split it "
                                 "into separate steps")
            ids += self.encode(s) + [self.step_id]
        return ids

    def split_steps(self, ids: Sequence[int]) -> list[list[int]]:
        """Splits ids after each step end (step_id or a step_end_id, kept in its step); a trailing partial
        step is kept too."""
        steps, cur, stops = [], [], step_stops(self)
        for i in ids:
            cur.append(int(i))
            if i in stops:
                steps.append(cur)
                cur = []
        return steps + [cur] if cur else steps

    def decode_steps(self, ids: Sequence[int]) -> list[str]:
        """The text of each step (without its delimiter)."""
        return [self.decode([i for i in s if i != self.step_id]).removesuffix(self.step_delimiter)
                for s in self.split_steps(ids)]

    def _write_sidecar(self, folder: Path, kind: str, extra: dict | None = None) -> None:
        (folder / _SIDECAR).write_text(json.dumps({"kind": kind, "step_delimiter": self.step_delimiter,
                                                   **(extra or {})}) + "\n")


# --------------------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(_StepMixin):
    """A sentencepiece model with byte fallback (any text round-trips) and the step delimiter as a
    user-defined symbol (always exactly one token). Ids: unk 0, bos 1, eos 2, pad 3, step 4.

    Normalization is off ("identity", no whitespace collapsing, no dummy prefix), so
    `decode(encode(a) + encode(b)) == a + b`: steps encoded one by one decode to the joined text.
    (U+2581 "▁", sentencepiece's space marker, decodes to a space: the one character that does not
    round-trip.)
    """

    def __init__(self, model_proto: bytes, step_delimiter: str = STEP_DELIMITER, path: Path | None = None):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.path = path
        self.step_delimiter = step_delimiter
        ids = self._sp.encode(step_delimiter)
        if len(ids) != 1 or self._sp.is_unknown(ids[0]):
            raise ValueError(
                f"step delimiter {step_delimiter!r} is not a single token of this sentencepiece model "
                f"(encodes to {ids}); train it with SentencePieceTokenizer.train(step_delimiter=...), which "
                "adds it as a user-defined symbol")
        self.step_id = ids[0]
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        if self.eos_id < 0:
            raise ValueError("this sentencepiece model has no EOS piece (eos_id=-1); retrain with eos_id >= 0")

    @classmethod
    def train(cls, corpus_texts: Iterable[str], vocab_size: int, out=None, *,
              step_delimiter: str = STEP_DELIMITER, model_type: str = "bpe", split_digits: bool = True,
              extra_symbols: Sequence[str] = ()) -> "SentencePieceTokenizer":
        """Trains deterministically: the same corpus and settings give a byte-identical model file.

        Args:
          corpus_texts: training texts (each may span several lines/steps).
          vocab_size: total pieces, including 256 byte-fallback pieces, the 4 specials, the delimiter and
            `extra_symbols` (so at least ~300 for a tiny corpus).
          out: where to write the model: a path ending in ".model", or a folder (gets tokenizer.model and
            the rlm_tokenizer.json sidecar); None keeps it in memory only.
          split_digits: every digit is its own token (arithmetic-friendly; numbers tokenize uniformly).
        """
        import sentencepiece as spm

        texts = [str(t) for t in corpus_texts]
        if not texts:
            raise ValueError("SentencePieceTokenizer.train needs a non-empty corpus")
        buf = io.BytesIO()  # writing to memory keeps file paths out of the model proto (determinism)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
                user_defined_symbols=[step_delimiter, *extra_symbols], byte_fallback=True,
                split_digits=split_digits, character_coverage=1.0, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                # Determinism: one thread, no sampling or shuffling of the input.
                num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
                max_sentence_length=1 << 20, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed ({e}); vocab_size={vocab_size} must exceed 256 "
                             "byte pieces + specials + the corpus' distinct characters, and be reachable "
                             "from the corpus (lower it for a tiny corpus)") from None
        tok = cls(buf.getvalue(), step_delimiter)
        if out is not None:
            out = Path(out)
            if out.suffix == ".model":
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tok._proto)
                tok.path = out
            else:
                tok.save(out)
        return tok

    @classmethod
    def load(cls, path, step_delimiter: str | None = None) -> "SentencePieceTokenizer":
        """Loads a .model file, or a folder holding tokenizer.model (and maybe the sidecar)."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / _SP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        if step_delimiter is None:
            side = folder / _SIDECAR
            step_delimiter = json.loads(side.read_text())["step_delimiter"] if side.is_file() else STEP_DELIMITER
        return cls(path.read_bytes(), step_delimiter, path=path)

    def save(self, folder) -> Path:
        """Writes folder/tokenizer.model + the sidecar; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _SP_FILE).write_bytes(self._proto)
        self._write_sidecar(folder, "sentencepiece")
        return folder

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


# ------------------------------------------------------------------------------------------ HF


class HFTokenizer(_StepMixin):
    """A local transformers tokenizer (tokenizer.json / tokenizer_config.json in a folder).

    The step delimiter must already be one token of the vocabulary ("\\n" is, in byte-level BPEs such as
    Llama-3's and Qwen2's); otherwise `from_folder` raises rather than adding a token, since a new token
    would need a resized, untrained embedding row. `pad_id` falls back to `eos_id` when the tokenizer has
    no pad token (left padding is masked, so its id never matters to the model).
    """

    def __init__(self, hf_tokenizer, step_delimiter: str = STEP_DELIMITER, system_prompt: str | None = None,
                 fewshot: Sequence[Sequence[str]] = ()):
        """system_prompt: None: prompts are the task's text (`formatting.prompt_ids`); a string (may be empty):
        prompts go through the tokenizer's chat template as one user turn after that system prompt and the
        `fewshot` (question, solution) turns, and a solution ends with the template's end-of-turn token
        (`eos_id`: <|im_end|>, <|eot_id|>)."""
        self.hf = hf_tokenizer
        self.step_delimiter = step_delimiter
        self.system_prompt = system_prompt
        self.fewshot = tuple((str(q), str(a)) for q, a in fewshot)
        ids = hf_tokenizer.encode(step_delimiter, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"step delimiter {step_delimiter!r} is not a single token of this tokenizer (encodes to {ids}); "
                "pick a delimiter that is one token, or add it as a special token "
                "(hf_tokenizer.add_special_tokens) and resize the model's embeddings")
        self.step_id = ids[0]
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("this tokenizer has no EOS token; set eos_token in tokenizer_config.json")
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.bos_id = None if hf_tokenizer.bos_token_id is None else int(hf_tokenizer.bos_token_id)
        self.pad_id = self.eos_id if hf_tokenizer.pad_token_id is None else int(hf_tokenizer.pad_token_id)
        self.vocab_size = len(hf_tokenizer)  # includes added tokens, unlike hf_tokenizer.vocab_size
        if self.chat:
            from rlm_jax import prompting  # it builds on this module

            self.eos_id = prompting.primary_stop(hf_tokenizer, self.prompt_format)

    @property
    def chat(self) -> bool:
        return self.system_prompt is not None

    @property
    def prompt_format(self):
        from rlm_jax import prompting

        return prompting.PromptFormat(chat_template="auto", system=self.system_prompt or None, fewshot=self.fewshot)

    def chat_prompt_ids(self, text: str) -> list[int]:
        """`text` as the user's turn of the chat template, with the assistant's generation prompt."""
        from rlm_jax import prompting

        return prompting.prompt_ids(self.hf, self.prompt_format, text)

    @classmethod
    def from_folder(cls, folder, step_delimiter: str | None = None) -> "HFTokenizer":
        """Loads with `AutoTokenizer.from_pretrained(folder, local_files_only=True)`."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {folder}")
        side = json.loads((folder / _SIDECAR).read_text()) if (folder / _SIDECAR).is_file() else {}
        if step_delimiter is None:
            step_delimiter = side.get("step_delimiter", STEP_DELIMITER)
        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), step_delimiter,
                   side.get("system_prompt"), side.get("fewshot", ()))

    @functools.cached_property
    def step_end_ids(self) -> tuple[int, ...]:
        """The tokens other than step_id whose text ends with the step delimiter: where a byte-level BPE merged
        it with the characters before it (".\n\n", ":\n\n", "\n\n\n" in Qwen2's and Llama 3's vocabularies
        for "\n\n"). They end a step as step_id does (`LMSpec.step_ends`) and stay in it; the step's text is
        theirs minus the delimiter. Special tokens never count. A delimiter completed across two tokens
        ("\n" then "\n") does not end a step: the pre-tokenizers of these vocabularies keep newline runs in
        one piece, so the model rarely writes it that way."""
        special = set(self.hf.all_special_ids)
        texts = self.hf.batch_decode([[i] for i in range(self.vocab_size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        return tuple(i for i, t in enumerate(texts)
                     if t.endswith(self.step_delimiter) and i != self.step_id and i not in special)

    def save(self, folder) -> Path:
        folder = Path(folder)
        self.hf.save_pretrained(str(folder))
        chat = {"system_prompt": self.system_prompt, "fewshot": [list(e) for e in self.fewshot]}
        self._write_sidecar(folder, "hf", chat if self.chat else {})
        return folder

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False)


def load_tokenizer(path, step_delimiter: str | None = None) -> Tokenizer:
    """Loads whatever `path` holds: a .model file or a folder with tokenizer.model -> sentencepiece;
    a folder with tokenizer.json / tokenizer_config.json -> HF. The rlm_tokenizer.json sidecar written by
    `save` decides when present (an HF Llama folder holds both kinds of files)."""
    path = Path(path)
    if path.is_file():
        return SentencePieceTokenizer.load(path, step_delimiter)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a .model file or a tokenizer folder")
    side = path / _SIDECAR
    kind = json.loads(side.read_text())["kind"] if side.is_file() else None
    if kind == "sentencepiece" or (kind is None and (path / _SP_FILE).is_file()
                                   and not (path / "tokenizer.json").is_file()
                                   and not (path / "tokenizer_config.json").is_file()):
        return SentencePieceTokenizer.load(path, step_delimiter)
    if kind == "hf" or (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return HFTokenizer.from_folder(path, step_delimiter)
    raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.model (sentencepiece) or "
                            f"tokenizer.json / tokenizer_config.json (HF); found {sorted(p.name for p in path.iterdir())}")
