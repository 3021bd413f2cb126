"""Turning text into token ids: one rule for every front door.

A prompt starts the way the model's tokenizer starts a sequence. Llama 3, Gemma 2/3,
Mistral and Phi-3 tokenizers put a BOS token first, and their models were trained on
nothing else: without it a Gemma 3 model's perplexity doubles and its greedy text
degenerates. A serving engine tokenizes a text prompt the same way (vLLM: with the
tokenizer's special tokens), so caches stored for a text are found again only if both
sides start it alike.

The rule
    * The first piece of a prompt gets the tokenizer's own leading special tokens
      (:func:`special_prefix`: BOS where the tokenizer adds one, nothing where it does
      not), never twice: a text that already starts with them (a rendered chat template
      that writes ``<bos>``) gets none added.
    * Later pieces (a question after a cached document, glue between blended segments)
      get none.
    * Trailing special tokens a tokenizer may append (an EOS) are never added: a prompt
      continues after a cached piece, it does not end there.
    * A position-independent document for blending (captured behind an anchor) is a later
      piece: its anchor, the model's BOS where there is one, stands where the BOS would.

Chat models are used through their chat template: :func:`chat_text` renders a system +
user turn holding the document and cuts it right after the document, the prefix every
question about that document shares; :func:`chat_suffix` is what follows it (the
question, the end of the turn, the assistant's header).
"""
from __future__ import annotations

from ..core.kvcache import check_token_ids
from ..errors import ConfigError, ShapeError

# A private-use character no chat template writes: where the document ends in a render.
_MARK = "\ue000kvcodec-cut\ue000"


def special_prefix(tokenizer) -> list:
    """Token ids ``tokenizer`` puts before every sequence (its BOS where it adds one;
    ``[]`` for tokenizers that add none, e.g. Qwen2 and SmolLM2)."""
    probe = "kvcodec"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return [int(t) for t in full[:i]]
    return []


def text_ids(tokenizer, text: str, *, first: bool = True) -> list:
    """Token ids of ``text`` under the rule above: ``first`` (the start of a prompt)
    adds the tokenizer's leading special tokens unless the text already starts with
    them; a later piece adds none."""
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not first:
        return ids
    prefix = special_prefix(tokenizer)
    if not prefix or ids[:len(prefix)] == prefix:
        return ids
    return prefix + ids


def _render(tokenizer, system, content: str, generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model's tokenizer has no chat template; drop --chat (chat=True) "
                          "or use an instruction-tuned model")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as exc:  # noqa: BLE001 - templates raise what their authors chose
        raise ConfigError(f"the model's chat template refused the conversation ({exc})") from exc


def chat_text(tokenizer, document: str, system: str | None = None) -> str:
    """The chat template's rendering of a conversation whose first user turn starts with
    ``document`` (after a ``system`` turn, if given), cut right after the document: what
    every prompt asking about that document starts with."""
    rendered = _render(tokenizer, system, document + _MARK, False)
    cut = rendered.find(_MARK)
    if cut < 0:
        raise ConfigError("the model's chat template does not keep the user's text verbatim")
    return rendered[:cut]


def chat_suffix(tokenizer, question: str, system: str | None = None) -> str:
    """What follows :func:`chat_text` in a chat prompt that asks ``question`` about the
    document: the question, the end of the user turn and the assistant's header."""
    rendered = _render(tokenizer, system, _MARK + question, True)
    cut = rendered.find(_MARK)
    if cut < 0:
        raise ConfigError("the model's chat template does not keep the user's text verbatim")
    return rendered[cut + len(_MARK):]


def document_ids(tokenizer, text: str, *, chat: bool = False, system: str | None = None,
                 independent: bool = False) -> list:
    """Token ids a document is cached under: the start of a prompt (:func:`text_ids`),
    rendered as the start of a chat turn with ``chat``; with ``independent`` (a
    position-independent document for blending) a later piece, never carrying a BOS."""
    if independent:
        if chat:
            raise ConfigError("a position-independent document is placed inside a prompt: "
                              "it cannot carry a chat template (drop chat/--chat)")
        return text_ids(tokenizer, text, first=False)
    return text_ids(tokenizer, chat_text(tokenizer, text, system) if chat else text)


def prompt_ids(tokenizer, question: str, *, chat: bool = False,
               system: str | None = None) -> list:
    """Token ids of ``question`` following a cached document (a later piece): with
    ``chat``, the rest of the chat prompt that :func:`document_ids` started."""
    return text_ids(tokenizer, chat_suffix(tokenizer, question, system) if chat else question,
                    first=False)


def check_ids(model, ids, what: str = "token ids") -> list:
    """``ids`` (a list, tuple or 1-D integer array) as a list of ints ``model`` can embed:
    integers in ``[0, 2**32)`` (:func:`~kvcodec.core.kvcache.check_token_ids`) below the
    size of its embedding table; else a ShapeError (an id past the table was torch's
    IndexError from inside the forward pass, a string int()'s ValueError)."""
    ids = check_token_ids(ids)
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError, NotImplementedError):
        return ids  # no embedding table to read the size of
    if ids and max(ids) >= vocab:
        raise ShapeError(f"{what}: token id {max(ids)} is outside the model's vocabulary "
                         f"of {vocab}")
    return ids
