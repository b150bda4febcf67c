"""ggraft pack: LM Studio and Ollama layouts, re-read and verified; refusals leave nothing behind."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import assert_one_line_error, pair_warnings, run_cli

from ggraft import __version__
from ggraft.jobs.pack import chat_formats, projector
from ggraft.pair.check import check_pair

NAME = "tiny-llava-text"  # the fixture text GGUF's general.name
EOS = "</s>"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rewritten(src: Path, out: Path, set_keys: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a GGUF with keys set or removed, written with gguf-py."""
    reader = gguf.GGUFReader(src)
    kept = {k: v for k, v in reader.fields.items() if k not in drop}
    reader.fields = type(reader.fields)(kept)
    projector.rewrite_with_keys(reader, out, set_keys or {})
    return out


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile parser (parser/parser.go ParseFile) for FROM / TEMPLATE / PARAMETER:
    comments only at line starts, values end at a newline once they unquote, no escapes."""
    def unquote(s: str) -> tuple[str, bool]:
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    commands, state, buf, name = [], "nil", "", ""
    for ch in text:
        if state == "nil":
            state, buf = ("comment", "") if ch == "#" else ("nil", "") if ch in " \t\r\n" else ("name", ch)
        elif state == "comment":
            state = "nil" if ch in "\r\n" else "comment"
        elif state in ("name", "parameter"):
            if ch in " \t":
                word = buf.lower()
                state, name, buf = ("parameter", "", "") if word == "parameter" and state == "name" else (
                    "value", "model" if word == "from" else (buf if state == "parameter" else word), "")
            elif ch.isascii() and (ch.isalpha() or (state == "parameter" and (ch.isdigit() or ch == "_"))):
                buf += ch
            else:
                raise ValueError(f"invalid command near {buf!r}")
        elif ch in " \t\r\n":
            value, ok = unquote(buf.strip())
            if ok and ch not in " \t":
                commands.append((name, value))
                state, buf = "nil", ""
            else:
                buf += ch
        elif ch.isprintable():
            buf += ch
    assert state in ("nil", "comment"), f"unterminated Modelfile value {buf!r}"
    return commands


@pytest.fixture()
def pair(llava_fixture, llava_mmproj, tmp_path) -> tuple[Path, Path]:
    """The tiny LLaVA pair copied into tmp_path, so hard links are possible (same file system)."""
    src = tmp_path / "src"
    src.mkdir()
    return (Path(shutil.copy(llava_fixture / "text.gguf", src / "text.gguf")),
            Path(shutil.copy(llava_mmproj, src / "mmproj.gguf")))


def pack_json(*args) -> dict:
    result = run_cli("pack", *args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_lmstudio_layout_is_complete_and_verifiable(pair, tmp_path):
    text, mmproj = pair
    out = tmp_path / "models"
    out.mkdir()
    data = pack_json(text, mmproj, "--lmstudio", out)
    folder = out / "ggraft" / NAME
    assert data["folder"] == str(folder) and data["layout"] == "lmstudio"
    text_file, mmproj_file = f"{NAME}-F32.gguf", f"mmproj-{NAME}-F32.gguf"
    assert sorted(os.listdir(folder)) == sorted([text_file, mmproj_file, "README.md", "SHA256SUMS"])
    assert os.listdir(out) == ["ggraft"] and os.listdir(out / "ggraft") == [NAME]  # no temp folders left

    # the GGUFs are the sources, hard-linked; SHA256SUMS and the JSON agree with the bytes
    for packed, src in ((text_file, text), (mmproj_file, mmproj)):
        assert os.stat(folder / packed).st_ino == os.stat(src).st_ino
        assert sha256(folder / packed) == sha256(src)
    sums = dict(reversed(line.split("  ")) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted([text_file, mmproj_file, "README.md"])
    assert all(sums[f] == sha256(folder / f) for f in sums)
    assert {Path(f["path"]).name: f["sha256"] for f in data["files"]} == {
        f: sha256(folder / f) for f in os.listdir(folder)}
    assert {f["role"]: f["method"] for f in data["files"]}["text"] == "link"
    assert check_pair(folder / text_file, folder / mmproj_file).ok
    assert data["check"]["ok"] and data["mmproj_fixes"] == []

    card = (folder / "README.md").read_text()
    for field in (f"# {NAME}", f"| Recipient (text model) | {NAME} (`llama`) |",
                  "| Donor (vision encoder) | hf (LlavaForConditionalGeneration) |", "| Projector type | `mlp` |",
                  "text embedding 96; projector output 96; vision encoder 64 (3 blocks, image 56 px, patch 14)",
                  f"| Check | passed (0 errors, {len(pair_warnings(text, mmproj))} warnings) |", f"| ggraft | {__version__} |",
                  f"- `ggraft.version`: {__version__}", "- `ggraft.source_architecture`: LlavaForConditionalGeneration",
                  f"llama-mtmd-cli -m {text_file} --mmproj {mmproj_file}", f"`{sha256(folder / text_file)}`"):
        assert field in card, field
    lms = [f"lms import --user-repo ggraft/{NAME} --hard-link -y {folder / f}" for f in (text_file, mmproj_file)]
    assert data["commands"] == lms and all(c in card for c in lms)


def test_lmstudio_human_output_prints_lms_import(pair, tmp_path):
    result = run_cli("pack", *pair, "--lmstudio", tmp_path, "--name", "my-vlm", "--publisher", "me", "--copy")
    assert result.code == 0, result.stderr
    assert "check: passed" in result.stdout and "(copy," in result.stdout
    assert f"lms import --user-repo me/my-vlm --hard-link -y {tmp_path / 'me' / 'my-vlm' / 'my-vlm-F32.gguf'}" in result.stdout
    assert os.stat(tmp_path / "me" / "my-vlm" / "my-vlm-F32.gguf").st_ino != os.stat(pair[0]).st_ino


def test_ollama_layout_modelfile_reads_back(pair, tmp_path):
    text, mmproj = pair
    data = pack_json(text, mmproj, "--ollama", tmp_path, "--copy")
    folder = tmp_path / NAME
    text_file, mmproj_file = f"{NAME}-F32.gguf", f"mmproj-{NAME}-F32.gguf"
    assert sorted(os.listdir(folder)) == sorted([text_file, mmproj_file, "Modelfile"])
    assert sorted(os.listdir(tmp_path)) == ["src", NAME]
    for packed, src in ((text_file, text), (mmproj_file, mmproj)):  # --copy: same bytes, another inode
        assert os.stat(folder / packed).st_ino != os.stat(src).st_ino
        assert sha256(folder / packed) == sha256(src)

    # the fixture's template, rendered as llama.cpp renders it (trim_blocks), is the LLaVA format
    # with no separator after the user turn; the TEMPLATE must produce exactly that
    from fixtures.llava import CHAT_TEMPLATE

    fmt = chat_formats.match_chat_format(CHAT_TEMPLATE, "<s>", EOS, True)
    assert fmt.render(chat_formats.PROBES[3], EOS) == ("Be brief.\nUSER: HiASSISTANT: Hello.</s>\n"
                                               "USER: What colour is the sky?ASSISTANT:")
    assert data["template"] == "llava" and data["stop"] == [EOS, "USER:"]
    commands = parse_modelfile((folder / "Modelfile").read_text())
    assert commands == [("model", f"./{text_file}"), ("model", f"./{mmproj_file}"),
                        ("template", fmt.template(EOS)), ("stop", EOS), ("stop", "USER:")]
    for _, path in commands[:2]:  # FROM paths are relative to the Modelfile (text model first)
        assert (folder / path).is_file()
    assert gguf.GGUFReader(folder / commands[0][1]).get_field("general.architecture").contents() == "llama"
    assert gguf.GGUFReader(folder / commands[1][1]).get_field("general.architecture").contents() == "clip"
    assert data["commands"] == [f"ollama create {NAME} -f {folder / 'Modelfile'}"]


def test_ollama_create_runs_ollama_or_prints_the_command(pair, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ollama-call.json"
    fake = bin_dir / "ollama"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    data = pack_json(*pair, "--ollama", tmp_path / "src", "--name", "vlm", "--create")
    folder = tmp_path / "src" / "vlm"
    assert data["created"] is True
    assert json.loads(record.read_text()) == {"argv": ["create", "vlm", "-f", str(folder / "Modelfile")],
                                               "cwd": str(folder)}

    fake.unlink()
    result = run_cli("pack", *pair, "--ollama", tmp_path / "src", "--name", "vlm2", "--create")
    assert result.code == 0, result.stderr
    assert f"ollama create vlm2 -f {tmp_path / 'src' / 'vlm2' / 'Modelfile'}" in result.stdout
    assert "ollama is not installed" in result.stderr


def test_mmproj_metadata_is_fixed_in_the_copy_only(pair, tmp_path):
    text, good = pair
    keys = ("general.type", "clip.has_vision_encoder", "clip.vision.block_count")
    bare = rewritten(good, tmp_path / "src" / "bare.gguf", drop=keys)
    before = sha256(bare)
    data = pack_json(text, bare, "--ollama", tmp_path, "--name", "fixed")
    packed = tmp_path / "fixed" / "mmproj-fixed-F32.gguf"
    assert sha256(bare) == before  # the source is untouched
    assert {f["role"]: f["method"] for f in data["files"]}["mmproj"] == "rewritten"
    assert data["mmproj_fixes"] == ["general.type = 'mmproj' (was missing)",
                                    "clip.has_vision_encoder = True (was missing)",
                                    "clip.vision.block_count = 3 (was missing)"]
    fixed, orig = gguf.GGUFReader(packed), gguf.GGUFReader(good)
    assert fixed.get_field("general.type").contents() == "mmproj"
    assert fixed.get_field("clip.has_vision_encoder").contents() is True
    assert fixed.get_field("clip.vision.block_count").contents() == 3
    assert projector.projector_fixes(fixed) == {}
    assert [t.name for t in fixed.tensors] == [t.name for t in orig.tensors]
    assert all(np.array_equal(a.data, b.data) and a.tensor_type == b.tensor_type
               for a, b in zip(fixed.tensors, orig.tensors))
    assert data["files"][1]["sha256"] == sha256(packed)

    # llama.cpp takes the fixed copy as a vision encoder and encodes exactly as the original
    from ggraft.pair import engine

    rgb = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    model = engine.load_text_model(text)
    try:
        with engine.VisionEncoder(packed, model) as fixed_enc, engine.VisionEncoder(good, model) as orig_enc:
            assert np.array_equal(fixed_enc.encode(rgb, 96), orig_enc.encode(rgb, 96))
    finally:
        engine.free_text_model(model)


def test_failing_pairs_are_refused_with_nothing_written(pair, tmp_path):
    text, mmproj = pair
    out = tmp_path / "out"
    out.mkdir()
    swapped = run_cli("pack", mmproj, text, "--lmstudio", out)  # check refuses it (exit 1 or 2 by its rules)
    assert swapped.code in (1, 2) and "wrong way round" in swapped.stderr and "Traceback" not in swapped.stderr

    # a text model of another width, with an mmproj whose metadata needs fixing: the check fails
    # after the fixed copy was staged, and still nothing is left behind
    narrow = rewritten(text, tmp_path / "src" / "narrow.gguf", {"llama.embedding_length": (gguf.GGUFValueType.UINT32, 64)})
    bare = rewritten(mmproj, tmp_path / "src" / "bare.gguf", drop=("general.type", "clip.has_vision_encoder"))
    for layout in ("--lmstudio", "--ollama"):
        result = run_cli("pack", narrow, bare, layout, out)
        assert result.code == 1, result.stderr
        assert "Error: ggraft check fails" in result.stderr and "embedding width is 64" in result.stderr
        assert len([ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]) == 1
        assert "Traceback" not in result.stderr
    assert os.listdir(out) == []


@pytest.mark.parametrize("option, value, needle", [
    ("--name", "", "NAME is empty"), ("--name", "a/b", "path separators"), ("--name", "..", "'..'"),
    ("--name", "a\\b", "path separators"), ("--name", "x\x01y", "control characters"),
    ("--name", "a\nb", "control characters"), ("--publisher", "../up", "PUBLISHER"),
    ("--publisher", "p:q", "Windows"), ("--name", " pad", "spaces"),
])
def test_bad_names_are_one_line_errors(pair, tmp_path, option, value, needle):
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(run_cli("pack", *pair, "--lmstudio", out, option, value), needle)
    assert os.listdir(out) == []


@pytest.mark.parametrize("args, needle", [
    (["--ollama", "{out}", "--name", "has space"], "not a valid Ollama model name"),
    (["--ollama", "{out}", "--publisher", "me"], "--lmstudio only"),
    (["--ollama", "{out}", "--lmstudio", "{out}"], "exactly one of"),
    (["--name", "x"], "exactly one of"),
    (["--lmstudio", "{out}", "--copy", "--link"], "exclude each other"),
    (["--lmstudio", "{out}", "--create"], "--ollama only"),
    (["--lmstudio", "{out}/plain-file"], "not a folder"),
])
def test_bad_usage_is_refused(pair, tmp_path, args, needle):
    out = tmp_path / "out"
    out.mkdir()
    if "plain-file" in " ".join(args):
        (out / "plain-file").write_text("not a folder")
        assert_one_line_error(run_cli("pack", *pair, *[a.format(out=out) for a in args]), needle)
        assert os.listdir(out) == ["plain-file"]
        return
    assert_one_line_error(run_cli("pack", *pair, *[a.format(out=out) for a in args]), needle)
    assert os.listdir(out) == []


def test_missing_output_folders_are_created_and_removed_on_failure(pair, tmp_path):
    """The README's `--ollama ./ollama-models` works before the folder exists; a refused pair
    leaves no folder it created behind."""
    made = pack_json(*pair, "--ollama", tmp_path / "new" / "ollama-models")
    assert Path(made["folder"]) == tmp_path / "new" / "ollama-models" / NAME
    assert (Path(made["folder"]) / "Modelfile").is_file()
    # refused only after the package was staged (its mmproj copy needs fixing, then check fails)
    narrow = rewritten(pair[0], tmp_path / "src" / "narrow.gguf", {"llama.embedding_length": (gguf.GGUFValueType.UINT32, 64)})
    bare = rewritten(pair[1], tmp_path / "src" / "bare.gguf", drop=("general.type", "clip.has_vision_encoder"))
    refused = run_cli("pack", narrow, bare, "--lmstudio", tmp_path / "other" / "models")
    assert refused.code == 1 and "embedding width is 64" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "other").exists()


def test_split_text_model_is_refused(pair, tmp_path):
    V = gguf.GGUFValueType
    shard = rewritten(pair[0], tmp_path / "src" / "m-00001-of-00002.gguf",
                      {"split.no": (V.UINT16, 0), "split.count": (V.UINT16, 2), "split.tensors.count": (V.INT32, 1)})
    assert_one_line_error(run_cli("pack", shard, pair[1], "--ollama", tmp_path), "split GGUF", "--merge")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_existing_target_needs_force(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first = pack_json(*pair, "--lmstudio", out)
    folder = Path(first["folder"])
    (folder / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("pack", *pair, "--lmstudio", out), "exists", "--force")
    assert (folder / "notes.txt").read_text() == "mine"  # untouched

    second = pack_json(*pair, "--lmstudio", out, "--force", "--copy")
    assert second["folder"] == str(folder) and not (folder / "notes.txt").exists()
    assert os.stat(folder / f"{NAME}-F32.gguf").st_ino != os.stat(pair[0]).st_ino
    assert os.listdir(out / "ggraft") == [NAME]  # the old folder and the stage are gone

    (out / "ggraft" / "plain").write_text("a file")
    assert_one_line_error(run_cli("pack", *pair, "--lmstudio", out, "--name", "plain", "--force"), "not a folder")


def test_stop_tokens_and_chatml_template_from_the_gguf(pair, tmp_path):
    text, mmproj = pair
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    image_id = gguf.GGUFReader(text).get_field("tokenizer.ggml.tokens").contents().index("<image>")
    V = gguf.GGUFValueType
    chat = rewritten(text, tmp_path / "src" / "chat.gguf", {"tokenizer.chat_template": (V.STRING, chatml),
                                                            "tokenizer.ggml.eot_token_id": (V.UINT32, image_id)})
    data = pack_json(chat, mmproj, "--ollama", tmp_path, "--name", "chat", "--link")
    assert [f["method"] for f in data["files"]] == ["link", "link", "written"]
    assert data["template"] == "chatml"
    assert data["stop"] == [EOS, "<image>", "<|im_start|>", "<|im_end|>"]
    commands = parse_modelfile((tmp_path / "chat" / "Modelfile").read_text())
    chatml_fmt = next(f for f in chat_formats.CHAT_FORMATS if f.name == "chatml")
    assert ("template", chatml_fmt.template(EOS)) in commands
    assert [v for c, v in commands if c == "stop"] == data["stop"]


LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_V3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
VICUNA = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}{% elif m['role'] == 'user' %}"
          "{{ 'USER: ' + m['content'] + '\n' }}{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
         "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, bos, eos, adds_bos, expected", [
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True, "llama3"),
    (MISTRAL_V3, "<s>", "</s>", True, "mistral"),
    (VICUNA, "<s>", "</s>", True, "llava"),
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", False, None),  # BOS in the text, not added: no Go equivalent
    (QWEN2, "", "<|im_end|>", False, None),  # a default system prompt: not plain ChatML
    ("{% generation %}x{% endgeneration %}", "<s>", "</s>", True, None),  # not renderable
    (None, "<s>", "</s>", True, None),
])
def test_chat_templates_are_mapped_only_when_faithful(template, bos, eos, adds_bos, expected):
    fmt = chat_formats.match_chat_format(template, bos, eos, adds_bos)
    assert (fmt.name if fmt else None) == expected
    if fmt:
        for probe in chat_formats.PROBES:
            rendered = chat_formats.render_jinja(template, probe, bos, eos).removeprefix(bos)
            assert fmt.render(probe, eos) == rendered


GO_RENDER = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

type Message struct { Role, Content string }

func main() {
	var cases []struct { Template string; Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil { panic(err) }
	var outs []string
	for _, c := range cases {
		var system []string
		var msgs []*Message
		for i := range c.Messages {
			if c.Messages[i].Role == "system" { system = append(system, c.Messages[i].Content) }
			msgs = append(msgs, &c.Messages[i])
		}
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": msgs}); err != nil { panic(err) }
		outs = append(outs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain to run text/template")
def test_go_templates_render_like_their_formats(tmp_path):
    """Every TEMPLATE pack can write, executed by Go's text/template the way Ollama executes it
    (System = the system messages joined, Messages), equals the format's rendering on every probe."""
    (tmp_path / "main.go").write_text(GO_RENDER)
    cases = [{"Template": f.template(EOS), "Messages": [{"Role": m["role"], "Content": m["content"]} for m in p]}
             for f in chat_formats.CHAT_FORMATS for p in chat_formats.PROBES]
    proc = subprocess.run(["go", "run", str(tmp_path / "main.go")], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "GO111MODULE": "off"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = [f.render(p, EOS) for f in chat_formats.CHAT_FORMATS for p in chat_formats.PROBES]
    assert json.loads(proc.stdout) == expected
