"""An S3-compatible server on 127.0.0.1 for tests that use a DVC remote over the network.

moto's server (the test extra's ``moto[s3]``) answers the S3 API over HTTP on a port the system
picks, the same protocol DVC's ``dvc-s3`` plugin speaks to AWS, MinIO or any S3-compatible store:
DVC reaches it through ``endpointurl`` with credentials from the environment, as the retrain
workflow configures a real one. It keeps objects in this process's memory, and goes with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# any values do for moto; the names are the ones the retrain workflow's secrets fill
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tlpipe-test", "AWS_SECRET_ACCESS_KEY": "tlpipe-test-secret"}
# settings on the machine that would point DVC's S3 client elsewhere than the test server
FOREIGN_AWS_SETTINGS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)


@dataclass(frozen=True)
class S3Remote:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        """The DVC remote's URL, as a team would set it: ``s3://BUCKET/PREFIX``."""
        return f"s3://{self.bucket}/{self.prefix}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self) -> set[str]:
        """Every object under the prefix, read back over HTTP."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        )
        return {entry["Key"] for page in pages for entry in page.get("Contents", [])}

    def holds(self, md5: str) -> bool:
        """Whether DVC pushed the object of this hash (DVC 3's layout: files/md5/XX/REST)."""
        return f"{self.prefix}/files/md5/{md5[:2]}/{md5[2:]}" in self.keys()


def s3_environment(base: Mapping[str, str], scratch: Path) -> dict[str, str]:
    """``base`` with the test server's credentials, and nothing of the machine's own AWS setup
    (``scratch``: a folder for the empty AWS config files that stand in for ``~/.aws``)."""
    env = {k: v for k, v in base.items() if k not in FOREIGN_AWS_SETTINGS}
    env.update(CREDENTIALS)
    for name, variable in (("config", "AWS_CONFIG_FILE"), ("credentials", "AWS_SHARED_CREDENTIALS_FILE")):
        empty = scratch / f"aws-{name}"  # botocore wants a file: /dev/null is "not found"
        empty.write_text("")
        env[variable] = str(empty)
    bypass = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env["NO_PROXY"] = env["no_proxy"] = bypass  # a proxy set for the registries must not take loopback
    return env


@contextmanager
def s3_server(bucket: str = "tlpipe-dvc", prefix: str = "store") -> Iterator[S3Remote]:
    """moto's S3 server on a free loopback port, with one empty bucket; stopped on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: the system picks
    access_log = logging.getLogger("werkzeug")  # one line per request: hundreds in a push
    level = access_log.level
    access_log.setLevel(logging.WARNING)
    server.start()
    try:
        host, port = server.get_host_and_port()
        remote = S3Remote(endpoint=f"http://{host}:{port}", bucket=bucket, prefix=prefix)
        remote.client().create_bucket(Bucket=bucket)
        yield remote
    finally:
        server.stop()
        access_log.setLevel(level)
