"""The one item-prompt formatter, used by LRCL, CRRL and export and saved with every checkpoint (docs/method.md,
"The item prompt")."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

THOUGHT_TOKEN = "<|Thought|>"
PROMPT_FORMAT_FILE = "prompt_format.json"

Attributes = Sequence[tuple[str, str]]


def normalise_attributes(attributes: Any) -> list[tuple[str, str]]:
    """Accept `[{"key": k, "value": v}, ...]`, `[(k, v), ...]` or an ordered `{k: v}` mapping."""
    if isinstance(attributes, Mapping):
        pairs = list(attributes.items())
    elif isinstance(attributes, (str, bytes)):
        pairs = [()]
    else:
        pairs = [(a["key"], a["value"]) if isinstance(a, Mapping) else () if isinstance(a, str) else tuple(a)
                 for a in attributes]  # fmt: skip
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"an item is a list of (key, value) pairs or a {{key: value}} mapping, got "
                         f"{attributes!r:.80}; to embed one item pass a list holding it, e.g. [[('title', 'Toy')]]")
    return [(str(k), "" if v is None else str(v)) for k, v in pairs]


@dataclass
class ItemPromptFormatter:
    """Renders an item's attributes into token ids that end with the thought token and EOS."""

    system_prompt: str = (
        "You are an expert recommender. Read the item and condense what it is into a single representation."
    )
    user_prefix: str = "Item: "
    max_value_chars: int = 100
    max_length: int = 256
    use_chat_template: bool = True
    thought_token: str = THOUGHT_TOKEN

    # ---- text -----------------------------------------------------------------------------------------------
    def clean_value(self, value: str, max_chars: int | None = None) -> str:
        value = " ".join(str(value).replace(";", ".").split())  # newlines -> spaces, `;` is our separator
        return value[: self.max_value_chars if max_chars is None else max_chars]

    def render_attributes(self, attributes: Attributes, max_chars: int | None = None) -> str:
        """The item text: `key is value` pairs joined by `; `, each value cleaned and cut to `max_chars`."""
        return "; ".join(f"{k} is {self.clean_value(v, max_chars)}" for k, v in attributes)

    def _user_text(self, body: str, tokenizer) -> str:
        content = self.user_prefix + body
        if self.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return (self.system_prompt + "\n" if self.system_prompt else "") + content + "\n"

    # ---- tokens ---------------------------------------------------------------------------------------------
    def suffix_ids(self, tokenizer) -> list[int]:
        thought_id = tokenizer.convert_tokens_to_ids(self.thought_token)
        if thought_id is None or thought_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {self.thought_token!r} token: call add_thought_token(tokenizer) first")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before building prompts")
        return [thought_id, tokenizer.eos_token_id]

    def _prefix_ids(self, attributes: Attributes, tokenizer, value_chars: int | None = None) -> list[int]:
        body = self.render_attributes(attributes, value_chars)
        return tokenizer(self._user_text(body, tokenizer), add_special_tokens=False)["input_ids"]

    def prefix_ids(self, attributes: Any, tokenizer) -> list[int]:
        """Token ids before the thought token. Over-long items lose trailing attributes, then value characters;
        the template, the thought token and EOS are never cut."""
        attrs = normalise_attributes(attributes)
        budget = self.max_length - 2  # thought token + EOS
        ids = self._prefix_ids(attrs, tokenizer)
        while len(ids) > budget and len(attrs) > 1:
            attrs = attrs[:-1]
            ids = self._prefix_ids(attrs, tokenizer)
        chars = self.max_value_chars
        while len(ids) > budget and chars > 0:
            chars = chars * budget // (len(ids) + 1)  # shrink in proportion to the overflow
            ids = self._prefix_ids(attrs, tokenizer, chars)
        if len(ids) > budget:
            raise ValueError(
                f"the prompt template alone takes {len(ids)} tokens but max_length is {self.max_length}: "
                "raise max_length or shorten system_prompt/user_prefix"
            )
        return ids

    def template_ids(self, tokenizer) -> list[int]:
        """The prompt of an item without attributes: the template that every item's text sits in."""
        return tokenizer(self._user_text("", tokenizer), add_special_tokens=False)["input_ids"]

    def item_span(self, prefix_ids: Sequence[int], tokenizer, template: Sequence[int] | None = None) -> tuple[int, int]:
        """[start, end) of the item's own tokens in `prefix_ids`: what is left after the longest common token prefix
        and the longest common token suffix with `template_ids` (by ids, so a BPE merge across the boundary only
        moves it by a token). Depends on the item and this format only."""
        template = self.template_ids(tokenizer) if template is None else template
        n, m = len(prefix_ids), len(template)
        start = 0
        while start < min(n, m) and prefix_ids[start] == template[start]:
            start += 1
        tail = 0
        while tail < min(n - start, m - start) and prefix_ids[n - 1 - tail] == template[m - 1 - tail]:
            tail += 1
        return start, n - tail

    # ---- persistence ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ItemPromptFormatter":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown prompt-format fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def save(self, folder: str | Path) -> None:
        Path(folder, PROMPT_FORMAT_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "ItemPromptFormatter":
        return cls.from_dict(json.loads(Path(folder, PROMPT_FORMAT_FILE).read_text()))


def add_thought_token(tokenizer, model=None, thought_token: str = THOUGHT_TOKEN) -> int:
    """Add the thought token; grow the model's embedding table only when the token id does not fit (never shrink)."""
    if thought_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [thought_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(thought_token)
    if model is not None:
        embeddings = model.get_input_embeddings()
        # `num_embeddings`, not `weight.shape[0]`: under DeepSpeed ZeRO-3 the local weight is an empty partition.
        rows = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
        if token_id >= rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return token_id

