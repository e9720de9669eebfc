"""Network cards on the QEMU command line, and the MAC rules of the VM spec."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError

from corral.agent.drivers.qemu.cmdline import QemuConfig, build_argv
from corral.model import VmSpec
from corral.model.vm import VmNic, new_mac

from .test_cmdline import boot_files, make_config, values_of  # noqa: F401  (fixtures)


def test_each_mac_is_one_virtio_net_card_on_its_own_user_netdev(
    make_config: Callable[..., QemuConfig],  # noqa: F811
) -> None:
    argv = build_argv(make_config(nics=("52:54:00:00:00:01", "52:54:00:00:00:02")))
    assert values_of(argv, "-netdev") == ["user,id=net0", "user,id=net1"]
    devices = values_of(argv, "-device")
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=nic0" in devices
    assert "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=nic1" in devices
    assert "-netdev" not in build_argv(make_config())


def test_a_mac_that_could_inject_options_is_refused(
    make_config: Callable[..., QemuConfig],  # noqa: F811
) -> None:
    with pytest.raises(ValidationError, match="MAC address"):
        make_config(nics=("52:54:00:00:00:01,id=x",))


@pytest.mark.parametrize(
    ("mac", "rule"),
    [
        ("52:54:00:00:00", "six hex pairs"),
        ("52-54-00-00-00-01", "six hex pairs"),
        ("01:00:5e:00:00:01", "unicast"),
    ],
)
def test_vm_spec_refuses_bad_macs_naming_the_rule(mac: str, rule: str) -> None:
    with pytest.raises(ValidationError, match=rule):
        VmSpec.model_validate({"nics": [{"mac": mac}]})


def test_macs_are_normalised_and_generated_in_the_qemu_range() -> None:
    assert VmNic(mac="52:54:00:AB:CD:EF").mac == "52:54:00:ab:cd:ef"
    macs = {new_mac() for _ in range(50)}
    assert len(macs) > 45 and all(m.startswith("52:54:00:") for m in macs)
    assert all(VmNic(mac=m).mac == m for m in macs)
