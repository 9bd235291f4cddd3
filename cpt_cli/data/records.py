"""Task records as documents with trained parts: prompt/completion pairs and chat conversations.

A plain-text document is trained on every token. A task record becomes a list of *segments*,
`(text, trained)` pairs whose texts joined are the document: a prompt/completion record is
`[(prompt, False), (completion, True)]` under `loss_on: completion`; a conversation alternates
untrained text (system and user turns, the template's markup) with trained assistant turns
(their end-of-turn markup included) under `loss_on: assistant`. The cache tokenizes each
segment on its own and concatenates the ids, so the trained tokens are exactly the tokens of
the trained segments, with no boundary token half in the prompt and half in the answer; scoring
tokenizes the same way, so training and evaluation agree on which tokens are the answer.

As lm-evaluation-harness's `loglikelihood` does, whitespace that ends a prompt is moved to the
start of its completion ("Answer: " + "Paris" -> "Answer:" + " Paris"): byte-level tokenizers
attach a space to the word after it, so the completion's first token is " Paris" as it would be
in running text, not a lone " " trained as the prompt's last token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cpt_cli.config import SourceConfig

Segments = list[tuple[str, bool]]
ROLES = ("system", "user", "assistant", "tool")


def prompt_completion_split(source: SourceConfig) -> tuple[str, str] | None:
    """A prompt_completion source's template cut at its `{completion_field}` placeholder: the
    prompt's format string and the completion's; None without a template."""
    if source.template is None:
        return None
    placeholder = "{" + source.completion_field + "}"
    cut = source.template.index(placeholder)
    return source.template[:cut], source.template[cut:]


def _field_text(record: dict[str, Any], name: str, key: str, where: str) -> str:
    if name not in record:
        raise ValueError(f"{where}: field {name!r} is missing; the record has "
                         f"{', '.join(sorted(map(str, record))) or 'no fields'}. Set {key} for "
                         "this source.")
    value = record[name]
    if not isinstance(value, str):
        kind = "null" if value is None else f"a value of type {type(value).__name__}"
        raise ValueError(f"{where}: field {name!r} holds {kind}, not text")
    return value


def prompt_completion_segments(source: SourceConfig, record: Any, where: str) -> Segments:
    """The prompt and completion of one record (trailing prompt whitespace moved to the
    completion); the completion must hold more than whitespace."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a prompt and a completion, got "
                         f"{'a plain file' if hasattr(record, 'path') else type(record).__name__}"
                         "; prompt_completion sources read .jsonl/.json/.parquet/.csv records")
    completion = _field_text(record, source.completion_field, "completion_field", where)
    if not completion.strip():
        raise ValueError(f"{where}: field {source.completion_field!r} is an empty completion: "
                         "there is nothing to train or score")
    split = prompt_completion_split(source)
    if split is None:
        prompt = _field_text(record, source.prompt_field, "prompt_field", where)
    else:
        try:
            prompt = split[0].format_map(record)
            completion = split[1].format_map(record)
        except KeyError as err:
            raise ValueError(f"{where}: template field {err} is missing; the record has "
                             f"{', '.join(sorted(map(str, record))) or 'no fields'}") from None
    stripped = prompt.rstrip()
    prompt, completion = stripped, prompt[len(stripped):] + completion
    trained_prompt = source.loss_on == "all"
    return [(prompt, trained_prompt), (completion, True)] if prompt else [(completion, True)]


def check_messages(messages: Any, field_name: str, where: str) -> list[dict[str, str]]:
    """A conversation as a list of {role, content} with known roles; a ValueError naming the
    first message that is not one."""
    if not isinstance(messages, list) or not messages:
        kind = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise ValueError(f"{where}: field {field_name!r} holds {kind}, not a list of "
                         "{role, content} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} is {type(message).__name__}, not an object "
                             "with role and content")
        missing = [k for k in ("role", "content") if k not in message]
        if missing:
            raise ValueError(f"{where}: message {i} has no {' and no '.join(missing)} (it has "
                             f"{', '.join(sorted(map(str, message))) or 'no fields'})")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has the unknown role {message['role']!r}; "
                             f"roles are {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i}'s content is "
                             f"{type(message['content']).__name__}, not text")
    return messages


class ChatRenderer:
    """Renders conversations with a Jinja chat template (transformers' renderer: the sandboxed
    environment and globals a tokenizer's `apply_chat_template` uses) and finds the assistant
    turns in the rendering.

    A turn is found by rendering the conversation prefix by prefix: the text that the
    conversation up to and including assistant turn i adds to the conversation before it (with
    the generation prompt, the "<|assistant|>" header a model is given) is turn i, its
    end-of-turn markup included. Searching for the reply's text instead would mark the wrong
    place when the same words appear twice (a user quoting the answer, two equal replies, or a
    template that prints a turn twice). A template that renders earlier turns differently once
    later ones follow has no such prefixes, and is refused by name.
    """

    def __init__(self, template: str, special_tokens: dict[str, str]) -> None:
        self.template = template
        self.special_tokens = special_tokens

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[messages],
                                            chat_template=self.template,
                                            add_generation_prompt=generation_prompt,
                                            **self.special_tokens)
        return rendered[0]

    def segments(self, messages: list[dict[str, str]], loss_on: str, where: str) -> Segments:
        try:
            full = self.render(messages, False)
            if loss_on != "assistant":
                return [(full, True)]
            return list(self._assistant_turns(messages, full, where))
        except ValueError as err:
            if str(err).startswith(where):
                raise
            raise ValueError(f"{where}: the chat template failed to render this record "
                             f"({type(err).__name__}: {err})") from None
        except Exception as err:  # noqa: BLE001 - Jinja raises many kinds, all about the template
            raise ValueError(f"{where}: the chat template failed to render this record "
                             f"({type(err).__name__}: {err})") from None

    def _assistant_turns(self, messages: list[dict[str, str]], full: str,
                         where: str) -> Iterator[tuple[str, bool]]:
        done = 0
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ValueError(f"{where}: no assistant message, so nothing to train under "
                             "loss_on: assistant")
        for i in turns:
            before = self.render(messages[:i], True)
            through = self.render(messages[:i + 1], False)
            if not (through.startswith(before) and full.startswith(through)
                    and len(before) >= done):
                raise ValueError(f"{where}: the chat template renders the conversation before "
                                 f"message {i} differently once message {i} follows, so its "
                                 "assistant turns cannot be told apart; use a chat_template "
                                 "that renders every turn the same way whatever follows")
            if len(before) > done:
                yield full[done:len(before)], False
            if len(through) > len(before):
                yield full[len(before):len(through)], True
            done = len(through)
        if len(full) > done:
            yield full[done:], False


def renderer_of(tokenizer: Any, template: str | None = None) -> ChatRenderer | None:
    """A renderer of `template`, else of the tokenizer's chat template (its default one when it
    has several); None when there is neither."""
    template = template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return None
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return ChatRenderer(template, special)


def chat_segments(source: SourceConfig, record: Any, where: str,
                  renderer: ChatRenderer | None) -> Segments:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object holding messages, got "
                         f"{'a plain file' if hasattr(record, 'path') else type(record).__name__}")
    if source.messages_field not in record:
        raise ValueError(f"{where}: field {source.messages_field!r} is missing; the record has "
                         f"{', '.join(sorted(map(str, record))) or 'no fields'}. Set "
                         "messages_field for this source.")
    messages = check_messages(record[source.messages_field], source.messages_field, where)
    assert renderer is not None, "chat sources are read with a renderer"
    return renderer.segments(messages, source.loss_on, where)
