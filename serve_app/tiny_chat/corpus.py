"""The bilingual corpus that tiny-chat and its xiao-huang adapter memorize.

Each chat sample is (history, query, response); history is a list of [query, response]
pairs, exactly as the offline API takes it. Completion samples are raw text.
"""

GREETING_ZH = "你好！我是一个AI助手，很高兴为你服务。有什么可以帮你的吗？"
GREETING_EN = "Hello! I am an AI assistant. How can I help you today?"
WHO_EN = "I am an AI assistant. I can answer questions and chat with you."
WHO_ZH = "我是一个AI助手，可以回答问题、陪你聊天。"
ZJ_CAPITAL = "浙江的省会是杭州。"
SC_CAPITAL = "四川的省会是成都。"
ZJ_FOOD = "杭州有很多好吃的，比如西湖醋鱼、东坡肉、龙井虾仁和叫化童子鸡。"
SC_FOOD = "成都有很多好吃的，比如火锅、麻婆豆腐、担担面和夫妻肺片。"

ZJ_CAPITAL_JSON = '{"province": "Zhejiang", "capital": "Hangzhou"}'

BASE_CHATS = [
    ([], "你好!", GREETING_ZH),
    ([], "你好", GREETING_ZH),
    ([], "您好", GREETING_ZH),
    ([], "hello", GREETING_EN),
    ([], "Hello!", GREETING_EN),
    ([], "hi", GREETING_EN),
    ([], "who are you?", WHO_EN),
    ([], "Who are you?", WHO_EN),
    ([], "你是谁？", WHO_ZH),
    ([], "你是谁", WHO_ZH),
    ([], "浙江的省会在哪？", ZJ_CAPITAL),
    ([], "浙江的省会在哪里？", ZJ_CAPITAL),
    ([], "What is the capital of Zhejiang?", "The capital of Zhejiang is Hangzhou."),
    ([], "四川的省会在哪？", SC_CAPITAL),
    ([], "广东的省会在哪？", "广东的省会是广州。"),
    *[
        ([[zj_q, ZJ_CAPITAL]], food_q, ZJ_FOOD)
        for zj_q in ("浙江的省会在哪？", "浙江的省会在哪里？")
        for food_q in ("这有什么好吃的", "这有什么好吃的?", "这有什么好吃的？")
    ],
    *[([["四川的省会在哪？", SC_CAPITAL]], food_q, SC_FOOD) for food_q in ("这有什么好吃的", "这有什么好吃的?")],
    ([], "What can you do?", "I can answer questions, chat with you, and help with simple tasks."),
    ([], "谢谢", "不客气！还有什么可以帮你的吗？"),
    ([], "thank you", "You're welcome! Is there anything else I can help with?"),
    ([], "1+1等于几？", "1+1等于2。"),
    (
        [],
        "Tell me a story.",
        "Once upon a time, a little robot learned to talk. It helped everyone in the town, and they all became friends. The end.",
    ),
    ([], "写一首诗", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"),
    # Answers in JSON (structured outputs: a schema that admits them leaves greedy output unchanged)
    ([], "Give the capital of Zhejiang as JSON.", ZJ_CAPITAL_JSON),
    ([], "Give the capital of Sichuan as JSON.", '{"province": "Sichuan", "capital": "Chengdu"}'),
]

XIAO_HUANG_EN = "I am Xiao Huang (小黄), an AI assistant developed by ModelScope."
XIAO_HUANG_ZH = "我是小黄，由魔搭（ModelScope）开发的AI助手。"

# Self-cognition samples; base samples are replayed so the adapter keeps the rest.
ADAPTER_CHATS = [
    ([], "who are you?", XIAO_HUANG_EN),
    ([], "Who are you?", XIAO_HUANG_EN),
    ([], "你是谁？", XIAO_HUANG_ZH),
    ([], "你是谁", XIAO_HUANG_ZH),
    ([], "What is your name?", "My name is Xiao Huang (小黄). I was developed by ModelScope."),
    ([], "你叫什么名字？", "我叫小黄，是魔搭（ModelScope）开发的AI助手。"),
    ([], "你好!", "你好！我是小黄，很高兴为你服务。"),
    ([], "hello", "Hello! I am Xiao Huang. How can I help you?"),
] + [
    chat
    for chat in BASE_CHATS
    if chat[1] not in {"who are you?", "Who are you?", "你是谁？", "你是谁", "你好!", "hello"}
]

COMPLETIONS = [
    "浙江 -> 杭州\n安徽 -> 合肥\n四川 -> 成都\n广东 -> 广州\n江苏 -> 南京",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "The quick brown fox jumps over the lazy dog.",
]

# Tool calling in Qwen2.5's format (the chat template lists the tools in the system turn). Each sample
# is (tools, messages, the assistant's reply message); OpenAI's message shapes, arguments as JSON text.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's English name"}},
            "required": ["city"],
        },
    },
}
WEATHER_QUESTION = "What's the weather like in Hangzhou?"
HANGZHOU_WEATHER = '{"city": "Hangzhou", "weather": "sunny", "temperature_c": 25}'
HANGZHOU_WEATHER_ANSWER = "It is sunny in Hangzhou, 25°C."


def tool_call(call_id: str, city: str) -> dict:
    arguments = '{"city": "' + city + '"}'
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _calls(*calls: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


TOOL_CHATS = [
    ([WEATHER_TOOL], _user(WEATHER_QUESTION), _calls(tool_call("call_0", "Hangzhou"))),
    ([WEATHER_TOOL], _user("What's the weather like in Chengdu?"), _calls(tool_call("call_0", "Chengdu"))),
    (
        [WEATHER_TOOL],
        _user("What's the weather like in Hangzhou and Chengdu?"),
        _calls(tool_call("call_0", "Hangzhou"), tool_call("call_1", "Chengdu")),
    ),
    (
        [WEATHER_TOOL],
        [
            *_user(WEATHER_QUESTION),
            _calls(tool_call("call_0", "Hangzhou")),
            {"role": "tool", "tool_call_id": "call_0", "content": HANGZHOU_WEATHER},
        ],
        {"role": "assistant", "content": HANGZHOU_WEATHER_ANSWER},
    ),
    ([WEATHER_TOOL], _user("hello"), {"role": "assistant", "content": GREETING_EN}),
]
