"""Cluster membership: the supervised etcd member and leader election."""

from corral.cluster.election import LeaderElection, read_leader
from corral.cluster.etcd import EtcdConfig, EtcdSupervisor

__all__ = ["EtcdConfig", "EtcdSupervisor", "LeaderElection", "read_leader"]
