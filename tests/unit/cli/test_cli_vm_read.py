"""`corral vm ls` and `corral vm show`: tables, key/value views and `-o json`."""

from __future__ import annotations

import pytest

from corral.client.testing import FakeCorralApi

from .support import Cli, json_out, kv, rows


def test_vm_ls_shows_every_vm_across_pages(cli: Cli) -> None:
    result = cli("vm", "ls")

    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert table[0] == ["NAME", "STATE", "NODE", "VCPUS", "MEMORY", "LABELS", "AGE"]
    assert table[1:] == [
        ["db-1", "stopped", "n1", "4", "4Gi", "-", "2m"],
        ["web-1", "running", "n1", "2", "512Mi", "tier=web", "2m"],
        ["web-2", "running", "n2", "1", "1Gi", "env=prod,tier=web", "2m"],
    ]


def test_vm_ls_filters_by_label_node_and_state(cli: Cli, fake: FakeCorralApi) -> None:
    result = cli("vm", "ls", "--label", "tier=web", "--label", "env!=prod", "--state", "running")

    assert result.exit_code == 0, result.output
    assert [row[0] for row in rows(result.stdout)[1:]] == ["web-1"]
    assert fake.requests[-1].url.params["label"] == "tier=web,env!=prod"

    on_n2 = cli("vm", "ls", "--node", "n2")
    assert [row[0] for row in rows(on_n2.stdout)[1:]] == ["web-2"]


def test_vm_ls_with_nothing_to_show_says_so_on_stderr(cli: Cli) -> None:
    result = cli("vm", "ls", "--state", "crashed")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == "no vms found\n"


@pytest.mark.parametrize(
    "args",
    [
        ("-o", "json", "vm", "ls"),
        ("vm", "ls", "-o", "json"),
        ("vm", "ls", "--output", "JSON"),
    ],
)
def test_vm_ls_json_is_the_whole_list_object(
    cli: Cli, fake: FakeCorralApi, args: tuple[str, ...]
) -> None:
    result = cli(*args)

    assert result.exit_code == 0, result.output
    assert json_out(result) == {
        "items": [fake.vms["db-1"], fake.vms["web-1"], fake.vms["web-2"]],
        "next_cursor": None,
        "revision": fake.revision,
    }


def test_vm_show_prints_a_readable_view(cli: Cli) -> None:
    result = cli("vm", "show", "web-1")

    assert result.exit_code == 0, result.output
    view = kv(result.stdout)
    assert view["Name"] == "web-1"
    assert view["State"] == "running"
    assert view["Node"] == "n1"
    assert view["vCPUs"] == "2"
    assert view["Memory"] == "512Mi"
    assert view["Labels"] == "tier=web"
    assert view["Created"] == "2026-11-26T21:00:00Z (2m ago)"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("vm", "show", "web-1", "-o", "json"), {}),
        (("-o", "json", "vm", "show", "web-1"), {}),
        (("vm", "show", "web-1"), {"CORRAL_OUTPUT": "json"}),
        (("-o", "table", "vm", "show", "web-1", "-o", "json"), {}),
    ],
)
def test_vm_show_json_is_exactly_the_api_object(
    cli: Cli, fake: FakeCorralApi, args: tuple[str, ...], env: dict[str, str]
) -> None:
    result = cli(*args, env=env)
    assert result.exit_code == 0, result.output
    assert json_out(result) == fake.vms["web-1"]


def test_a_command_level_table_beats_a_global_json(cli: Cli) -> None:
    result = cli("vm", "show", "web-1", "-o", "table", env={"CORRAL_OUTPUT": "json"})
    assert result.exit_code == 0
    assert kv(result.stdout)["Name"] == "web-1"


def test_vm_show_of_a_missing_vm_exits_3(cli: Cli) -> None:
    result = cli("vm", "show", "web-9")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == "error: vm web-9 not found"
    assert result.stderr.splitlines()[1].startswith("request id: req-")


def test_server_text_is_printed_literally_not_as_markup(cli: Cli, fake: FakeCorralApi) -> None:
    fake.vms["web-1"]["status"]["message"] = "disk [bold]full[/bold]"
    result = cli("vm", "show", "web-1")
    assert kv(result.stdout)["Message"] == "disk [bold]full[/bold]"
