import json
import subprocess
import sys

import pytest


def test_walkthrough(cli, fake_model):
    src = str(fake_model())
    assert "registered x:1" in cli("models", "register", src, "--name", "x", "--task", "embed", check=True).stdout
    assert "registered x:2" in cli("models", "register", src, "-n", "x", "-t", "embed", check=True).stdout
    cli("models", "alias", "x", "production", "1", check=True)
    cli("models", "alias", "x", "production", "2", "--reason", "newer", check=True)
    assert "2 → 1" in cli("models", "rollback", "x", "production", check=True).stdout
    history = json.loads(cli("models", "history", "x", "--json", check=True).stdout)
    assert [(h["action"], h["from_version"], h["to_version"]) for h in history] == [
        ("set", None, 1),
        ("set", 1, 2),
        ("rollback", 2, 1),
    ]
    shown = json.loads(cli("models", "show", "x", "--json", check=True).stdout)
    assert shown["ref"] == "x:1" and shown["aliases"] == ["production"]
    assert "hello" in cli("predict", "x", "hello", check=True).stdout


def test_tampered_file_fails_verify_and_load(cli, fake_model, tmp_path):
    cli("models", "register", str(fake_model()), "--name", "x", "--task", "embed", check=True)
    weights = tmp_path / "home" / "artifacts" / "x" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[123] ^= 0x01  # one byte
    weights.write_bytes(bytes(data))
    verify = cli("models", "verify", "x")
    assert verify.returncode == 1 and "weights.safetensors: checksum mismatch" in verify.stdout
    load = cli("predict", "x", "hello")
    assert load.returncode == 2
    assert "file weights.safetensors does not match its checksum" in load.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("models", "show", "nope"), "unknown model 'nope'"),
        (("models", "show", "a/../b"), "bad model reference 'a/../b'"),
        (("models", "show", "x:zero"), "bad model reference 'x:zero'"),
        (("models", "register", "/does/not/exist", "--name", "y", "--task", "embed"), "does not exist"),
        (("models", "register", "{fake}", "--name", "y", "--task", "generate"), "wrong task"),
        (("models", "register", "{fake}", "--name", "y", "--task", "poetry"), "unknown task 'poetry'"),
        (("--config", "{bad_config}", "models", "list"), "is not valid YAML"),
        (("--config", "/no/such.yaml", "models", "list"), "config file /no/such.yaml does not exist"),
        (("models", "delete", "x", "--yes"), "delete needs an explicit version"),
        (("models", "rollback", "x", "production"), "no earlier target"),
    ],
)
def test_bad_input_gets_one_clear_line(cli, fake_model, tmp_path, args, needle):
    cli("models", "register", str(fake_model()), "--name", "x", "--task", "embed", "--alias", "production", check=True)
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("registry: [unclosed\n")
    args = [a.format(fake=fake_model(), bad_config=bad_config) for a in args]
    proc = cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("stdin", ["devnull", "closed"])
def test_delete_without_yes_on_a_non_interactive_terminal_refuses_in_one_line(cli, cli_env, fake_model, stdin):
    cli("models", "register", str(fake_model()), "--name", "x", "--task", "embed", check=True)
    command = [sys.executable, "-m", "moorage", "models", "delete", "x:1"]
    if stdin == "devnull":  # a script or a pipe
        proc = subprocess.run(command, capture_output=True, text=True, env=cli_env, stdin=subprocess.DEVNULL)
    else:  # `moorage ... <&-`: Python starts with no sys.stdin at all
        proc = subprocess.run(
            ["sh", "-c", 'exec "$@" <&-', "sh", *command], capture_output=True, text=True, env=cli_env
        )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert lines == ["error: refusing to delete x:1 without --yes: there is no terminal to confirm on"]
    assert "x:1" in cli("models", "show", "x:1", check=True).stdout  # nothing was deleted
