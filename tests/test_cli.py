"""The CLI as a user meets it: one-line errors for bad options, no file of the user's replaced
without --force (never the loaded model), chat commands, --stop escapes, info, --version."""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_rwkv
from mlx_rwkv.chat import ChatSession, prompts
from mlx_rwkv.cli import main
from mlx_rwkv.cli_args import unescaped
from mlx_rwkv.loading import load
from mlx_rwkv.output_files import OutputError, check_output
from mlx_rwkv.state import State

TINY_SYNTH = ["--shape", "0.1B", "--layers", "1", "--embd", "64", "--vocab", "256"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mlx-rwkv argv...` run in this process."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_file(tmp_path: Path, capsys) -> Path:
    path = tmp_path / "m.pth"
    assert run_cli(capsys, "synth", *TINY_SYNTH, "-o", str(path))[0] == 0
    return path


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "."], "is a directory"),
    (["generate", "--model", "missing.pth"], "no such file"),
    (["generate", "--chunk-size", "-1"], "--chunk-size: must be >= 1"),
    (["generate", "--chunk-size", "0"], "--chunk-size: must be >= 1"),
    (["generate", "--seed", "-1"], "--seed: must be >= 0"),
    (["generate", "--seed", str(2**64)], "--seed: must be < 2**64"),
    (["generate", "--max-tokens", "-5"], "--max-tokens: must be >= 0"),
    (["generate", "--temperature", "nan"], "--temperature: must be a finite number"),
    (["generate", "--temperature", "inf"], "--temperature: must be a finite number"),
    (["generate", "--top-p", "0"], "--top-p: must be a finite number in (0, 1]"),
    (["generate", "--min-p", "1"], "--min-p"),
    (["generate", "--presence-penalty", "inf"], "--presence-penalty"),
    (["generate", "--stop", ""], "a stop string cannot be empty"),
    (["generate", "--top-k", "x"], "'x' is not an integer"),
    (["synth", "--layers", "0", "-o", "x.pth"], "--layers: must be >= 1"),
    (["synth", "--layers", "-1", "-o", "x.pth"], "--layers: must be >= 1"),
    (["synth", "--vocab", "0", "-o", "x.pth"], "--vocab: must be >= 1"),
    (["synth", "--embd", "100", "-o", "x.pth"], "multiple of 64"),
    (["synth", "-o", "x.bin"], "must end in .pth or .safetensors"),
    (["quantize", __file__, "out.bin"], "must end in .gguf or .safetensors"),
    (["doctor", "--report", "r.txt"], "must end in .json"),
    (["bench", "--results-dir", __file__], "is a file, not a directory"),
    (["bench", "--contexts", "-1"], "--contexts: must be >= 0"),
    (["bench", "--prefill-tokens", "0"], "--prefill-tokens: must be >= 1"),
    (["bench", "--embd", "100"], "--embd: must be a multiple of 64"),
    (["bench", "--strategies", "fast"], "--strategies: invalid choice"),
    (["bench", "--repeats", "x"], "--repeats: 'x' is not an integer"),
    (["serve", "--port", "70000"], "must be <= 65535"),
    (["serve", "--port", "x"], "is not an integer"),
    (["serve", "--max-batch", "0"], "must be >= 1"),
    (["serve", "--cache-mb", "-1"], "must be a finite number"),
    (["serve", "--max-prompt-tokens", "0"], "must be >= 1"),
    (["serve", "--state", "/no/such/file"], "no such file"),
    (["serve", "--api-key", ""], "non-empty"),
])
def test_bad_options_fail_at_parse_time_in_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_stop_token_outside_the_vocabulary(capsys, model_file):
    code, _, err = run_cli(capsys, "generate", "--model", str(model_file), "--stop-token", "999")
    assert code == 1 and "--stop-token 999 is outside this model's vocabulary (0..255)" in err


def test_api_refuses_bad_values(model_file):
    model, tokenizer = load(model_file, dtype="float32")
    for kwargs, message in [({"seed": -1}, "seed must be an integer"), ({"max_tokens": -1}, "max_tokens"),
                            ({"chunk_size": 0}, "chunk_size"), ({"stop_tokens": [256]}, "outside")]:
        with pytest.raises(ValueError, match=message):
            mlx_rwkv.generate(model, tokenizer, "hi", **kwargs)
    with pytest.raises(ValueError, match="finite"):
        mlx_rwkv.SamplingParams(temperature=float("nan"))


def test_synth_never_replaces_without_force(capsys, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"the user's file")
    code, _, err = run_cli(capsys, "synth", *TINY_SYNTH, "-o", str(path))
    assert code == 1 and "exists: not replaced (use --force" in err
    assert path.read_bytes() == b"the user's file"
    assert run_cli(capsys, "synth", *TINY_SYNTH, "-o", str(path), "--force")[0] == 0
    assert load(path)[0].config.n_embd == 64
    code, _, err = run_cli(capsys, "synth", *TINY_SYNTH, "-o", str(tmp_path / "no-dir" / "m.pth"))
    assert code == 1 and "does not exist" in err


def test_written_files_follow_the_umask(capsys, tmp_path, model_file):
    old = os.umask(0o027)
    try:
        state_path = tmp_path / "s.state"
        model, _ = load(model_file, dtype="float32")
        model.new_state().save(state_path, model)
        assert run_cli(capsys, "synth", *TINY_SYNTH, "-o", str(tmp_path / "b.pth"))[0] == 0
    finally:
        os.umask(old)
    for path in (state_path, tmp_path / "b.pth"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_quantize_refuses_existing_output_and_the_input(capsys, tmp_path, model_file):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "quantize", str(model_file), str(out))
    assert code == 1 and "exists: not replaced" in err and out.read_bytes() == b"keep me"
    same = tmp_path / "m.safetensors"
    assert run_cli(capsys, "synth", *TINY_SYNTH, "-o", str(same))[0] == 0
    before = same.read_bytes()
    code, _, err = run_cli(capsys, "quantize", str(same), str(same), "--force")
    assert code == 1 and "is the file this session loaded" in err and same.read_bytes() == before


def test_state_save_refuses_to_replace_unless_asked(tmp_path, model_file):
    model, _ = load(model_file, dtype="float32")
    path = tmp_path / "s.state"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        model.new_state().save(path, model)
    assert path.read_bytes() == b"precious"
    model.new_state().save(path, model, overwrite=True)
    State.load(path, model)


def chat(session: ChatSession, *lines: str) -> list[str]:
    """Feed `lines` to the chat loop; the text turns it would send to the model."""
    feed = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return list(prompts(read, session))


def test_chat_commands(tmp_path, model_file):
    model, _ = load(model_file, dtype="float32")
    err = io.StringIO()
    session = ChatSession(model, loaded=[model_file], err=err)
    model_bytes = model_file.read_bytes()
    state_path = tmp_path / "chat.state"
    turns = chat(session, "hello", f"/save {model_file}", f"/save! {model_file}", "/save", f"/save {tmp_path}",
                 f"/save {state_path}", f"/save {state_path}", f"/save! {state_path}", "/help", "/bogus",
                 "//literal", f"/load {state_path}", "/exit", "never sent")
    log = err.getvalue()
    assert turns == ["hello", "/literal"]  # commands, errors and what follows /exit never reach the model
    assert model_file.read_bytes() == model_bytes
    assert log.count("is the file this session loaded") == 2
    assert "usage: /save PATH" in log and "is a directory" in log
    assert "exists: not replaced (use /save! PATH" in log
    assert log.count(f"[state saved to {state_path}]") == 2
    assert "/quit, /exit" in log and "unknown command /bogus" in log
    assert f"[state loaded from {state_path}]" in log


def test_check_output_rules(tmp_path):
    loaded = tmp_path / "model.pth"
    loaded.write_bytes(b"x")
    link = tmp_path / "alias.pth"
    link.symlink_to(loaded)
    with pytest.raises(OutputError, match="this session loaded"):
        check_output(link, force=True, loaded=[loaded])
    with pytest.raises(OutputError, match="directory"):
        check_output(tmp_path, force=True)
    assert check_output(tmp_path / "new.pth") == tmp_path / "new.pth"


def test_stop_escapes():
    assert unescaped(r"\n\n") == "\n\n"
    assert unescaped(r"a\tb\\n") == "a\tb\\n"
    assert unescaped(r"\x") == r"\x"


def test_stop_string_from_the_shell_stops(capsys, model_file):
    """`--stop '\\n'` (backslash-n as the shell passes it) must stop at the first newline."""
    code, out, err = run_cli(capsys, "generate", "--model", str(model_file), "--prompt", "a", "--max-tokens", "5000",
                             "--temperature", "1", "--seed", "3", "--stop", r"\n", "--dtype", "float32")
    assert code == 0 and "stopped: stop" in err and "\n" not in out.rstrip("\n")


def test_version_and_info(capsys, model_file):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"mlx-rwkv {mlx_rwkv.__version__}"
    code, out, _ = run_cli(capsys, "info", str(model_file))
    assert code == 0
    assert "layers       1" in out and "vocab        256" in out and "float16 100.0%" in out
    assert "pth" in out


def test_help_shows_every_option_with_a_description(capsys):
    from mlx_rwkv.cli import build_parser

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001 - argparse has no API
        for action in sub._actions:  # noqa: SLF001
            assert action.help, f"{name} {action.option_strings} has no help text"
    assert "(default: 0.7)" in parser._subparsers._group_actions[0].choices["generate"].format_help()  # noqa: SLF001


@pytest.mark.webgpu
def test_generate_on_the_webgpu_engine(capsys, model_file):
    pytest.importorskip("wgpu")
    from webgpu_ref import NoAdapterError, get_gpu

    try:
        get_gpu()
    except NoAdapterError:
        pytest.skip("no WebGPU adapter")
    argv = ["generate", "--model", str(model_file), "--temperature", "0", "--max-tokens", "12", "--dtype", "float32"]
    code, mlx_out, _ = run_cli(capsys, *argv)
    code_w, webgpu_out, err = run_cli(capsys, *argv, "--engine", "webgpu")
    assert code == code_w == 0 and "(webgpu, float32)" in err
    assert webgpu_out == mlx_out  # greedy: the same bytes from both engines
    mx.clear_cache()


def test_ids_without_text_are_never_sampled():
    """World ids 65530-65535 have no text: a model that favours them must not crash generation."""
    from mlx_rwkv.config import config_for_shape
    from mlx_rwkv.loading import build_model
    from mlx_rwkv.synth import synthesize
    from mlx_rwkv.tokenizer import WorldTokenizer

    config = config_for_shape("0.1B", n_layer=1, n_embd=64)
    weights = synthesize(config, seed=0, dtype="float32")
    weights["ln_out.weight"][:], weights["ln_out.bias"][:] = 0, 1  # the head sees a vector of ones
    weights["head.weight"][65530:] = 1  # logit 64 for the ids without text, the largest by far
    model, tokenizer = build_model(weights, config, "float32"), WorldTokenizer()
    assert tokenizer.textless_ids == list(range(65530, 65536))
    logits, _ = model.forward(tokenizer.encode("hi"))
    assert int(mx.argmax(logits)) >= 65530  # so greedy decoding would pick one
    chunks = list(mlx_rwkv.stream_generate(model, tokenizer, "hi", max_tokens=8,
                                           sampling=mlx_rwkv.SamplingParams(temperature=0)))
    assert all(c.token < 65530 for c in chunks) and chunks[-1].finish_reason in ("length", "stop")


def test_synth_refuses_a_model_larger_than_memory_and_notes_a_vocab_without_tokenizer(capsys, tmp_path):
    code, _, err = run_cli(capsys, "synth", "--layers", "100000", "-o", str(tmp_path / "big.pth"))
    assert code == 1 and "GiB in memory to write, more than this machine's" in err
    assert not (tmp_path / "big.pth").exists()
    code, _, err = run_cli(capsys, "synth", "--layers", "1", "--embd", "64", "--vocab", "100", "-o", str(tmp_path / "v.pth"))
    assert code == 0 and "no tokenizer has 100 tokens" in err


def test_loading_a_missing_state_says_so(model_file, tmp_path):
    from mlx_rwkv.state import StateError

    model, _ = load(model_file, dtype="float32")
    with pytest.raises(StateError, match="no such state file"):
        State.load(tmp_path / "missing.state", model)
