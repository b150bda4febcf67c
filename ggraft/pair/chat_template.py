"""Rendering a GGUF's chat template the way llama-cpp-python's mtmd handler does, with a budget.

A chat template is code from the model file.  jinja2's sandbox keeps it from reaching outside
and caps each ``range`` at 100000 items, but not the total work: two nested ``range(100000)``
loops run for hours.  ``render_with_image`` therefore counts the template's executed lines
(``sys.settrace``, on the template's own frames only) and its wall-clock time, and refuses a
repeat or power that would build a huge value, raising ``TemplateTooCostly`` past the budget.
"""
from __future__ import annotations

import sys
import time
from typing import Any

from ggraft import compat

MEDIA_MARKER = "<__media__>"  # mtmd.cpp mtmd_default_marker(): where llama-cpp-python puts each image
MAX_STEPS = 1_000_000  # template lines executed; a real template renders one message in a few thousand
MAX_SECONDS = 5.0
MAX_REPEAT = 1_000_000  # items or characters a single `*` may build; exponents above MAX_POWER
MAX_POWER = 256
_TEMPLATE_FILE = "<template>"  # the file name jinja2 compiles templates from strings under


class TemplateTooCostly(Exception):
    """The template did not finish within the budget."""


def _sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
                raise TemplateTooCostly(f"the chat template raises a number to the power {right}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise TemplateTooCostly(f"the chat template repeats a value {n} times")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


class _Budget:
    """A trace function that counts the template's lines and stops it past the budget."""

    def __init__(self, steps: int, seconds: float):
        self.budget = f"{steps} steps / {seconds:g} s"
        self.steps, self.deadline = steps, time.monotonic() + seconds

    def __call__(self, frame, event: str, arg):
        if event == "call":
            return self if frame.f_code.co_filename == _TEMPLATE_FILE else None
        if event == "line":
            self.steps -= 1
            if self.steps <= 0 or (self.steps % 4096 == 0 and time.monotonic() > self.deadline):
                raise TemplateTooCostly(f"the chat template did not finish rendering one message within {self.budget}")
        return self


def render_bounded(template, steps: int = MAX_STEPS, seconds: float = MAX_SECONDS, **variables: Any) -> str:
    """``template.render(**variables)`` within the budget (TemplateTooCostly otherwise)."""
    previous = sys.gettrace()
    sys.settrace(_Budget(steps, seconds))
    try:
        return template.render(**variables)
    finally:
        sys.settrace(previous)


def render_with_image(template: str, bos: str, eos: str, steps: int = MAX_STEPS, seconds: float = MAX_SECONDS) -> str:
    """The prompt llama-cpp-python's MTMDChatHandler renders for one user message with an image."""
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///ggraft-check.png"}},
                                           {"type": "text", "text": "What is in the picture?"}]}
    return render_user_turn(template, compat.message_for_template(message, MEDIA_MARKER), bos, eos, steps, seconds)


def render_user_turn(template: str, message: dict[str, Any], bos: str, eos: str, steps: int = MAX_STEPS,
                     seconds: float = MAX_SECONDS) -> str:
    """One user ``message`` and the generation prompt, rendered as llama-cpp-python's
    Jinja2 chat formatter renders it, within the budget."""
    from jinja2.ext import loopcontrols
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    env = _sandbox()(trim_blocks=True, lstrip_blocks=True,
                     extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, loopcontrols])
    env.filters["tojson"] = Jinja2ChatFormatter.tojson

    def raise_exception(text: str) -> None:
        raise ValueError(text)

    return render_bounded(env.from_string(template), steps, seconds,
                          messages=[message], add_generation_prompt=True,
                          bos_token=bos, eos_token=eos, raise_exception=raise_exception,
                          strftime_now=Jinja2ChatFormatter.strftime_now)
