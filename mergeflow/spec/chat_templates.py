"""Chat templates: the built-in ones, and what a config's `chat_template:` value means.

`chat_template` is `auto` (the template most of the input models carry), the name of a
built-in template below, or a literal Jinja template (anything containing `{{` or `{%`).
The chosen text is saved with the output tokenizer (see tokenizer.py). Each built-in names
the special tokens it relies on, so a merge can warn when its tokenizer lacks them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinTemplate:
    text: str
    markers: tuple[str, ...] = ()  # tokens the format needs as single tokens


CHATML = BuiltinTemplate(
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n",
    ("<|im_start|>", "<|im_end|>"),
)

LLAMA3 = BuiltinTemplate(
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}\n"
    "{{- message['content'] | trim -}}{{- '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}\n",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# [INST] blocks; a leading system message is put in front of the first user turn.
MISTRAL = BuiltinTemplate(
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}\n"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}\n"
    "{{- bos_token -}}\n"
    "{%- for message in turns -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}\n"
    "{%- else -%}{{- raise_exception('the mistral template takes a first system message, "
    "then user and assistant turns') -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n",
)

ALPACA = BuiltinTemplate(
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'user' -%}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}\n",
)

# LG's EXAONE format: `[|role|]` before each turn, `[|endofturn|]` closing system and
# assistant turns, an empty system turn when the conversation has none. (mergekit 0.1.5's
# file for it is indented, and the indentation leaks spaces and blank lines into prompts;
# this one renders the format exactly.)
EXAONE = BuiltinTemplate(
    "{%- for message in messages -%}\n"
    "{%- if loop.first and message['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}\n"
    "{{- '[|' + message['role'] + '|]' + message['content'] -}}\n"
    "{%- if message['role'] == 'user' -%}{{- '\\n' -}}{%- else -%}{{- '[|endofturn|]\\n' -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}\n",
    ("[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"),
)

BUILTIN: dict[str, BuiltinTemplate] = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL,
                                       "alpaca": ALPACA, "exaone": EXAONE}
AUTO = "auto"


def is_literal(value: str) -> bool:
    return "{{" in value or "{%" in value


def template_problem(value: str) -> str | None:
    """Why a config's `chat_template:` value is unusable, or None."""
    if value == AUTO or value in BUILTIN:
        return None
    if not is_literal(value):
        names = ", ".join(BUILTIN)
        return (f"unknown chat_template `{value}`; use `auto` (the inputs' most common template), "
                f"a built-in name ({names}) or a Jinja template")
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        return f"chat_template is not valid Jinja (template line {e.lineno}): {e.message}"
    return None


def model_template(path: Path) -> str | None:
    """A model directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: [{name, template}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def choose_template(value: str | None, paths: list[Path], warnings: list[str]) -> str | None:
    """The template text for a config's `chat_template:` value (None: keep the tokenizer's)."""
    if value is None:
        return None
    if value == AUTO:
        found = most_common([t for path in paths if (t := model_template(path)) is not None])
        if found is None:
            warnings.append("chat_template: auto found no chat template in any input model; none is set")
        return found
    return BUILTIN[value].text if value in BUILTIN else value


def marker_warnings(name: str | None, vocab: dict[str, int]) -> list[str]:
    """A built-in template's special tokens that the output vocabulary lacks, as a warning."""
    missing = [t for t in (BUILTIN[name].markers if name in BUILTIN else ()) if t not in vocab]
    if not missing:
        return []
    return [f"chat_template {name} uses {', '.join(missing)}, which the output tokenizer lacks "
            "(they would be split into ordinary tokens); add them under `tokenizer: tokens:`"]


def most_common(templates: list[str]) -> str | None:
    """The template most inputs carry (the earliest in model order on a tie), or None."""
    counts: dict[str, int] = {}
    for t in templates:
        counts[t.strip()] = counts.get(t.strip(), 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None
