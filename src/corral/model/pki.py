"""The cluster's certificate authorities as etcd keeps them (``/corral/v1/pki``).

Written once at bootstrap. The private keys are PKCS#8 PEM encrypted with the cluster's
``pki_secret``, which only server hosts hold (in their ``cluster.json``): a copy of etcd's data
alone does not give the CA keys away.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ClusterPki"]


class ClusterPki(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ca_cert: str
    ca_key: str
    etcd_ca_cert: str
    etcd_ca_key: str
