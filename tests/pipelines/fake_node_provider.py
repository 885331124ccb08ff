"""Ray's fake multi-node provider (autoscaler v1, `type: external`), with each fake node's runtime
environments in a folder of its own.

The fake nodes of one machine share the head's session dir, and a node's runtime-env agent re-extracts
a `--working-dir` package it has not seen yet (`download_and_unpack_package(overwrite=True)` removes
the folder first). With one shared `runtime_resources` folder, every node that joins wipes the job's
code under the driver and the other nodes' workers (seen: `cd: .../_ray_pkg_...: No such file or
directory`, then the driver failing to open one of its files). Real nodes have disks of their own.
"""

from __future__ import annotations

import ray._private.node
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class IsolatedFakeMultiNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        folder = f"runtime_resources_node{self._next_node_id + 1}"  # the parent numbers nodes from 1
        node_cls = ray._private.node.Node

        def node(params, **kwargs):
            params.runtime_env_dir_name = folder
            return node_cls(params, **kwargs)

        with self.lock:  # node creation is serialised by this lock; restore the class right after
            ray._private.node.Node = node
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.node.Node = node_cls
