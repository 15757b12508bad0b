import json
import os
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


@pytest.fixture
def read_only(tmp_path):
    """Run `python -m moorage ARGS` with the home folder read-only: a read-only bind mount in a private
    mount namespace (root ignores file modes), or the files' write bits removed (anyone else)."""
    home = tmp_path / "home"
    chmodded = []

    def run(env: dict, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "moorage", *args]
        if os.geteuid() == 0:
            mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
            probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, str(home), "true"], capture_output=True)
            if probe.returncode != 0:
                pytest.skip(f"cannot mount the home read-only as root: {probe.stderr.decode().strip()}")
            command = ["unshare", "-m", "sh", "-c", mount, str(home), *command]
        elif not chmodded:
            for path in [home, *home.rglob("*")]:
                chmodded.append((path, path.stat().st_mode))
                path.chmod(path.stat().st_mode & ~0o222)
        return subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)

    yield run
    for path, mode in reversed(chmodded):
        path.chmod(mode)


def test_a_read_only_home_still_lists_shows_and_verifies(cli, cli_env, fake_model, read_only):
    cli("models", "register", str(fake_model()), "--name", "x", "--task", "embed", "--alias", "production", check=True)
    listed = read_only(cli_env, "models", "list")
    assert listed.returncode == 0 and "production" in listed.stdout, listed.stderr
    shown = read_only(cli_env, "models", "show", "x@production", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["ref"] == "x:1", shown.stderr
    verified = read_only(cli_env, "models", "verify", "x")
    assert verified.returncode == 0 and "2 files OK" in verified.stdout, verified.stderr
    tagged = read_only(cli_env, "models", "tag", "x", "team=search")  # a write: refused, and says why
    assert tagged.returncode == 2 and tagged.stderr.strip().count("\n") == 0, tagged.stderr
    assert tagged.stderr.startswith("error: the catalog ") and "is read-only" in tagged.stderr


def test_a_read_only_catalog_behind_the_schema_says_it_needs_an_upgrade(cli, cli_env, fake_model, read_only, tmp_path):
    import sqlite3

    cli("models", "register", str(fake_model()), "--name", "x", "--task", "embed", check=True)
    db = sqlite3.connect(tmp_path / "home" / "catalog.db")
    with db:  # as if an older moorage had written it
        db.execute("UPDATE alembic_version SET version_num = '0001'")
    db.close()
    listed = read_only(cli_env, "models", "list")
    assert listed.returncode == 2 and listed.stderr.count("\n") == 1, listed.stderr
    assert "is read-only and its schema is at revision 0001, not " in listed.stderr
    assert "run any moorage command once with write access" in listed.stderr
