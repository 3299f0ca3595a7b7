"""Emulated hosts on one machine (ringsync-cluster): a tool for tests and benchmarks.

Not on the data path: nothing in ringsync imports it. hosts.py builds a cluster of network
namespaces joined by a switch with shaped links (netns.py does the Linux plumbing); agent.py is
the ssh stand-in MPI launchers use to start processes on a host; launch.py builds each MPI's
command line across the hosts, pinned to TCP between them; links.py reads the links' byte
counters and measures their rate; cli.py is the command. See docs/cluster.md.
"""
from .hosts import Cluster, ClusterSpec, Host
from .netns import ClusterError

__all__ = ["Cluster", "ClusterError", "ClusterSpec", "Host"]
