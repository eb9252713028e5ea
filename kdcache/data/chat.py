"""Chat and instruction rows rendered with the teacher's own chat template, and the response mask: which token
positions belong to the turns a student learns (assistant turns by default), so that a causal-LM cache can keep
targets there only. A turn's span is every token its message adds after the role's header (its content and the
template's end-of-turn tokens), found by rendering the conversation turn by turn; a template whose renders are not
prefixes of one another (e.g. one that rewrites earlier turns) is refused, not guessed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import KdcacheError

ROLES = ("system", "user", "assistant", "tool")


class ChatError(KdcacheError, ValueError):
    """A chat row that cannot be rendered or masked; the message names the row, the field and the fix."""


@dataclass(frozen=True)
class Rendered:
    """One conversation as the teacher sees it: token ids [L] (int64), the response mask [L] (bool), and whether
    `max_length` cut it (then ids and mask are its first `max_length` tokens)."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: bool


def to_messages(row: Mapping[str, Any], where: str, messages: str = "messages", prompt: str = "prompt",
                response: str = "response", system: str | None = None) -> list[dict[str, str]]:
    """The row's conversation: its `messages` list of {role, content}, else its `prompt` / `response` columns as
    one user turn and one assistant turn (after an optional `system` column). `where` names the row in errors."""
    if messages in row and row[messages] is not None:
        turns = row[messages]
        if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
            raise ChatError(f"{where}: field `{messages}` must be a non-empty list of {{role, content}} turns")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, Mapping) or not isinstance(t.get("content"), str) or t.get("role") not in ROLES:
                raise ChatError(f"{where}: `{messages}[{i}]` must be {{role: one of {', '.join(ROLES)}, content: "
                                f"text}}; got {t!r:.120}")
            out.append({"role": t["role"], "content": t["content"]})
        return out
    if prompt in row and response in row:
        if not isinstance(row[prompt], str) or not isinstance(row[response], str):
            raise ChatError(f"{where}: `{prompt}` and `{response}` must both be text")
        head = [{"role": "system", "content": row[system]}] if system and row.get(system) else []
        return [*head, {"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]
    raise ChatError(f"{where}: a chat row needs a `{messages}` list or `{prompt}` and `{response}` columns; it has "
                    f"{', '.join(map(str, row)) or 'no fields'}")


def _ids(tokenizer: Any, turns: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(turns, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(tokenizer: Any, turns: list[dict[str, str]], where: str, roles: Sequence[str] = ("assistant",),
           max_length: int | None = None) -> Rendered:
    """Render `turns` with the tokenizer's chat template; the mask marks each turn of `roles` from the end of its
    header (where an empty turn of that role would diverge) to the end of the tokens it adds."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(f"{where}: the teacher's tokenizer has no chat template; use the instruction-tuned "
                        "teacher's own tokenizer (teacher.tokenizer) or plain-text rows")
    ids: list[int] = []
    mask: list[bool] = []
    for i, turn in enumerate(turns):
        upto = _ids(tokenizer, turns[:i + 1])
        if upto[:len(ids)] != ids:
            raise ChatError(f"{where}: the chat template renders turn {i} by changing what came before it (its "
                            "renders are not prefixes of one another), so its response spans cannot be told apart; "
                            "use a template that appends turns")
        start = len(ids)
        if turn["role"] in roles:  # the header ends where an empty turn of the same role parts from this one
            empty = _ids(tokenizer, [*turns[:i], {"role": turn["role"], "content": ""}])
            start = max(len(ids), _common(upto, empty))
        mask += [False] * (start - len(ids)) + [turn["role"] in roles] * (len(upto) - start)
        ids = upto
    if not any(mask):
        raise ChatError(f"{where}: no token belongs to a turn of {', '.join(roles)}: nothing for a student to "
                        "learn here (add such a turn, or change the masked roles)")
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return Rendered(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), truncated)


def prompt_turns(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation up to the response a teacher is to write: without its trailing assistant turns."""
    end = len(turns)
    while end and turns[end - 1]["role"] == "assistant":
        end -= 1
    return turns[:end]


def render_prompt(tokenizer: Any, turns: list[dict[str, str]], where: str) -> np.ndarray:
    """Token ids [L] (int64) of `turns` followed by the template's opening of an assistant turn (the generation
    prompt), which the teacher continues."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(f"{where}: the teacher's tokenizer has no chat template; use the instruction-tuned "
                        "teacher's own tokenizer (teacher.tokenizer)")
    if not turns:
        raise ChatError(f"{where}: no prompt turn before the response the teacher is to write")
    out = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
    return np.asarray(out["input_ids"] if isinstance(out, Mapping) else out, dtype=np.int64)
