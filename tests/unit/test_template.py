import pytest
from transformers import AutoTokenizer

from serve_app.errors import InvalidRequestError, PromptTooLongError
from serve_app.model_types import TINY_CHAT_DIR
from serve_app.template import conversation_to_messages, get_template, messages_to_conversation
from tests.unit import official_chat_templates as official

HISTORY = [["你好!", "你好！有什么可以帮你的吗？"], ["  who are you? ", " I am an assistant.  "]]
QUERY = "浙江的省会在哪？"


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    tok.bos_token, tok.eos_token = "<s>", "</s>"  # the llama templates read them
    return tok


def official_render(tokenizer, chat_template, system, history, query):
    messages = conversation_to_messages(system, history, query)
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


CASES = [
    # (template_type, official template, systems to try; None = the template's default)
    ("qwen", official.QWEN2_INSTRUCT, [None, "Answer briefly."]),
    ("chatml", official.YI_CHAT, [""]),
    ("llama", official.LLAMA2_CHAT, ["Answer briefly.", ""]),
    ("llama3", official.LLAMA3_INSTRUCT, ["Answer briefly.", ""]),
    ("chatglm3", official.CHATGLM3, ["Answer briefly.", ""]),
]


@pytest.mark.parametrize("template_type,chat_template,systems", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("history", [[], HISTORY], ids=["no-history", "history"])
def test_template_renders_what_the_official_chat_template_renders(
    tokenizer, template_type, chat_template, systems, history
):
    template = get_template(template_type, tokenizer)
    for system in systems:
        ours = template.render(QUERY, history, system)
        # "" means "no system message"; None means the template's default system prompt
        official_system = template.default_system if system is None else (system or None)
        assert ours == official_render(tokenizer, chat_template, official_system, history, QUERY)


def test_jinja_template_uses_the_tokenizers_own_chat_template(tokenizer):
    jinja, qwen = get_template("jinja", tokenizer), get_template("qwen", tokenizer)
    assert jinja.render(QUERY, HISTORY) == qwen.render(QUERY, HISTORY)


def test_generation_template_is_the_raw_query(tokenizer):
    template = get_template("default-generation", tokenizer)
    assert template.render("浙江 -> 杭州\n四川 ->") == "浙江 -> 杭州\n四川 ->"
    with pytest.raises(InvalidRequestError, match="no chat history"):
        template.render("q", HISTORY)


def test_history_is_trimmed_oldest_first(tokenizer):
    template = get_template("qwen", tokenizer)
    history = [[f"question {i}", f"answer {i} " * 5] for i in range(6)]
    full, _ = template.encode(QUERY, history)
    limit = len(full) - 10
    ids, used = template.encode(QUERY, history, max_length=limit)
    assert len(ids) <= limit and 0 < len(used) < len(history)
    assert used == history[len(history) - len(used) :]


def test_query_alone_too_long_names_the_counts(tokenizer):
    template = get_template("qwen", tokenizer)
    with pytest.raises(PromptTooLongError, match=r"prompt has \d+ tokens but the model's context holds 8"):
        template.encode("a long question " * 20, HISTORY, max_length=8)


def test_messages_round_trip():
    system, history, query = messages_to_conversation(conversation_to_messages("sys", HISTORY, QUERY))
    assert (system, history, query) == ("sys", HISTORY, QUERY)


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "must not be empty"),
        ([{"role": "assistant", "content": "x"}], "last message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ],
)
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        messages_to_conversation(messages)


def test_unknown_template_type_lists_choices(tokenizer):
    with pytest.raises(InvalidRequestError, match="choose one of"):
        get_template("qwen3", tokenizer)
