"""The keys file: format, hashes, appending, reloading, and looking a caller up by key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetcore.errors import AuthenticationError
from gateway.auth import ANONYMOUS, Authenticator
from gateway.keys import (
    KeyEntry,
    KeysFile,
    KeysFileError,
    append_key,
    hash_key,
    load_keys_file,
    new_key,
    parse_keys,
)


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_a_new_key_is_long_random_and_stored_only_as_its_sha256() -> None:
    key, other = new_key(), new_key()
    assert key != other and key.startswith("sk-fleet-") and len(key) >= 40
    digest = hash_key(key)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert key not in digest and hash_key(key) == digest


def test_yaml_entries_parse_with_defaults() -> None:
    a, b = hash_key("a"), hash_key("b")
    entries = parse_keys(f'"{a}": {{name: alice, models: [m1, m2], rpm: 60, tpm: 1000, '
                         f'concurrency: 2}}\n"{b}":\n  name: bob\n')
    assert entries[a] == KeyEntry(name="alice", models=["m1", "m2"], rpm=60, tpm=1000,
                                  concurrency=2)
    assert entries[b].allows("anything") and entries[b].rpm is None
    assert entries[b].concurrency is None
    assert entries[a].allows("m1") and not entries[a].allows("m3")
    assert KeyEntry(name="x", models=["*"]).allows("m3")


def test_empty_file_has_no_keys() -> None:
    assert parse_keys("") == {} and parse_keys("# only a comment\n") == {}
    assert parse_keys("  ", json_format=True) == {}


@pytest.mark.parametrize("text, says", [
    ("- a list", "expected a mapping"),
    ('"sk-plain-key": {name: a}', "sha256"),
    ('"sha256:ABC": {name: a}', "sha256"),
    (f'"{hash_key("k")}": {{name: a, rmp: 5}}', "rmp"),
    (f'"{hash_key("k")}": {{name: a, rpm: 0}}', "rpm"),
    (f'"{hash_key("k")}": {{name: a, rpm: "5"}}', "rpm"),
    (f'"{hash_key("k")}": {{models: [m]}}', "name"),
    ("key: [unclosed", "YAML"),
])
def test_bad_files_are_refused_naming_the_problem(text: str, says: str) -> None:
    with pytest.raises(KeysFileError, match=says):
        parse_keys(text)


def test_a_key_in_clear_is_not_echoed_in_the_error() -> None:
    with pytest.raises(KeysFileError) as info:
        parse_keys('"sk-secret-value-123": {name: a}')
    assert "sk-secret-value-123" not in str(info.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_append_adds_entries_and_refuses_a_repeat(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"keys{suffix}"
    first, second = hash_key("one"), hash_key("two")
    append_key(path, first, KeyEntry(name="one", models=["m"], rpm=5))
    append_key(path, second, KeyEntry(name="two", tpm=100))
    entries = load_keys_file(path)
    assert entries == {first: KeyEntry(name="one", models=["m"], rpm=5),
                       second: KeyEntry(name="two", tpm=100)}
    with pytest.raises(KeysFileError, match="already"):
        append_key(path, first, KeyEntry(name="again"))


def test_append_keeps_the_comments_of_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("# team keys, see the wiki\n")
    append_key(path, hash_key("k"), KeyEntry(name="k"))
    assert path.read_text().startswith("# team keys, see the wiki\n")
    assert hash_key("k") in load_keys_file(path)


def test_append_into_a_flow_style_yaml_file_rewrites_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("{}\n")
    append_key(path, hash_key("k"), KeyEntry(name="k"))
    assert list(load_keys_file(path)) == [hash_key("k")]


def test_concurrent_creates_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-m", "fleet.cli", "keys", "create", "--name",
                               f"k{i}", "--file", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env) for i in range(6)]
    keys = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        keys.append(out.decode().strip())
    entries = load_keys_file(path)
    assert {hash_key(k) for k in keys} == set(entries)
    assert sorted(e.name for e in entries.values()) == [f"k{i}" for i in range(6)]


def test_cli_create_prints_the_key_once_and_stores_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "keys", "create", "--name", "alice", "--models",
         "a,b", "--rpm", "60", "--tpm", "500", "--concurrency", "4", "--file", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("sk-fleet-") and key not in path.read_text()
    assert load_keys_file(path)[hash_key(key)] == KeyEntry(name="alice", models=["a", "b"],
                                                           rpm=60, tpm=500, concurrency=4)
    assert "4 concurrency" in result.stderr
    listed = subprocess.run([sys.executable, "-m", "fleet.cli", "keys", "list", "--file",
                             str(path)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "alice" in listed.stdout and "rpm=60" in listed.stdout and key not in listed.stdout
    assert "concurrency=4" in listed.stdout


def test_cli_refuses_a_bad_limit(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "keys", "create", "--name", "a", "--rpm", "0",
         "--file", str(tmp_path / "k.yaml")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == 2 and "--rpm" in result.stderr and not result.stdout
    assert not (tmp_path / "k.yaml").exists()


def test_a_concurrency_below_one_is_refused() -> None:
    with pytest.raises(KeysFileError, match="concurrency"):
        parse_keys(f'"{hash_key("a")}": {{name: a, concurrency: 0}}\n')


def test_keys_file_reloads_on_change_and_keeps_the_last_good_entries(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    append_key(path, hash_key("one"), KeyEntry(name="one"))
    keys = KeysFile(path)
    assert not keys.reload_if_changed()
    append_key(path, hash_key("two"), KeyEntry(name="two"))
    assert keys.reload_if_changed() and set(keys.entries) == {hash_key("one"), hash_key("two")}
    good = dict(keys.entries)
    path.write_text("not: [valid")
    assert not keys.reload_if_changed() and keys.entries == good
    path.unlink()
    assert not keys.reload_if_changed() and keys.entries == good
    path.write_text(f'"{hash_key("three")}": {{name: three}}\n')
    assert keys.reload_if_changed() and list(keys.entries) == [hash_key("three")]


def test_same_size_rewrite_within_one_second_is_seen(tmp_path: Path) -> None:
    # mtime in nanoseconds (and the inode, for editors that replace the file) tell it apart.
    path = tmp_path / "keys.yaml"
    path.write_text(f'"{hash_key("aaa")}": {{name: a}}\n')
    keys = KeysFile(path)
    stat = path.stat()
    path.write_text(f'"{hash_key("bbb")}": {{name: b}}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert keys.reload_if_changed() and list(keys.entries) == [hash_key("bbb")]


def test_authenticator_without_keys_lets_everyone_in() -> None:
    auth = Authenticator()
    assert not auth.enabled and auth.authenticate(None) is ANONYMOUS


@pytest.mark.parametrize("header, code", [
    (None, "missing_api_key"),
    ("Bearer wrong", "invalid_api_key"),
    ("Basic plain", "invalid_authorization"),
    ("Bearer ", "invalid_authorization"),
    ("Bearer " + "x" * 600, "invalid_authorization"),
])
def test_authenticator_refuses_bad_headers(header: str | None, code: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        Authenticator(["plain"]).authenticate(header)
    assert info.value.code == code


def test_plain_keys_and_file_keys_work_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = new_key()
    append_key(path, hash_key(key), KeyEntry(name="alice", models=["m"], rpm=3))
    auth = Authenticator(["plain"], path)
    plain = auth.authenticate(bearer("plain"))
    assert plain.entry.allows("any") and plain.entry.rpm is None
    alice = auth.authenticate(bearer(key))
    assert alice.name == "alice" and alice.key_id == hash_key(key) and not alice.entry.allows("x")


def test_an_empty_keys_file_still_requires_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("")
    auth = Authenticator(keys_file=path)
    assert auth.enabled
    with pytest.raises(AuthenticationError):
        auth.authenticate(bearer("anything"))


def test_a_broken_keys_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text('"sk-plain": {name: a}')
    with pytest.raises(KeysFileError):
        Authenticator(keys_file=path)


def test_watcher_reloads_off_the_request_path(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("")
    auth = Authenticator(keys_file=path)
    key = new_key()

    async def scenario() -> None:
        changes: asyncio.Queue[set[str]] = asyncio.Queue()
        watcher = asyncio.create_task(auth.watch_forever(0.01, changes.put_nowait))
        try:
            append_key(path, hash_key(key), KeyEntry(name="late"))
            assert await asyncio.wait_for(changes.get(), 5) == {hash_key(key)}
            assert auth.authenticate(bearer(key)).name == "late"
            path.write_text("# revoked\n")
            assert await asyncio.wait_for(changes.get(), 5) == set()
            with pytest.raises(AuthenticationError):
                auth.authenticate(bearer(key))
        finally:
            watcher.cancel()

    asyncio.run(scenario())


def test_a_reload_changes_what_a_key_already_seen_may_do(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, other = new_key(), new_key()
    append_key(path, hash_key(key), KeyEntry(name="a", models=["m"], rpm=3))
    auth = Authenticator(keys_file=path)
    assert auth.authenticate(bearer(key)).entry.rpm == 3
    assert auth.authenticate(bearer(key)) is auth.authenticate(bearer(key))  # looked up once
    path.write_text("")
    append_key(path, hash_key(key), KeyEntry(name="a", models=["m", "n"], rpm=7))
    append_key(path, hash_key(other), KeyEntry(name="b"))
    os.utime(path, (1, 1))  # a new mtime, whatever the clock's resolution
    assert asyncio.run(auth.reload())
    caller = auth.authenticate(bearer(key))
    assert caller.entry.rpm == 7 and caller.entry.allows("n")
    assert auth.authenticate(bearer(other)).name == "b"
    with pytest.raises(AuthenticationError):
        auth.authenticate(bearer(key) + "x")


def test_authenticate_does_not_touch_the_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys.yaml"
    key = new_key()
    append_key(path, hash_key(key), KeyEntry(name="a"))
    auth = Authenticator(keys_file=path)
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a) or real_stat(*a, **k))
    for _ in range(1000):
        auth.authenticate(bearer(key))
    assert calls == []


def test_the_gateway_does_not_start_on_a_broken_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text('"sk-in-clear": {name: a}\n')
    result = subprocess.run([sys.executable, "-m", "gateway", "--keys-file", str(path)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 2 and "sha256" in result.stderr
    assert "Traceback" not in result.stderr and "sk-in-clear" not in result.stderr
