"""Templates (read-only VM images made from a stopped VM), and the bodies of clone requests.

A template keeps the VM's hardware (``spec``) and its volumes, which become read-only: they are
held by the template (``attached_to: template:<name>``), their files are made read-only on their
host, and they are never written again, so linked clones may use them as backing files.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.model.common import Labels, Name, ObjectMeta, Strict
from corral.model.vm import VmSpec

__all__ = [
    "TEMPLATE_HOLDER",
    "CloneRequest",
    "InstantiateRequest",
    "Template",
    "TemplateCreate",
    "TemplateSpec",
    "TemplateStatus",
    "holder",
]

TEMPLATE_HOLDER = "template:"
"""``Volume.status.attached_to`` of a template's volume: this prefix and the template's name."""


def holder(template: str) -> str:
    return f"{TEMPLATE_HOLDER}{template}"


class TemplateCreate(Strict):
    """Body of ``POST /api/v1/templates``: the stopped VM ``vm`` becomes template ``name``."""

    name: Name
    vm: Name
    labels: Labels = Field(default_factory=dict)


class TemplateSpec(Strict):
    source_vm: Name
    # The VM's hardware; ``disks`` are the template's read-only volumes, in order.
    vm: VmSpec
    labels: Labels = Field(default_factory=dict)


class TemplateStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["ready", "deleting"] = "ready"
    message: str = ""


class Template(ObjectMeta):
    kind: Literal["template"] = "template"
    spec: TemplateSpec
    status: TemplateStatus = Field(default_factory=TemplateStatus)


class InstantiateRequest(Strict):
    """Body of ``POST /api/v1/templates/{name}/instantiate``: a new VM from the template.
    ``full`` unset: linked clones of the template's volumes (they share its files), full copies
    only with ``full``."""

    name: Name
    start: bool = False
    full: bool = False
    labels: Labels = Field(default_factory=dict)
    to: Name | None = Field(
        default=None, description="copy the disks to this host (full copies only)"
    )
    pool: Name | None = Field(
        default=None, description="put the copies in this pool (full copies only)"
    )


class CloneRequest(Strict):
    """Body of ``POST /api/v1/vms/{name}/clone``: a new VM (new MAC addresses, new identity)
    with copies of the VM's disks. A running VM keeps running. Full (default): each disk is
    copied (from a temporary snapshot of a running VM), to host ``to`` if given. ``linked``:
    the VM's disks become read-only bases that the VM (on new overlays) and the clone share."""

    name: Name
    linked: bool = False
    start: bool = False
    labels: Labels = Field(default_factory=dict)
    to: Name | None = Field(default=None, description="copy the disks to this host")
    pool: Name | None = Field(
        default=None,
        description="put the copies in this pool (full clones only; default: each disk's own)",
    )
