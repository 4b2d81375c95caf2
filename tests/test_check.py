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


PARAMS = """\
[[dma]]
id = "D1"

[[vendor]]
id = "nb"
payload = "json"
channel = [
  { name = "register", quantity = "volume", unit = "m3", params = { address = 3 } },
]

[[vendor]]
id = "wq"
  [[vendor.channel]]
  name = "ph"
  quantity = "ph"
  unit = "pH"
  params = { nodeid = "ns=2;s={station}.pH" }
  [[vendor.channel]]
  name = "turbidity"
  quantity = "turbidity"
  unit = "NTU"
  params = { node_id = "ns=x;q=1" }

[[meter_group]]
vendor = "nb"
dma = "D1"
id_format = "NB{:03d}"
count = 2
protocol = "coap"

[[device]]
id = "M1"
vendor = "nb"
protocol = "mqtt"
dma = "D1"
params = { host = "10.0.0.9" }

[[device]]
id = "WQ1"
vendor = "wq"
protocol = "opcua"
dma = "D1"
  [device.params]
  endpoint = "opc.tcp://127.0.0.1:4840/"
  publishing_intervall = 500
"""


def test_every_protocol_params_through_its_model(tmp_path: Path) -> None:
    """MQTT and CoAP read no params, OPC-UA's are typed: each unknown key on its own line."""
    reg = tmp_path / "registry.toml"
    reg.write_text(PARAMS)
    problems, summary = check_registry_text(reg, PARAMS)
    assert summary is None
    by_line = {p.line: p.message for p in problems}
    lines = PARAMS.splitlines()

    def line_of(text: str) -> int:
        return next(i for i, line in enumerate(lines, start=1) if text in line)

    # CoAP meters (the group) use the vendor template: a Modbus-style key there is refused
    assert "params.address is not a key this protocol reads" in by_line[line_of("address = 3")]
    assert "(coap, mqtt channel)" in by_line[line_of("address = 3")]
    assert "params.host is not a key" in by_line[line_of('host = "10.0.0.9"')]
    assert "did you mean 'node_id'?" in by_line[line_of("nodeid =")]
    assert "does not parse" in by_line[line_of('node_id = "ns=x;q=1"')]
    assert "did you mean 'publishing_interval'?" in by_line[line_of("publishing_intervall")]
    assert len(problems) == 5, "\n".join(map(str, problems))


def test_load_time_refuses_the_same_keys() -> None:
    """The OPC-UA adapter validates through the same models: a typo never becomes a default."""
    import tomllib

    from aquameter.registry import Registry
    from protocols.opcua import ConfigError, device_config

    data = tomllib.loads(PARAMS)
    registry = Registry.model_validate(data)
    wq = next(d for d in registry.devices if d.id == "WQ1")
    try:
        device_config(wq, registry)
    except ConfigError as err:
        assert "unknown params key 'publishing_intervall'" in str(err)
    else:
        raise AssertionError("a misspelt device key was accepted")
    fixed = wq.model_copy(update={"params": {"endpoint": "opc.tcp://127.0.0.1:4840/"}})
    cfg, errors = device_config(fixed, registry)
    assert [c.channel for c in cfg.channels] == []
    assert "did you mean 'node_id'?" in errors[0] and "does not parse" in errors[1]


def test_meter_classes_and_holiday_calendars_are_checked_not_refused(tmp_path: Path) -> None:
    """`devices check` / `devices sync` accept [[meter_class]] and [[calendar]] tables and put a
    mistake in them, or an unknown calendar on a DMA, on its line."""
    base = (Path(__file__).parent.parent / "examples" / "registry.toml").read_text()
    good = base + (
        '\n[[meter_class]]\nid = "bulk"\nhold_codes = ["TAMPER"]\n'
        '\n[[calendar]]\nid = "default"\nholidays = ["2026-12-25", 2026-12-26]\n'
    )
    reg = tmp_path / "r.toml"
    problems, summary = check_registry_text(reg, good)
    assert problems == [] and summary is not None
    bad = good.replace('"2026-12-25"', '"2026-13-25"')
    problems, _ = check_registry_text(reg, bad)
    line = bad.splitlines().index('holidays = ["2026-13-25", 2026-12-26]') + 1
    assert len(problems) == 1 and str(problems[0]).startswith(f"{reg}:{line}:"), problems
    unknown = good.replace('id = "DMA-NORTH"', 'id = "DMA-NORTH"\ncalendar = "nowhere"', 1)
    problems, _ = check_registry_text(reg, unknown)
    dma_line = unknown.splitlines().index('calendar = "nowhere"') + 1
    assert len(problems) == 1 and "nowhere" in str(problems[0]), problems
    assert str(problems[0]).startswith(f"{reg}:{dma_line}:"), problems
