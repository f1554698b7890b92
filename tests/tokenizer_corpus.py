"""A deterministic, varied text corpus for tokenizer tests and benchmarks (no downloads).

`corpus(seed)` returns a list of named sections: multilingual prose, code, emoji sequences,
whitespace runs, control characters, random code points, random printable ASCII and long runs
of one character. `varied_text(n_bytes, seed)` interleaves them into one string of about n_bytes.
"""
from __future__ import annotations

import random

_PROSE_WORDS = {
    "en": ("the of and to in is that it was for on are with as be at by this have from or one had "
           "not but what all were when we there can an your which their said if do will each about "
           "how up out them then she many some so these would other into has more her two like him "
           "see time could no make than first been its who now people my made over did down only way "
           "find use may water long little very after words called just where most know get through "
           "back much before go good new write our used me man too any day same right look think also "
           "around another came come work three word must because does part even place well such here "
           "take why things help put years different away again off went old number great tell men "
           "say small every found still between name should Mr home big give air line set own under "
           "read last never us left end along while might next sound below saw something thought both "
           "few those always looked show large often together asked house don't world going want school "
           "important until form food keep children feet land side without boy once animals life enough "
           "took sometimes four head above kind began almost live page got earth need far hand high year "
           "mother light parts country father let night following picture being study second eyes soon "
           "times story boys since white days ever paper hard near sentence better best across during "
           "today others however sure means knew it's try told young miles sun ways thing whole hear "
           "example heard several change answer room sea against top turned learn point city play toward "
           "five using himself usually Transformer RNN attention tokenizer GPU inference O(n) 3.14 2024 "
           "e.g. i.e. U.S. Dr. RWKV-7 state-of-the-art well-known naïve café résumé").split(),
    "zh": ("我们 你们 他们 这个 那个 什么 为什么 因为 所以 但是 如果 已经 可以 没有 一个 一种 人工智能 "
           "机器学习 深度学习 神经网络 语言模型 计算机 中国 北京 上海 今天 明天 昨天 时间 世界 问题 "
           "发展 经济 社会 文化 历史 科学 技术 研究 大学 学生 老师 朋友 家庭 工作 生活 重要 简单 困难 "
           "美丽 快乐 天气 春天 夏天 秋天 冬天 山 水 风 雨 雪 花 鸟 鱼 龙 猫 狗 书 字 说 看 听 写 读 走 "
           "跑 吃 喝 想 爱 的 了 在 是 有 和 也 就 都 而 及 与 着 或 一 二 三 十 百 千 万 亿 饕餮 魑魅魍魉 "
           "鬱 龘 𠀀 𪚥").split(),
    "ja": ("これは 日本語 の テキスト です 私 は 学生 です 東京 大阪 京都 ありがとう ございます すみません "
           "おはよう こんにちは こんばんは さようなら コンピューター プログラム データ ネットワーク "
           "人工知能 機械学習 自然言語処理 を に が で と から まで より 食べる 飲む 行く 来る 見る 書く "
           "読む 話す 聞く 思う 考える 美しい 新しい 古い 大きい 小さい ｶﾀｶﾅ ﾊﾝｶｸ ゔ ヴ").split(),
    "ko": "안녕하세요 감사합니다 한국어 텍스트 입니다 서울 부산 컴퓨터 프로그램 인공지능 학교 사랑 시간 사람".split(),
    "ar": ("مرحبا بالعالم اللغة العربية هذا نص تجريبي الذكاء الاصطناعي تعلم الآلة الحاسوب كتاب مدرسة "
           "جامعة شكرا من إلى على في عن مع هو هي نحن أنتم").split(),
    "ru": ("Привет мир это тестовый текст на русском языке искусственный интеллект машинное обучение "
           "компьютер программа университет студент время человек жизнь день рука работа слово место "
           "Москва Санкт-Петербург ёлка съешь ещё этих мягких французских булок").split(),
    "hi": ("नमस्ते दुनिया यह हिंदी में एक परीक्षण पाठ है कृत्रिम बुद्धिमत्ता मशीन लर्निंग कंप्यूटर भारत "
           "दिल्ली मुंबई विश्वविद्यालय छात्र समय").split(),
    "el": "Γεια σου κόσμε αυτό είναι ένα κείμενο δοκιμής τεχνητή νοημοσύνη Αθήνα".split(),
    "he": "שלום עולם זהו טקסט בדיקה בעברית בינה מלאכותית ירושלים".split(),
    "th": "สวัสดีชาวโลก นี่คือข้อความทดสอบ ภาษาไทย ปัญญาประดิษฐ์ กรุงเทพ".split(),
    "vi": "Xin chào thế giới đây là văn bản thử nghiệm tiếng Việt trí tuệ nhân tạo Hà Nội".split(),
}
_NO_SPACE = {"zh", "ja", "th"}
_PUNCT = {"zh": "，。！？；：、", "ja": "、。！？", "default": ",.!?;:"}

_CODE_TEMPLATES = [
    "def {f}({a}, {b}=None):\n    \"\"\"Return the {a} of {b}.\"\"\"\n    if {b} is None:\n        return {a}\n"
    "    for i in range(len({a})):\n        {a}[i] += {b}[i] * {n}\n    return {a}\n\n",
    "class {F}:\n    def __init__(self, {a}: int = {n}) -> None:\n        self.{a} = {a}\n\n"
    "    def __repr__(self) -> str:\n        return f\"{F}({{self.{a}!r}})\"\n\n",
    "function {f}({a}, {b}) {{\n  const {c} = {a}.map((x) => x * {n});\n  if ({c}.length === 0) {{\n"
    "    throw new Error(\"empty {a}\");\n  }}\n  return {c}.reduce((s, v) => s + v, {b});\n}}\n",
    "#include <stdio.h>\nstatic int {f}(const int *{a}, size_t {b}) {{\n\tint {c} = 0;\n"
    "\tfor (size_t i = 0; i < {b}; ++i) {{ {c} += {a}[i] << {n}; }}\n\treturn {c};\n}}\n",
    "SELECT {a}, COUNT(*) AS {c} FROM {f} WHERE {b} > {n} GROUP BY {a} ORDER BY {c} DESC;\n",
    "<div class=\"{a}\" id=\"{f}-{n}\">\r\n  <span>{b} &amp; {c}</span>\r\n</div>\r\n",
    "{{\"{a}\": [{n}, {n}.5, -{n}e-3], \"{b}\": {{\"{c}\": null, \"ok\": true}}, \"{f}\": \"\\u00e9\\n\"}}\n",
    "fn {f}(&mut self, {a}: &[u8]) -> Result<usize, {F}> {{\n    let {c} = {a}.iter().filter(|&&x| x != b'\\n').count();\n"
    "    Ok({c} + {n})\n}}\n",
    "$ {f} --{a}={n} | grep -E '^[a-z]+$' > /tmp/{b}.log 2>&1 && echo \"done: ${{?}}\"\n",
    "\\begin{{equation}} \\sum_{{i=1}}^{{{n}}} {a}_i^2 = \\frac{{{b}}}{{{c}}} \\end{{equation}}\n",
]
_IDENTS = "x y z i j k n data value result items buffer count total idx tmp self config state model token".split()

_EMOJI_BASE = ["😀", "😂", "🥲", "❤️", "🔥", "👍", "🎉", "🚀", "🤖", "🌍", "✨", "🙏", "👀", "💯", "🐍", "☕"]
_EMOJI_ZWJ = ["👨‍👩‍👧‍👦", "👩‍💻", "🧑‍🚀", "🏳️‍🌈", "👁️‍🗨️", "❤️‍🔥", "🧔‍♀️", "👨🏽‍🦰", "🐈‍⬛", "🏃‍♀️‍➡️"]
_SKIN_TONES = ["\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
_TONED = ["👍", "👋", "🙌", "✊", "🤝", "🧑", "👶"]
_EXTRA = ["1️⃣", "#️⃣", "©️", "™️", "↔️", "\u200d", "\ufe0f", "\u200b", "\ufeff"]


def _prose(rng: random.Random, lang: str, n_words: int) -> str:
    words = _PROSE_WORDS[lang]
    punct = _PUNCT.get(lang, _PUNCT["default"])
    sep = "" if lang in _NO_SPACE else " "
    out: list[str] = []
    for i in range(n_words):
        w = rng.choice(words)
        if lang == "en" and (i == 0 or out[-1][-1:] in ".!?") and rng.random() < 0.9:
            w = w[:1].upper() + w[1:]
        out.append(w)
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice(punct))
        if r < 0.01:
            out.append("\n\n" if rng.random() < 0.5 else "\n")
        elif r < 0.02 and lang != "en":
            out.append(" " + rng.choice(_PROSE_WORDS["en"]))
        out.append(sep)
    return "".join(out)


def _code(rng: random.Random, n_snippets: int) -> str:
    parts = []
    for _ in range(n_snippets):
        names = rng.sample(_IDENTS, 4)
        snippet = rng.choice(_CODE_TEMPLATES).format(
            f=names[0], F=names[0].title(), a=names[1], b=names[2], c=names[3], n=rng.randint(0, 4096))
        if rng.random() < 0.3:
            snippet = snippet.replace("    ", "\t")
        parts.append(snippet)
    return "".join(parts)


def _emoji(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(rng.choice(_EMOJI_BASE))
        elif r < 0.5:
            out.append(rng.choice(_EMOJI_ZWJ))
        elif r < 0.65:
            out.append(rng.choice(_TONED) + rng.choice(_SKIN_TONES))
        elif r < 0.8:  # a flag: two regional indicator letters
            out.append("".join(chr(0x1F1E6 + rng.randrange(26)) for _ in range(2)))
        elif r < 0.9:
            out.append(rng.choice(_EXTRA))
        else:
            out.append(rng.choice([" ", "\n", "!", "ok ", "好"]))
    return "".join(out)


def _whitespace(rng: random.Random, n: int) -> str:
    units = [" ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\v", "\f"]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            out.append(rng.choice(units) * rng.choice([1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 64, 127, 128, 129, 300]))
        elif r < 0.7:
            out.append("".join(rng.choice(units) for _ in range(rng.randint(1, 40))))
        else:
            out.append(rng.choice(["x", "if", "word", "}", "  return", "#"]))
    return "".join(out)


def _control(rng: random.Random, n: int) -> str:
    controls = [chr(c) for c in list(range(0, 32)) + [127] + list(range(0x80, 0xA0))]
    return "".join(rng.choice(controls) if rng.random() < 0.7 else rng.choice("ab 1\n") for _ in range(n))


def _random_codepoints(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        plane = rng.random()
        if plane < 0.3:
            cp = rng.randrange(0x80, 0x800)
        elif plane < 0.8:
            cp = rng.randrange(0x800, 0x10000)
        else:
            cp = rng.randrange(0x10000, 0x110000)
        if 0xD800 <= cp < 0xE000:  # lone surrogates cannot be encoded to UTF-8
            cp -= 0x1000
        out.append(chr(cp))
    return "".join(out)


def _random_ascii(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(32, 127)) for _ in range(n))


def _runs(rng: random.Random) -> str:
    chars = ["a", "=", "-", "#", "*", " ", "\n", "0", "中", "é", "😀", "\x00", "ab", "\t", "🇺🇸", "ー"]
    return "".join(c * rng.choice([1, 2, 5, 64, 128, 129, 255, 256, 1000, 4099]) + "|" for c in chars)


def corpus(seed: int = 0, scale: int = 1) -> list[tuple[str, str]]:
    """Named sections, about 540 KB of UTF-8 per unit of scale, the same for the same seed."""
    rng = random.Random(seed)
    sections: list[tuple[str, str]] = []
    for lang in _PROSE_WORDS:
        sections.append((f"prose-{lang}", _prose(rng, lang, (10000 if lang == "en" else 2500) * scale)))
    mixed = " ".join(_prose(rng, rng.choice(list(_PROSE_WORDS)), rng.randint(3, 40)) for _ in range(150 * scale))
    sections.append(("prose-mixed", mixed))
    sections.append(("code", _code(rng, 120 * scale)))
    sections.append(("emoji", _emoji(rng, 4000 * scale)))
    sections.append(("whitespace", _whitespace(rng, 600 * scale)))
    sections.append(("control", _control(rng, 4000 * scale)))
    sections.append(("random-unicode", _random_codepoints(rng, 6000 * scale)))
    sections.append(("random-ascii", _random_ascii(rng, 12000 * scale)))
    sections.append(("runs", "".join(_runs(rng) for _ in range(scale))))
    return sections


def varied_text(n_bytes: int = 1_000_000, seed: int = 0) -> str:
    """One string of about n_bytes UTF-8 bytes: corpus sections cut into pieces and shuffled."""
    rng = random.Random(seed)
    pieces: list[str] = []
    size, unit = 0, 0
    while size < n_bytes:
        for _, text in corpus(seed + unit):
            for start in range(0, len(text), 4096):
                piece = text[start:start + 4096 + rng.randrange(0, 64)]
                pieces.append(piece)
                size += len(piece.encode("utf-8"))
        unit += 1
    rng.shuffle(pieces)
    out, size = [], 0
    for piece in pieces:
        if size >= n_bytes:
            break
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)
