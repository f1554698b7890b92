"""Source lints for what a host compiler cannot see in a Metal kernel body.

  RESERVED_WORDS                  names MSL reserves (they may not name a variable, function, ...)
  reserved_declarations(code)     reserved names that `code` declares
  stray_attribute_mentions(body)  MLX attribute names that the body mentions other than as code

The reserved list follows the Metal Shading Language Specification (version 3.2,
https://developer.apple.com/metal/Metal-Shading-Language-Specification.pdf): section 2.1 scalar,
2.2 vector and packed vector, 2.3 matrix, 2.4 SIMD-group matrix, 2.6 atomic, 2.9-2.10 texture and
sampler types, 2.20 as_type, 4 address spaces, 5.1 function qualifiers, 6.1 the metal namespace,
and the constants of <metal_types>; naga's MSL backend keeps the same list
(gfx-rs/wgpu naga/src/back/msl/keywords.rs). C++ keywords are left out: every C++ compiler
rejects those already.
"""
from __future__ import annotations

import itertools
import re

_SCALARS = ("bool", "char", "short", "int", "long", "uchar", "ushort", "uint", "ulong", "half",
            "bfloat", "float")
_VECTORS = {f"{t}{n}" for t in _SCALARS for n in (2, 3, 4)}
_MATRICES = {f"{t}{c}x{r}" for t in ("half", "float", "bfloat") for c, r in itertools.product((2, 3, 4), repeat=2)}
_TEXTURES = {"texture1d", "texture1d_array", "texture2d", "texture2d_array", "texture3d", "texturecube",
             "texturecube_array", "texture2d_ms", "texture2d_ms_array", "texture_buffer", "depth2d",
             "depth2d_array", "depthcube", "depthcube_array", "depth2d_ms", "depth2d_ms_array",
             "sampler", "access", "imageblock"}
_CONSTANTS = {"CHAR_BIT", "SCHAR_MAX", "SCHAR_MIN", "UCHAR_MAX", "CHAR_MAX", "CHAR_MIN", "USHRT_MAX",
              "SHRT_MAX", "SHRT_MIN", "UINT_MAX", "INT_MAX", "INT_MIN", "ULONG_MAX", "LONG_MAX",
              "LONG_MIN", "FLT_DIG", "FLT_MANT_DIG", "FLT_MAX", "FLT_MIN", "FLT_EPSILON", "MAXFLOAT",
              "HUGE_VALF", "INFINITY", "NAN", "HALF_MAX", "HALF_MIN", "HALF_EPSILON", "MAXHALF",
              "HUGE_VALH", "M_E_F", "M_LOG2E_F", "M_LOG10E_F", "M_LN2_F", "M_LN10_F", "M_PI_F",
              "M_PI_2_F", "M_PI_4_F", "M_1_PI_F", "M_2_PI_F", "M_2_SQRTPI_F", "M_SQRT2_F",
              "M_SQRT1_2_F", "M_E_H", "M_PI_H", "M_SQRT2_H"}
RESERVED_WORDS: frozenset[str] = frozenset(
    {"uchar", "ushort", "uint", "ulong", "half", "bfloat", "int8_t", "uint8_t", "int16_t",
     "uint16_t", "int32_t", "uint32_t", "int64_t", "uint64_t", "size_t", "ptrdiff_t", "llong",
     "ullong", "quad", "complex", "imaginary", "vec", "packed_vec", "matrix", "as_type",
     "atomic", "atomic_int", "atomic_uint", "atomic_bool", "atomic_ulong", "atomic_float",
     "simdgroup_matrix", "simdgroup_float8x8", "simdgroup_half8x8", "simdgroup_bfloat8x8",
     "device", "constant", "thread", "threadgroup", "threadgroup_imageblock", "ray_data",
     "object_data", "kernel", "vertex", "fragment", "metal", "restrict", "main"}
    | _VECTORS | {f"packed_{v}" for v in _VECTORS} | _MATRICES | _TEXTURES | _CONSTANTS)

# Tokens after which `NAME (` is a use (a call, a cast, a return value), not a declaration.
_STATEMENT_WORDS = {"return", "else", "do", "case", "goto", "throw", "sizeof", "alignof", "new",
                    "delete", "co_return", "co_yield", "decltype", "noexcept", "typename"}
_TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|::|->|[^\s\w]")


def strip_comments(text: str) -> str:
    """`text` without // and /* */ comments (line breaks kept, so line numbers stay)."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)


def reserved_declarations(code: str) -> list[tuple[int, str]]:
    """(line, name) for every MSL reserved name that `code` declares: a variable, parameter,
    function or macro (`const uint half = 1;`, `float4 float2[2];`, `#define half ...`)."""
    found = []
    for number, line in enumerate(strip_comments(code).splitlines(), 1):
        define = re.match(r"\s*#\s*define\s+(\w+)", line)
        if define and define.group(1) in RESERVED_WORDS:
            found.append((number, define.group(1)))
            continue
        if line.lstrip().startswith("#"):
            continue
        tokens = _TOKEN.findall(line)
        for before, name, after in zip(tokens, tokens[1:], tokens[2:] + [""]):
            if name not in RESERVED_WORDS or after not in {"=", ";", "[", ",", ")", "(", ":", "{", ""}:
                continue
            after_type = re.fullmatch(r"[A-Za-z_]\w*", before) and before not in _STATEMENT_WORDS
            after_template_or_pointer = before in {">", "*", "&"} and after != "("  # vec<T, 4> x; T* x
            if after_type or after_template_or_pointer:
                found.append((number, name))
    return found


def stray_attribute_mentions(body: str, attributes: list[str]) -> list[str]:
    """Attribute names that MLX finds as substrings of `body` (and so declares as kernel
    parameters) but that the body's code does not use as a whole name: a mention in a comment,
    or inside a longer identifier."""
    code = set(re.findall(r"\w+", strip_comments(body)))
    return [name for name in attributes if name in body and name not in code]
