"""chat_template: a built-in name, a Jinja string or ``auto``, written into the merged
tokenizer_config.json and rendered by ``tokenizer.apply_chat_template``."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

import mergelab
from mergelab.errors import MergelabError
from mergelab.lm import build_tokenizer
from mergelab.vocab import BUILTIN_TEMPLATES, resolve_chat_template

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "copy 1 2"},
        {"role": "assistant", "content": "1 2"}, {"role": "user", "content": "sort 2 1"}]


def linear(world, *names, **extra) -> dict:
    return {"merge_method": "linear", "parameters": {"weight": 1.0},
            "models": [{"model": world[name]} for name in names], **extra}


def test_a_built_in_template_is_written_and_applied(world, tmp_path):
    out = mergelab.merge(linear(world, "a", "b", chat_template="chatml"), tmp_path / "out", quiet=True)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == BUILTIN_TEMPLATES["chatml"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\ncopy 1 2<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.mark.parametrize("name, expected", [
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\ncopy 1 2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n1 2<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nsort 2 1<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n"),
    ("alpaca", "Be brief.\n\n### Instruction:\ncopy 1 2\n\n### Response:\n1 2</s>\n\n### Instruction:\nsort 2 1\n\n"
               "### Response:\n"),
    ("mistral", "<s>[INST] Be brief. [/INST][INST] copy 1 2 [/INST]1 2</s>[INST] sort 2 1 [/INST]"),
])
def test_each_built_in_template_renders_a_conversation(name, expected):
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(CHAT, chat_template=resolve_chat_template(name, {}), tokenize=False,
                                         add_generation_prompt=True)
    assert text == expected


def test_a_jinja_string_is_taken_as_the_template(world, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    out = mergelab.merge(linear(world, "a", "b", chat_template=template), tmp_path / "out", quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(CHAT[1:3], tokenize=False) == "[user] copy 1 2\n[assistant] 1 2\n"


def with_template(source: str, target, template: str) -> str:
    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return str(target)


def test_auto_takes_the_template_most_inputs_share(world, tmp_path):
    one, two = "{{ 'one' }}", "{{ 'two' }}"
    models = {"x": with_template(world["a"], tmp_path / "x", one), "y": with_template(world["b"], tmp_path / "y", two),
              "z": with_template(world["c"], tmp_path / "z", two)}
    out = mergelab.merge(linear(models, "x", "y", "z", chat_template="auto"), tmp_path / "out", quiet=True)
    assert AutoTokenizer.from_pretrained(out).chat_template == two
    # a tie goes to the first model's template
    out = mergelab.merge(linear(models, "x", "y", chat_template="auto"), tmp_path / "tie", quiet=True)
    assert AutoTokenizer.from_pretrained(out).chat_template == one


@pytest.mark.parametrize("value, match", [
    ("auto", r"chat_template: auto found no chat template in any input model; name one of chatml, llama3"),
    ("vicuna", r"chat_template 'vicuna' is neither a built-in template \(chatml, llama3, alpaca, mistral\)"),
    ("{% for m in messages %}", r"chat_template is not a valid Jinja template"),
])
def test_bad_chat_templates_are_refused_before_merging(world, tmp_path, value, match):
    with pytest.raises(MergelabError, match=match):
        mergelab.merge(linear(world, "a", "b", chat_template=value), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
