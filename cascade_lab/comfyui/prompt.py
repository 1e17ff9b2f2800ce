"""CLIPTextEncode as ComfyUI encodes a prompt for Stable Cascade's CLIP-G: ``(words)`` weighs 1.1, ``(words:1.3)``
sets a weight (nesting multiplies the 1.1s), ``\\(`` ``\\)`` are literal brackets. Each weighted piece is
tokenized on its own; pieces are packed into 77-token windows (start + up to 75 + end, padded with the end token)
without splitting a piece shorter than 8 tokens across windows; a weighted token's state is moved away from the
empty prompt's: z = (z − z_empty)·w + z_empty. Windows stack along the tokens; the pooled output is the first's.
"""

from __future__ import annotations

import re
from typing import Any

MAX_LENGTH = 77
MAX_WORD_LENGTH = 8  # a piece this long may be split across windows; shorter ones move whole to the next
_ESCAPES = (("\\(", "\0\1"), ("\\)", "\0\2"))


def weighted_pieces(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """``"a (red:1.3) fox"`` → [("a ", 1.0), ("red", 1.3), (" fox", 1.0)] (escaped brackets kept literal)."""
    for plain, code in _ESCAPES:
        text = text.replace(plain, code)
    return [(_unescape(piece), w) for piece, w in _pieces(text, weight)]


def _unescape(text: str) -> str:
    for plain, code in _ESCAPES:
        text = text.replace(code, plain[1:])
    return text


def _groups(text: str) -> list[str]:
    """Top-level bracket groups and the text between them; an unclosed group runs to the end."""
    out, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                out.append(current)
                current = ""
            current += char
            depth += 1
        elif char == ")" and depth > 0:
            depth -= 1
            current += char
            if depth == 0:
                out.append(current)
                current = ""
        else:
            current += char
    return [*out, current] if current else out


def _pieces(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for group in _groups(text):
        if len(group) >= 2 and group[0] == "(" and group[-1] == ")":
            inner, inner_weight = group[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _pieces(inner, inner_weight)
        else:
            out.append((group, weight))
    return out


def windows(tokenizer: Any, text: str, start: int, end: int) -> list[list[tuple[int, float]]]:
    """The prompt's (token id, weight) windows, each exactly 77 long."""
    if re.search(r"(^|[\s(])embedding:", text):
        raise NotImplementedError("the prompt names a textual-inversion embedding (embedding:NAME), which "
                                  "cascade_lab does not load; remove it from the prompt")
    groups = []
    for piece, weight in weighted_pieces(text):
        if piece:
            ids = tokenizer(piece)["input_ids"][1:-1]  # without the start and end tokens the tokenizer adds
            groups.append([(int(t), weight) for t in ids])
    out: list[list[tuple[int, float]]] = []
    window: list[tuple[int, float]] = [(start, 1.0)]
    room = MAX_LENGTH - 1  # the end token always fits
    for group in groups:
        large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(window) + len(group) <= room:
                window += group
                break
            if large:  # fill this window, continue in the next
                take = room - len(window)
                window += group[:take]
                group = group[take:]
            out.append(_close(window, end))
            window = [(start, 1.0)]
    out.append(_close(window, end))
    return out


def _close(window: list[tuple[int, float]], end: int) -> list[tuple[int, float]]:
    return window + [(end, 1.0)] * (MAX_LENGTH - len(window))  # the end token, then end tokens as padding


def encode(encoder: Any, text: str) -> tuple[Any, Any]:
    """(cond [1, 77·windows, C], pooled [1, C]) of ``text`` with cascade_lab's `TextEncoder` (its CLIP-G model and
    tokenizer), as ComfyUI's CLIPTextEncode computes them."""
    import torch

    start, end = int(encoder.bos_id), int(encoder.eos_id)
    rows = windows(encoder.tokenizer, text, start, end)
    weighted = any(w != 1.0 for row in rows for _, w in row)
    ids = [[t for t, _ in row] for row in rows]
    if weighted:
        ids.append([start] + [end] * (MAX_LENGTH - 1))  # the empty prompt
    input_ids = torch.tensor(ids, dtype=torch.long)
    first_end = (input_ids == end).int().argmax(dim=1)
    mask = (torch.arange(MAX_LENGTH)[None] <= first_end[:, None]).long()  # tokens up to the first end token
    model = encoder.model
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(encoder.device), attention_mask=mask.to(encoder.device),
                    output_hidden_states=True)
        hidden = out.hidden_states[-1].float().cpu()  # [n, 77, C]: the last layer, before the final norm
        pooled = model.text_projection(out.last_hidden_state[0, int(first_end[0])]).float().cpu()[None]
    z = hidden[:len(rows)].clone()
    if weighted:
        empty = hidden[-1]
        weights = torch.tensor([[w for _, w in row] for row in rows])[..., None]  # [n, 77, 1]
        z = torch.where(weights != 1.0, (z - empty) * weights + empty, z)
    return z.reshape(1, -1, z.shape[-1]), pooled
