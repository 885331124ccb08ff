"""Session-wide real parts for tests (DESIGN §1): one local Ray, one S3 server on loopback, real photos.

- `ray_local`: ONE local Ray instance per test session (2 CPUs), initialised in this process;
  subprocess drivers join it with `env={**os.environ, **ray_local.env}`.
- `s3_server`: ONE moto `ThreadedMotoServer` on 127.0.0.1 (any free port); `make_bucket()` gives each
  test its own bucket; `storage_options` (fsspec/s3fs) and `env` (AWS variables) reach it.
- `real_images`: small real photos bundled in the scikit-image and scikit-learn wheels.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY_TEST_CPUS = 2


@dataclass(frozen=True)
class RayLocal:
    address: str  # GCS address, for RAY_ADDRESS
    num_cpus: int

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address}


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance with 2 CPUs shared by the whole session (started once, ~5 s)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    from pipelines.cluster import start_local_ray

    # Never a Ray that happens to run on the machine; its processes know its address (see
    # pipelines.cluster: Ray Train's cleaner would otherwise ask whichever Ray started last).
    ctx = start_local_ray(num_cpus=RAY_TEST_CPUS, object_store_memory=512 * 1024**2, log_to_driver=True)
    yield RayLocal(address=ctx.address_info["gcs_address"], num_cpus=RAY_TEST_CPUS)
    ray.shutdown()


@dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    region: str = "us-east-1"
    buckets: list[str] = field(default_factory=list)

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options (what `--storage-options` takes)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint_url,
            client_kwargs={"region_name": self.region}, use_listings_cache=False, skip_instance_cache=True,
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """A new empty bucket; returns its name."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                              aws_secret_access_key=self.secret, region_name=self.region)
        client.create_bucket(Bucket=name)  # us-east-1: no location constraint
        self.buckets.append(name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 on 127.0.0.1 for the whole session. The secret is unique so tests can grep for leaks."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(
        endpoint_url=f"http://{host}:{port}",
        key="AKIATESTKEY" + uuid.uuid4().hex[:8].upper(),
        secret="moto-secret-" + uuid.uuid4().hex,
    )
    server.stop()


@dataclass(frozen=True)
class RealImage:
    name: str
    path: Path

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    def open(self):
        from PIL import Image

        return Image.open(self.path)


_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@pytest.fixture(scope="session")
def real_images() -> list[RealImage]:
    """Real photos (JPEG and PNG, colour and grey, 300-640 px) from the scikit-image/scikit-learn wheels."""
    found: list[RealImage] = []
    try:
        import skimage

        root = Path(skimage.__file__).parent / "data"
        found += [RealImage(n.split(".")[0], root / n) for n in _SKIMAGE_PHOTOS if (root / n).is_file()]
    except ImportError:
        pass
    import sklearn

    root = Path(sklearn.__file__).parent / "datasets" / "images"
    found += [RealImage(n.split(".")[0], root / n) for n in _SKLEARN_PHOTOS if (root / n).is_file()]
    assert len(found) >= 2, "no real photos found (install scikit-learn / scikit-image)"
    return found


@pytest.fixture(scope="session")
def animated_gif_path() -> Path | None:
    """scikit-image's small real animated GIF, when installed."""
    try:
        import skimage
    except ImportError:
        return None
    path = Path(skimage.__file__).parent / "data" / "no_time_for_that_tiny.gif"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def subprocess_env():
    """A function: os.environ plus extra dicts, with the repo first on PYTHONPATH (for `python -m jobs.x`)."""
    root = str(Path(__file__).resolve().parents[1])

    def make(*extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for e in extra:
            env.update(e)
        return env

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A `tiny` tokenizer checkpoint (seeded) whose tokens depend on the image: a fresh model's code
    head is so small that every image maps to the centre code, which would hide mixed-up rows."""
    import torch

    from flextok import FlexTok

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FlexTok.from_preset("tiny").eval()
    state = model.state_dict()
    state["encoder.to_codes.weight"] = state["encoder.to_codes.weight"] * 60.0
    model.load_state_dict(state)
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.safetensors"
    model.save_pretrained(path)
    return path
