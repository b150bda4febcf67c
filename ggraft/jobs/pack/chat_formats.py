"""Chat templates for Ollama: a GGUF's Jinja chat template is mapped to a Go template only where
it is one of a few well-known formats and renders identically to it on probe conversations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gguf

from ggraft.gguf_io import gguf_file

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ChatFormat:
    """A well-known prompt format: how it renders a conversation that ends with a user turn
    (with the generation prompt), the Go template that renders it the same way in Ollama, and
    the role markers worth stopping on."""

    name: str
    render: Callable[[Messages, str], str]
    go_template: str  # "{eos}" stands for the GGUF's end-of-sequence text
    stops: tuple[str, ...]

    def template(self, eos: str) -> str:
        return self.go_template.replace("{eos}", eos)


def _chatml(msgs: Messages, eos: str) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n"


def _llama3(msgs: Messages, eos: str) -> str:
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _mistral(msgs: Messages, eos: str) -> str:
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")  # Ollama's .System
    turns = [m for m in msgs if m["role"] != "system"]
    out = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            prefix = f"{system}\n\n" if system and i == len(turns) - 1 else ""
            out.append(f"[INST] {prefix}{m['content']}[/INST]")
        else:
            out.append(f" {m['content']}{eos}")
    return "".join(out)


def _llava(sys_sep: str, user_sep: str, asst_sep: str) -> ChatFormat:
    """The Vicuna / LLaVA-1.5 format (USER: / ASSISTANT:), whose templates differ in separators."""
    turn = {"system": ("", sys_sep), "user": ("USER: ", user_sep), "assistant": ("ASSISTANT: ", "{eos}" + asst_sep)}

    def render(msgs: Messages, eos: str) -> str:
        text = "".join(turn[m["role"]][0] + m["content"] + turn[m["role"]][1] for m in msgs)
        return text.replace("{eos}", eos) + "ASSISTANT:"

    return ChatFormat("llava", render, _RANGE + (
        '{{- if eq .Role "system" }}{{ .Content }}' + sys_sep +
        '{{ else if eq .Role "user" }}USER: {{ .Content }}' + user_sep + '{{ if $last }}ASSISTANT:{{ end }}'
        '{{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}{{ if not $last }}{eos}' + asst_sep +
        '{{ end }}{{ end }}\n{{- end }}'), ("USER:",))


# In each template $last marks the final message: after a user turn the generation prompt
# follows; a final assistant turn is left open so Ollama can continue it.
SEPARATORS = ("\n", " ", "", "\n\n")
_RANGE = '{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
CHAT_FORMATS = (
    ChatFormat("chatml", _chatml, _RANGE + (
        '{{- "" }}<|im_start|>{{ .Role }}\n'
        '{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
        '{{ end }}\n{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant\n'
        '{{ end }}\n{{- end }}'), ("<|im_start|>", "<|im_end|>")),
    ChatFormat("llama3", _llama3, _RANGE + (
        '{{- "" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
        '{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}\n'
        '{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>\n\n'
        '{{ end }}\n{{- end }}'), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("mistral", _mistral, _RANGE + (
        '{{- if eq .Role "user" }}[INST] {{ if and $last $.System }}{{ $.System }}\n\n'
        '{{ end }}{{ .Content }}[/INST]\n'
        '{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}{eos}{{ end }}\n'
        '{{- end }}\n{{- end }}'), ("[INST]", "[/INST]")),
    *(_llava(a, b, c) for a in SEPARATORS for b in SEPARATORS for c in SEPARATORS),
)

#: conversations both renderings must agree on (string content; Ollama places images itself)
PROBES: tuple[Messages, ...] = tuple(
    [{"role": r, "content": c} for r, c in conv] for conv in (
        [("user", "What is in the picture?")],
        [("system", "Answer in one sentence."), ("user", "What is in the picture?")],
        [("user", "What is in the picture?"), ("assistant", "A red cat."), ("user", "And the mat?")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "What colour is the sky?")],
    ))


def render_jinja(template: str, messages: Messages, bos: str, eos: str) -> str:
    """The chat template rendered as llama.cpp / transformers do (sandboxed, trimmed blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception  # as transformers and llama-cpp-python provide it
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos, tools=None)


def match_chat_format(template: str | None, bos: str, eos: str, adds_bos: bool) -> ChatFormat | None:
    """The known format this chat template renders identically to on every probe, or None.

    A leading BOS the tokenizer adds anyway is not part of a prompt in Ollama, so it is
    dropped from the Jinja rendering before comparing.
    """
    if not template or "{{" in eos or '"""' in eos:
        return None
    try:
        rendered = [render_jinja(template, probe, bos, eos) for probe in PROBES]
    except Exception:  # any template error or unsupported construct: not a faithful match
        return None
    if adds_bos and bos:
        rendered = [r.removeprefix(bos) for r in rendered]
    for fmt in CHAT_FORMATS:
        if all(fmt.render(probe, eos) == r for probe, r in zip(PROBES, rendered)):
            return fmt
    return None


def token_text(index: gguf_file.GGUFIndex, token_id: Any) -> str | None:
    """A token's text, read from the header index (the vocab is never decoded whole)."""
    field = index.fields.get(gguf.Keys.Tokenizer.LIST)
    if field is None or field.item_type != gguf.GGUFValueType.STRING or not isinstance(token_id, int) \
            or not 0 <= token_id < field.count:
        return None
    return index.string_at(field, token_id)


def end_of_turn_tokens(text: gguf_file.GGUFIndex) -> list[str]:
    """The texts of the end-of-sequence / end-of-turn / end-of-message tokens, in that order."""
    keys = (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID)
    return list(dict.fromkeys(t for t in (token_text(text, gguf_file.value(text, k)) for k in keys) if t))


def modelfile_quote(value: str) -> str | None:
    """A value as Ollama's Modelfile parser reads it back (no escapes; \"\"\" for quotes), or None."""
    if '"""' in value or any(not c.isprintable() and c not in "\n\t" for c in value):
        return None
    return f'"""{value}"""' if '"' in value or "\n" in value else f'"{value}"'


def modelfile(text_file: str, mmproj_file: str, fmt: ChatFormat | None, eos: str, stops: list[str],
              header: list[str]) -> str:
    lines = [f"# {line}" for line in header]
    lines += [f"FROM ./{text_file}", f"FROM ./{mmproj_file}", ""]
    if fmt:
        lines += [f"# the GGUF's chat template is the {fmt.name} format; this renders it identically",
                  f"TEMPLATE {modelfile_quote(fmt.template(eos))}"]
    else:
        lines += ["# No TEMPLATE: the GGUF's chat template is not one ggraft maps faithfully to Go template",
                  "# syntax, so Ollama will use the template in the GGUF (it picks the closest template in",
                  "# its own library; without one it sends the prompt as is)."]
    for stop in stops:
        quoted = modelfile_quote(stop)
        lines.append(f"PARAMETER stop {quoted}" if quoted else f"# stop {stop!r} cannot be written in a Modelfile")
    return "\n".join(lines) + "\n"
