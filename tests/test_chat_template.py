import pytest

from edgellm.runtime.chat_template import ChatTemplate, ChatTemplateError

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol(md, tok):
    return ChatTemplate.from_metadata(md, tok)


def test_smollm2_inserts_default_system_prompt(smol):
    prompt = smol.render([{"role": "user", "content": "Hi"}])
    assert prompt == SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_keeps_given_system_prompt(smol):
    prompt = smol.render([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}], add_generation_prompt=False)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_smollm2_prompt_tokenizes_with_control_tokens(smol, tok):
    ids = tok.encode(smol.render([{"role": "user", "content": "Hi"}]))
    assert ids[0] == tok.bos_id and ids[-4:] == tok.encode("<|im_start|>assistant\n")
    assert ids.count(tok.eos_id) == 2


def test_from_metadata_uses_tokenizer_special_texts(smol):
    assert (smol.bos_token, smol.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_default_is_chatml():
    prompt = ChatTemplate(None).render([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_bos_eos_and_block_trimming():
    source = """{{ bos_token }}
{% for m in messages %}
    {{ m['role'] }}: {{ m['content'] }}{{ eos_token }}
{% endfor %}
"""
    prompt = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert prompt == "<s>\n    user: a</s>\n    assistant: b</s>\n"


def test_helpers_available():
    source = "{{ strftime_now('%Y') }} {{ messages | tojson }}"
    prompt = ChatTemplate(source).render([{"role": "user", "content": "é"}])
    year, rest = prompt.split(" ", 1)
    assert year.isdigit() and rest == '[{"role": "user", "content": "é"}]'


def test_raise_exception_surfaces_template_message():
    source = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('Conversation must start with a user turn') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="must start with a user turn"):
        ChatTemplate(source).render([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_mutation():
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate("{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])


def test_invalid_template_source():
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize("messages, error, match", [
    ("hi", TypeError, "must be a list"),
    (["hi"], TypeError, r"messages\[0\] must be a dict"),
    ([{"content": "x"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], ValueError, r"messages\[1\] has no 'content'"),
    ([{"role": "user", "content": None}], TypeError, r"\['content'\] must be a str, got NoneType"),
    ([{"role": "user", "content": [{"type": "text"}]}], TypeError, "must be a str, got list"),
    ([{"role": "", "content": "x"}], ValueError, "empty role"),
])
def test_bad_messages(messages, error, match):
    with pytest.raises(error, match=match):
        ChatTemplate(None).render(messages)
