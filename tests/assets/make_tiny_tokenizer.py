"""Rebuild tests/assets/tiny_tokenizer: a byte-level BPE tokenizer (vocab ~400) with a ChatML template.

Run once by hand (`python tests/assets/make_tiny_tokenizer.py`); the result is committed so tests stay offline.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "title is Toy Story; year is 1995; genres is Animation Children's Comedy",
    "You are a helpful assistant that represents items for recommendation.",
    "name is Golden Dragon; categories is Restaurants, Chinese; city is Phoenix; stars is 4.5",
    "brand is Acme; price is 19.99; description is a small red kettle with a wooden handle",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(__file__).parent / "tiny_tokenizer"
    fast.save_pretrained(out)
    print(f"saved {len(fast)} tokens to {out}")


if __name__ == "__main__":
    main()
