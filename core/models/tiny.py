"""The ``tiny`` preset: a small Llama-architecture model with a byte-level BPE tokenizer that rlm builds
itself from text shaped like the task generators' (numbers, arithmetic, code, logic puzzles, instructions).
The tokenizer is the same for every seed; the seed only sets the initial weights."""

from __future__ import annotations

import random
from typing import Iterator

from rlm.core.contracts import PluginConfig

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an of to and in is are was were be it that this for on with as by at from or not no yes "
    "answer question solve find compute total each how many much more less than times plus minus "
    "number numbers sum product difference left right first second third last final result step so "
    "therefore because if then else true false knight knave knights knaves liar truth teller says "
    "said person people island inhabitant who which what when where all some none only both either "
    "def return print import for while range len list dict int str float class self None True False "
    "write function python code test assert value values input output string integer sorted "
    "passage query relevant rank document negation does not contain mention about "
    "response word words sentence sentences paragraph paragraphs letter letters capital lowercase "
    "include keyword keywords title end with start format json bullet points section highlight "
    "apples oranges books coins dollars cents hours minutes days weeks students teacher store buys "
    "sells costs price half twice double triple remaining altogether per every"
).split()


def corpus(seed: int = 1234, lines: int = 3000) -> Iterator[str]:
    """Deterministic training text for the tokenizer."""
    rng = random.Random(seed)
    for i in range(lines):
        kind = i % 6
        if kind == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            yield f"What is {a} {op} {b}? The answer is {eval(f'{a}{op}{b}')}. #### {eval(f'{a}{op}{b}')}"
        elif kind == 1:
            n = rng.randint(2, 8)
            names = rng.sample(["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"], n)
            who = rng.choice(names)
            roles = ", ".join(f"{p} is a {rng.choice(('knight', 'knave'))}" for p in names)
            yield f"{who} says: {rng.choice(names)} is a {rng.choice(('knight', 'knave'))}. {roles}."
        elif kind == 2:
            f = rng.choice(["add", "mul", "sub", "total", "count"])
            yield f"def {f}(a, b):\n    return a {rng.choice('+-*')} b\n\nassert {f}({rng.randint(0, 9)}, 2) == {rng.randint(0, 20)}"
        elif kind == 3:
            yield " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20))).capitalize() + "."
        elif kind == 4:
            yield f"<answer>{rng.randint(0, 10000)}</answer> [{', '.join(str(rng.randint(0, 9)) for _ in range(5))}]"
        else:
            yield " ".join(rng.choice(_WORDS).upper() if rng.random() < 0.2 else rng.choice(_WORDS)
                           for _ in range(rng.randint(4, 12))) + "\n- " + rng.choice(_WORDS)


class TinyPreset(PluginConfig):
    """Architecture of the ``tiny`` preset (every number a field)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False


def build_tokenizer(vocab_size: int = 512):
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(list(corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None, model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny(seed: int = 0, preset: TinyPreset | None = None):
    """Return ``(model, tokenizer)`` for the tiny preset, weights initialised from ``seed``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    preset = preset or TinyPreset()
    tokenizer = build_tokenizer(preset.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        initializer_range=preset.initializer_range,
        tie_word_embeddings=preset.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    saved_rng = torch.random.get_rng_state()  # seed the weights without disturbing the caller's RNG
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(saved_rng)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    return model, tokenizer
