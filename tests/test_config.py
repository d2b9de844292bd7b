"""Configuration: every error names the key path, the file and line, and what is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest

from relay.config import _validate, load_config
from relay.errors import ConfigError
from relay.settings import Secret, Settings
from relay.yamlfile import LoadedYaml, read_env_file
from tests.helpers import ROOT, make_config, registry

GOOD = """\
state_dir: /tmp/relay-state
sources:
  demo:
    type: demo
destinations:
  out:
    type: file
    path: /tmp/out.jsonl
"""

# (name, YAML, expected "path", expected line, a phrase the message must contain)
BAD_CONFIGS = [
    ("unknown top-level key", "stat_dir: /x\n" + GOOD[GOOD.index("sources"):], "stat_dir", 1,
     "unknown key (did you mean 'state_dir'?)"),
    ("typo in destination key", GOOD.replace("    path:", "    pth:"), "destinations.out.pth", 8,
     "unknown key (did you mean 'path'?)"),
    ("missing required setting", GOOD.replace("    path: /tmp/out.jsonl\n", ""), "destinations.out.path", 6,
     "required key is missing"),
    ("missing type", GOOD.replace("    type: file\n", ""), "destinations.out", 6, "`type` is required"),
    ("unknown destination type", GOOD.replace("type: file", "type: fille"), "destinations.out.type", 7,
     "unknown destination type 'fille' (did you mean 'file'?)"),
    ("unknown source type", GOOD.replace("type: demo", "type: dmeo"), "sources.demo.type", 4,
     "unknown source type 'dmeo'"),
    ("bad duration", GOOD + "    batch:\n      max_wait: soon\n", "destinations.out.batch.max_wait", 10,
     "'soon' is not a duration"),
    ("bad size", GOOD + "    batch:\n      max_bytes: 10 parsecs\n", "destinations.out.batch.max_bytes", 10,
     "is not a size"),
    ("negative batch size", GOOD + "    batch:\n      max_entries: -5\n", "destinations.out.batch.max_entries", 10,
     "greater than 0"),
    ("typo in nested key", GOOD + "    retry:\n      max_backof: 1m\n", "destinations.out.retry.max_backof", 10,
     "did you mean 'max_backoff'?"),
    ("wrong type for a list", GOOD + "    drop_fields: context.location\n", "destinations.out.drop_fields", 9,
     "valid list"),
    ("bad enum", GOOD + "    start_at: yesterday\n", "destinations.out.start_at", 9, "'oldest' or 'newest'"),
    ("bad log level", "log:\n  level: loud\n" + GOOD, "log.level", 2, "'debug', 'info', 'warning' or 'error'"),
    ("bad listen address", "metrics:\n  listen: 9464\n" + GOOD, "metrics.listen", 2, "host:port"),
    ("missing env var", GOOD.replace("/tmp/out.jsonl", "${RELAY_TEST_UNSET_VAR}"), "destinations.out.path", 8,
     "environment variable RELAY_TEST_UNSET_VAR is not set"),
    ("unreadable file reference", GOOD.replace("/tmp/out.jsonl", "${file:/nonexistent/secret}"),
     "destinations.out.path", 8, "cannot read ${file:/nonexistent/secret}"),
    ("bad name", GOOD.replace("  out:", "  Out Put:"), "destinations.Out Put", 6, "lower-case letters"),
    ("duplicate key", GOOD + "  out:\n    type: stdout\n", "destinations.out", 9,
     "duplicate key (first set on line 6)"),
    ("destination not a mapping", GOOD.replace("  out:\n    type: file\n    path: /tmp/out.jsonl\n", "  out: file\n"),
     "destinations.out", 6, "must be a mapping"),
    ("backoff order", GOOD + "    retry:\n      initial_backoff: 10m\n      max_backoff: 1m\n",
     "destinations.out.retry.initial_backoff", 10, "must not exceed retry.max_backoff"),
    ("invalid YAML", GOOD + "  broken: [unclosed\n", "", 10, "invalid YAML"),
    ("bad demo rate", GOOD.replace("    type: demo\n", "    type: demo\n    rate: fast\n"), "sources.demo.rate", 5,
     "valid number"),
]


@pytest.mark.parametrize(("text", "path", "line", "phrase"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_key_path_and_line(text: str, path: str, line: int, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(text, file="relay.yaml", env={})
    issues = info.value.issues
    matching = [i for i in issues if i.path == path]
    assert matching, f"no issue for {path!r}; got {[str(i) for i in issues]}"
    issue = matching[0]
    assert issue.line == line, str(issue)
    assert phrase in issue.message, str(issue)
    assert str(issue).startswith(f"relay.yaml:{line}: ")


def test_every_problem_is_reported_at_once() -> None:
    text = GOOD.replace("    path:", "    pth:") + "    batch:\n      max_wait: soon\n" + "bogus: 1\n"
    with pytest.raises(ConfigError) as info:
        make_config(text, env={})
    assert {i.path for i in info.value.issues} == {"destinations.out.pth", "destinations.out.path",
                                                   "destinations.out.batch.max_wait", "bogus"}


def test_substitution_env_default_and_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cr3t-value\n")
    text = textwrap.dedent("""\
        state_dir: ${STATE:-/tmp/default-state}
        sources: {demo: {type: demo, rate: "${RATE}"}}
        destinations: {out: {type: file, path: "${file:token}.jsonl"}}
    """)
    config = make_config(text, env={"RATE": "5", "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert str(config.state_dir) == "/tmp/default-state"
    assert config.sources["demo"].settings.rate == 5
    assert str(config.destinations["out"].settings.path) == "s3cr3t-value.jsonl"


def test_substituted_values_cannot_inject_yaml() -> None:
    config = make_config(GOOD.replace("/tmp/out.jsonl", "${EVIL}"), env={"EVIL": "x\n    fsync: false"})
    assert config.destinations["out"].settings.fsync is True


def test_state_dir_defaults_to_systemd_state_directory() -> None:
    text = GOOD.replace("state_dir: /tmp/relay-state\n", "")
    assert str(make_config(text, env={"STATE_DIRECTORY": "/var/lib/audit-relay"}).state_dir) == "/var/lib/audit-relay"
    assert str(make_config(text, env={}).state_dir) == "state"


def test_durations_and_sizes_are_parsed() -> None:
    config = make_config(GOOD + "    batch:\n      max_wait: 250ms\n      max_bytes: 900KiB\n"
                                "    retry:\n      max_backoff: 1h\n", env={})
    dest = config.destinations["out"]
    assert dest.batch.max_wait == 0.25 and dest.batch.max_bytes == 900 * 1024
    assert dest.delivery.retry.max_backoff == 3600
    assert dest.batch.max_entries == 5000, "unset batch limits keep the type's defaults"


def test_secrets_never_print() -> None:
    secret = Secret("hunter2-very-secret")
    assert "hunter2" not in str(secret) and "hunter2" not in repr(secret)
    assert secret.reveal() == "hunter2-very-secret"


def test_a_failed_substitution_is_reported_once() -> None:
    text = GOOD.replace("    path: /tmp/out.jsonl\n", "    path: ${RELAY_TEST_UNSET_VAR}\n")
    with pytest.raises(ConfigError) as info:
        make_config(text, env={})
    assert [str(i) for i in info.value.issues] == [
        "relay.yaml:8: destinations.out.path: environment variable RELAY_TEST_UNSET_VAR is not set"]


@pytest.mark.parametrize(("text", "line", "phrase"), [
    (GOOD + "    drop_fields: " + "[" * 3000 + "]" * 3000 + "\n", 9, "invalid YAML: nested too deeply"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6)) + GOOD, 1,
     "expands to more than 100,000 keys and values"),
], ids=["deep nesting", "alias bomb"])
def test_hostile_yaml_is_refused_with_a_line(text: str, line: int, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(text, env={})
    [issue] = info.value.issues
    assert issue.line == line and phrase in issue.message


def test_unreadable_bytes_are_config_errors_with_a_line(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_bytes(GOOD.replace("/tmp/out.jsonl", "${file:token}").encode()
                                          .replace(b"state_dir: /tmp", b"state_dir: /t\xe9mp"))
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "relay.yaml", registry(), {})
    assert str(info.value.issues[0]).endswith("relay.yaml:1: the configuration is not UTF-8 text "
                                              "(invalid continuation byte, byte 0xe9)")
    (tmp_path / "relay.yaml").write_text(GOOD.replace("/tmp/out.jsonl", "${file:token}"))
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "relay.yaml", registry(), {})
    assert [i.message for i in info.value.issues] == ["cannot read ${file:token}: it is not UTF-8 text"]


def test_env_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the environment file: No such file"):
        read_env_file(tmp_path / "missing.env")
    (tmp_path / "bad.env").write_bytes(b"A=1\nB=\xff\n")
    with pytest.raises(ConfigError) as info:
        read_env_file(tmp_path / "bad.env")
    assert str(info.value.issues[0]).endswith("bad.env:2: the environment file is not UTF-8 text")


@pytest.mark.parametrize(("auth", "expected"), [
    ({"token": "t", "mode": "c"}, ["relay.yaml: sources.push.auth.mode: Input should be 'a' or 'b'"]),
    ({"tokn": "t"}, ["relay.yaml: sources.push.auth.tokn: unknown key (did you mean 'token'?)",
                     "relay.yaml: sources.push.auth.token: required key is missing"]),
    ("nothing", ["relay.yaml: sources.push.auth: Input should be 'none'"]),
])
def test_a_union_setting_is_reported_as_the_member_the_input_fits(auth: object, expected: list[str]) -> None:
    """`auth: none | {...}`: pydantic reports every member and puts their tags in the key path
    (`auth.function-after[...]`); only the member the input's shape fits is meant."""
    class Credentials(Settings):
        token: str
        mode: Literal["a", "b"] = "a"

    class UnionSettings(Settings):
        auth: Literal["none"] | Credentials

    issues: list[Any] = []
    _validate(UnionSettings, {"auth": auth}, ("sources", "push"), LoadedYaml({}, "relay.yaml"), issues)
    assert sorted(str(i) for i in issues) == sorted(expected)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "nope.yaml", registry())


def test_example_config_is_valid() -> None:
    """relay.yaml.example documents every type; it must load with the placeholder environment."""
    from relay.yamlfile import read_env_file

    env = read_env_file(ROOT / "relay.env.example")
    config = load_config(ROOT / "relay.yaml.example", registry(), env)
    documented = {d.type for d in config.destinations.values()} | {s.type for s in config.sources.values()}
    installed = {t.name for t in registry().all() if t.package.startswith("audit-relay ")}
    assert installed <= documented, f"types missing from relay.yaml.example: {installed - documented}"
