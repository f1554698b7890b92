"""Compile-check of the Metal instantiation of every kernel, without Apple tools.

For every KernelSpec in mlx_rwkv (found automatically) and every activation dtype, the source
that mx.fast.metal_kernel would hand to the Metal compiler is rebuilt (tests/metal_source.py,
cross-checked against MLX's own generator where this MLX can trace without Metal) and
type-checked by clang++ against metal_kernels/metal_shim.h, which models MSL's address spaces
and type keywords; Apple's per-kernel limits (threadgroup memory, buffer arguments) are checked
per instantiation. Lints (tests/msl_lint.py) cover what no host compiler sees: MSL reserved words
used as names, and MLX attribute names mentioned outside code. Plus the "one source" guarantee:
the CUDA body is the Metal body up to the index prelude. The planted-fault tests show that each
check fails on the fault it exists for.
"""
from __future__ import annotations

import re
from pathlib import Path

import os

import mlx.core as mx
import pytest
from msl_lint import reserved_declarations, stray_attribute_mentions, strip_comments
from metal_source import (
    EXAMPLE_CALLS, METAL_ATTRIBUTES, Launch, compile_check, find_compiler, launch_source,
    mlx_generated_source, record_launches, registered_specs,
)

from mlx_rwkv import kernels
from mlx_rwkv.kernels import KernelSpec, render

KERNEL_DIR = Path(__file__).resolve().parents[1] / "metal_kernels"
SPECS = registered_specs()
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@pytest.fixture(scope="module")
def cxx() -> str:
    compiler = find_compiler()
    if compiler is None:
        if os.environ.get("CI"):  # in CI a missing clang must not pass as a skip
            pytest.fail("the Metal source check needs clang++ (apt-get install clang)")
        pytest.skip("no clang++ for the Metal source check")
    return compiler


def launches_of(name: str, dtype: mx.Dtype) -> list[Launch]:
    """The launches of kernel `name` that its example call makes, one per distinct source."""
    if name not in EXAMPLE_CALLS:
        pytest.fail(f"kernel {name!r} has no entry in EXAMPLE_CALLS (tests/metal_source.py)")
    found = {launch_source(x): x for x in record_launches(EXAMPLE_CALLS[name], dtype) if x.spec.name == name}
    assert found, f"EXAMPLE_CALLS[{name!r}] launched no {name!r} kernel through get_kernel"
    return list(found.values())


def _describe(launch: Launch) -> str:
    template = ", ".join(f"{n}={v}" for n, v in launch.template)
    return f"{launch.spec.name}<{template}> inputs {[str(d) for d in launch.input_dtypes]}"


# ---- coverage -----------------------------------------------------------------------------------

def test_every_kernel_source_has_a_spec():
    bodies = {p.stem for p in KERNEL_DIR.glob("*.inc")}
    assert bodies, f"no kernel bodies in {KERNEL_DIR}"
    orphans = sorted(bodies - {Path(f).stem for spec in SPECS.values() for f in spec.files})
    assert not orphans, (f"metal_kernels/{{{', '.join(orphans)}}}.inc are in no KernelSpec bound at "
                         "module level in an mlx_rwkv module, so nothing checks them")


def test_every_spec_has_an_example_call():
    missing = sorted(set(SPECS) - set(EXAMPLE_CALLS))
    assert not missing, (f"add an EXAMPLE_CALLS entry (tests/metal_source.py) calling the code "
                         f"that launches {missing}")


# ---- the Metal instantiation compiles -----------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", sorted(SPECS))
def test_metal_instantiation_compiles(name, dtype, cxx):
    for launch in launches_of(name, DTYPES[dtype]):
        ok, output = compile_check(launch_source(launch, utils=False, line_markers=True), cxx)
        assert ok, f"{_describe(launch)} does not compile ({cxx}):\n{output}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_generated_source_matches_mlx(name):
    """Our signature generator against MLX's own (export tracing works without Metal)."""
    for dtype in DTYPES.values():
        for launch in launches_of(name, dtype):
            theirs = mlx_generated_source(launch)
            if theirs is None:
                pytest.skip(f"this MLX ({mx.__version__}) cannot generate Metal source here")
            ours = launch_source(launch, utils=False)
            # kernel names only differ between MLX versions (suffixes), never in what compiles
            their_name = re.search(r"\[\[kernel\]\] void (\w+)\(", theirs).group(1)
            our_name = re.search(r"\[\[kernel\]\] void (\w+)\(", ours).group(1)
            assert theirs.replace(their_name, our_name) == ours, _describe(launch)


# ---- the check can fail -------------------------------------------------------------------------

PROBE = KernelSpec(name="probe", inputs=("x", "n"), outputs=("y",))
PROBE_BODY = """\
const uint i = gid * N + tid;
SHARED float s[N];
s[tid] = float(x[i]);
BARRIER();
y[i] = T(s[(tid + 1) % N] * 2.0f + float(n[0]));
"""


def probe_launch(dtype: mx.Dtype) -> Launch:
    return Launch(PROBE, (dtype, mx.int32), ((256,), (1,)), (dtype,), ((256,),),
                  (("T", dtype), ("N", 64)), (256, 1, 1), (64, 1, 1))


_READ_SOURCE = kernels.read_source


def check_probe(monkeypatch, cxx, dtype, body, header_extra=""):
    real = _READ_SOURCE

    def read_source(filename: str) -> str:
        if filename == "probe.inc":
            return body
        return real(filename) + (header_extra if filename == "prelude_metal.h" else "")

    monkeypatch.setattr(kernels, "read_source", read_source)
    return compile_check(launch_source(probe_launch(dtype), utils=False, line_markers=True), cxx)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_probe_compiles(monkeypatch, cxx, dtype):
    ok, output = check_probe(monkeypatch, cxx, DTYPES[dtype], PROBE_BODY)
    assert ok, output


@pytest.mark.parametrize("case,line,expect", [
    ("undeclared identifier", "y[i] = T(undeclared_scale);", "undeclared_scale"),
    ("write to an input buffer", "x[i] = y[i];", "read-only|const"),
    ("vector to scalar", "const float2 v = float(x[i]); const float f = v;", "float"),
    ("undeclared template parameter", "y[i] = T(M);", "'M'|‘M’"),
    ("missing semicolon", "const uint j = i", "expected"),
    ("a variable named half", "const uint half = 4;", "half"),
    ("a device pointer assigned to a thread pointer", "thread T* p = y;", "address space|device"),
    ("a constant input read as device", "const device int* m = n;", "address space|constant"),
    ("a threadgroup array as a device pointer", "device float* p = s;", "SHARED|threadgroup"),
    ("36 KiB of threadgroup memory", "SHARED float big[9216];", "32 KiB of threadgroup memory"),
    ("36 KiB over two arrays", "SHARED float4 b1[1024];\nSHARED float4 b2[1280];", "32 KiB"),
])
def test_check_catches(monkeypatch, cxx, case, line, expect):
    ok, output = check_probe(monkeypatch, cxx, mx.float32, PROBE_BODY + line + "\n")
    assert not ok, f"{case} compiled"
    assert re.search(expect, output), output
    assert "metal_kernels/probe.inc" in output, "messages should name the kernel file"


def test_threadgroup_memory_is_counted_per_instantiation(monkeypatch, cxx):
    """N * 128 floats: 32 KiB at N = 64 fits, at N = 72 it does not (a template argument)."""
    body = PROBE_BODY + "SHARED float big[N * 128 - N];\n"  # plus the probe's own s[N]
    assert check_probe(monkeypatch, cxx, mx.float32, body)[0]
    launch = probe_launch(mx.float32)
    launch = Launch(**{**launch.__dict__, "template": (("T", mx.float32), ("N", 72))})
    monkeypatch.setattr(kernels, "read_source", lambda f, real=_READ_SOURCE: body if f == "probe.inc" else real(f))
    ok, output = compile_check(launch_source(launch, utils=False, line_markers=True), cxx)
    assert not ok and "32 KiB" in output


def test_too_many_buffer_arguments_fail(monkeypatch, cxx):
    """Apple GPUs bind at most 31 buffers; MLX gives every input and output one."""
    wide = KernelSpec(name="probe", inputs=tuple(f"x{i}" for i in range(31)), outputs=("y",))
    launch = Launch(wide, (mx.float32,) * 31, ((256,),) * 31, (mx.float32,), ((256,),),
                    (("T", mx.float32),), (256, 1, 1), (64, 1, 1))
    monkeypatch.setattr(kernels, "read_source", lambda f, real=_READ_SOURCE: "y[tid] = x0[tid];\n"
                        if f == "probe.inc" else real(f))
    ok, output = compile_check(launch_source(launch, utils=False), cxx)
    assert not ok and "32 buffer arguments" in output


def test_check_instantiates_every_dtype(monkeypatch, cxx):
    """A T-dependent error shows only in the half/bfloat instantiations."""
    body = PROBE_BODY + "const device float* xf = x;\n"
    assert check_probe(monkeypatch, cxx, mx.float32, body)[0]
    assert not check_probe(monkeypatch, cxx, mx.float16, body)[0]
    assert not check_probe(monkeypatch, cxx, mx.bfloat16, body)[0]


def test_attribute_used_only_in_the_header_fails(monkeypatch, cxx):
    """MLX declares [[thread_index_in_simdgroup]] only when the *body* mentions it."""
    header = "\nDEVICE_FN uint lane_id() { return thread_index_in_simdgroup; }\n"
    ok, output = check_probe(monkeypatch, cxx, mx.float32, PROBE_BODY, header_extra=header)
    assert not ok and "thread_index_in_simdgroup" in output
    ok, output = check_probe(monkeypatch, cxx, mx.float32,
                             PROBE_BODY + "y[i] = T(float(thread_index_in_simdgroup));\n")
    assert ok, output


# ---- lints: MSL reserved words, MLX attribute names -----------------------------------------------

@pytest.mark.parametrize("name", sorted(SPECS))
def test_body_declares_no_msl_reserved_word(name):
    """`const uint half = ...` compiles as C++ and CUDA; in MSL half is a type keyword."""
    found = reserved_declarations(render(SPECS[name], "metal")[1])
    assert not found, f"{name}: MSL reserved words used as names (line, name): {found}"


def test_metal_prelude_declares_no_msl_reserved_word():
    assert not reserved_declarations(kernels.read_source("prelude_metal.h"))


def test_reserved_word_lint_finds_a_variable_named_half():
    body = kernels.read_source("wkv7_scan.inc").replace("const uint span =", "const uint half =")
    assert [w for _, w in reserved_declarations(body)] == ["half"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_body_mentions_only_the_attributes_it_uses(name):
    """MLX declares a kernel parameter for every attribute name found anywhere in the body."""
    body = render(SPECS[name], "metal")[1]
    stray = stray_attribute_mentions(body, [a for a, _ in METAL_ATTRIBUTES])
    assert not stray, f"{name}.inc mentions {stray} outside code (in a comment or a longer name)"


def test_attribute_lint_finds_a_comment_mention():
    attributes = [a for a, _ in METAL_ATTRIBUTES]
    assert stray_attribute_mentions("x[tid] = 1;  // not grid_size\n", attributes) == ["grid_size"]
    assert stray_attribute_mentions("const uint3 g = grid_size;\n", attributes) == []


# ---- one source: the CUDA instantiation -----------------------------------------------------------



@pytest.mark.parametrize("name", sorted(SPECS))
def test_cuda_body_is_the_metal_body(name):
    """Both backends get the spec's .inc files verbatim, in order, after a prelude of index declarations."""
    files = "".join(kernels.read_source(f) for f in SPECS[name].files)
    declared = {}
    for backend in ("metal", "cuda"):
        header, body = render(SPECS[name], backend)
        assert header.strip(), f"empty {backend} prelude"
        assert body.endswith(files), f"the {backend} body is not {SPECS[name].files} verbatim"
        prefix = body[: len(body) - len(files)]
        lines = [x for x in prefix.splitlines() if x.strip()]
        assert all(re.fullmatch(r"const uint \w+ = [\w.*+ ]+;", x) for x in lines), prefix
        declared[backend] = [x.split()[2] for x in lines]
    assert declared["metal"] == declared["cuda"]


def _defines(filename: str) -> set[str]:
    return set(re.findall(r"^\s*#\s*define\s+(\w+)", kernels.read_source(filename), re.M))


def test_preludes_map_the_same_vocabulary():
    assert _defines("prelude_metal.h") == _defines("prelude_cuda.h")


BACKEND_ONLY = re.compile(
    r"\b(threadgroup|threadgroup_barrier|simdgroup_barrier|mem_flags|device|constant|"
    r"__syncthreads|__shared__|__device__|__global__|threadIdx|blockIdx|blockDim|gridDim|"
    r"warpSize|__shfl\w*)\b")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_body_is_portable(name):
    """No backend keyword in a body; Metal built-ins it uses must be mapped by the CUDA prelude."""
    code = strip_comments(kernels.read_source(f"{name}.inc"))
    found = sorted(set(BACKEND_ONLY.findall(code)))
    assert not found, f"{name}.inc uses backend-specific {found}: map them in the preludes"
    cuda = kernels.read_source("prelude_cuda.h")
    metal_names = {a for a, _ in METAL_ATTRIBUTES} | set(re.findall(r"\b(simd_\w+|quad_\w+)\b", code))
    unmapped = sorted(n for n in metal_names if re.search(rf"\b{n}\b", code) and n not in cuda)
    assert not unmapped, f"{name}.inc uses Metal built-ins {unmapped} that prelude_cuda.h lacks"
