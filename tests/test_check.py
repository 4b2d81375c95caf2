"""aquameter check: every registry mistake as FILE:LINE: message, before devices sync."""

from __future__ import annotations

from pathlib import Path

from aquameter.check import check_registry, check_registry_text, check_url

BAD = """\
[[dma]]
id = "D1"
timezone = "Europe/Lodnon"

[[vendor]]
id = "plc"
channel = [
  { name = "flow", quantity = "flow", unit = "m3/h", params = { address = 0, typ = "float32" } },
  { name = "press", quantity = "pressure", unit = "psig", params = { address = 2 } },
]

[[device]]
id = "PS1"
vendor = "plc"
protocol = "modbus"
dma = "D1"
psk_file = "keys/none.psk"
params = { host = "modbus://10.0.0.1", port = 502 }

[[device]]
id = "WQ1"
vendor = "plc"
protocol = "opcua"
dma = "D1"
  [device.params]
  endpoint = "10.0.0.2:4840"
"""


def test_every_mistake_has_its_line(tmp_path: Path) -> None:
    reg = tmp_path / "registry.toml"
    reg.write_text(BAD)
    problems, summary = check_registry_text(reg, BAD)
    assert summary is None
    got = {(p.line, p.message.split(":")[0]) for p in problems}
    text = "\n".join(str(p) for p in problems)
    assert f"{reg}:3: dma D1: unknown time zone 'Europe/Lodnon'" in text
    assert "did you mean 'type'?" in text and f"{reg}:8:" in text
    assert f"{reg}:9: vendor plc channel press: 'psig' is not a unit of pressure" in text
    assert "host is a host name or address, not a URL" in text
    assert "keys/none.psk does not exist" in text
    assert "endpoint must be an opc.tcp://host:port URL" in text
    assert len(got) >= 6


def test_examples_are_ok() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in ("examples/estate.toml", "examples/registry.toml"):
        path = root / name
        problems, summary = check_registry_text(path, path.read_text())
        assert problems == [] and summary is not None
        assert str(summary).startswith("registry OK: ")


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    reg = tmp_path / "r.toml"
    reg.write_text('[[dma]]\nid = "A\n')
    (problem,) = check_registry(reg)
    assert str(problem).startswith(f"{reg}:2:") and "TOML syntax error" in str(problem)
    assert problem.col is not None


def test_urls_need_a_scheme() -> None:
    assert check_url("broker:1883", ("mqtt", "mqtts"), "url") is not None
    assert check_url("mqtts://broker", ("mqtt", "mqtts"), "url") is None
