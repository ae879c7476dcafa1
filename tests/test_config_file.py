"""The YAML config reader: every error names the file, the line and the field."""
from __future__ import annotations

import pytest

from tensorslm.config_file import load_section
from tensorslm.errors import ConfigError

GOOD = """\
name: pi-01
port: 1883
broker:
  url: mqtt://127.0.0.1
  tls: false
points:
  - {name: top, threads: 2}
  - name: low
    threads: 1
"""


def write(tmp_path, text):
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_reads_typed_values_and_nested_sections(tmp_path):
    root = load_section(write(tmp_path, GOOD))
    assert root.str("name") == "pi-01"
    assert root.int("port", minimum=1, maximum=65535) == 1883
    broker = root.section("broker")
    assert broker.str("url") == "mqtt://127.0.0.1"
    assert broker.bool("tls") is False
    points = root.sections("points")
    assert [p.str("name") for p in points] == ["top", "low"]
    assert [p.int("threads") for p in points] == [2, 1]
    assert root.float("missing", default=2.5) == 2.5
    root.reject_unknown()


@pytest.mark.parametrize("text, call, line, field, message", [
    ("port: abc\n", lambda r: r.int("port"), 1, "port", "expected a whole number, got 'abc'"),
    ("a: 1\nport: 70000\n", lambda r: r.int("port", maximum=65535), 2, "port",
     "expected at most 65535, got 70000"),
    ("name: x\n", lambda r: r.str("url"), 1, "url", "required field is missing"),
    ("mode: fast\n", lambda r: r.choice("mode", ["dense", "tied"]), 1, "mode",
     "expected one of dense, tied; got 'fast'"),
    ("b:\n  tls: yes please\n", lambda r: r.section("b").bool("tls"), 2, "b.tls",
     "expected true or false, got 'yes please'"),
    ("points:\n  - name: a\n  - threads: 2\n", lambda r: [p.str("name") for p in r.sections("points")],
     3, "points[1].name", "required field is missing"),
    ("x: 1\nx: 2\n", lambda r: None, 2, "x", "duplicate key"),
    ("rate: .nan\n", lambda r: r.float("rate"), 1, "rate", "expected a number, got nan"),
    ("name: ''\n", lambda r: r.str("name"), 1, "name", "expected non-empty text"),
])
def test_errors_name_file_line_field(tmp_path, text, call, line, field, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        call(load_section(path))
    err = info.value
    assert (err.file, err.line, err.field, err.reason) == (str(path), line, field, message)
    assert str(err) == f"{path}, line {line}, field '{field}': {message}"


def test_unknown_field_lists_accepted(tmp_path):
    root = load_section(write(tmp_path, "name: a\nnmae: b\n"))
    root.str("name")
    with pytest.raises(ConfigError, match=r"line 2, field 'nmae': unknown field; accepted fields here: name"):
        root.reject_unknown()


@pytest.mark.parametrize("text, line, message", [
    ("a: [1, 2\n", 2, "invalid YAML"),
    ("", 1, "file is empty"),
    ("- 1\n- 2\n", 1, "expected a mapping"),
])
def test_file_level_errors(tmp_path, text, line, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_section(write(tmp_path, text))
    assert info.value.line == line


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_section(tmp_path / "nope.yaml")
