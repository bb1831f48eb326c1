"""The shared fixtures start real services."""

import redis


def test_redis_fixture_serves(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.set("kvmesh:probe", "1")
    assert client.get("kvmesh:probe") == b"1"


def test_ray_fixture_runs_tasks(ray_cluster):
    @ray_cluster.remote(num_cpus=0.1)
    def square(x):
        return x * x

    assert ray_cluster.get(square.remote(7)) == 49
