"""Cluster membership: the supervised etcd member, leader election and Serf gossip."""

from corral.cluster.election import LeaderElection, read_leader
from corral.cluster.etcd import EtcdConfig, EtcdSupervisor, EtcdTlsFiles
from corral.cluster.serf import SerfAgent, generate_key
from corral.cluster.serf_rpc import Member, SerfClient, SerfError

__all__ = [
    "EtcdConfig",
    "EtcdSupervisor",
    "EtcdTlsFiles",
    "LeaderElection",
    "Member",
    "SerfAgent",
    "SerfClient",
    "SerfError",
    "generate_key",
    "read_leader",
]
