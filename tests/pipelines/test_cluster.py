"""`pipelines.cluster`: a local Ray whose every process knows its own address, so that Ray Train's
placement-group cleaner asks its own Ray about its controller (the quickstart test checks the run
is free of the cleaner's warnings)."""

import os

from pipelines.cluster import ADDRESS_ENV, GCS_PORT_ENV


def test_workers_of_the_local_ray_know_its_address_and_the_driver_env_is_untouched(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def env_of_a_worker():
        return os.environ.get(ADDRESS_ENV), os.environ.get(GCS_PORT_ENV)

    address, port = ray.get(env_of_a_worker.remote())
    assert address == ray_local.address and address.endswith(":" + port)
    assert ADDRESS_ENV not in os.environ and GCS_PORT_ENV not in os.environ  # restored after start
